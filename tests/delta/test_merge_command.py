"""``lifelong-delta merge`` end to end: every method against the tensor formulas on sharded tiny checkpoints, a
mergekit YAML against the equivalent flags, every bad input as one ``error:`` line (exit 2) with nothing written, and
outputs that never touch an input (``--overwrite`` included)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifelong_delta.cli import main
from lifelong_delta.delta import merge_command
from lifelong_delta.delta.merge import MergeSpec, merge_tensor
from tests.delta._checkpoints import leftovers, perturbed, read_checkpoint, tiny_state, write_checkpoint

CLI = str(Path(sys.executable).parent / "lifelong-delta")
N_MODELS = 3


def _run(capsys, *args: object) -> tuple[int, str, str]:
    """``lifelong-delta merge ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        main(["merge", "--progress", "false", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Hash of every file under ``root`` except under ``skip``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and not (skip is not None and (p == skip or skip in p.parents))
    }


def _models(
    root: Path, base_sd: dict[str, torch.Tensor] | None = None, fts: list[dict] | None = None, shard_size: str = "1KB"
) -> tuple[Path, list[Path]]:
    base_sd = tiny_state() if base_sd is None else base_sd
    if fts is None:
        fts = [perturbed(base_sd, scale=0.05, seed=i + 1) for i in range(N_MODELS)]
        for i, sd in enumerate(fts):  # non-floating tensors come from the base, not from a fine-tune
            sd["position_ids"] = sd["position_ids"] + i + 1
    base = write_checkpoint(root / "base", base_sd, shard_size)
    paths = [write_checkpoint(root / f"ft{i}", sd, shard_size) for i, sd in enumerate(fts)]
    for i, path in enumerate(paths):
        (path / "config.json").write_text(json.dumps({"model_type": "tiny", "fine_tune": i}))
    return base, paths


def _flags(base: Path, models: list[Path]) -> list[str]:
    return ["--base", str(base), "--models", *map(str, models)]


def _reference(base: Path, models: list[Path], spec: MergeSpec) -> dict[str, torch.Tensor]:
    """Each output tensor from whole tensors through ``merge_tensor`` (non-floating ones from the base)."""
    b = read_checkpoint(base)
    fts = [read_checkpoint(m) for m in models]
    return {n: merge_tensor(t, [f[n] for f in fts], spec, name=n) if t.is_floating_point() else t for n, t in b.items()}


# ----------------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare-linear", "dare-ties", "darex-q"])
def test_every_method_streams_the_formula(tmp_path, capsys, monkeypatch, method):
    monkeypatch.setattr(merge_command, "_CHUNK_ELEMENTS", 7)  # many chunks per tensor, through TIES' tie limits
    base, models = _models(tmp_path)
    out = tmp_path / "out"
    args = [
        *_flags(base, models),
        "--method",
        method,
        "--weights",
        "1",
        "--weights",
        "0.5",
        "--weights",
        "2",
        "--lambda",
        "0.8",
        "--seed",
        "5",
        "--out",
        out,
        "--out-shard-size",
        "1KB",
    ]
    density = None if method == "task-arithmetic" else (0.3, 0.6, 0.9)
    args += [a for d in density or () for a in ("--density", str(d))]
    q = (0.5, 0.7, 0.95) if method == "darex-q" else None
    args += [a for x in q or () for a in ("--q", str(x))]
    code, stdout, err = _run(capsys, *args)
    assert code == 0, err
    assert f"merged 11 tensors ({method}, 3 models); copied 1 from the base and 0 from the first model" in stdout
    assert f"merge: {method} of 3 fine-tune(s)" in err
    spec = MergeSpec(method, (1.0, 0.5, 2.0), density=density, q=q, lambda_=0.8, seed=5)
    got = read_checkpoint(out)
    want = _reference(base, models, spec)
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert json.loads((out / "config.json").read_text())["fine_tune"] == 0  # the first model's files
    assert leftovers(tmp_path) == []


def test_console_script_dtype_and_reproducible_masks(tmp_path):
    base, models = _models(tmp_path)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        res = subprocess.run(
            [
                CLI,
                "merge",
                *_flags(base, models),
                "--method",
                "dare-ties",
                "--p",
                "0.5",
                "--dtype",
                "bfloat16",
                "--seed",
                "9",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
    a, b = read_checkpoint(outs[0]), read_checkpoint(outs[1])
    spec = MergeSpec("dare-ties", (1.0,) * 3, density=(0.5,), seed=9)
    want = {n: t.bfloat16() if t.is_floating_point() else t for n, t in _reference(base, models, spec).items()}
    for name, t in want.items():
        assert torch.equal(a[name], t) and torch.equal(b[name], t), name
    assert a["layers.0.weight"].dtype == torch.bfloat16 and a["position_ids"].dtype == torch.int64


def test_heads_and_prefixed_names_with_exclude(tmp_path, capsys):
    """Fine-tunes ``model.X`` + a head ``score.weight`` against a base ``X``: the head is an error unless
    --exclude names it, then it comes from the first model; names and layout follow the fine-tunes."""
    base_sd = tiny_state()
    fts = []
    for i in range(2):
        sd = {f"model.{k}": v for k, v in perturbed(base_sd, seed=i + 1).items()}
        sd["score.weight"] = torch.full((2, 8), float(i + 1))
        fts.append(sd)
    base, models = _models(tmp_path, base_sd, fts)
    out = tmp_path / "out"
    code, _, err = _run(capsys, *_flags(base, models), "--method", "ties", "--density", "0.5", "--out", out)
    assert code == 2 and "have no counterpart in the base model: score.weight; pass --exclude PATTERN" in err
    assert not out.exists()
    code, stdout, err = _run(
        capsys, *_flags(base, models), "--method", "ties", "--density", "0.5", "--exclude", "score.*", "--out", out
    )
    assert code == 0, err
    assert "copied 1 from the base and 1 from the first model" in stdout
    got = read_checkpoint(out)
    spec = MergeSpec("ties", (1.0, 1.0), density=(0.5,))
    assert list(got) == list(fts[0])
    assert torch.equal(got["score.weight"], fts[0]["score.weight"])
    assert torch.equal(got["model.position_ids"], base_sd["position_ids"])
    for name, t in base_sd.items():
        if t.is_floating_point():
            assert torch.equal(
                got[f"model.{name}"], merge_tensor(t, [f[f"model.{name}"] for f in fts], spec, name=f"model.{name}")
            ), name


# ------------------------------------------------------------------------------------------------------- mergekit
def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_mergekit_config_gives_the_merge_of_the_equivalent_flags(tmp_path, capsys):
    base, models = _models(tmp_path)
    config = _yaml(
        tmp_path / "ties.yaml",
        f"""
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {models[0]}
    parameters: {{weight: 1.0, density: 0.3}}
  - model: {models[1]}
    parameters: {{weight: 0.5}}
  - model: {models[2]}
    parameters: {{density: 0.9}}
parameters: {{weight: 2.0, density: 0.6, normalize: false, lambda: 0.5, int8_mask: true}}
dtype: bfloat16
tokenizer_source: base
""",
    )
    code, _, err = _run(capsys, "--mergekit_config", config, "--seed", "3", "--out", tmp_path / "from-yaml")
    assert code == 0, err
    assert "note: models[0] is the base model; skipped" in err
    line = next(x for x in err.splitlines() if x.startswith(f"merge: --mergekit_config {config} = "))
    flags = shlex.split(line.split(" = ", 1)[1])
    assert flags == [
        "--base",
        str(base),
        "--models",
        *map(str, models),
        "--method",
        "ties",
        "--weights",
        "1",
        "0.5",
        "2",
        "--density",
        "0.3",
        "0.6",
        "0.9",
        "--lambda",
        "0.5",
        "--normalize",
        "false",
        "--dtype",
        "bfloat16",
        "--files_from",
        "base",
    ]
    code, _, err = _run(capsys, *flags, "--seed", "3", "--out", tmp_path / "from-flags")
    assert code == 0, err
    a, b = read_checkpoint(tmp_path / "from-yaml"), read_checkpoint(tmp_path / "from-flags")
    spec = MergeSpec("ties", (1.0, 0.5, 2.0), density=(0.3, 0.6, 0.9), lambda_=0.5, normalize=False)
    want = _reference(base, models, spec)
    for name, t in want.items():
        t = t.bfloat16() if t.is_floating_point() else t
        assert torch.equal(a[name], t) and torch.equal(b[name], t), name
    assert _tree(tmp_path / "from-yaml") == _tree(tmp_path / "from-flags")
    assert json.loads((tmp_path / "from-yaml" / "config.json").read_text()) == {"model_type": "tiny", "hidden_size": 8}


def test_mergekit_dare_ties_keeps_mergekits_default_normalize(tmp_path, capsys):
    base, models = _models(tmp_path)
    config = _yaml(
        tmp_path / "dare.yaml",
        f"""
merge_method: dare_ties
base_model: {base}
models:
"""
        + "".join(f"  - model: {m}\n    parameters: {{weight: 1, density: 0.5}}\n" for m in models),
    )
    flags = [*_flags(base, models), "--method", "dare-ties", "--density", "0.5"]
    runs = {
        "yaml": ["--mergekit_config", config],
        "flags-false": [*flags, "--normalize", "false"],
        "flags-default": flags,
    }
    for label, args in runs.items():
        code, _, err = _run(capsys, *args, "--out", tmp_path / label)
        assert code == 0, err
    assert _tree(tmp_path / "yaml") == _tree(tmp_path / "flags-false") != _tree(tmp_path / "flags-default")


# ----------------------------------------------------------------------------------------------------- bad inputs
def _expect_error(capsys, tmp_path: Path, args: list[object], *expected: str) -> str:
    out = tmp_path / "out"
    before = _tree(tmp_path)
    code, _, err = _run(capsys, *args, "--out", out)
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for text in expected:
        assert text in errors[0], errors[0]
    assert not out.exists() and leftovers(tmp_path) == []
    assert _tree(tmp_path) == before
    return errors[0]


def _bad_model(root: Path, change: str) -> tuple[Path, list[Path]]:
    base_sd = tiny_state()
    fts = [perturbed(base_sd, seed=i + 1) for i in range(N_MODELS)]
    if change == "shape":
        fts[2]["layers.1.weight"] = torch.zeros(8, 9)
    elif change == "missing":
        del fts[1]["layers.2.bias"]
    elif change == "extra":
        fts[2]["extra.weight"] = torch.zeros(2)
    elif change == "integer":
        fts[1]["layers.0.bias"] = torch.zeros(8, dtype=torch.int32)
    elif change == "head":
        for sd in fts:
            sd["score.weight"] = torch.zeros(2, 8)
    elif change == "nan":
        fts[2]["layers.2.weight"][3, 4] = float("nan")  # late in the file: earlier tensors were already written
    return _models(root, base_sd, fts)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("shape", ["ft2 does not match --models", "tensor 'layers.1.weight' has shape [8, 9] there but [8, 8]"]),
        ("missing", ["ft1 does not match", "it lacks 1 tensor(s): layers.2.bias"]),
        ("extra", ["ft2 does not match", "it has 1 more tensor(s): extra.weight"]),
        ("integer", ["tensor 'layers.0.bias' is int32 there but float32 in the first model"]),
        ("head", ["missing from the base model: score.weight (pass --exclude PATTERN"]),
        ("nan", ["tensor 'layers.2.weight' of the fine-tuned #3 model has 1 non-finite value(s)"]),
    ],
)
def test_mismatched_or_broken_models(tmp_path, capsys, change, expected):
    base, models = _bad_model(tmp_path, change)
    _expect_error(capsys, tmp_path, [*_flags(base, models), "--method", "ties", "--density", "0.5"], *expected)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--method", "ties", "--density", "0"], r"density 0 is outside (0, 1]"),
        (["--method", "dare-linear", "--density", "1.5"], r"density 1.5 is outside (0, 1]"),
        (["--method", "dare-ties", "--density", "-0.1"], r"density -0.1 is outside (0, 1]"),
        (["--method", "dare-ties", "--density", "0.5", "--density", "0.5"], "density has 2 values for 3 models"),
        (["--method", "dare-linear", "--p", "1"], "--p 1 is outside [0, 1)"),
        (
            ["--method", "ties", "--density", "0.5", "--weights", "1", "--weights", "2"],
            "--weights has 2 value(s) for 3 model(s)",
        ),
        (
            ["--method", "task-arithmetic", "--weights", "1", "--weights", "1", "--weights", "1", "--weights", "1"],
            "--weights has 4 value(s) for 3 model(s)",
        ),
        (["--method", "ties"], "ties needs density"),
        (["--method", "task-arithmetic", "--density", "0.5"], "task-arithmetic keeps every delta entry"),
        (["--method", "darex-q", "--density", "0.5", "--q", "0.3"], "q 0.3 of model 1 is outside [density, 1]"),
        (["--method", "ties", "--density", "0.5", "--q", "0.7"], "q is the rescale of darex-q"),
        (["--method", "ties", "--density", "0.5", "--p", "0.5"], "pass either --density"),
        (
            ["--method", "ties", "--density", "0.5", "--weights", "1", "--weights", "-1", "--weights", "1"],
            "undoes a negative weight",
        ),
        (["--density", "0.5"], "--method is required"),
        (["--method", "slerp"], "--method: expected one of task-arithmetic, ties"),
        (["--method", "ties", "--density", "0.5", "--dtype", "int8"], "--dtype"),
    ],
)
def test_bad_options(tmp_path, capsys, extra, expected):
    base, models = _models(tmp_path)
    _expect_error(capsys, tmp_path, [*_flags(base, models), *extra], expected)


