"""AdamR: λ = 0 is AdamW bit for bit; steps against a plain re-implementation and a hand computation; groups,
frozen params, checkpoints; the anchor it pulls toward (default PretrainedAnchor, EWC-weighted, shared)."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lifelong_delta.anchors import EWCAnchor, L2Anchor, PretrainedAnchor
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


def test_the_pull_stops_at_the_anchor_when_gradients_vanish():
    """lr·λ/√mean(v̂) is 1e4 here: uncapped, the L2 pull would move θ − θ* by a factor of 1 − 1e4 per step and
    overflow; capped at 1 it puts θ on θ*, and Adam's own step (its momentum of the first gradient) is all that
    moves it afterwards."""
    theta_pre = torch.zeros(8)
    p = nn.Parameter(theta_pre.clone())
    opt = AdamR([p], lr=0.1, reg=1.0)
    p.grad = torch.full((8,), 1e-3)
    opt.step()  # θ leaves θ*; v̂ holds (1e-3)²
    for _ in range(200):
        p.grad = torch.zeros(8)  # v̂ decays slowly, the rate stays far above 1
        before = p.detach().clone()
        opt.step()
        assert torch.isfinite(p).all()
        assert p.detach().abs().max() <= before.abs().max() + 0.1  # at most one Adam step from θ*
    assert p.detach().abs().max() < 0.1 * 0.9**150  # momentum gone: θ sits on θ*


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


@pytest.mark.parametrize(
    "kwargs, match", [({"reg": -1.0}, "reg"), ({"reg": float("nan")}, "reg"), ({"variant": "l3"}, "variant")]
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamR(_model().parameters(), **kwargs)


# ----------------------------------------------------------------------------- a plain re-implementation
def _deep_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 2))


@torch.no_grad()
def _plain_pull_(opt: torch.optim.AdamW, pretrained: dict, reg: list[float], variant: list[str]) -> None:
    """AdamR's pull written out per tensor: mean(v̂_t) over the parameters with gradients (fp32 gradient norms,
    summed in fp64), then θ ← θ − min(lr·λ/(√mean(v̂_t) + ε), 1) · (θ − θ_pre) or its sign, group by group (one
    multiply-add per element, as torch's ``add_(d, alpha=-rate)`` rounds it)."""
    total, count = 0.0, 0
    for group in opt.param_groups:
        beta2 = group["betas"][1]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state.get(p, {})
            step = float(state["step"]) + 1 if "step" in state else 1.0
            v_prev = float(state["exp_avg_sq"].double().sum()) if "exp_avg_sq" in state else 0.0
            g2 = torch.linalg.vector_norm(p.grad).double().square().item()
            total += (beta2 * v_prev + (1 - beta2) * g2) / (1 - beta2**step)
            count += p.numel()
    scale = 1.0 / (math.sqrt(total / max(count, 1)) + opt.defaults["eps"])
    for group, lam, var in zip(opt.param_groups, reg, variant):
        rate = min(group["lr"] * lam * scale, 1.0)
        for p in group["params"]:
            if p.grad is None or lam == 0:
                continue
            d = p - pretrained[p]
            p.add_(d if var == "l2" else d.sign(), alpha=-rate)


CASES = {  # name: (AdamR keyword arguments, per-group settings or None for one group)
    "l2": ({"reg": 0.3}, None),
    "l1": ({"reg": 0.01, "variant": "l1"}, None),
    "l2, rate in [0.5, 1] and capped": ({"reg": 5.0}, None),
    "amsgrad": ({"reg": 0.2, "amsgrad": True, "betas": (0.8, 0.99), "eps": 1e-6}, None),
    "groups": ({"reg": 0.5}, [{}, {"reg": 2.0, "variant": "l1", "lr": 3e-2}, {"reg": 0.0}]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_steps_are_bit_identical_to_a_plain_re_implementation(case):
    """Six steps of AdamR equal, bit for bit, AdamW(weight_decay=0) preceded by the pull written out per tensor: with
    one or three groups, L2 and L1, the lerp and the sub/add path, AMSGrad, a frozen tensor and a step in which one
    tensor has no gradient."""
    kwargs, groups = CASES[case]

    def build(model: nn.Module, cls):
        extra = {} if cls is AdamR else {"weight_decay": 0.0}
        own = {k: v for k, v in kwargs.items() if k not in ("reg", "variant")} | extra
        if groups is None:
            return cls(model.parameters(), lr=1e-2, **(kwargs if cls is AdamR else own))
        model[0].weight.requires_grad_(False)
        parts = [[model[0].bias], list(model[2].parameters()), list(model[4].parameters())]
        specs = [
            {"params": ps} | {k: v for k, v in g.items() if cls is AdamR or k == "lr"} for ps, g in zip(parts, groups)
        ]
        return cls(specs, lr=1e-2, **(kwargs if cls is AdamR else own))

    a, b = _deep_model(), _deep_model()
    opt_a, opt_b = build(a, AdamR), build(b, torch.optim.AdamW)
    pretrained = {p: p.detach().clone() for p in b.parameters()}
    reg = [g.get("reg", kwargs["reg"]) for g in (groups or [{}])]
    variant = [g.get("variant", kwargs.get("variant", "l2")) for g in (groups or [{}])]
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 2, (8,), generator=gen)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model[4].weight.requires_grad_(step != 3)  # no gradient for this tensor at step 3
            nn.functional.cross_entropy(model(x), y).backward()
            model[4].weight.requires_grad_(True)
        _plain_pull_(opt_b, pretrained, reg, variant)
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb), (case, step)
    assert not torch.equal(a[2].weight, _deep_model()[2].weight)


# ----------------------------------------------------------------------------- the anchor
def _ewc_anchor(model: nn.Module, include=("*",)) -> tuple[EWCAnchor, dict, dict]:
    """An EWC anchor whose θ* is ``model``'s weights perturbed and whose ω is spread over [0, 3)."""
    gen = torch.Generator().manual_seed(3)
    anchor = EWCAnchor(include=include)
    names = anchor.match([n for n, _ in model.named_parameters()])
    params = dict(model.named_parameters())
    ref = {n: params[n].detach() + 0.5 * torch.randn(params[n].shape, generator=gen) for n in names}
    omega = {n: 3 * torch.rand(params[n].shape, generator=gen) for n in names}
    anchor.load_state_dict({"class": "EWCAnchor", "num_snapshots": 1, "reference": ref, "importance": omega})
    return anchor, ref, omega


@pytest.mark.parametrize("variant", ["l2", "l1"])
def test_ewc_anchor_weights_the_pull_by_its_importance(variant):
    """θ ← θ − rate·ω⊙(θ − θ*) (L1: ω⊙sign(θ − θ*)) before the Adam step, with rate = lr·λ/(√mean(v̂) + ε)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    anchor, ref, omega = _ewc_anchor(model, include=["weight"])
    lr, reg, eps, _b2 = 0.1, 0.05, 1e-8, 0.999
    opt = AdamR(model.named_parameters(), lr=lr, reg=reg, variant=variant, eps=eps, anchor=anchor)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    v_hat = torch.cat([g.flatten() ** 2 for g in grads.values()]).double().mean().item()  # step 1: v̂ = g²
    rate = lr * reg / (math.sqrt(v_hat) + eps)
    assert rate * omega["weight"].max() < 1  # the weighted pull does not overshoot here
    d = theta["weight"] - ref["weight"]
    pulled = {
        "weight": theta["weight"] - rate * omega["weight"] * (d if variant == "l2" else d.sign()),
        "bias": theta["bias"],
    }  # bias: not anchored
    for n, p in model.named_parameters():
        adam = lr * grads[n] / (grads[n].abs() + eps)  # Adam's first step: lr · m̂ / (√v̂ + ε)
        torch.testing.assert_close(p.detach(), pulled[n] - adam, rtol=0, atol=1e-6)


def test_anchor_is_matched_by_name_and_shared_not_copied():
    model = _model()
    anchor = PretrainedAnchor(include=["2.*"])
    opt = AdamR(model.named_parameters(), lr=1e-2, reg=0.5, anchor=anchor)
    assert list(anchor.reference) == ["2.weight", "2.bias"]  # anchored here, at the weights of the parameters
    assert {p.data_ptr() for p in opt.pretrained.values()} == {t.data_ptr() for t in anchor.reference.values()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, steps=3)
    assert all(torch.equal(anchor.reference[n], before[n]) for n in anchor.reference)  # θ* never moves


def test_parameters_the_anchor_does_not_hold_take_the_plain_adam_step():
    a, b = _model(), _model()
    far = {n: p.detach() + 1.0 for n, p in a.named_parameters() if n.startswith("0.")}
    opt_a = AdamR(a.named_parameters(), lr=1e-2, reg=0.5, anchor=PretrainedAnchor.from_reference(far))
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pa.grad = torch.full_like(pa, 0.1)
        pb.grad = torch.full_like(pb, 0.1)
    opt_a.step()
    opt_b.step()
    assert torch.equal(a[2].weight, b[2].weight) and torch.equal(a[2].bias, b[2].bias)
    assert not torch.equal(a[0].weight, b[0].weight)  # pulled toward θ* = θ + 1


def test_an_anchor_without_reference_pulls_once_snapshotted():
    a, b = _model(), _model()
    anchor = L2Anchor()
    opt = AdamR(a.named_parameters(), lr=1e-2, reg=1.0, anchor=anchor)
    _train(a, opt, steps=3)
    _train(b, torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0), steps=3)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))  # nothing to pull toward
    anchor.snapshot_(a)  # e.g. a task boundary
    _train(a, opt, steps=1)
    assert not torch.equal(a[0].weight, b[0].weight)


def test_anchor_errors():
    model = _model()
    with pytest.raises(ValueError, match="matches parameters by name: pass model.named_parameters"):
        AdamR(model.parameters(), anchor=PretrainedAnchor())
    anchor = L2Anchor()
    anchor.snapshot_(nn.Sequential(model))  # names '0.0.weight', ...: another module
    with pytest.raises(ValueError, match=r"anchor holds no parameter of the optimiser.*'0\.0\.weight'"):
        AdamR(model.named_parameters(), anchor=anchor)
    with pytest.raises(TypeError, match="must be a ParameterAnchor"):
        AdamR(model.named_parameters(), anchor={"0.weight": model[0].weight})


@pytest.mark.parametrize("kind", ["default", "ewc"])
def test_anchor_state_travels_in_the_optimiser_state_dict(kind):
    """Save after 3 steps, load into a fresh optimiser (whose own anchor is empty or elsewhere), continue: the same
    weights as 5 uninterrupted steps."""
    a = _model()
    if kind == "default":
        opt = AdamR(a.parameters(), lr=1e-2, reg=0.3)
    else:
        opt = AdamR(a.named_parameters(), lr=1e-2, reg=0.3, anchor=_ewc_anchor(a)[0])
    _train(a, opt, steps=3)
    state = copy.deepcopy(opt.state_dict())
    assert state["anchor"]["class"] == ("PretrainedAnchor" if kind == "default" else "EWCAnchor")
    b = _model(seed=5)
    b.load_state_dict(a.state_dict())
    if kind == "default":
        opt_b = AdamR(b.parameters(), lr=1e-2, reg=0.3)  # anchored at b's weights until the state loads
    else:
        opt_b = AdamR(b.named_parameters(), lr=1e-2, reg=0.3, anchor=EWCAnchor())
    opt_b.load_state_dict(state)
    _train(a, opt, steps=2)
    _train(b, opt_b, steps=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_a_state_with_a_pretrained_list_loads():
    a = _model()
    opt = AdamR(a.parameters(), lr=1e-2, reg=0.3)
    _train(a, opt, steps=3)
    state = copy.deepcopy(opt.state_dict())
    state["pretrained"] = list(state.pop("anchor")["reference"].values())
    b = _model(seed=5)
    b.load_state_dict(a.state_dict())
    opt_b = AdamR(b.parameters(), lr=1e-2, reg=0.3)
    opt_b.load_state_dict(state)
    _train(a, opt, steps=2)
    _train(b, opt_b, steps=2)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="holds 3 pretrained tensors but the optimiser has 4"):
        AdamR(b.parameters(), lr=1e-2).load_state_dict({**state, "pretrained": state["pretrained"][:3]})


class _Fit(pl.LightningModule):
    """A tiny classifier trained by AdamR toward an EWC anchor near its initial weights."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()
        self.anchor, _, _ = _ewc_anchor(self.net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return AdamR(self.net.named_parameters(), lr=1e-2, reg=0.5, anchor=self.anchor)


def test_anchor_state_travels_in_the_lightning_checkpoint(tmp_path):
    """``--ckpt_path`` resume from a mid-run checkpoint: the anchor state comes back from the checkpoint's optimiser
    state (the resumed module's anchor starts empty), and the resumed weights equal the uninterrupted run's."""
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen))

    def fit(ckpt_path=None) -> _Fit:
        model = _Fit()
        callbacks = []
        if ckpt_path is None:
            callbacks = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)]
        else:
            model.anchor = EWCAnchor()  # nothing to pull toward unless the checkpoint restores θ* and ω
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=8,
            logger=False,
            enable_checkpointing=not ckpt_path,
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
        return model

    full = fit()
    half = tmp_path / "epoch=0-step=4.ckpt"
    assert torch.load(half, weights_only=False)["optimizer_states"][0]["anchor"]["class"] == "EWCAnchor"
    resumed = fit(half)
    assert resumed.anchor.num_snapshots == 1
    for pa, pb in zip(full.net.parameters(), resumed.net.parameters()):
        assert torch.equal(pa, pb)
