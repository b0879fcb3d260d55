"""Every bad input of the issue: a one-line error naming the tensor or option, and nothing written.

Each case runs through ``commands.prune`` in-process; a few also through the ``lifelong-delta`` console script to
check the exit status and the single ``error:`` line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifelong_delta.delta.commands import prune
from lifelong_delta.outputs import OutputPathError
from tests.delta._checkpoints import leftovers, make_pair, perturbed, read_checkpoint, tiny_state, write_checkpoint

CLI = str(Path(sys.executable).parent / "lifelong-delta")


def _expect_error(tmp_path, match, *, base=None, ft=None, **kwargs):
    if base is None or ft is None:
        base, ft = make_pair(tmp_path)
    out = tmp_path / "out"
    kwargs.setdefault("progress", False)
    with pytest.raises(ValueError, match=match) as e:
        prune(str(base), str(ft), str(out), **kwargs)
    message = str(e.value)
    assert "\n" not in message, message
    assert not out.exists()
    assert leftovers(tmp_path) == []
    return message


def test_missing_tensor_in_base(tmp_path):
    ft_sd = perturbed(tiny_state())
    ft_sd["extra.weight"] = torch.ones(2, 2)
    base, ft = make_pair(tmp_path, ft_sd=ft_sd)
    _expect_error(tmp_path, r"missing from the base model: extra\.weight", base=base, ft=ft)


def test_extra_tensor_in_base(tmp_path):
    base_sd = tiny_state()
    ft_sd = perturbed(base_sd)
    del ft_sd["layers.1.bias"]
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd)
    _expect_error(tmp_path, r"missing from the fine-tuned model: layers\.1\.bias", base=base, ft=ft)


def test_shape_mismatch(tmp_path):
    base_sd = tiny_state()
    ft_sd = perturbed(base_sd)
    ft_sd["layers.1.weight"] = torch.zeros(8, 9)
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd)
    _expect_error(
        tmp_path, r"tensor 'layers\.1\.weight' has shape \[8, 8\] in the base model but \[8, 9\]", base=base, ft=ft
    )


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_p_outside_unit_interval(tmp_path, p):
    _expect_error(tmp_path, rf"p={p} is outside \[0, 1\)", p=p)


def test_q_below_one_minus_p_unless_forced(tmp_path):
    _expect_error(tmp_path, r"q=0\.05 is below 1-p=0\.1.*force", method="darex-q", p=0.9, q=0.05)
    summary = prune(
        str(tmp_path / "base"),
        str(tmp_path / "ft"),
        str(tmp_path / "forced"),
        method="darex-q",
        p=0.9,
        q=0.05,
        force=True,
        progress=False,
    )
    assert summary.q == 0.05 and (tmp_path / "forced").is_dir()


@pytest.mark.parametrize(("which", "value"), [("ft", float("nan")), ("base", float("inf"))])
def test_non_finite_values(tmp_path, which, value):
    base_sd = tiny_state()
    ft_sd = perturbed(base_sd)
    bad = ft_sd if which == "ft" else base_sd
    bad["layers.2.weight"][3, 4] = value  # late in the file: earlier tensors were already written to the temp dir
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd)
    kind = "fine-tuned" if which == "ft" else "base"
    _expect_error(tmp_path, rf"tensor 'layers\.2\.weight' of the {kind} model has 1 non-finite", base=base, ft=ft)


def test_unreadable_and_missing_files(tmp_path):
    base, ft = make_pair(tmp_path)
    shard = sorted(base.glob("*.safetensors"))[1]
    shard.write_bytes(b"\x00" * 3)
    msg = _expect_error(tmp_path, "not a safetensors file", base=base, ft=ft)
    assert str(shard) in msg
    with pytest.raises(ValueError, match="--base .*nope: not found"):
        prune(str(tmp_path / "nope"), str(ft), str(tmp_path / "out"), progress=False)


def test_existing_output_unless_overwrite(tmp_path):
    base, ft = make_pair(tmp_path)
    out = tmp_path / "out"
    prune(str(base), str(ft), str(out), progress=False)
    with pytest.raises(OutputPathError, match="already exists; pass --overwrite"):
        prune(str(base), str(ft), str(out), progress=False)
    first = read_checkpoint(out)
    prune(str(base), str(ft), str(out), overwrite=True, seed=1, progress=False)
    assert not torch.equal(read_checkpoint(out)["layers.0.weight"], first["layers.0.weight"])


def test_overwrite_refuses_a_folder_this_tool_did_not_write(tmp_path):
    base, ft = make_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match="was not written by lifelong-delta"):
        prune(str(base), str(ft), str(out), overwrite=True, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_output_may_not_be_an_input(tmp_path):
    base, ft = make_pair(tmp_path)
    with pytest.raises(OutputPathError, match="is the same path as --finetuned"):
        prune(str(base), str(ft), str(ft), overwrite=True, progress=False)
    assert read_checkpoint(ft)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "darex-q"}, r"darex-q needs --q Q .* or --q_mode"),
        ({"method": "darex-q", "q": 0.5, "q_mode": "grid"}, "either --q or --q_mode"),
        ({"method": "dare", "q_mode": "grid"}, "--method dare always rescales by 1/\\(1-p\\); use --method darex-q"),
        ({"method": "magnitude", "q_mode": "analytic"}, "analytic assumes DARE's independent random mask"),
        ({"method": "structural", "q_mode": "analytic"}, "use it with --method darex-q"),
        ({"method": "magnitude", "q_mode": "grid", "rescale": "none"}, "--rescale is none; drop --rescale"),
        ({"method": "magnitude", "rescale": "q"}, "--method magnitude with --rescale q needs q"),
        ({"method": "structural", "q": 0.5, "rescale": "dare"}, "q is set but rescale='dare'"),
        ({"method": "darex-q", "q_mode": "analytic", "eta": 0.0}, "--eta must be > 0"),
        ({"method": "wanda"}, "--method wanda needs --calib_data"),
        ({"method": "darex-q", "q_mode": "unlabelled"}, "--q_mode unlabelled needs --calib_data"),
        ({"method": "darex-q", "q": 0.5, "rescale": "sideways"}, "rescale"),
        ({"method": "dare", "calib_samples": 0}, "--calib_samples must be >= 1"),
        ({"out_shard_size": "big"}, "out_shard_size"),
    ],
)
def test_bad_options(tmp_path, kwargs, match):
    _expect_error(tmp_path, match, **kwargs)


def test_bad_calibration_file(tmp_path):
    _base, _ft = make_pair(tmp_path)
    data = tmp_path / "calib.csv"
    data.write_text("sentence\nhello\n")
    with pytest.raises(ValueError, match="calib_data .*calib.csv: every row needs a 'text' column"):
        from lifelong_delta.delta.calibration import read_text_data

        read_text_data(data, need_labels=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["missing", "p", "exists"])
def test_cli_bad_input_exit_status_and_one_line(tmp_path, case):
    base_sd = tiny_state()
    ft_sd = perturbed(base_sd)
    if case == "missing":
        ft_sd["extra.weight"] = torch.ones(2)
    base = write_checkpoint(tmp_path / "base", base_sd)
    ft = write_checkpoint(tmp_path / "ft", ft_sd)
    out = tmp_path / "out"
    if case == "exists":
        out.mkdir()
    args = [
        "prune",
        "--base",
        str(base),
        "--finetuned",
        str(ft),
        "--out",
        str(out),
        "--p",
        "1.2" if case == "p" else "0.5",
    ]
    res = _cli(*args)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("prune: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    expected = {"missing": "extra.weight", "p": "p=1.2 is outside [0, 1)", "exists": "already exists"}[case]
    assert expected in lines[0]
    assert out.exists() == (case == "exists") and (case != "exists" or not any(out.iterdir()))
    assert leftovers(tmp_path) == []
