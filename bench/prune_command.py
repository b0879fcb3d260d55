"""Wall time of a whole ``lifelong-delta prune --method dare`` against ``cp -r`` and ``mergekit-yaml``.

Also the CLI's start-up (``--help``, argument errors) against ``import torch``. Each command runs as a user
runs it (a subprocess, page cache warm), and the ratios are taken within one run.

Goals, each a ratio within one run:

* a whole ``prune --method dare`` of a sharded bf16 checkpoint in <= 3x the wall time of ``cp -r`` of its
  fine-tune, and the same for fp32;
* >= 5x faster than ``mergekit-yaml`` on the same DARE job (dare_linear, density 0.1), whole command;
* ``--help``, ``prune --help`` and argument errors in < 0.5x the wall time of ``python -c "import torch"``.

The checkpoint pairs are Llama-architecture models (transformers' ``LlamaConfig`` random init: GQA, untied
embeddings, vocab 32000, intermediate ~2.7x hidden), saved by ``save_pretrained`` as sharded safetensors with
their config; the fine-tune is base + Gaussian noise of 1e-3 x each tensor's RMS, added in fp32 and cast back.
They are built once per dtype and size and cached under ``--cache-dir`` (about 40 s and 2.3 GB of RAM for a
1 GB pair). Every command runs ``--repeats`` times, the commands interleaved round by round; the median wall
time is reported with the command's peak RSS (GNU ``/usr/bin/time``'s ``%M``). Outputs are deleted (and the
file system synced) between runs, outside the timing. Every file of both checkpoints is read once before the
first run, so the page cache is warm; the start-up commands run once, untimed, to warm the interpreter's files
as well. Children run with HF_HUB_OFFLINE=1 and without PYTHONDONTWRITEBYTECODE, so they read cached bytecode
as a user's second run does.

    .venv/bin/python bench/prune_command.py [--size-gb 1] [--dtypes bfloat16,float32] [--repeats 3]
        [--cache-dir ~/.cache/lifelong_delta/bench] [--mergekit-yaml PATH | --setup-mergekit] [--json PATH]

mergekit is never a dependency of this project. It runs from a separate venv outside the repository that sees
the project venv's packages (torch, transformers, pydantic, ...) through a ``.pth`` file, so it adds ~36 MB
and leaves ``.venv`` untouched. ``--setup-mergekit`` performs these commands (mergekit 0.1.5 needs
transformers >= 5; the four packages are the ones of its requirements missing from ``.venv``):

    .venv/bin/python -m venv ~/.cache/lifelong_delta/peer-venv
    .venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))" \\
        > ~/.cache/lifelong_delta/peer-venv/lib/python3.11/site-packages/_lifelong_delta_venv.pth
    ~/.cache/lifelong_delta/peer-venv/bin/python -m pip install -qq --no-deps \\
        mergekit==0.1.5 immutables sentencepiece protobuf

and then uses ``~/.cache/lifelong_delta/peer-venv/bin/mergekit-yaml``. Its config is ``merge_method:
dare_linear``, ``base_model: BASE``, one model FT with ``weight: 1.0, density: 0.1``, ``dtype: float32``
(compute in fp32, as ours does) and ``out_dtype`` the checkpoint's dtype; it runs as
``mergekit-yaml CONFIG OUT --random-seed 0 --quiet --no-copy-tokenizer`` (the synthetic checkpoints have no
tokenizer, and looking for one costs mergekit 0.5-1.5 s; CPU is its default device; its other options at their
defaults; add more with ``--mergekit-args``). Its output keeps 10.0 % of each delta, rescaled by 10.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lifelong_delta.outputs import atomic_dir, make_temp_dir

PROJECT_VENV_BIN = Path(sys.executable).parent
DEFAULT_CACHE = Path.home() / ".cache" / "lifelong_delta" / "bench"
PEER_VENV = Path.home() / ".cache" / "lifelong_delta" / "peer-venv"
MERGEKIT_PACKAGES = ("mergekit==0.1.5", "immutables", "sentencepiece", "protobuf")
GOAL_VS_CP = 3.0  # prune <= 3x cp -r
GOAL_VS_MERGEKIT = 5.0  # mergekit / prune >= 5
GOAL_VS_TORCH = 0.5  # start-up commands < 0.5x import torch
NOISE_REL = 1e-3  # fine-tune = base + N(0, (NOISE_REL * rms)^2) per tensor
VOCAB = 32000


# ------------------------------------------------------------------------------------------------ checkpoints
def llama_shape(size_gb: float, itemsize: int, tied: bool = False) -> dict[str, int]:
    """A Llama shape whose parameters take about ``size_gb`` GB at ``itemsize`` bytes each.

    hidden 2048 (16 heads, 4 KV heads, intermediate 5504) from 300 M parameters on, else hidden 1024 (8 heads,
    2 KV heads, intermediate 2752); the number of layers sets the size.
    """
    hidden, heads, kv = (2048, 16, 4) if size_gb * 1e9 / itemsize >= 300e6 else (1024, 8, 2)
    inter = round(hidden * 2.6875 / 64) * 64  # 5504 for 2048, as OpenLLaMA 3B / TinyLlama-like ratios
    head_dim = hidden // heads
    per_layer = (
        2 * hidden * hidden
        + 2 * hidden * kv * head_dim  # q, o; k, v
        + 3 * hidden * inter
        + 2 * hidden
    )  # gate, up, down; two RMSNorms
    fixed = (1 if tied else 2) * VOCAB * hidden + hidden  # embed_tokens (and an untied lm_head); final norm
    layers = max(1, round((size_gb * 1e9 / itemsize - fixed) / per_layer))
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
    }


@dataclass
class Pair:
    dtype: str
    base: Path
    ft: Path
    params: int
    nbytes: int
    shards: int
    shape: dict[str, int]
    build_s: float | None = None
    build_peak_rss_gb: float | None = None


def _weights_bytes(d: Path) -> tuple[int, int]:
    files = list(d.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files), len(files)


@torch.no_grad()
def build_pair(cache_dir: Path, size_gb: float, dtype_name: str, shard: str, tied: bool = False) -> Pair:
    """Base (random init) and fine-tune (base + noise) checkpoints, built once and cached.

    The model is created directly in ``dtype`` (transformers' ``from_config(dtype=...)``) and perturbed one
    tensor at a time in fp32, so peak memory is about one checkpoint plus one tensor's fp32 temporaries.
    """
    dtype = getattr(torch, dtype_name)
    shape = llama_shape(size_gb, dtype.itemsize, tied)
    key = (
        f"llama-h{shape['hidden_size']}-l{shape['num_hidden_layers']}-v{VOCAB}-{dtype_name}"
        f"-shard{shard}-noise{NOISE_REL:g}{'-tied' if tied else ''}"
    )
    root = cache_dir / key
    if (root / "pair.json").is_file():
        meta = json.loads((root / "pair.json").read_text())
        return Pair(dtype_name, root / "base", root / "ft", meta["params"], meta["nbytes"], meta["shards"], shape)

    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    with atomic_dir(root) as tmp:  # a killed build's folder goes on the next run
        torch.manual_seed(0)
        config = LlamaConfig(**shape, tie_word_embeddings=tied, max_position_embeddings=4096)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp / "base", max_shard_size=shard)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            w = p.float()
            rms = float(w.square().mean().sqrt())
            w.add_(torch.randn(w.shape, generator=g).mul_(NOISE_REL * rms))
            p.copy_(w)
            del w
        model.save_pretrained(tmp / "ft", max_shard_size=shard)
        del model
        nbytes, shards = _weights_bytes(tmp / "ft")
        (tmp / "pair.json").write_text(
            json.dumps(
                {"params": params, "nbytes": nbytes, "shards": shards, "shape": shape, "dtype": dtype_name}, indent=2
            )
            + "\n"
        )
    return Pair(
        dtype_name,
        root / "base",
        root / "ft",
        params,
        nbytes,
        shards,
        shape,
        build_s=time.perf_counter() - t0,
        build_peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    )


def warm_page_cache(*dirs: Path) -> None:
    """Read every file under ``dirs`` once."""
    for d in dirs:
        for f in sorted(d.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.readinto(_BUF):
                        pass


_BUF = bytearray(16 << 20)


# ------------------------------------------------------------------------------------------------ mergekit
def setup_mergekit(venv: Path) -> Path:
    """Create ``venv`` seeing this venv's packages through a .pth file and pip-install mergekit into it."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.is_file():
        return exe
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "_lifelong_delta_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([python, "-m", "pip", "install", "-qq", "--no-deps", *MERGEKIT_PACKAGES], check=True)
    return exe


def mergekit_config(pair: Pair, path: Path) -> Path:
    """A dare_linear config: base_model + one fine-tune with weight 1.0 and density 0.1 (p = 0.9)."""
    path.write_text(
        "merge_method: dare_linear\n"
        f"base_model: {pair.base}\n"
        "models:\n"
        f"  - model: {pair.ft}\n"
        "    parameters:\n"
        "      weight: 1.0\n"
        "      density: 0.1\n"
        "dtype: float32\n"
        f"out_dtype: {pair.dtype}\n"
    )
    return path


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Command:
    label: str
    argv: list[str]
    group: str  # "prune:<dtype>" or "start-up"
    out: Path | None = None  # deleted before each run
    expect_error: bool = False
    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)  # bytes
    load: list[float] = field(default_factory=list)  # 1-min load average when the run started

    @property
    def median(self) -> float:
        return statistics.median(self.times)


