"""Which delta-pruning method to use: the decision pipeline of DARE the Extreme (arXiv 2410.09344, Sec. 6, Fig. 4).

The paper's findings, in the order the pipeline asks them:

1. **Are the delta parameters large?** DARE fails when δ has a large mean and variance, whatever the pruning rate:
   its output change has variance ∝ p/(1−p)·Σⱼ (δᵢⱼ xⱼ)², i.e. it grows with the second moment mean² + var of δ.
   Then importance-based pruning (WANDA with calibration activations, else magnitude) beats random dropping; if the
   model can be fine-tuned again, AdamR (L2 toward θ_pre) shrinks the delta so that DAREx works even at p = 0.99.
2. **Is the pruning rate extreme?** For small deltas and a moderate p, plain DARE (rescale 1/(1−p)) is fine.
3. **What data is there?** At high p, DAREx-q replaces 1/(1−p) by 1/q with q > 1−p: pick q on a labelled validation
   set (grid), or without labels by the last-layer output change, or per layer analytically.

The paper states these regimes qualitatively. We measure them with one scale-free number per model, computed on the
weight matrices: the relative delta size ``r = ‖δ‖₂/‖θ_pre‖₂`` (which pools mean² + variance of δ), and the DARE
noise-to-signal proxy ``ρ(p) = sqrt(p/(1−p))·r`` (the standard deviation of DARE's change of ``W x`` relative to
``‖W x‖`` for inputs with isotropic second moments). The thresholds in :class:`Thresholds` are this project's
heuristics, not numbers from the paper; pass your own to override them. They were calibrated on the MiniLM study of
``make prune-eval`` (``docs/reproduction.md``, finding 5): at ``r`` = 5.2e-2 (TREC, AdamW at lr 4e-4) DAREx-q still
beat WANDA by 28 points at p = 0.99, so ``large_rel_norm`` is 0.1, above every fine-tune measured there; and the
post-hoc methods lost 20+ points where ``ρ(p)`` passed 0.3, which AdamR-L2 re-fine-tuning recovered (about 70 → 88.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lifelong_delta.delta.stats import DeltaStats, LayerStats

__all__ = ["Choice", "Recommendation", "Thresholds", "dare_noise", "max_safe_p", "recommend"]

Choice = Literal["dare", "darex-q", "magnitude", "wanda", "refinetune-adamr"]


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds (heuristics; see the module docstring).

    Attributes:
        large_rel_norm: ``‖δ‖/‖θ_pre‖`` above which the delta counts as large. Ordinary task fine-tunes sit around
            1e-3..5e-2; continual pre-training and long instruction tuning reach 0.1 and more.
        dare_noise_ok: largest ``ρ(p)`` for which plain DARE's 1/(1−p) rescaling is considered safe.
        refinetune_noise: ``ρ(p)`` above which even DAREx-q loses much of the fine-tune, so that re-fine-tuning
            with AdamR is worth it when allowed.
        extreme_p: drop rates from here on count as extreme (the paper's 0.99 regime).
    """

    large_rel_norm: float = 0.1
    dare_noise_ok: float = 0.05
    refinetune_noise: float = 0.3
    extreme_p: float = 0.95

    def __post_init__(self) -> None:
        if not (self.large_rel_norm > 0 and 0 < self.dare_noise_ok < self.refinetune_noise and 0 < self.extreme_p < 1):
            raise ValueError(
                "Thresholds need large_rel_norm > 0, 0 < dare_noise_ok < refinetune_noise and extreme_p in (0, 1): "
                f"{self}"
            )


@dataclass(frozen=True)
class Recommendation:
    """The chosen method, why, and the numbers behind it."""

    method: Choice
    q_mode: Literal["grid", "analytic", "unlabelled"] | None
    reason: str
    numbers: dict[str, float] = field(default_factory=dict)
    alternatives: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.method == "refinetune-adamr":
            return "re-fine-tune with AdamR"
        return self.method + (f" (q_mode={self.q_mode})" if self.q_mode else "")


def dare_noise(rel_norm: float, p: float) -> float:
    """ρ(p) = sqrt(p/(1−p))·‖δ‖/‖θ_pre‖, the relative output noise of DARE at drop rate p."""
    return math.sqrt(p / (1.0 - p)) * rel_norm


