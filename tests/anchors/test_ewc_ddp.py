"""Two-process CPU gloo DDP: the all-reduced Fisher equals the single-process one on the same total data."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lifelong_delta.anchors import EWCAnchor

OPTIONS = [("per_sample", "softmax", "true"), ("batch", "bce", "argmax"), ("per_sample", "bce", "true")]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(4)]


def fishers(batches) -> list[dict[str, torch.Tensor]]:
    out = []
    for estimator, head, label in OPTIONS:
        anchor = EWCAnchor(estimator=estimator, label=label)
        anchor.snapshot_(make_model(), batches=batches, head=head)
        out.append(dict(anchor.importance))
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine = make_batches()[rank::world]  # rank r gets batches r, r + world, ... (half the data)
        torch.save(fishers(mine), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_two_process_fisher_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = fishers(make_batches())
    for rank in range(2):
        ddp = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for (estimator, head, label), want, got in zip(OPTIONS, single, ddp):
            for name in want:
                torch.testing.assert_close(
                    got[name], want[name], rtol=1e-5, atol=1e-7, msg=f"{estimator}/{head}/{label} {name}"
                )
    # and the halves alone differ from the whole: the all-reduce is what makes them equal
    half = fishers(make_batches()[0::2])
    assert not torch.allclose(half[0]["0.weight"], single[0]["0.weight"])