TIME = "/usr/bin/time"  # GNU time: its child's peak RSS; a child forked from this process would inherit ours
HAVE_TIME = os.access(TIME, os.X_OK)
RSS_NOTE = "" if HAVE_TIME else " (no /usr/bin/time: upper bounds, including this script's RSS at fork)"


def run_once(cmd: Command, env: dict[str, str], log: Path) -> None:
    """Run ``cmd`` once, recording its wall time and its peak RSS.

    The peak RSS comes from GNU ``/usr/bin/time -f %M`` (Debian package ``time``): a child forked directly
    from this process starts with this process's high-water mark, so its own ``wait4`` rusage would overstate
    it.
    Without ``/usr/bin/time`` that rusage is used anyway, an upper bound (see :data:`RSS_NOTE`).
    """
    if cmd.out is not None and cmd.out.exists():
        shutil.rmtree(cmd.out)
    os.sync()  # start every run with no dirty pages of the previous one waiting for writeback
    rss_file = log.with_suffix(".rss")
    argv = [TIME, "-f", "%M", "-o", str(rss_file), *cmd.argv] if HAVE_TIME else cmd.argv
    cmd.load.append(os.getloadavg()[0])
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    failed = proc.returncode != 0
    if failed != cmd.expect_error:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(
            f"error: {cmd.label} exited {proc.returncode} (expected "
            f"{'an error' if cmd.expect_error else '0'}): {shlex.join(cmd.argv)}\n{tail}"
        )
    cmd.times.append(wall)
    if HAVE_TIME:  # on a non-zero exit GNU time writes "Command exited with non-zero status N" first
        cmd.rss.append(int(rss_file.read_text().split()[-1]) * 1024)
    else:
        cmd.rss.append(usage.ru_maxrss * 1024)  # ru_maxrss is KiB on Linux


