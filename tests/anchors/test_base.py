"""ParameterAnchor / L2Anchor / PretrainedAnchor: selection, penalty, pull, growth, state, errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lifelong_delta.anchors import (
    ANCHORS,
    L2Anchor,
    ParameterAnchor,
    PretrainedAnchor,
    anchor_penalty,
    anchor_pull_,
)


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def perturb_(model: nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


class HalfAnchor(ParameterAnchor):
    """ω = 0.5 · |θ| + (index-dependent) — a non-trivial importance with a known value."""

    def compute_importance(self, model, params, **context):
        return {n: 0.5 * p.detach().abs() + context.get("offset", 0.0) for n, p in params.items()}


# ----------------------------------------------------------------------------- selection and validation
def test_select_include_exclude_globs():
    model = tiny()
    assert list(L2Anchor().select(model)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(L2Anchor(include=["*.weight"]).select(model)) == ["0.weight", "2.weight"]
    assert list(L2Anchor(include="[0-1].*", exclude=["*.bias"]).select(model)) == ["0.weight"]


def test_select_nothing_names_patterns_and_examples():
    with pytest.raises(ValueError, match=r"include patterns \['head\.\*'\].*names look like '0.weight'"):
        L2Anchor(include=["head.*"]).select(tiny())
    with pytest.warns(UserWarning, match="'head.\\*' matches no parameter"):
        L2Anchor(include=["head.*", "0.*"]).select(tiny())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strength": -1.0}, "strength"),
        ({"strength": math.inf}, "strength"),
        ({"include": []}, "include"),
        ({"include": [""]}, "include"),
        ({"exclude": [3]}, "exclude"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L2Anchor(**kwargs)


def test_constructor_rejects_non_sequence():
    with pytest.raises(TypeError, match="include"):
        L2Anchor(include=5)  # type: ignore[arg-type]


def test_registry_names_classes():
    assert ANCHORS["l2"] is L2Anchor and ANCHORS["pretrained"] is PretrainedAnchor


# ----------------------------------------------------------------------------- penalty
def test_penalty_zero_before_snapshot_and_right_after():
    model, anchor = tiny(), L2Anchor()
    assert anchor.penalty(model).item() == 0.0
    anchor.snapshot_(model)
    pen = anchor.penalty(model)
    assert pen.item() == 0.0 and pen.requires_grad
    pen.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_l2_penalty_and_gradient_match_hand_computation():
    model, anchor = tiny(), L2Anchor(include=["2.*", "0.weight"])
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchor.snapshot_(model)
    perturb_(model)
    pen = anchor.penalty(model)
    names = ["0.weight", "2.weight", "2.bias"]
    params = dict(model.named_parameters())
    hand = sum(((params[n] - ref[n]) ** 2).sum() for n in names)
    torch.testing.assert_close(pen, hand.detach())
    pen.backward()
    for n in names:
        torch.testing.assert_close(params[n].grad, 2 * (params[n] - ref[n]).detach())
    assert params["0.bias"].grad is None


def test_weighted_penalty_matches_hand_computation():
    model = tiny()
    anchor = HalfAnchor(include=["0.*"])
    anchor.snapshot_(model, offset=0.1)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    omega = {n: 0.5 * ref[n].abs() + 0.1 for n in ("0.weight", "0.bias")}
    perturb_(model)
    params = dict(model.named_parameters())
    hand = sum((omega[n] * (params[n] - ref[n]) ** 2).sum() for n in omega)
    pen = anchor.penalty(model)
    torch.testing.assert_close(pen, hand.detach())
    pen.backward()
    torch.testing.assert_close(
        params["0.weight"].grad, (2 * omega["0.weight"] * (params["0.weight"] - ref["0.weight"])).detach()
    )


def test_functional_penalty_and_pull():
    ps = [torch.randn(3, 2), torch.randn(4)]
    rs = [torch.randn(3, 2), torch.randn(4)]
    ws = [torch.rand(3, 2), torch.rand(4)]
    pen = anchor_penalty(ps, rs, [w.sqrt() for w in ws])
    torch.testing.assert_close(pen, sum((w * (p - r) ** 2).sum() for p, r, w in zip(ps, rs, ws)))
    expect = [p - 0.1 * w * (p - r) for p, r, w in zip(ps, rs, ws)]
    anchor_pull_(ps, rs, ws, 0.1)
    for p, e in zip(ps, expect):
        torch.testing.assert_close(p, e)
    assert anchor_penalty([], [], None).item() == 0.0


def test_unit_pull_is_bit_identical_on_either_path():
    """ω = 1 with |rate| < 0.5 takes the one-pass lerp path; it must round exactly like the sub/add path (which
    larger rates and weighted anchors take), so that AdamR's results do not depend on the path."""
    g = torch.Generator().manual_seed(0)
    for rate in (1e-7, 3.3e-5, 0.01, 0.3, 0.4999, 0.5, 0.9):
        ps = [torch.randn(257, 63, generator=g) * 0.05, torch.randn(1031, generator=g)]
        rs = [p + torch.randn(p.shape, generator=g) * 1e-3 for p in ps]
        math = [p - rate * (p - r) for p, r in zip(ps, rs)]
        explicit = [p.clone() for p in ps]
        torch._foreach_add_(explicit, torch._foreach_sub(explicit, rs), alpha=-rate)
        anchor_pull_(ps, rs, None, rate)
        for p, e, m in zip(ps, explicit, math):
            assert torch.equal(p, e), rate
            torch.testing.assert_close(p, m)


