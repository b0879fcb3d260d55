"""FSDP2: each of 2 gloo ranks prunes its own shard of every ``fully_shard``-ed parameter; the gathered result
equals a single-process ``prune_tensor`` bit for bit."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lifelong_delta.delta.methods import PruneSpec, prune_tensor

SPECS = [PruneSpec("dare", 0.7, seed=3), PruneSpec("darex-q", 0.6, q=0.5, seed=1)]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # rows that do not split evenly over 2 ranks: 7 and 3 rows
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3)).to(torch.bfloat16)


def _pairs() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    base = _model().state_dict()
    g = torch.Generator().manual_seed(1)
    ft = {n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in base.items()}
    return base, ft


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from lifelong_delta.delta.sharded import is_sharded, prune_local_shard_

        base, ft = _pairs()
        results = {}
        for i, spec in enumerate(SPECS):
            model = _model()
            model.load_state_dict(ft)
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            counts = torch.zeros(2, dtype=torch.float64)
            for name, param in model.state_dict().items():
                assert is_sharded(param)
                stats = prune_local_shard_(name, param, base[name], spec)
                counts += torch.tensor([stats.nnz_before, stats.nnz_after], dtype=torch.float64)
            dist.all_reduce(counts)
            results[i] = ({n: t.full_tensor() for n, t in model.state_dict().items()}, counts)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_prune_their_shards_like_one_process(tmp_path: Path) -> None:
    out = tmp_path / "sharded.pt"
    mp.spawn(_rank, args=(2, _free_port(), str(out)), nprocs=2)
    results = torch.load(out)
    base, ft = _pairs()
    for i, spec in enumerate(SPECS):
        got, counts = results[i]
        before = after = 0
        for name in base:
            want = prune_tensor(name, base[name], ft[name], spec)
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), (spec.method, name)
            before += int((ft[name] != base[name]).sum())
            after += int((want != base[name]).sum())
        assert counts.tolist() == [before, after]


def test_methods_that_rank_whole_rows_refuse_a_shard() -> None:
    from lifelong_delta.delta.sharded import prune_local_shard_

    with pytest.raises(ValueError, match="ranks whole rows or tensors"):
        prune_local_shard_("w", torch.zeros(2, 2), torch.zeros(2, 2), PruneSpec("magnitude", 0.5))
