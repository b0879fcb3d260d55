"""The decision pipeline, on hand-made statistics: every branch, and the numbers quoted in the reason."""

from __future__ import annotations

import math

import pytest

from lifelong_delta.delta.recommend import Thresholds, dare_noise, max_safe_p, recommend
from lifelong_delta.delta.stats import DeltaStats, LayerStats


def _stats(rel_norm: float, *, mean: float = 0.0, n: int = 10_000) -> DeltaStats:
    """One 100×100 matrix with ‖θ_pre‖ = 1 and ‖δ‖ = rel_norm (and a bias that must not matter)."""
    sum_sq = rel_norm**2
    matrix = LayerStats(
        "enc.0.weight",
        (100, 100),
        n,
        sum=mean * n,
        sum_sq=sum_sq,
        sum_abs=math.sqrt(sum_sq * n),
        max_abs=rel_norm,
        base_sum_sq=1.0,
    )
    bias = LayerStats(
        "enc.0.bias", (100,), 100, sum=0.0, sum_sq=100.0, sum_abs=100.0, max_abs=1.0, base_sum_sq=1e-6
    )  # a huge relative change on a tiny bias
    return DeltaStats((matrix, bias))


def test_noise_formula_and_inverse():
    assert dare_noise(0.01, 0.99) == pytest.approx(math.sqrt(99) * 0.01)
    for r in (1e-3, 0.02):
        p = max_safe_p(r, 0.05)
        assert dare_noise(r, p) == pytest.approx(0.05)
    assert max_safe_p(0.0, 0.05) == 1.0


def test_small_delta_moderate_p_is_plain_dare():
    rec = recommend(_stats(0.005), target_p=0.9)
    assert rec.method == "dare" and rec.q_mode is None
    assert "5.00e-03" in rec.reason and "0.015" in rec.reason  # ‖δ‖/‖θ‖ and sqrt(9)·0.005
    assert rec.numbers["rel_norm"] == pytest.approx(0.005)  # the bias is ignored: only matrices count


@pytest.mark.parametrize(
    ("labelled", "unlabelled", "q_mode"),
    [(True, False, "grid"), (True, True, "grid"), (False, True, "unlabelled"), (False, False, "unlabelled")],
)
def test_small_delta_extreme_p_is_darex_q(labelled, unlabelled, q_mode):
    rec = recommend(_stats(0.01), target_p=0.99, has_labelled_data=labelled, has_unlabelled_data=unlabelled)
    assert rec.method == "darex-q" and rec.q_mode == q_mode
    assert "100" in rec.reason  # the 1/(1-p) rescale
    assert rec.numbers["dare_noise"] == pytest.approx(math.sqrt(99) * 0.01)
    if not (labelled or unlabelled):
        assert "no data" in rec.reason and rec.alternatives[0].startswith("dare with p <=")


def test_large_delta_is_importance_pruning_or_adamr():
    big = _stats(0.2)
    rec = recommend(big, target_p=0.9, has_unlabelled_data=True)
    assert rec.method == "wanda" and "2.00e-01" in rec.reason and "above 0.1" in rec.reason
    assert recommend(big, target_p=0.9).method == "magnitude"
    rec = recommend(big, target_p=0.99, can_refinetune=True)
    assert rec.method == "refinetune-adamr" and rec.label == "re-fine-tune with AdamR" and "AdamR" in rec.reason
    assert recommend(big, target_p=0.99, can_refinetune=False).method == "magnitude"


def test_a_large_low_rank_delta_is_not_importance_pruned():
    big = _stats(0.2)
    kw = {"target_p": 0.9, "has_labelled_data": True, "can_refinetune": False}
    assert recommend(big, **kw).method == "wanda"
    rec = recommend(big, low_rank=True, **kw)
    assert (rec.method, rec.q_mode) == ("darex-q", "grid") and "LoRA product" in rec.reason
    assert recommend(big, low_rank=True, target_p=0.9).method == "refinetune-adamr"  # ρ = 0.6
    assert recommend(_stats(0.01), low_rank=True, target_p=0.9) == recommend(_stats(0.01), target_p=0.9)


@pytest.mark.parametrize(
    ("rel_norm", "p", "post_hoc", "if_refinetune"),
    [  # the measured MiniLM fine-tunes of docs/reproduction.md (finding 5): what was best in the study
        (5.27e-2, 0.9, "darex-q", "darex-q"),  # trec/adamw-large: DAREx-q 89.2, DARE 90.3, WANDA 87.5
        (5.27e-2, 0.99, "darex-q", "refinetune-adamr"),  # DAREx-q 70.5 > WANDA 42.7; AdamR-L2 re-fine-tune 88.9
        (2.08e-2, 0.99, "darex-q", "darex-q"),  # trec/adamw: ρ = 0.21, DAREx-q 84.7 within noise of the best
        (2.08e-2, 0.999, "darex-q", "refinetune-adamr"),  # ρ = 0.66: everything post hoc is near chance
    ],
)
def test_measured_regimes(rel_norm, p, post_hoc, if_refinetune):
    kw = {"target_p": p, "has_labelled_data": True, "has_unlabelled_data": True}
    assert recommend(_stats(rel_norm), can_refinetune=False, **kw).method == post_hoc
    assert recommend(_stats(rel_norm), can_refinetune=True, **kw).method == if_refinetune


def test_small_delta_too_noisy_for_darex_suggests_adamr_and_a_lower_p():
    rec = recommend(_stats(0.02), target_p=0.999, has_labelled_data=True)
    rho = math.sqrt(999) * 0.02
    assert rec.method == "refinetune-adamr" and rec.numbers["dare_noise"] == pytest.approx(rho)
    assert f"{rho:.3f}" in rec.reason and "above 0.3" in rec.reason and rec.alternatives == ("darex-q",)
    lower = max_safe_p(0.02, 0.3)
    assert f"{lower:.3f}" in rec.reason and dare_noise(0.02, lower) == pytest.approx(0.3)
    # the boundary: just below the threshold it is DAREx-q
    assert recommend(_stats(0.02), target_p=lower - 1e-4, has_labelled_data=True).method == "darex-q"


def test_thresholds_are_overridable_and_validated():
    assert (
        recommend(
            _stats(0.2), thresholds=Thresholds(large_rel_norm=0.5, dare_noise_ok=1.0, refinetune_noise=2.0)
        ).method
        == "dare"
    )
    with pytest.raises(ValueError, match="Thresholds"):
        Thresholds(extreme_p=1.5)
    with pytest.raises(ValueError, match="dare_noise_ok < refinetune_noise"):
        Thresholds(dare_noise_ok=0.5, refinetune_noise=0.3)


def test_bad_input():
    with pytest.raises(ValueError, match="target_p"):
        recommend(_stats(0.01), target_p=1.0)
    with pytest.raises(ValueError, match="no floating tensors"):
        recommend(DeltaStats(()))