# ----------------------------------------------------------------------------- pull
def test_pull_math_weighted_and_unit():
    model = tiny()
    anchor = HalfAnchor(include=["2.weight"])
    anchor.snapshot_(model)
    ref = model[2].weight.detach().clone()
    omega = 0.5 * ref.abs()
    perturb_(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchor.pull_(model, rate=0.2)
    torch.testing.assert_close(model[2].weight.detach(), before["2.weight"] - 0.2 * omega * (before["2.weight"] - ref))
    torch.testing.assert_close(model[0].weight.detach(), before["0.weight"])  # not anchored: untouched

    l2 = L2Anchor(include=["0.bias"])
    l2.snapshot_(model)
    ref_b = model[0].bias.detach().clone()
    with torch.no_grad():
        model[0].bias.add_(1.0)
    l2.pull_(model, rate=1.0)  # rate·ω = 1: back onto θ*
    torch.testing.assert_close(model[0].bias.detach(), ref_b)
    with pytest.raises(ValueError, match="rate"):
        l2.pull_(model, rate=-0.1)


# ----------------------------------------------------------------------------- growth
def grow_head_(model: nn.Module, extra_rows: int) -> None:
    old = model[2]
    new = nn.Linear(old.in_features, old.out_features + extra_rows)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
    model[2] = new


def test_grown_head_penalised_on_leading_slice_and_new_rows_free():
    model = tiny()
    anchor = HalfAnchor()
    anchor.snapshot_(model)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    grow_head_(model, 2)
    perturb_(model)
    params = dict(model.named_parameters())
    omega = {n: 0.5 * r.abs() for n, r in ref.items()}
    hand = sum((omega[n] * (params[n][tuple(slice(0, s) for s in r.shape)] - r) ** 2).sum() for n, r in ref.items())
    pen = anchor.penalty(model)
    torch.testing.assert_close(pen, hand.detach())
    pen.backward()
    assert torch.equal(params["2.weight"].grad[3:], torch.zeros(2, 5))
    assert params["2.weight"].grad[:3].abs().sum() > 0
    # pull only moves the covered slice
    before = params["2.bias"].detach().clone()
    anchor.pull_(model, 0.5)
    assert torch.equal(params["2.bias"].detach()[3:], before[3:])
    assert not torch.equal(params["2.bias"].detach()[:3], before[:3])


def test_new_parameter_after_snapshot_is_free():
    model = tiny()
    anchor = L2Anchor()
    anchor.snapshot_(model)
    model.add_module("extra", nn.Linear(2, 2))
    perturb_(model)
    anchor.penalty(model).backward()
    assert model.extra.weight.grad is None


def test_missing_or_shrunk_parameter_is_a_value_error_naming_it():
    model = tiny()
    anchor = L2Anchor()
    anchor.snapshot_(model)
    model[2] = nn.Linear(5, 2)  # shrank
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(2, 5\).*\(3, 5\)"):
        anchor.penalty(model)
    model[2] = nn.Identity()  # disappeared
    with pytest.raises(ValueError, match="'2.weight' is no longer in the model"):
        anchor.penalty(model)


def test_importance_of_subclass_is_validated():
    class Bad(ParameterAnchor):
        def compute_importance(self, model, params, **context):
            return {n: -torch.ones_like(p) for n, p in params.items()}

    class Missing(ParameterAnchor):
        def compute_importance(self, model, params, **context):
            return {}

    with pytest.raises(ValueError, match="finite and >= 0"):
        Bad().snapshot_(tiny())
    with pytest.raises(ValueError, match="one tensor per selected parameter"):
        Missing().snapshot_(tiny())


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("cls", [L2Anchor, HalfAnchor, PretrainedAnchor])
def test_state_dict_round_trip_restores_penalty(cls):
    model = tiny()
    anchor = cls(include=["0.*", "2.weight"], strength=3.0)
    anchor.snapshot_(model)
    perturb_(model)
    buffer = io.BytesIO()
    torch.save({"anchor": anchor.state_dict()}, buffer)
    buffer.seek(0)
    fresh = cls(include=["0.*", "2.weight"], strength=3.0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True)["anchor"])
    assert fresh.num_snapshots == 1
    assert torch.equal(fresh.penalty(model), anchor.penalty(model))
    assert repr(fresh) == repr(anchor)


