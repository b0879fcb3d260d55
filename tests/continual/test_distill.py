"""PredKD (BCE and CE heads) and FeatKD against brute-force references."""

import math

import pytest
import torch

from lifelong_delta.continual.distill import feat_kd_loss, pred_kd_loss


def _pair(B=4, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, C, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = (torch.randn(B, C, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    return s, t


def _sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_bce_predkd_matches_brute_force(T):
    s, t = _pair()
    past = range(0, 3)
    loss = pred_kd_loss(s, t, past, temperature=T, head="bce")
    ref = 0.0
    for b in range(4):
        for c in past:
            q = _sig(t[b, c].item() / T)
            p = _sig(s[b, c].item() / T)
            ref -= q * math.log(p) + (1 - q) * math.log(1 - p)
    assert loss.item() == pytest.approx(ref / (4 * 3), rel=1e-12)
    loss.backward()
    assert torch.all(s.grad[:, 3:] == 0) and torch.any(s.grad[:, :3] != 0)
    assert t.grad is None  # the teacher is detached


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ce_predkd_is_scaled_kl_on_past_classes(T):
    s, t = _pair(seed=1)
    past = [0, 2, 4]
    loss = pred_kd_loss(s, t, past, temperature=T, head="ce")
    ref = 0.0
    for b in range(4):
        zs = [s[b, c].item() / T for c in past]
        zt = [t[b, c].item() / T for c in past]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        for vs, vt in zip(zs, zt):
            pt = math.exp(vt - lt)
            ref += pt * ((vt - lt) - (vs - ls))
    assert loss.item() == pytest.approx(T * T * ref / 4, rel=1e-10)
    loss.backward()
    assert torch.all(s.grad[:, [1, 3, 5]] == 0)


def test_ce_predkd_is_zero_when_student_equals_teacher():
    s, _ = _pair()
    assert pred_kd_loss(s, s.detach().clone(), range(4), 3.0, "ce").item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("head", ["bce", "ce"])
def test_no_past_classes_gives_zero(head):
    s, t = _pair()
    loss = pred_kd_loss(s, t, range(0), 2.0, head)
    assert loss.shape == () and loss.item() == 0.0 and loss.dtype == s.dtype


def test_predkd_rejects_bad_input():
    s, t = _pair()
    with pytest.raises(ValueError, match="temperature"):
        pred_kd_loss(s, t, range(2), temperature=0.0)
    with pytest.raises(ValueError, match="head"):
        pred_kd_loss(s, t, range(2), head="mse")
    with pytest.raises(ValueError, match="shape|\\[B, C\\]"):
        pred_kd_loss(s, t[:, :3], range(2))


def test_feat_kd_is_mean_squared_distance_over_batch_and_width():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = feat_kd_loss(s, t)
    ref = sum(float(((s[b] - t[b]) ** 2).sum().detach()) for b in range(3)) / (3 * 5)
    assert loss.item() == pytest.approx(ref, rel=1e-12)
    loss.backward()
    assert t.grad is None
    assert feat_kd_loss(t.detach(), t.detach()).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        feat_kd_loss(s, t[:, :4])
