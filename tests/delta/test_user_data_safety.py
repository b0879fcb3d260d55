"""No command loses a user's data: every case of the data-safety issue, through the real ``lifelong-delta`` command.

Each test runs the console script in a subprocess and asserts the exit status, the one-line message and that every
input's bytes are unchanged (a hash of every file under the test's folder that is not the output).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lifelong_delta.outputs import MARKER, TEMP_MARKER
from tests.delta._checkpoints import (
    make_pair,
    perturbed,
    read_checkpoint,
    tiny_bert_pair,
    tiny_state,
    write_checkpoint,
)

CLI = str(Path(sys.executable).parent / "lifelong-delta")


def _run(*args: str, cwd: Path | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(
        [CLI, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, preexec_fn=preexec
    )


def _tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Hash of every file under ``root`` (not following symlinks, not under ``skip``)."""
    digest = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file() and not path.is_symlink():
            digest[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def _error(res: subprocess.CompletedProcess, *expected: str, code: int = 2) -> str:
    """The single ``error:`` line of a refused command (a status line before it is allowed)."""
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def _prune(base: Path | str, ft: Path | str, out: Path | str, *extra: str, **kw) -> subprocess.CompletedProcess:
    return _run(
        "prune", "--base", base, "--finetuned", ft, "--out", out, "--p", "0.5", "--progress", "false", *extra, **kw
    )


# 1 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["plain", "trailing-slash", "dotdot", "symlink"])
def test_out_containing_the_inputs_is_refused(tmp_path, spelling):
    m = tmp_path / "M"
    m.mkdir()
    base, ft = make_pair(m)
    (m / "NOTES.txt").write_text("my notes")
    (tmp_path / "link").symlink_to(m)
    out = {"plain": m, "trailing-slash": f"{m}/", "dotdot": m / "ft" / "..", "symlink": tmp_path / "link"}[spelling]
    before = _tree(tmp_path)
    res = _prune(base, ft, out, "--overwrite")
    _error(res, "contains --base")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("where", ["inside-ft", "is-ft-via-symlink", "inside-base-via-dotdot"])
def test_out_inside_or_equal_to_an_input_is_refused(tmp_path, where):
    base, ft = make_pair(tmp_path)
    (tmp_path / "ft-link").symlink_to(ft)
    out = {
        "inside-ft": ft / "pruned",
        "is-ft-via-symlink": tmp_path / "ft-link",
        "inside-base-via-dotdot": ft / ".." / "base" / "sub",
    }[where]
    before = _tree(tmp_path)
    res = _prune(base, ft, out, "--overwrite")
    _error(res, "--finetuned" if where != "inside-base-via-dotdot" else "--base")
    assert _tree(tmp_path) == before


# 2 ---------------------------------------------------------------------------------------------------------------
def test_inputs_given_as_files_are_protected_too(tmp_path):
    d = tmp_path / "D"
    for name, sd in (("base", tiny_state()), ("ft", perturbed(tiny_state()))):
        write_checkpoint(d / name, sd, "10GB")
    before = _tree(tmp_path)
    res = _prune(d / "base" / "model.safetensors", d / "ft" / "model.safetensors", d / "base", "--overwrite")
    _error(res, "--out", "contains --base")
    res = _prune(d / "base" / "model.safetensors", d / "ft", d / "base" / "model.safetensors", "--overwrite")
    _error(res, "is the same path as --base")
    assert _tree(tmp_path) == before


# 3 ---------------------------------------------------------------------------------------------------------------
def test_stats_never_writes_its_png_onto_or_into_an_input(tmp_path):
    base, ft = make_pair(tmp_path, shard_size="10GB")
    before = _tree(tmp_path)
    _error(
        _run("stats", "--base", base, "--finetuned", ft, "--png", ft / "model.safetensors"),
        "--png",
        "is inside --finetuned",
    )
    _error(
        _run("stats", "--base", base, "--finetuned", ft / "model.safetensors", "--png", ft / "model.safetensors"),
        "--png",
        "is the same path as --finetuned",
    )
    _error(_run("stats", "--base", base, "--finetuned", ft, "--png", ft / "stats.png"), "is inside --finetuned")
    (tmp_path / "plots").mkdir()
    _error(_run("stats", "--base", base, "--finetuned", ft, "--png", tmp_path / "plots"), "is a folder")  # 11
    (tmp_path / "holiday.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    _error(
        _run("stats", "--base", base, "--finetuned", ft, "--png", tmp_path / "holiday.png"),
        "not a plot written by lifelong-delta",
    )
    assert _tree(tmp_path) == _tree(tmp_path) | before and all(_tree(tmp_path)[k] == v for k, v in before.items())
    ok = _run("stats", "--base", base, "--finetuned", ft, "--png", tmp_path / "stats.png")
    assert ok.returncode == 0, ok.stderr
    again = _run("stats", "--base", base, "--finetuned", ft, "--png", tmp_path / "stats.png")  # its own plot
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in _tree(tmp_path).items() if k in before} == before