def tiny_pair(cache_dir: Path, dtype_name: str) -> tuple[Path, Path]:
    """A two-tensor checkpoint pair (safetensors + config.json) to warm up a prune run of ``dtype_name``."""
    from safetensors.torch import save_file

    root = cache_dir / f"tiny-{dtype_name}"
    if not (root / "ft" / "config.json").is_file():
        g = torch.Generator().manual_seed(0)
        dtype = getattr(torch, dtype_name)
        w = {
            "model.layers.0.mlp.up_proj.weight": torch.randn(512, 512, generator=g),  # parallel kernel size
            "model.norm.weight": torch.ones(512),
        }  # serial kernel size
        for which, noise in (("base", 0.0), ("ft", 1e-3)):
            (root / which).mkdir(parents=True, exist_ok=True)
            tensors = {k: (v + noise).to(dtype) for k, v in w.items()}
            save_file(tensors, str(root / which / "model.safetensors"), metadata={"format": "pt"})
            (root / which / "config.json").write_text('{"model_type": "llama"}\n')
    return root / "base", root / "ft"


def warm_up(
    cmds: list[Command], pairs: list[Pair], cache_dir: Path, work: Path, env: dict[str, str], log: Path
) -> None:
    """Untimed: each start-up command once, and a prune of a tiny pair per dtype (bytecode, numba's cache)."""
    for c in cmds:
        if c.group == "start-up":
            run_once(c, env, log)
    for pair in pairs:
        ours = next(c for c in cmds if c.group == f"prune:{pair.dtype}" and c.label.startswith("lifelong"))
        base, ft = tiny_pair(cache_dir, pair.dtype)
        argv = [str(base) if a == str(pair.base) else str(ft) if a == str(pair.ft) else a for a in ours.argv]
        run_once(Command("warm-up prune of a tiny pair", argv, "warm-up", ours.out), env, log)
    for c in cmds:
        c.times.clear()
        c.rss.clear()
        c.load.clear()


