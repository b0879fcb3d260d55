"""lifelong_delta.outputs: the checks and temporary folders every command's output goes through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lifelong_delta import outputs
from lifelong_delta.outputs import OutputPathError

CLI = str(Path(sys.executable).parent / "lifelong-delta")


def test_check_can_create(tmp_path):
    outputs.check_can_create(tmp_path / "a" / "b", option="--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="--out .*file is a file, not a folder"):
        outputs.check_can_create(tmp_path / "file" / "sub", option="--out")


def test_remove_run_dir_deletes_one_run_folder_below_runs_and_nothing_else(tmp_path):
    runs = tmp_path / "out" / "runs"
    run = runs / "ft" / "seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("x")
    (runs / "ft" / "seed1").mkdir()
    outputs.remove_run_dir(run, runs=runs)
    assert not run.exists() and (runs / "ft" / "seed1").is_dir()
    outputs.remove_run_dir(run, runs=runs)  # already gone: nothing to do

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "seed0").mkdir(parents=True)
    (elsewhere / "keep.txt").write_text("x")
    (runs / "l2").symlink_to(elsewhere, target_is_directory=True)
    (runs / "ft" / "seed2").symlink_to(elsewhere, target_is_directory=True)
    (runs / "ft" / "seed3").write_text("x")
    for path, message in (
        (runs, "not a run folder below"),
        (runs / "ft" / ".." / ".." / "notes", "not a run folder below"),
        (tmp_path / "other" / "ft" / "seed0", "not a run folder below"),
        (runs / "ft" / "seed2", "is not a folder"),
        (runs / "ft" / "seed3", "is not a folder"),
        (runs / "l2" / "seed0", "leads out of"),
    ):
        with pytest.raises(OutputPathError, match=message):
            outputs.remove_run_dir(path, runs=runs)
    assert (elsewhere / "keep.txt").exists() and (elsewhere / "seed0").is_dir() and (runs / "ft" / "seed3").exists()


def test_stale_temp_of_a_dead_process_is_removed_and_a_live_one_kept(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".out.tmp-x"
    stale.mkdir()
    (stale / outputs.TEMP_MARKER).write_text(
        json.dumps({"tool": "lifelong-delta", "pid": int(dead.stdout), "started": None, "host": os.uname().nodename})
    )
    user = tmp_path / ".cache"  # a hidden folder of the user's, no marker: never touched
    user.mkdir()
    assert outputs.clean_stale_temps(tmp_path) == [stale]
    assert f"note: removed {stale}" in capsys.readouterr().err
    mine = outputs.make_temp_dir(tmp_path, ".other.tmp-")  # this process is alive: kept
    assert outputs.clean_stale_temps(tmp_path) == []
    assert mine.exists() and user.exists() and not stale.exists()


def test_atomic_file_follows_the_umask_and_cleans_up_on_error(tmp_path):
    old = os.umask(0o027)
    try:
        with outputs.atomic_file(tmp_path / "a.txt") as tmp:
            tmp.write_text("hi")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    with pytest.raises(RuntimeError), outputs.atomic_file(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_dir_gives_what_a_library_wrote_0600_the_umask_and_leaves_links_alone(tmp_path):
    """safetensors' ``save_file`` (and so ``save_pretrained``) creates its file ``0600``; a cache entry's files
    follow the umask like every other output. A hard link to another file and a symlink keep that file's mode."""
    import torch
    from safetensors.torch import save_file

    other = tmp_path / "someone-elses.txt"
    other.write_text("x")
    other.chmod(0o600)
    old = os.umask(0o027)
    try:
        with outputs.atomic_dir(tmp_path / "entry") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir()
            (tmp / "sub" / "notes.txt").write_text("n")
            os.link(other, tmp / "linked.txt")
            (tmp / "symlink.txt").symlink_to(other)
    finally:
        os.umask(old)
    entry = tmp_path / "entry"
    modes = {p.name: p.lstat().st_mode & 0o777 for p in [entry, *entry.rglob("*")] if not p.is_symlink()}
    assert modes == {"entry": 0o750, "model.safetensors": 0o640, "sub": 0o750, "notes.txt": 0o640, "linked.txt": 0o600}
    assert other.stat().st_mode & 0o777 == 0o600


def test_pretrain_refuses_a_cache_dir_that_is_a_file_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = subprocess.run(
        [CLI, "pretrain", "--cache_dir", str(tmp_path / "afile"), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --cache_dir")
    assert "fit:" not in res.stderr  # refused before any training