def test_load_state_dict_errors():
    anchor = L2Anchor()
    anchor.snapshot_(tiny())
    with pytest.raises(ValueError, match="cannot load the state of a L2Anchor into a HalfAnchor"):
        HalfAnchor().load_state_dict(anchor.state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        L2Anchor().load_state_dict({"foo": 1})


def test_to_and_repr():
    model = tiny()
    anchor = L2Anchor(include=["2.*"], strength=10.0).to("cpu")
    anchor.snapshot_(model)
    assert anchor.to("cpu") is anchor
    assert (
        repr(anchor)
        == "L2Anchor(include=['2.*'], exclude=[], strength=10; anchored 2 tensors / 18 elements, snapshots=1)"
    )


def test_penalty_follows_param_dtype():
    model = tiny()
    anchor = HalfAnchor()
    anchor.snapshot_(model)
    perturb_(model)
    expected = anchor.penalty(model)
    model.double()
    pen = anchor.penalty(model)
    assert pen.dtype == torch.float64
    torch.testing.assert_close(pen.float(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- re-anchoring and pretrained
def test_l2_snapshot_re_anchors_and_importance_stays_one():
    model = tiny()
    anchor = L2Anchor()
    anchor.snapshot_(model)
    perturb_(model)
    anchor.snapshot_(model)
    assert anchor.penalty(model).item() == 0.0 and anchor.num_snapshots == 2
    assert all(torch.equal(w, torch.ones_like(w)) for w in anchor.importance.values())


def test_pretrained_anchor_never_re_anchors():
    model = tiny()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchor = PretrainedAnchor()
    anchor.snapshot_(model)
    perturb_(model)
    anchor.snapshot_(model)  # no-op
    hand = sum(((p - ref[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(anchor.penalty(model), hand.detach())


def test_pretrained_anchor_anchors_at_the_first_weights_it_sees():
    """penalty or pull_ before any snapshot anchors at the current weights (a ContinualModule's first step)."""
    model = tiny()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchor = PretrainedAnchor(include=["2.*"])
    assert anchor.penalty(model).item() == 0.0 and list(anchor.reference) == ["2.weight", "2.bias"]
    perturb_(model)
    anchor.snapshot_(model)  # a task boundary: no-op
    hand = sum(((p - ref[n]) ** 2).sum() for n, p in model.named_parameters() if n.startswith("2."))
    torch.testing.assert_close(anchor.penalty(model), hand.detach())

    fresh, moved = PretrainedAnchor(), {n: p.detach().clone() for n, p in model.named_parameters()}
    fresh.pull_(model, rate=0.5)  # anchors, so nothing moves
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters())
    assert all(torch.equal(fresh.reference[n], moved[n]) for n in moved)


def test_pretrained_snapshot_tensors_copies_once():
    model = tiny()
    named = dict(model.named_parameters())
    anchor = PretrainedAnchor(exclude=["*.bias"])
    anchor.snapshot_tensors_(named)
    assert list(anchor.reference) == ["0.weight", "2.weight"] and anchor.num_snapshots == 1
    assert anchor.reference["0.weight"].data_ptr() != named["0.weight"].data_ptr()  # a copy, not a view
    perturb_(model)
    anchor.snapshot_tensors_(named)  # no-op: θ* stays θ_pre
    assert not torch.equal(anchor.reference["0.weight"], named["0.weight"])
    with pytest.raises(ValueError, match="match no parameter"):
        PretrainedAnchor(include=["head.*"]).snapshot_tensors_(named)


def test_l1_pull_weighted_and_pull_tensors_touches_only_the_given_anchored_names():
    model = tiny()
    anchor = HalfAnchor(include=["*.weight"])
    anchor.snapshot_(model)
    ref = {n: t.clone() for n, t in anchor.reference.items()}
    omega = anchor.importance
    perturb_(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchor.pull_(model, rate=0.1, variant="l1")
    for n in ("0.weight", "2.weight"):
        expect = before[n] - 0.1 * omega[n] * (before[n] - ref[n]).sign()
        torch.testing.assert_close(dict(model.named_parameters())[n].detach(), expect)

    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    anchor.pull_tensors_({n: named[n] for n in ("2.weight", "2.bias")}, rate=0.2)  # 2.bias is not anchored
    expect = before["2.weight"] - 0.2 * omega["2.weight"] * (before["2.weight"] - ref["2.weight"])
    torch.testing.assert_close(named["2.weight"].detach(), expect)
    assert all(torch.equal(named[n], before[n]) for n in ("0.weight", "0.bias", "2.bias"))
    with pytest.raises(ValueError, match="variant must be 'l2' or 'l1'"):
        anchor.pull_(model, rate=0.1, variant="l3")


def test_pretrained_from_reference_state_dict():
    model = tiny()
    pre = {n: t.clone() for n, t in model.state_dict().items()}
    anchor = PretrainedAnchor.from_reference(pre, include=["*.weight"])
    assert list(anchor.reference) == ["0.weight", "2.weight"]
    perturb_(model)
    hand = sum(((dict(model.named_parameters())[n] - pre[n]) ** 2).sum() for n in ("0.weight", "2.weight"))
    torch.testing.assert_close(anchor.penalty(model), hand.detach())


def test_pretrained_from_reference_drops_buffers_with_model():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    pre = {n: t.clone() for n, t in model.state_dict().items()}
    assert PretrainedAnchor.from_reference(pre).reference.keys() >= {"1.running_mean"}
    anchor = PretrainedAnchor.from_reference(pre, model=model)
    assert sorted(anchor.reference) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert anchor.penalty(model).item() == 0.0


def test_bf16_parameters_penalty_in_fp32_and_gradient_in_bf16():
    model = tiny()
    anchor = HalfAnchor()
    anchor.snapshot_(model)
    perturb_(model)
    expected = anchor.penalty(model)
    model.bfloat16()
    pen = anchor.penalty(model)
    assert pen.dtype == torch.float32
    torch.testing.assert_close(pen, expected, rtol=2e-2, atol=1e-3)
    pen.backward()
    assert model[0].weight.grad.dtype == torch.bfloat16


def test_functional_penalty_gradient_matches_autograd_reference():
    ps = [torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    rs = [torch.randn(3, 2), torch.randn(4)]
    ws = [torch.rand(3, 2), torch.rand(4)]
    (anchor_penalty(ps, rs, [w.sqrt() for w in ws]) * 3.0).backward()
    for p, r, w in zip(ps, rs, ws):
        torch.testing.assert_close(p.grad, (6.0 * w * (p - r)).detach())
    for p in ps:
        p.grad = None
    anchor_penalty(ps, rs).backward()
    for p, r in zip(ps, rs):
        torch.testing.assert_close(p.grad, (2.0 * (p - r)).detach())


def test_frozen_parameters_count_in_the_value_but_get_no_gradient():
    model = tiny()
    anchor = L2Anchor()
    anchor.snapshot_(model)
    perturb_(model)
    model[0].weight.requires_grad_(False)
    ref = anchor.reference
    hand = sum(((p - ref[n]) ** 2).sum() for n, p in model.named_parameters())
    pen = anchor.penalty(model)
    torch.testing.assert_close(pen, hand.detach())
    pen.backward()
    assert model[0].weight.grad is None
    torch.testing.assert_close(model[2].weight.grad, (2 * (model[2].weight - ref["2.weight"])).detach())


def test_mixed_dtype_model():
    model = tiny()
    anchor = HalfAnchor()
    anchor.snapshot_(model)
    perturb_(model)
    expected = anchor.penalty(model)
    model[0].bfloat16()
    model[2].double()
    pen = anchor.penalty(model)
    assert pen.dtype == torch.float64
    torch.testing.assert_close(pen.float(), expected, rtol=2e-2, atol=1e-3)
    pen.backward()
    assert model[0].weight.grad.dtype == torch.bfloat16 and model[2].weight.grad.dtype == torch.float64