def commands_for(pairs: list[Pair], work: Path, mergekit: Path | None, mergekit_args: list[str]) -> list[Command]:
    """Per dtype: cp -r, our prune and mergekit-yaml (if available); then the start-up commands."""
    ld = str(PROJECT_VENV_BIN / "lifelong-delta")
    cmds = []
    for pair in pairs:
        out, group = work / f"out-{pair.dtype}", f"prune:{pair.dtype}"
        cmds.append(Command("cp -r FT OUT", ["cp", "-r", str(pair.ft), str(out)], group, out))
        prune = [
            ld,
            "prune",
            "--base",
            str(pair.base),
            "--finetuned",
            str(pair.ft),
            "--out",
            str(out),
            "--method",
            "dare",
            "--p",
            "0.9",
            "--seed",
            "0",
            "--progress",
            "false",
        ]
        cmds.append(Command("lifelong-delta prune --method dare --p 0.9", prune, group, out))
        if mergekit is not None:
            cfg = mergekit_config(pair, work / f"dare_linear-{pair.dtype}.yaml")
            merge = [
                str(mergekit),
                str(cfg),
                str(out),
                "--random-seed",
                "0",
                "--quiet",
                "--no-copy-tokenizer",
                *mergekit_args,
            ]
            cmds.append(Command("mergekit-yaml dare_linear (density 0.1)", merge, group, out))
    pair, out = pairs[0], work / "out-startup"
    valid = ["--base", str(pair.base), "--finetuned", str(pair.ft), "--method", "dare", "--progress", "false"]
    python = str(PROJECT_VENV_BIN / "python")
    cmds += [
        Command('python -c "import torch"', [python, "-c", "import torch"], "start-up"),
        Command("lifelong-delta --help", [ld, "--help"], "start-up"),
        Command("lifelong-delta prune --help", [ld, "prune", "--help"], "start-up"),
        Command(
            "lifelong-delta prune --p 2 (bad value)",
            [ld, "prune", *valid, "--out", str(out), "--p", "2"],
            "start-up",
            out,
            expect_error=True,
        ),
        Command("lifelong-delta prune (missing --out)", [ld, "prune", *valid], "start-up", out, expect_error=True),
    ]
    return cmds


# ------------------------------------------------------------------------------------------------ report
def _ok(good: bool) -> str:
    return "yes" if good else "NO"


def _row_times(c: Command) -> str:
    return " / ".join(f"{t:.2f}" for t in c.times)