# 4 ---------------------------------------------------------------------------------------------------------------
def test_overwrite_replaces_only_this_tools_output(tmp_path):
    base, ft = make_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"123")
    before = _tree(tmp_path)
    _error(_prune(base, ft, out, "--overwrite"), "was not written by lifelong-delta")
    (tmp_path / "file").write_text("a file")
    _error(_prune(base, ft, tmp_path / "file", "--overwrite"), "is an existing file")
    assert _tree(tmp_path) == _tree(tmp_path) | before and (tmp_path / "file").read_text() == "a file"

    mine = tmp_path / "pruned"
    assert _prune(base, ft, mine).returncode == 0
    _error(_prune(base, ft, mine), "already exists; pass --overwrite")
    assert _prune(base, ft, mine, "--overwrite", "--seed", "3").returncode == 0
    (mine / "notes.txt").write_text("added by the user")
    _error(_prune(base, ft, mine, "--overwrite"), "holds files lifelong-delta did not write (notes.txt)")
    assert (mine / "notes.txt").read_text() == "added by the user"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# 5, 6 --------------------------------------------------------------------------------------------------------------
def _slow_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A pair big enough that a prune is still running when the test signals it (96 MB per checkpoint)."""
    g = torch.Generator().manual_seed(0)
    base_sd = {f"layers.{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(24)}
    return (
        write_checkpoint(tmp_path / "base", base_sd, "20MB"),
        write_checkpoint(tmp_path / "ft", perturbed(base_sd), "20MB"),
    )


def _start_and_wait_for_temp(base: Path, ft: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    # magnitude holds whole tensors and sorts them: slow enough to be caught mid-run
    # as at a terminal: a shell starts background jobs (and so, maybe, this test run) with SIGINT ignored, and
    # Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen(
        [
            CLI,
            "prune",
            "--base",
            str(base),
            "--finetuned",
            str(ft),
            "--out",
            str(out),
            "--method",
            "magnitude",
            "--p",
            "0.5",
            "--out-shard-size",
            "4MB",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        temps = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
        if temps and any(p.name != TEMP_MARKER for p in temps[0].iterdir()):
            # frozen at once, wherever it is: on a loaded machine the test may not get the CPU back before the
            # prune would have finished; the caller's signal is handled after SIGCONT
            proc.send_signal(signal.SIGSTOP)
            return proc, temps[0]
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"the prune never started writing: {proc.communicate()[1]}")


def test_a_killed_run_leaves_a_temp_that_the_next_run_removes(tmp_path):
    base, ft = _slow_pair(tmp_path)
    out = tmp_path / "out"
    proc, temp = _start_and_wait_for_temp(base, ft, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert temp.is_dir() and (temp / TEMP_MARKER).is_file() and not out.exists()
    res = _prune(base, ft, out, "--out-shard-size", "4MB")
    assert res.returncode == 0, res.stderr
    assert f"note: removed {temp}" in res.stderr and "left by an interrupted lifelong-delta run" in res.stderr
    assert not temp.exists() and read_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "out"]


def test_a_running_prunes_temp_is_left_alone(tmp_path):
    base, ft = _slow_pair(tmp_path)
    proc, temp = _start_and_wait_for_temp(base, ft, tmp_path / "out")  # stopped, but alive
    try:
        res = _prune(base, ft, tmp_path / "other")  # writes next to the running prune's temp folder
        assert res.returncode == 0 and "note: removed" not in res.stderr
        assert temp.exists()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_print_one_line_and_clean_up(tmp_path, sig, code):
    base, ft = _slow_pair(tmp_path)
    before = _tree(tmp_path)
    out = tmp_path / "out"
    proc, temp = _start_and_wait_for_temp(base, ft, out)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("lifelong-delta prune: interrupted"), stderr
    assert not temp.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]
    assert _tree(tmp_path) == before


# 7 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out", [".", "..", "./"])
def test_out_current_folder_is_refused_before_any_work(tmp_path, out):
    base, ft = make_pair(tmp_path)
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    before = _tree(tmp_path)
    _error(
        _run("prune", "--base", base, "--finetuned", ft, "--out", out, "--overwrite", cwd=work),
        "--out",
        "current folder",
    )
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["here"]
    assert list(work.iterdir()) == []


# 8, 11 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ("../../elsewhere/model.safetensors", "outside the model folder"),
        ("/etc/passwd", "outside the model folder"),
        ("LIST", "'weight_map' must be an object"),
    ],
)
def test_index_shard_names_stay_inside_the_model_folder(tmp_path, weight_map, message):
    base, ft = make_pair(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    write_checkpoint(elsewhere, perturbed(tiny_state()), "10GB")
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    names = list(index["weight_map"])
    index["weight_map"] = names if weight_map == "LIST" else {n: weight_map for n in names}
    (ft / "model.safetensors.index.json").write_text(json.dumps(index))
    before = _tree(tmp_path)
    _error(_prune(base, ft, tmp_path / "out"), message)
    _error(_run("stats", "--base", base, "--finetuned", ft), message)
    assert _tree(tmp_path) == before and not (tmp_path / "out").exists()


# 9 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)]
)
def test_output_follows_the_umask(tmp_path, umask, dir_mode, file_mode):
    base, ft = make_pair(tmp_path)
    (ft / "config.json").chmod(0o600)  # a private input file: the copy still follows the umask
    out = tmp_path / "out"
    assert _prune(base, ft, out, umask=umask).returncode == 0
    assert out.stat().st_mode & 0o777 == dir_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {file_mode}, modes
    assert _run("stats", "--base", base, "--finetuned", ft, "--png", tmp_path / "s.png", umask=umask).returncode == 0
    assert (tmp_path / "s.png").stat().st_mode & 0o777 == file_mode


# 11 --------------------------------------------------------------------------------------------------------------
def test_float_base_against_int_finetune_says_what_is_wrong(tmp_path):
    base_sd = tiny_state()
    ft_sd = perturbed(base_sd)
    ft_sd["layers.0.bias"] = torch.arange(8)
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd)
    _error(
        _prune(base, ft, tmp_path / "out"),
        "tensor 'layers.0.bias' is float32 in the base model but int64 in the fine-tuned model",
    )


@pytest.mark.parametrize("method", ["magnitude", "structural", "dare", "wanda-free-darex"])
def test_zero_size_tensors_are_copied(tmp_path, method):
    base_sd = tiny_state()
    base_sd["empty.weight"] = torch.zeros(0, 8)
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=perturbed(base_sd))
    args = ["--method", "darex-q", "--q", "0.7"] if method == "wanda-free-darex" else ["--method", method]
    res = _prune(base, ft, tmp_path / "out", *args)
    assert res.returncode == 0, res.stderr
    assert read_checkpoint(tmp_path / "out")["empty.weight"].shape == (0, 8)


# every option: one line, exit 2, nothing written ------------------------------------------------------------------
BAD_PRUNE = [
    (["--p", "1"], "p=1.0 is outside [0, 1)"),
    (["--p", "-0.1"], "outside [0, 1)"),
    (["--p", "nan"], "--p: expected a float, got 'nan'"),
    (["--p", "0.5", "--p", "x"], "--p: expected a float, got 'x'"),
    (["--method", "ties"], "--method: expected one of dare, darex-q"),
    (["--method", "darex-q"], "needs --q Q"),
    (["--method", "darex-q", "--q", "0"], "q=0.0 must be > 0"),
    (["--method", "darex-q", "--q", "2"], "above 1"),
    (["--method", "darex-q", "--p", "0.5", "--q", "0.1"], "below 1-p"),
    (["--method", "darex-q", "--q", "0.5", "--q-mode", "grid"], "either --q or --q_mode"),
    (["--method", "darex-q", "--q-mode", "grid"], "needs --calib_data"),
    (["--method", "darex-q", "--q-mode", "grid", "--calib-data", "nope.csv"], "--calib_data nope.csv: not found"),
    (["--method", "darex-q", "--q-mode", "grid", "--calib-data", "DIR"], "not a file"),
    (["--method", "wanda"], "needs --calib_data"),
    (["--method", "darex-q", "--q-mode", "analytic", "--eta", "0"], "--eta must be > 0"),
    (["--method", "darex-q", "--q-mode", "analytic", "--analytic-tie-rtol", "1"], "analytic_tie_rtol"),
    (["--out-shard-size", "big"], "out_shard_size"),
    (["--out-shard-size", "0"], "out_shard_size must be positive"),
    (["--calib-samples", "0"], "--calib_samples must be >= 1"),
    (["--batch-size", "0"], "--batch_size must be >= 1"),
    (["--max-length", "0"], "--max_length must be >= 1"),
    (["--seed", "x"], "--seed: expected an int, got 'x'"),
    (["--rescale", "sideways"], "rescale"),
    (["--lora-prune", "factors"], "needs a PEFT adapter directory"),
    (["--structural-axis", "diagonal"], "structural_axis"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize(("args", "message"), BAD_PRUNE, ids=[" ".join(a) for a, _ in BAD_PRUNE])
def test_every_bad_prune_option_is_one_line(tmp_path, args, message):
    base, ft = make_pair(tmp_path)
    (tmp_path / "DIR").mkdir()
    args = [str(tmp_path / "DIR") if a == "DIR" else a for a in args]
    before = _tree(tmp_path)
    res = _run("prune", "--base", base, "--finetuned", ft, "--out", tmp_path / "out", *args, cwd=tmp_path)
    _error(res, message)
    assert _tree(tmp_path) == before and not (tmp_path / "out").exists()


BAD_OTHER = [
    (["stats", "--base", "BASE", "--finetuned", "NOPE"], "--finetuned NOPE: not found"),
    (["stats", "--base", "BASE", "--finetuned", "FT", "--top", "0"], "--top must be >= 1"),
    (["stats", "--base", "BASE", "--finetuned", "FT", "--png", "missing/dir/x.png"], "does not exist"),
    (["recommend", "--base", "BASE", "--finetuned", "FT", "--target-p", "1.5"], "--target_p must be in [0, 1)"),
    (["recommend", "--base", "NOPE", "--finetuned", "FT"], "--base NOPE: not found"),
    (["prune", "--base", "BASE", "--finetuned", "FT"], "the following arguments are required: --out"),
    (["stats", "--base", "BASE", "--finetuned", "FT", "--top", "x"], "--top: expected an int, got 'x'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_OTHER, ids=[" ".join(a) for a, _ in BAD_OTHER])
def test_every_bad_stats_and_recommend_option_is_one_line(tmp_path, args, message):
    base, ft = make_pair(tmp_path)
    before = _tree(tmp_path)
    paths = {"BASE": str(base), "FT": str(ft)}
    res = _run(*[paths.get(a, a) for a in args], cwd=tmp_path)
    _error(res, message)
    assert _tree(tmp_path) == before


def test_calibration_reads_exactly_the_pruned_tensors(tmp_path):
    """A stray ``pytorch_model.bin`` next to the weights that are pruned must not decide q."""
    model = tiny_bert_pair(tmp_path)
    (tmp_path / "calib.jsonl").write_text(
        "".join(json.dumps({"text": f"sentence {i} about cats"}) + "\n" for i in range(8))
    )
    args = [
        "--method",
        "darex-q",
        "--p",
        "0.9",
        "--q-mode",
        "unlabelled",
        "--calib-data",
        tmp_path / "calib.jsonl",
        "--calib-samples",
        "8",
    ]
    clean = _run("prune", "--base", tmp_path / "base", "--finetuned", tmp_path / "ft", "--out", tmp_path / "a", *args)
    assert clean.returncode == 0, clean.stderr
    # the same weights under another name, with a very different stray model next to them
    (tmp_path / "ft" / "model.safetensors").rename(tmp_path / "ft" / "weights.safetensors")
    stray = {k: torch.randn_like(v) * 5 for k, v in model.state_dict().items() if v.is_floating_point()}
    torch.save(stray, tmp_path / "ft" / "pytorch_model.bin")
    before = _tree(tmp_path)
    res = _run("prune", "--base", tmp_path / "base", "--finetuned", tmp_path / "ft", "--out", tmp_path / "b", *args)
    assert res.returncode == 0, res.stderr
    chosen = [line for line in clean.stdout.splitlines() if line.startswith("chose q")]
    assert chosen and chosen == [line for line in res.stdout.splitlines() if line.startswith("chose q")]
    a, b = read_checkpoint(tmp_path / "a"), read_checkpoint(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in _tree(tmp_path).items() if k in before} == before
    (tmp_path / "ft" / "weights.safetensors").unlink()
    _error(
        _run("prune", "--base", tmp_path / "base", "--finetuned", tmp_path / "ft", "--out", tmp_path / "c", *args),
        "no safetensors weights",
    )


def test_marker_lists_every_file_written(tmp_path):
    base, ft = make_pair(tmp_path)
    assert _prune(base, ft, tmp_path / "out").returncode == 0
    record = json.loads((tmp_path / "out" / MARKER).read_text())
    on_disk = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert record["tool"] == "lifelong-delta" and sorted(record["files"] + [MARKER]) == on_disk
