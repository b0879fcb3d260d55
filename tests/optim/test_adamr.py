"""AdamR: λ = 0 is AdamW bit for bit; one step against a hand computation; groups, frozen params, checkpoints."""

import copy
import math

import pytest
import torch
from torch import nn

from lifelong_delta.optim import AdamR


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_zero_reg_is_adamw_bit_for_bit():
    a, b = _model(), _model()
    _train(a, AdamR(a.parameters(), lr=1e-2, reg=0.0))
    _train(b, torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("variant", ["l2", "l1"])
def test_one_step_matches_hand_computation(variant):
    torch.manual_seed(0)
    theta_pre = torch.randn(4, 3)
    p = nn.Parameter(theta_pre.clone())
    lr, reg, eps, (b1, b2) = 0.1, 0.5, 1e-8, (0.9, 0.999)
    opt = AdamR([p], lr=lr, reg=reg, variant=variant, eps=eps, betas=(b1, b2))
    # step 1 from θ_pre: the pull is zero (θ = θ_pre); take it, then check step 2 by hand
    g1 = torch.randn(4, 3)
    p.grad = g1.clone()
    opt.step()
    m = (1 - b1) * g1
    v = (1 - b2) * g1**2
    theta = theta_pre - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    assert torch.allclose(p.detach(), theta, atol=1e-6)

    g2 = torch.randn(4, 3)
    p.grad = g2.clone()
    opt.step()
    m = b1 * m + (1 - b1) * g2
    v = b2 * v + (1 - b2) * g2**2
    v_hat = v / (1 - b2**2)
    scale = lr * reg / (math.sqrt(v_hat.double().mean().item()) + eps)
    delta = theta - theta_pre
    theta = theta - scale * (delta if variant == "l2" else delta.sign())
    theta = theta - lr * (m / (1 - b1**2)) / (v_hat.sqrt() + eps)
    assert torch.allclose(p.detach(), theta, atol=1e-6)


def test_pull_shrinks_delta_compared_to_adamw():
    ref = _model()
    a, b = _model(), _model()
    _train(a, AdamR(a.parameters(), lr=1e-2, reg=1.0), steps=30)
    _train(b, AdamR(b.parameters(), lr=1e-2, reg=0.0), steps=30)

    def delta_norm(m: nn.Module) -> float:
        return sum((p - q).norm() ** 2 for p, q in zip(m.parameters(), ref.parameters())).sqrt().item()

    assert delta_norm(a) < 0.8 * delta_norm(b)


def test_param_groups_and_frozen_parameters():
    model = _model()
    first, last = model[0], model[2]
    first.weight.requires_grad_(False)
    opt = AdamR(
        [{"params": [first.bias]}, {"params": list(last.parameters()), "reg": 2.0, "variant": "l1"}],
        lr=1e-2,
        reg=0.5,
    )
    assert opt.param_groups[0]["reg"] == 0.5 and opt.param_groups[1]["variant"] == "l1"
    frozen = first.weight.detach().clone()
    _train(model, opt)
    assert torch.equal(first.weight, frozen)


def test_state_dict_round_trip_keeps_pretrained_reference():
    a = _model()
    opt = AdamR(a.parameters(), lr=1e-2, reg=0.3)
    _train(a, opt, steps=3)
    state = copy.deepcopy(opt.state_dict())  # as a checkpoint would; torch shares tensors otherwise
    b = _model(seed=5)  # different weights: the reference must come from the checkpoint, not from b
    b.load_state_dict(a.state_dict())
    opt_b = AdamR(b.parameters(), lr=1e-2, reg=0.3)
    opt_b.load_state_dict(state)
    _train(a, opt, steps=2)
    _train(b, opt_b, steps=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("kwargs, match", [({"reg": -1.0}, "reg"), ({"reg": float("nan")}, "reg"),
                                           ({"variant": "l3"}, "variant")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamR(_model().parameters(), **kwargs)
