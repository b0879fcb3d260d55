"""``DeltaPruning`` under Lightning's ``ModelParallelStrategy`` (FSDP2) on 2 gloo processes: every rank prunes its
own ``Shard(0)`` shard with the global element index, and the gathered result equals a single-process
``prune_tensor`` of the same (pretrained, fine-tuned) pair bit for bit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lifelong_delta.delta.matching import is_excluded
from lifelong_delta.delta.methods import PruneSpec, prune_tensor

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
    ),
]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_fsdp2_script.py")
TIMEOUT_S = 180


def _launch(out: Path) -> None:
    """Start both ranks of the script (as torchrun would) and wait for them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), str(out)],
                env=env,
                cwd=out,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, (_, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{err[-4000:]}"


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The script's output, from one 2-rank run; OUT_DIR/reference.safetensors holds the model's initial weights."""
    from tests.callbacks._fsdp2_script import Tiny

    out = tmp_path_factory.mktemp("fsdp2")
    save_file(
        {n: t.contiguous() for n, t in Tiny().state_dict().items() if t.is_floating_point()},
        out / "reference.safetensors",
    )
    _launch(out)
    return torch.load(out / "fsdp2.pt")


@pytest.mark.parametrize("method", ["dare", "darex-q"])
def test_fsdp2_ranks_prune_their_shards_like_one_process(fsdp2_results: dict, method: str) -> None:
    from tests.callbacks._fsdp2_script import EXCLUDE, RUNS, Tiny

    res = fsdp2_results[method]
    kwargs, _ = RUNS[method]
    spec = PruneSpec(kwargs["method"], kwargs["p"], q=kwargs.get("q"), seed=kwargs["seed"])
    initial = Tiny().state_dict()
    params = {n for n, _ in Tiny().named_parameters()}
    assert {n for n, pl in res["placements"].items() if pl == "(Shard(dim=0),)"} == params  # buffers stay plain
    before = after = 0
    for name, got in res["pruned"].items():
        pre, ft = res["pretrained"][name], res["finetuned"][name]
        assert torch.equal(pre, initial[name]), name  # the fit started from the model's initial weights
        if not got.is_floating_point() or is_excluded(name, EXCLUDE):
            assert torch.equal(got, ft), name
            continue
        assert not torch.equal(ft, pre), f"{name} did not train, so pruning it proves nothing"
        want = prune_tensor(name, pre, ft, spec)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        before += int((ft != pre).sum())
        after += int((want != pre).sum())
    assert all(not torch.equal(res["finetuned"][n], initial[n]) for n in EXCLUDE)  # left out although trained
    assert res["kept_fraction"] == pytest.approx(after / before, abs=0, rel=1e-12)