def test_bad_paths(tmp_path, capsys):
    base, models = _models(tmp_path)
    _expect_error(
        capsys,
        tmp_path,
        ["--base", tmp_path / "nowhere", "--models", models[0], "--method", "task-arithmetic"],
        "--base",
        "nowhere: not found",
    )
    _expect_error(
        capsys,
        tmp_path,
        ["--base", base, "--models", "someone/not-cached", "--method", "task-arithmetic"],
        "--models someone/not-cached",
        "HF_HUB_OFFLINE=1",
    )
    _expect_error(capsys, tmp_path, ["--base", base, "--method", "task-arithmetic"], "--models is required")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("merge_method: slerp\nbase_model: B\nmodels: [{model: M}]\n", "merge_method 'slerp' is not one"),
        ("merge_method: ties\nbase_model: B\nmodels: [{model: M}]\n", "models[0].parameters.weight is required"),
        ("merge_method: ties\nbase_model: B\nslices: []\nmodels: [{model: M}]\n", "'slices' is not supported"),
        (
            "merge_method: ties\nbase_model: B\nmodels: [{model: M, parameters: {weight: [0, 1]}}]\n",
            "per-layer values (lists or filters) are not supported",
        ),
        (
            "merge_method: ties\nbase_model: B\nmodels: [{model: M, parameters: {weight: 1, density: 0}}]\n",
            "density 0 is outside (0, 1]",
        ),
        (
            "merge_method: dare_ties\nbase_model: B\nparameters: {rescale: false}\nmodels: [{model: M}]\n",
            "parameters.rescale False is not supported",
        ),
        (
            "merge_method: ties\nbase_model: B\ntokenizer_source: union\nmodels: [{model: M}]\n",
            "tokenizer_source 'union' is not supported",
        ),
        ("merge_method: [ties\n", "not valid YAML at line"),
        ("merge_method: ties\nbase_model: B\nmodels: [{model: B, parameters: {weight: 1}}]\n", "lists only the base"),
    ],
)
def test_bad_mergekit_configs(tmp_path, capsys, body, expected):
    base, models = _models(tmp_path)
    config = _yaml(
        tmp_path / "m.yaml",
        body.replace("base_model: B", f"base_model: {base}")
        .replace("model: M", f"model: {models[0]}")
        .replace("model: B", f"model: {base}"),
    )
    _expect_error(capsys, tmp_path, ["--mergekit_config", config], f"--mergekit_config {config}", expected)


