"""The parameter anchor: a reference θ* and an importance ω for the parameters that a selector matches.

``strength · penalty(model) = strength · Σ ω (θ − θ*)²`` is the loss term of L2 / EWC-style continual learning
(Kirkpatrick et al., 2017, https://arxiv.org/abs/1612.00796, whose λ/2 is ``strength``), ``pull_(model, rate)`` is
the decoupled step ``θ ← θ − rate · ω ⊙ (θ − θ*)`` that AdamR applies to its named parameters
(:meth:`ParameterAnchor.pull_tensors_`), and ``DeltaPruning(reference=anchor)`` prunes ``θ − θ*``: one reference,
three consumers. A new anchor is a subclass that overrides :meth:`ParameterAnchor.compute_importance` (and optionally
:meth:`ParameterAnchor.accumulate`).

The penalty and the pull are a handful of ``torch._foreach_*`` kernels over all anchored tensors, not a
Python loop of small kernels; ``bench/anchor_overhead.py`` measures the difference.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lifelong_delta.anchors.ops import PullVariant, anchor_penalty, anchor_pull_

__all__ = ["ParameterAnchor"]

_STATE_VERSION = 1


def _patterns(value: Sequence[str] | str, option: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence):
        raise TypeError(f"{option} must be a list of glob patterns, got {type(value).__name__}")
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{option} must hold non-empty glob strings, got {pattern!r}")
    return tuple(value)


def _check_rate(value: float, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{option} must be a finite number >= 0, got {value!r}")
    return float(value)


def _leading_slice(param: Tensor, ref_shape: torch.Size, name: str) -> Tensor:
    """``param`` itself, or the leading slice of a grown ``param`` that the reference covers."""
    if param.shape == ref_shape:
        return param
    if param.dim() != len(ref_shape) or any(p < r for p, r in zip(param.shape, ref_shape)):
        raise ValueError(
            f"parameter {name!r} has shape {tuple(param.shape)} but its anchor reference has shape "
            f"{tuple(ref_shape)}; anchored parameters may only grow (call snapshot_ again to re-anchor)"
        )
    return param[tuple(slice(0, r) for r in ref_shape)]


class ParameterAnchor:
    """Reference θ* and importance ω for the parameters selected by glob patterns.

    Args:
        include: ``fnmatch`` patterns over ``model.named_parameters()`` names, e.g.
            ``["blocks.[0-4].attn.qkv.*",
            "head.*"]``. A single string is one pattern.
        exclude: patterns removed from the ``include`` selection.
        strength: λ of the loss term ``strength * penalty(model)``; the anchor itself never multiplies by it.
            It is Avalanche's ``ewc_lambda`` and Kirkpatrick et al.'s λ/2 (see :meth:`penalty`).

    Life cycle: :meth:`snapshot_` (end of a task) → :meth:`penalty` (every step) or :meth:`pull_`.
    The state (θ*, ω, counters) travels through :meth:`state_dict` / :meth:`load_state_dict`.
    """

    #: subclasses whose importance is always 1 set this, so the penalty skips the multiply by ω.
    unit_importance: bool = False

    def __init__(self, include: Sequence[str] = ("*",), exclude: Sequence[str] = (), strength: float = 1.0) -> None:
        self.include = _patterns(include, "include")
        if not self.include:
            raise ValueError("include must hold at least one glob pattern, e.g. ['*']")
        self.exclude = _patterns(exclude, "exclude")
        self.strength = _check_rate(strength, "strength")
        self.num_snapshots = 0
        self._reference: dict[str, Tensor] = {}
        self._importance: dict[str, Tensor] = {}
        self._cache: dict[tuple, tuple[Tensor, Tensor | None, Tensor]] = {}

    # ------------------------------------------------------------------ selection
    def select(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters of ``model`` whose names match ``include`` and no ``exclude`` pattern.

        Raises:
            ValueError: if nothing matches.
        """
        named = dict(model.named_parameters())
        return {name: named[name] for name in self.match(list(named))}

    def match(self, names: Sequence[str]) -> list[str]:
        """The ``names`` that match ``include`` and no ``exclude`` pattern, in order.

        Raises:
            ValueError: if nothing matches.
        """
        selected = [
            name
            for name in names
            if any(fnmatch.fnmatchcase(name, pat) for pat in self.include)
            and not any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)
        ]
        if not selected:
            examples = ", ".join(repr(n) for n in list(names)[:4]) or "(the model has no parameters)"
            raise ValueError(
                f"include patterns {list(self.include)} (minus exclude {list(self.exclude)}) match no "
                "parameter "
                f"of the model; names look like {examples}"
            )
        for pat in self.include:
            if not any(fnmatch.fnmatchcase(name, pat) for name in names):
                warnings.warn(f"{type(self).__name__}: include pattern {pat!r} matches no parameter", stacklevel=3)
        return selected

    # ------------------------------------------------------------------ importance (what subclasses override)
    def compute_importance(
        self, model: nn.Module, params: dict[str, nn.Parameter], **context: Any
    ) -> dict[str, Tensor]:
        """Importance ω of each selected parameter at the current θ; runs with gradients enabled.

        Args:
            model: the model being anchored.
            params: the selected parameters, ``{name: θ}``.
            **context: whatever the caller passes to :meth:`snapshot_`, e.g. ``batches=...``.

        Returns:
            ``{name: ω}`` for every name in ``params``, each ω ≥ 0 with θ's shape. The base class
            returns ones.
        """
        return {name: torch.ones((), device=p.device).expand(p.shape) for name, p in params.items()}

    def accumulate(self, old: Tensor | None, new: Tensor) -> Tensor:
        """Combine the importance of past snapshots with the new one; the base class replaces it.

        Args:
            old: previous ω, already zero-padded to ``new``'s shape, or ``None`` at the first snapshot.
            new: ω from :meth:`compute_importance`.
        """
        return new

    # ------------------------------------------------------------------ life cycle
    def snapshot_(self, model: nn.Module, **context: Any) -> None:
        """Re-anchor in place: θ* ← detached copy of θ, ω ← accumulate(ω_old, compute_importance(...)).

        Args:
            model: the model whose selected parameters are anchored.
            **context: forwarded to :meth:`compute_importance` (e.g. ``batches`` for EWC).
        """
        params = self.select(model)
        with torch.enable_grad():
            new = self.compute_importance(model, params, **context)
        if set(new) != set(params):
            missing, extra = sorted(set(params) - set(new)), sorted(set(new) - set(params))
            raise ValueError(
                f"{type(self).__name__}.compute_importance must return one tensor per selected parameter; "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
        with torch.no_grad():
            importance = {}
            for name, p in params.items():
                w = new[name].detach()
                if w.shape != p.shape:
                    raise ValueError(
                        f"{type(self).__name__}.compute_importance returned shape {tuple(w.shape)} "
                        f"for {name!r}, "
                        f"expected {tuple(p.shape)}"
                    )
                old = self._importance.get(name)
                if old is not None and old.shape != w.shape:
                    old = _pad_to(old, w.shape, name)
                w = self.accumulate(old, w)
                if not self.unit_importance and not bool(torch.isfinite(w).all() & (w >= 0).all()):
                    raise ValueError(f"{type(self).__name__}: importance of {name!r} must be finite and >= 0")
                importance[name] = w
            self._reference = {name: p.detach().clone() for name, p in params.items()}
            self._importance = importance
        self.num_snapshots += 1
        self._cache.clear()

    # ------------------------------------------------------------------ per-step use
    def _aligned(
        self, named: Mapping[str, Tensor], names: Sequence[str], sqrt: bool
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        """Lists (θ views, θ* on θ's device/dtype, ω or √ω on θ's device/dtype) for ``names`` (anchored ones).

        A reference already on θ's device and dtype is used as it is, not copied.
        """
        params, refs, weights = [], [], []
        for name in names:
            ref = self._reference[name]
            p = named.get(name)
            if p is None:
                raise ValueError(
                    f"anchored parameter {name!r} is no longer in the model; re-anchor with snapshot_ or "
                    "load a "
                    "state dict that matches the model"
                )
            p = _leading_slice(p, ref.shape, name)
            key = (name, p.device, p.dtype)
            cached = self._cache.get(key)
            if cached is None:
                w = None
                if not self.unit_importance:
                    w = self._importance[name].to(device=p.device, dtype=torch.float32)
                    w_sqrt = w.sqrt().to(p.dtype)
                    w = w.to(p.dtype)
                else:
                    w_sqrt = None
                cached = self._cache[key] = (ref.to(device=p.device, dtype=p.dtype), w, w_sqrt)
            params.append(p)
            refs.append(cached[0])
            weights.append(cached[2] if sqrt else cached[1])
        return params, refs, (None if self.unit_importance else weights)

    def penalty(self, model: nn.Module) -> Tensor:
        """Σ ω (θ − θ*)² over the anchored parameters, differentiable with respect to θ.

        The loss term is ``strength * penalty(model)``. Avalanche's EWC plugin (0.6) adds the same sum times its
        ``ewc_lambda``, so ``strength`` is Avalanche's λ and Kirkpatrick et al.'s λ/2 (their term is
        ``λ/2 · Σ F (θ − θ*)²``).

        A parameter that grew since the snapshot (e.g. head rows for new classes) is penalised on the
        leading slice the reference covers; a parameter that appeared since the snapshot is free.

        Returns:
            A 0-dim fp32 tensor (fp64 for fp64 parameters) on the parameters' device; zero before the
            first snapshot.

        Raises:
            ValueError: if an anchored parameter disappeared or shrank.
        """
        if not self._reference:
            p = next(model.parameters(), None)
            return torch.zeros((), device=None if p is None else p.device)
        params, refs, sqrt_w = self._aligned(dict(model.named_parameters()), list(self._reference), sqrt=True)
        return anchor_penalty(params, refs, sqrt_w)

    @torch.no_grad()
    def pull_(self, model: nn.Module, rate: float, variant: PullVariant = "l2") -> None:
        """Move θ toward θ* in place: θ ← θ − rate · ω ⊙ (θ − θ*). A no-op before the first snapshot.

        Args:
            model: the model whose anchored parameters are modified in place.
            rate: step size ≥ 0 (``rate · ω`` ≤ 1 keeps the step from overshooting θ*).
            variant: ``"l2"`` as above; ``"l1"`` pulls by ``rate · ω ⊙ sign(θ − θ*)``.

        Raises:
            ValueError: if an anchored parameter disappeared or shrank.
        """
        rate = _check_rate(rate, "rate")
        if not self._reference or rate == 0:
            return
        named = dict(model.named_parameters())
        anchor_pull_(*self._aligned(named, list(self._reference), sqrt=False), rate, variant)

    @torch.no_grad()
    def pull_tensors_(self, named: Mapping[str, Tensor], rate: float, variant: PullVariant = "l2") -> None:
        """:meth:`pull_` on the tensors of ``named`` that the anchor holds, in place; the others are untouched.

        This is the pull of an optimiser, which knows its parameters by name but not the model (AdamR).

        Args:
            named: ``{parameter name: θ}``, e.g. the parameters of one optimiser group that have a gradient.
            rate: step size ≥ 0.
            variant: ``"l2"`` or ``"l1"``, see :meth:`pull_`.
        """
        rate = _check_rate(rate, "rate")
        if not self._reference or rate == 0:
            return
        names = [name for name in named if name in self._reference]
        anchor_pull_(*self._aligned(named, names, sqrt=False), rate, variant)

    # ------------------------------------------------------------------ state
    @property
    def reference(self) -> Mapping[str, Tensor]:
        """θ* by parameter name (a new dict; the tensors are the anchor's own, do not modify them)."""
        return dict(self._reference)

    @property
    def importance(self) -> Mapping[str, Tensor]:
        """ω by parameter name (a new dict; the tensors are the anchor's own, do not modify them)."""
        return dict(self._importance)

    def state_dict(self) -> dict[str, Any]:
        """θ*, ω and counters; tensors are shared, not copied (the anchor never modifies them in place)."""
        return {
            "version": _STATE_VERSION,
            "class": type(self).__name__,
            "num_snapshots": self.num_snapshots,
            "reference": dict(self._reference),
            "importance": dict(self._importance),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the anchor's constructor arguments are not part of the state."""
        if not isinstance(state, Mapping) or "reference" not in state or "importance" not in state:
            raise ValueError("anchor state must be the dict returned by ParameterAnchor.state_dict()")
        if state.get("class", type(self).__name__) != type(self).__name__:
            raise ValueError(f"cannot load the state of a {state['class']} into a {type(self).__name__}")
        reference, importance = dict(state["reference"]), dict(state["importance"])
        if set(reference) != set(importance):
            raise ValueError("anchor state is corrupt: reference and importance name different parameters")
        for name, ref in reference.items():
            if importance[name].shape != ref.shape:
                raise ValueError(f"anchor state is corrupt: importance and reference of {name!r} differ in shape")
        self._reference, self._importance = reference, importance
        self.num_snapshots = int(state.get("num_snapshots", 0))
        self._load_extra_state(state.get("extra", {}))
        self._cache.clear()

    def _extra_state(self) -> dict[str, Any]:
        """Subclass counters to save along with θ* and ω."""
        return {}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved."""

    def to(self, device: torch.device | str) -> ParameterAnchor:
        """Move the stored θ* and ω to ``device``; returns ``self``."""
        self._reference = {n: t.to(device) for n, t in self._reference.items()}
        self._importance = {n: t.to(device) for n, t in self._importance.items()}
        self._cache.clear()
        return self

    def _config_repr(self) -> str:
        return f"include={list(self.include)}, exclude={list(self.exclude)}, strength={self.strength:g}"

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self._reference.values())
        return (
            f"{type(self).__name__}({self._config_repr()}; anchored {len(self._reference)} tensors / "
            f"{numel:,} elements, snapshots={self.num_snapshots})"
        )


def _pad_to(old: Tensor, shape: torch.Size, name: str) -> Tensor:
    """Zero-pad ``old`` on the trailing side of each dim to ``shape`` (growth); shrinking is an error."""
    if old.dim() != len(shape) or any(o > s for o, s in zip(old.shape, shape)):
        raise ValueError(
            f"parameter {name!r} shrank from {tuple(old.shape)} to {tuple(shape)} since the last snapshot; "
            "anchored parameters may only grow"
        )
    out = old.new_zeros(shape)
    out[tuple(slice(0, s) for s in old.shape)] = old
    return out