def max_safe_p(rel_norm: float, noise_ok: float) -> float:
    """Largest p with ``dare_noise(rel_norm, p) <= noise_ok`` (solves p/(1−p) = (noise_ok/r)²)."""
    if rel_norm == 0:
        return 1.0
    s = (noise_ok / rel_norm) ** 2
    return s / (1.0 + s)


def recommend(
    stats: DeltaStats,
    *,
    target_p: float = 0.9,
    has_labelled_data: bool = False,
    has_unlabelled_data: bool = False,
    can_refinetune: bool = True,
    low_rank: bool = False,
    thresholds: Thresholds | None = None,
) -> Recommendation:
    """Choose a delta-pruning method from delta statistics and the data at hand.

    Args:
        stats: Delta statistics of the model (see :class:`~lifelong_delta.delta.stats.DeltaStats`).
        target_p: Drop rate the user wants, in [0, 1).
        has_labelled_data: A labelled validation set exists (enables the DAREx-q grid).
        has_unlabelled_data: Unlabelled inputs exist (enough for DAREx-q ``unlabelled``/``analytic`` and WANDA).
        can_refinetune: The user can fine-tune the model again (enables the AdamR route).
        low_rank: The delta is a LoRA product B·A. Importance pruning is then not chosen even for a large delta:
            keeping each row's largest entries breaks the rank-r structure (docs/reproduction.md, finding 4: on the
            TREC LoRA delta, ‖δ‖/‖θ_pre‖ 5.6e-2, WANDA reached chance at p = 0.99 where DAREx-q kept 57 %).
        thresholds: Override the decision thresholds.

    Returns:
        A :class:`Recommendation` whose ``reason`` quotes the numbers it used.

    Raises:
        ValueError: ``target_p`` is outside [0, 1) or ``stats`` has no tensors.
    """
    th = thresholds or Thresholds()
    if not 0.0 <= target_p < 1.0:
        raise ValueError(f"target_p must be in [0, 1), got {target_p}")
    if not stats.layers:
        raise ValueError("no floating tensors to analyse: the base and fine-tuned models share none (check --exclude)")
    numbers, facts = _measure(stats, target_p, th)
    has_data = has_labelled_data or has_unlabelled_data
    if numbers["rel_norm"] > th.large_rel_norm and not low_rank:
        return _for_a_large_delta(facts, numbers, th, has_data=has_data, can_refinetune=can_refinetune)
    if numbers["rel_norm"] > th.large_rel_norm:
        small = (
            f"{facts} is above {th.large_rel_norm:g}, yet it is a LoRA product B·A (importance pruning breaks "
            "its rank-r rows; random dropping with a rescale keeps them in expectation)"
        )
    else:
        small = f"{facts} is at most {th.large_rel_norm:g}: the delta is small"
    return _for_a_small_delta(
        small,
        numbers,
        th,
        has_labelled_data=has_labelled_data,
        has_unlabelled_data=has_unlabelled_data,
        can_refinetune=can_refinetune,
    )


def _measure(stats: DeltaStats, target_p: float, th: Thresholds) -> tuple[dict[str, float], str]:
    """The numbers the decision reads (``rel_norm`` r, ``dare_noise`` ρ(p), ``max_safe_p``, ...) over the weight
    matrices (every tensor if there are none), and the sentence that quotes them."""
    pooled: LayerStats = DeltaStats.pool(stats.matrices or stats.layers, name="weight matrices")
    r = pooled.rel_norm
    worst = max(stats.matrices or stats.layers, key=lambda s: s.rel_norm)
    numbers = {
        "mean_delta": pooled.mean,
        "std_delta": pooled.std,
        "mean_abs_delta": pooled.mean_abs,
        "rel_norm": r,
        "worst_rel_norm": worst.rel_norm,
        "dare_noise": dare_noise(r, target_p),
        "max_safe_p": max_safe_p(r, th.dare_noise_ok),
        "target_p": target_p,
    }
    facts = (
        f"‖δ‖/‖θ_pre‖ = {r:.2e} over the weight matrices (mean δ = {pooled.mean:.2e}, std δ = {pooled.std:.2e}, "
        f"mean |δ| = {pooled.mean_abs:.2e}; largest {worst.rel_norm:.2e} in {worst.name})"
    )
    return numbers, facts