def test_config_and_merge_flags_do_not_mix(tmp_path, capsys):
    base, models = _models(tmp_path)
    config = _yaml(
        tmp_path / "m.yaml",
        f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {models[0]}, parameters: {{weight: 1}}}}]\n",
    )
    _expect_error(
        capsys, tmp_path, ["--mergekit_config", config, "--method", "ties"], "describes the merge; drop --method"
    )
    _expect_error(capsys, tmp_path, ["--mergekit_config", tmp_path / "none.yaml"], "none.yaml: not found")


# -------------------------------------------------------------------------------------------------- output safety
def test_the_output_never_touches_an_input(tmp_path, capsys):
    base, models = _models(tmp_path)
    flags = [*_flags(base, models), "--method", "task-arithmetic"]
    before = _tree(tmp_path)
    for out, expected in (
        (models[1], "is the same path as --models[2]"),
        (base / "merged", "is inside --base"),
        (tmp_path, "contains --base"),
    ):
        code, _, err = _run(capsys, *flags, "--out", out, "--overwrite")
        assert code == 2 and expected in err, err
    assert _tree(tmp_path) == before
    merged = tmp_path / "merged"  # this tool's output, given back as an input: --overwrite must not replace it
    assert _run(capsys, *flags, "--out", merged)[0] == 0
    mine = _tree(merged)
    code, _, err = _run(
        capsys,
        "--base",
        base,
        "--models",
        merged,
        "--models",
        models[0],
        "--method",
        "task-arithmetic",
        "--out",
        merged,
        "--overwrite",
    )
    assert code == 2 and "is the same path as --models[1]" in err, err
    config = _yaml(
        merged / "x.yaml",
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: "
        f"{models[0]}, parameters: {{weight: 1}}}}]\n",
    )
    code, _, err = _run(capsys, "--mergekit_config", config, "--out", merged, "--overwrite")
    assert code == 2 and "contains --mergekit_config" in err
    config.unlink()
    assert _tree(merged) == mine
    code, _, err = _run(capsys, *flags, "--out", merged)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert (
        _run(capsys, *flags, "--out", merged, "--overwrite", "--weights", "1", "--weights", "1", "--weights", "0")[0]
        == 0
    )
    assert _tree(merged) != mine and leftovers(tmp_path) == []