def report(pairs: list[Pair], cmds: list[Command], repeats: int, mergekit_note: str | None) -> None:
    for pair in pairs:
        group = [c for c in cmds if c.group == f"prune:{pair.dtype}"]
        cp, ours = group[0], group[1]
        mk = group[2] if len(group) > 2 else None
        s = pair.shape
        print(
            f"\n### {pair.dtype}: Llama h{s['hidden_size']} x {s['num_hidden_layers']} layers "
            f"(GQA {s['num_attention_heads']}/{s['num_key_value_heads']}, ffn {s['intermediate_size']}, "
            f"vocab {s['vocab_size']}), {pair.params / 1e6:.0f} M params, {pair.nbytes / 1e9:.2f} GB in "
            f"{pair.shards} shards; median of {repeats}\n"
        )
        print(f"| command | median s | runs (s) | peak RSS MB{RSS_NOTE} | x cp -r | mergekit / this | goal | ok |")
        print("|---|---:|---|---:|---:|---:|---|---|")
        for c in group:
            ratio = c.median / cp.median
            vs_mk = f"{mk.median / c.median:.2f}" if mk is not None and c is ours else "–"
            goal = ok = "–"
            if c is ours:
                goal = f"<= {GOAL_VS_CP:g}x cp" + (f", >= {GOAL_VS_MERGEKIT:g}x mergekit" if mk else "")
                good = ratio <= GOAL_VS_CP and (mk is None or mk.median / c.median >= GOAL_VS_MERGEKIT)
                ok = _ok(good)
            print(
                f"| `{c.label}` | {c.median:.2f} | {_row_times(c)} | {max(c.rss) / 1e6:,.0f} | "
                f"{ratio:.1f} | {vs_mk} | {goal} | {ok} |"
            )
        if mk is None and mergekit_note:
            print(f"| `mergekit-yaml` | {mergekit_note} | – | – | – | – | – | – |")
    start = [c for c in cmds if c.group == "start-up"]
    torch_c = start[0]
    print(f"\n### start-up (median of {repeats})\n")
    print(f"| command | median s | runs (s) | peak RSS MB{RSS_NOTE} | x import torch | goal | ok |")
    print("|---|---:|---|---:|---:|---|---|")
    for c in start:
        ratio = c.median / torch_c.median
        goal, ok = ("–", "–") if c is torch_c else (f"< {GOAL_VS_TORCH:g}", _ok(ratio < GOAL_VS_TORCH))
        print(
            f"| `{c.label}` | {c.median:.2f} | {_row_times(c)} | {max(c.rss) / 1e6:,.0f} | {ratio:.2f} | "
            f"{goal} | {ok} |"
        )