def _for_a_large_delta(
    facts: str, numbers: dict[str, float], th: Thresholds, *, has_data: bool, can_refinetune: bool
) -> Recommendation:
    """A large full delta: re-fine-tune with AdamR at an extreme p if allowed, else importance pruning (WANDA with
    data, magnitude without)."""
    target_p = numbers["target_p"]
    large = f"{facts} is above {th.large_rel_norm:g}: the delta is large, so random dropping (DARE) fails"
    if can_refinetune and target_p >= th.extreme_p:
        return Recommendation(
            "refinetune-adamr",
            None,
            f"{large}, and at p = {target_p:g} post-hoc importance pruning loses much of the fine-tune too. "
            "Re-fine-tune with AdamR (L2 pull toward θ_pre) to shrink the delta's mean and variance, then prune "
            "with DAREx-q (or AdamR-L1, then magnitude pruning).",
            numbers,
            ("wanda" if has_data else "magnitude",),
        )
    method: Choice = "wanda" if has_data else "magnitude"
    why = (
        "WANDA (|δ|·‖x‖ per output row) uses your calibration inputs"
        if has_data
        else "magnitude pruning needs no data (with inputs, WANDA is better)"
    )
    return Recommendation(
        method,
        None,
        f"{large}; importance-based pruning keeps the entries that matter: {why}.",
        numbers,
        ("refinetune-adamr",) if can_refinetune else (),
    )


def _for_a_small_delta(
    small: str,
    numbers: dict[str, float],
    th: Thresholds,
    *,
    has_labelled_data: bool,
    has_unlabelled_data: bool,
    can_refinetune: bool,
) -> Recommendation:
    """A small delta (or a LoRA product): plain DARE while its noise ρ(p) is low, re-fine-tuning with AdamR when
    ρ(p) is too high even for DAREx-q, else DAREx-q with the q mode the data allows."""
    target_p, r, rho, p_safe = numbers["target_p"], numbers["rel_norm"], numbers["dare_noise"], numbers["max_safe_p"]
    if rho <= th.dare_noise_ok:
        return Recommendation(
            "dare",
            None,
            f"{small}, and at p = {target_p:g} DARE's relative output noise sqrt(p/(1-p))·‖δ‖/‖θ_pre‖ = {rho:.3f} "
            f"is at most {th.dare_noise_ok:g} (plain DARE is safe up to p ≈ {p_safe:.3f}).",
            numbers,
            ("darex-q",),
        )
    if can_refinetune and rho > th.refinetune_noise:
        return Recommendation(
            "refinetune-adamr",
            None,
            f"{small}, but at p = {target_p:g} DARE's relative output noise sqrt(p/(1-p))·‖δ‖/‖θ_pre‖ = {rho:.3f} "
            f"is above {th.refinetune_noise:g}, where even DAREx-q loses much of the fine-tune. Re-fine-tune with "
            "AdamR (L2 pull toward θ_pre; a larger λ if it already was) to shrink the delta, then prune with DAREx-q; "
            f"or keep this model and lower p to about {max_safe_p(r, th.refinetune_noise):.3f}.",
            numbers,
            ("darex-q",),
        )
    noisy = (
        f"{small}, but at p = {target_p:g} DARE's rescaling 1/(1-p) = {1 / (1 - target_p):.3g} gives relative "
        f"output noise {rho:.3f} > {th.dare_noise_ok:g} (plain DARE is safe only up to p ≈ {p_safe:.3f}); "
        "DAREx-q rescales by 1/q with q > 1-p instead"
    )
    if has_labelled_data:
        return Recommendation(
            "darex-q",
            "grid",
            f"{noisy}, and with labelled validation data q is best chosen by a "
            "coarse-then-fine grid on the validation metric.",
            numbers,
            ("darex-q unlabelled",),
        )
    if has_unlabelled_data:
        return Recommendation(
            "darex-q",
            "unlabelled",
            f"{noisy}; without labels, choose q by minimising the "
            "last-layer output change on unlabelled inputs (one batch is enough).",
            numbers,
            ("darex-q analytic",),
        )
    return Recommendation(
        "darex-q",
        "unlabelled",
        f"{noisy}. You have no data: one batch of unlabelled inputs is enough to pick q by the last-layer output "
        f"change; otherwise lower p to about {p_safe:.3f} and use plain DARE.",
        numbers,
        (f"dare with p <= {p_safe:.3f}",),
    )