def test_help_and_option_errors_answer_before_torch(tmp_path):
    code = (
        "import sys\nfrom lifelong_delta.cli import main\n"
        "for args in (['merge', '--help'], ['merge', '--base', 'b', '--models', 'm', '--method', 'ties',"
        " '--density', '0', '--out', sys.argv[1]]):\n"
        "    try:\n        main(args)\n    except SystemExit as e:\n        print('exit', e.code)\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.stdout.splitlines()[-3:] == ["exit 0", "exit 2", "False"], res.stdout + res.stderr
    assert "--lambda_" in res.stdout and "mergekit YAML" in res.stdout
    assert "error: density 0 is outside (0, 1]" in res.stderr


def test_list_flags_take_several_values_and_lambda_its_keyword_name():
    from lifelong_delta.cli import _normalise_flags
    from lifelong_delta.delta.commands import prune

    argv = ["merge", "--models", "F1", "F2", "--lambda", "0.5", "--weights", "1", "-2", "--models=F3", "--overwrite"]
    assert _normalise_flags(argv, merge_command.merge) == [
        "merge",
        "--models+",
        "F1",
        "--models+",
        "F2",
        "--lambda_",
        "0.5",
        "--weights+",
        "1",
        "--weights+",
        "-2",
        "--models+=F3",
        "--overwrite=true",
    ]
    assert _normalise_flags(["prune", "--exclude", "a.*", "--exclude", "b.*", "--p", "0.9"], prune) == [
        "prune",
        "--exclude+",
        "a.*",
        "--exclude+",
        "b.*",
        "--p",
        "0.9",
    ]


def test_excluded_heads_may_differ_between_models(tmp_path, capsys):
    """Each task keeps its own head (another label count): an excluded tensor comes from the first model alone."""
    base_sd = tiny_state()
    fts = [perturbed(base_sd, scale=0.05, seed=i + 1) for i in range(2)]
    fts[1]["classifier.weight"] = torch.randn(5, 8)
    base, models = _models(tmp_path, base_sd, fts)
    code, _, err = _run(
        capsys,
        "--base",
        base,
        "--models",
        *models,
        "--method",
        "task-arithmetic",
        "--exclude",
        "classifier.*",
        "--out",
        tmp_path / "out",
    )
    assert code == 0, err
    out = read_checkpoint(tmp_path / "out")
    assert torch.equal(out["classifier.weight"], fts[0]["classifier.weight"])
    want = base_sd["layers.0.weight"] + sum(sd["layers.0.weight"] - base_sd["layers.0.weight"] for sd in fts)
    assert torch.allclose(out["layers.0.weight"], want, atol=1e-6)
    code, _, err = _run(
        capsys, "--base", base, "--models", *models, "--method", "task-arithmetic", "--out", tmp_path / "out2"
    )
    assert code == 2 and "shape [5, 8] there but [3, 8]" in err and not (tmp_path / "out2").exists()