def describe_source(env: dict[str, str]) -> str:
    """Where the timed ``lifelong_delta`` comes from, with its git commit and whether the tree has changes."""
    code = "import lifelong_delta, os; print(os.path.dirname(os.path.dirname(lifelong_delta.__file__)))"
    where = subprocess.run(
        [str(PROJECT_VENV_BIN / "python"), "-c", code], env=env, cwd="/", check=False, capture_output=True, text=True
    ).stdout.strip()
    git = subprocess.run(
        ["git", "-C", where, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
    )
    if git.returncode != 0:
        return where
    dirty = subprocess.run(
        ["git", "-C", where, "status", "--porcelain", "--", "lifelong_delta"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    changes = f" + {len(dirty)} changed files under lifelong_delta/" if dirty else ""
    return f"{where} at {git.stdout.strip()}{changes}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of EACH checkpoint, per dtype")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: bfloat16, float16, float32")
    ap.add_argument("--shard-size", default="200MB", help="input shard size (save_pretrained max_shard_size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the checkpoint pairs are cached")
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="parent of the outputs (default: --cache-dir, i.e. the inputs' file system)",
    )
    ap.add_argument(
        "--mergekit-yaml",
        default=None,
        help=f"path of a mergekit-yaml executable (default: {PEER_VENV}/bin/mergekit-yaml if it exists)",
    )
    ap.add_argument(
        "--setup-mergekit",
        action="store_true",
        help=f"create {PEER_VENV} with mergekit first (see the module docstring)",
    )
    ap.add_argument("--mergekit-args", default="", help="extra options for mergekit-yaml, one shell-quoted string")
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit even if it is available")
    ap.add_argument(
        "--src",
        type=Path,
        default=None,
        help="run lifelong_delta from this source tree (put first on PYTHONPATH), e.g. "
        "'git archive COMMIT | tar -x -C DIR' of another commit; default: the installed package",
    )
    ap.add_argument("--json", default=None, help="also write the raw numbers to this JSON file")
    ap.add_argument("--build-only", action="store_true", help="build (or find) the checkpoint pairs and stop")
    args = ap.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's second run reads cached bytecode
    if args.src is not None:
        if not (args.src / "lifelong_delta" / "__init__.py").is_file():
            sys.exit(f"error: --src {args.src} has no lifelong_delta/__init__.py")
        env["PYTHONPATH"] = os.pathsep.join([str(args.src.resolve()), *filter(None, [env.get("PYTHONPATH")])])
    source = describe_source(env)
    print(f"(lifelong_delta: {source})", file=sys.stderr)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    mergekit: Path | None = None
    mergekit_note = None
    if args.setup_mergekit:
        mergekit = setup_mergekit(PEER_VENV)
    elif args.mergekit_yaml:
        mergekit = Path(args.mergekit_yaml)
    elif (PEER_VENV / "bin" / "mergekit-yaml").is_file():
        mergekit = PEER_VENV / "bin" / "mergekit-yaml"
    elif shutil.which("mergekit-yaml"):
        mergekit = Path(shutil.which("mergekit-yaml"))  # type: ignore[arg-type]
    if args.no_mergekit:
        mergekit = None
    if mergekit is None:
        mergekit_note = "not run (no mergekit-yaml; pass --setup-mergekit or --mergekit-yaml PATH)"

    pairs = []
    for dtype_name in args.dtypes.split(","):
        pair = build_pair(args.cache_dir, args.size_gb, dtype_name.strip(), args.shard_size)
        if pair.build_s is not None:
            print(
                f"(built the {pair.dtype} pair in {pair.build_s:.0f} s; peak RSS of this process so far "
                f"{pair.build_peak_rss_gb:.2f} GB)",
                file=sys.stderr,
            )
        pairs.append(pair)
        print(f"({pair.dtype} pair: {pair.base.parent}, {pair.nbytes / 1e9:.2f} GB x 2)", file=sys.stderr)
    if args.build_only:
        return
    free_gb = shutil.disk_usage(args.cache_dir).free / 1e9
    need_gb = 1.2 * max(p.nbytes for p in pairs) / 1e9
    if free_gb < need_gb:
        sys.exit(f"error: {args.cache_dir} has {free_gb:.1f} GB free; the outputs need about {need_gb:.1f} GB")

    work = make_temp_dir(args.work_dir or args.cache_dir, ".prune_command-")
    try:
        cmds = commands_for(pairs, work, mergekit, shlex.split(args.mergekit_args))
        warm_page_cache(*[d for p in pairs for d in (p.base, p.ft)])
        log = work / "last.log"
        warm_up(cmds, pairs, args.cache_dir, work, env, log)
        t0 = time.perf_counter()
        for r in range(args.repeats):
            for c in cmds:
                run_once(c, env, log)
                print(
                    f"round {r + 1}/{args.repeats}: {c.group:16s} {c.label:45s} {c.times[-1]:7.2f} s", file=sys.stderr
                )
        for c in cmds:
            if c.out is not None and c.out.exists():
                shutil.rmtree(c.out)
        print(
            f"(timed runs took {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}; torch {torch.__version__})",
            file=sys.stderr,
        )
        print(f"lifelong_delta: {source}; mergekit-yaml: {mergekit or 'none'}; {os.cpu_count()} CPUs")
        report(pairs, cmds, args.repeats, mergekit_note)
        if args.json:
            data = {
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "lifelong_delta": source,
                "mergekit_yaml": str(mergekit) if mergekit else None,
                "pairs": [
                    {
                        "dtype": p.dtype,
                        "base": str(p.base),
                        "ft": str(p.ft),
                        "params": p.params,
                        "bytes": p.nbytes,
                        "shards": p.shards,
                        "shape": p.shape,
                    }
                    for p in pairs
                ],
                "commands": [
                    {
                        "label": c.label,
                        "group": c.group,
                        "argv": c.argv,
                        "times_s": c.times,
                        "median_s": c.median,
                        "peak_rss_bytes": c.rss,
                        "load_average": c.load,
                    }
                    for c in cmds
                ],
            }
            Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
            print(f"wrote {args.json}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
