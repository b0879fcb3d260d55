"""Hub ids as users type them: ``--base org/name`` resolves through the local Hugging Face cache, offline.

The cache is built by hand the way ``huggingface_hub`` lays it out (``models--org--name/refs/main`` naming a
snapshot whose files link into ``blobs/``), so no network is needed. Each command runs as a user runs it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifelong_delta.delta.hub import looks_like_hub_id
from tests.delta._checkpoints import make_pair, read_checkpoint

CLI = str(Path(sys.executable).parent / "lifelong-delta")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo: str, src: Path) -> Path:
    """Put the files of ``src`` into ``cache`` as hub model ``repo`` at ``main``; returns the snapshot folder."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for f in sorted(src.iterdir()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def hub(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A Hugging Face cache holding ``acme/base`` and ``acme/ft`` (a tiny sharded pair), and the environment that
    points the command at it, offline."""
    base, ft = make_pair(tmp_path / "src")
    cache = tmp_path / "hf-cache"
    _cache_repo(cache, "acme/base", base)
    _cache_repo(cache, "acme/ft", ft)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return cache, env


def _run(env: dict[str, str], *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def _error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def test_hub_ids_prune_from_the_cache_like_local_folders(tmp_path, hub):
    cache, env = hub
    before = _tree(cache)
    res = _run(
        env,
        "prune",
        "--base",
        "acme/base",
        "--finetuned",
        "acme/ft@main",
        "--out",
        tmp_path / "out",
        "--p",
        "0.7",
        "--seed",
        "3",
    )
    assert res.returncode == 0, res.stderr
    local = _run(
        env,
        "prune",
        "--base",
        tmp_path / "src" / "base",
        "--finetuned",
        tmp_path / "src" / "ft",
        "--out",
        tmp_path / "local",
        "--p",
        "0.7",
        "--seed",
        "3",
    )
    assert local.returncode == 0, local.stderr
    got, want = read_checkpoint(tmp_path / "out"), read_checkpoint(tmp_path / "local")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "out" / "config.json").exists()  # non-weight files come from the snapshot too
    assert _tree(cache) == before  # the cache is an input: nothing in it changed
    stats = _run(env, "stats", "--base", "acme/base", "--finetuned", "acme/ft")
    assert stats.returncode == 0 and "delta statistics" in stats.stdout, stats.stderr


def test_an_uncached_hub_id_offline_is_one_line_naming_the_cache(tmp_path, hub):
    cache, env = hub
    res = _run(env, "prune", "--base", "acme/missing", "--finetuned", "acme/ft", "--out", tmp_path / "out")
    line = _error_line(res)
    assert "--base acme/missing" in line and "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert str(cache) in line
    res = _run(env, "prune", "--base", "acme/base", "--finetuned", "acme/ft@v2", "--out", tmp_path / "out")
    assert "--finetuned acme/ft@v2" in _error_line(res) and "revision v2" in _error_line(res)
    assert not (tmp_path / "out").exists()


def test_without_a_network_a_cached_id_still_resolves_and_an_uncached_one_says_so(tmp_path, hub):
    _cache, env = hub
    env = {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    res = _run(env, "prune", "--base", "acme/base", "--finetuned", "acme/ft", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    line = _error_line(_run(env, "prune", "--base", "acme/nope", "--finetuned", "acme/ft", "--out", tmp_path / "o2"))
    assert "--base acme/nope" in line and "could not be downloaded" in line
    assert not (tmp_path / "o2").exists()


def test_output_into_a_cached_snapshot_is_refused(tmp_path, hub):
    cache, env = hub
    snapshot = next((cache / "models--acme--ft" / "snapshots").iterdir())
    before = _tree(cache)
    line = _error_line(
        _run(env, "prune", "--base", "acme/base", "--finetuned", "acme/ft", "--out", snapshot / "pruned")
    )
    assert "--finetuned" in line
    assert _tree(cache) == before and not (snapshot / "pruned").exists()


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, hub):
    _, env = hub
    for spec in (tmp_path / "nope", "./nope", "a/b/c", "weights/model.safetensors"):
        line = _error_line(_run(env, "prune", "--base", spec, "--finetuned", "acme/ft", "--out", tmp_path / "o"))
        assert line == f"error: --base {spec}: not found"


@pytest.mark.parametrize(
    ("spec", "hub_id"),
    [
        ("meta-llama/Llama-3.1-8B", True),
        ("Qwen/Qwen2.5-0.5B@main", True),
        ("org/name@refs/pr/1", True),
        ("gpt2", False),
        ("./a/b", False),
        ("/abs/x", False),
        ("a/b/c", False),
        ("a/model.safetensors", False),
    ],
)
def test_looks_like_hub_id(spec, hub_id):
    assert looks_like_hub_id(spec) is hub_id
