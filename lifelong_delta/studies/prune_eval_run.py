"""One fine-tune of the ``prune_eval`` study: load it once, then prune and evaluate every planned cell.

The model holds the fine-tuned weights on load; each method writes ``θ_pre + kept δ / q`` into the pruned
tensors (:mod:`lifelong_delta.studies.prune_eval_masks`), so nothing is reloaded between evaluations.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lifelong_delta.delta.analytic_q import Arithmetic, analytic_q_per_layer
from lifelong_delta.delta.calibration import input_norms
from lifelong_delta.delta.darex import select_q_grid, select_q_unlabelled
from lifelong_delta.delta.importance import collect_input_stats
from lifelong_delta.delta.lora import load_lora_adapter, lora_deltas
from lifelong_delta.delta.matching import is_excluded
from lifelong_delta.delta.methods import METHODS as PRUNE_METHODS
from lifelong_delta.delta.recommend import recommend
from lifelong_delta.delta.stats import DeltaStats
from lifelong_delta.studies.prune_eval_data import TaskSplits, accuracy, last_hidden
from lifelong_delta.studies.prune_eval_masks import NonZero, RescaledDelta, build_masked, mark_dirty, restore_

__all__ = ["FinetuneResult", "FinetuneRun", "Settings", "cell_cost", "q_grid"]

DAREX = ("dare", "darex-q-grid", "darex-q-analytic", "darex-q-unlabelled")  # share the DARE mask of a seed


@dataclass(frozen=True)
class Settings:
    """Sizes and options shared by every fine-tune of a study (see ``prune_eval``)."""

    max_test: int | None
    max_val: int
    n_calib: int
    q_grid_size: int
    q_fine_steps: int
    etas: tuple[float, ...]
    analytic_arithmetic: Arithmetic
    analytic_tie_rtol: float
    exclude: tuple[str, ...]
    batch_size: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Default η candidates of the analytic q (the authors' README uses 0.27–1.01 for BERT on GLUE).
ETA_GRID: tuple[float, ...] = (0.1, 0.27, 0.5, 1.0)


def q_grid(p: float, n: int) -> list[float]:
    """``n`` q candidates geometric in ``[1 − p, 1]``: even steps of the rescale factor's logarithm."""
    lo = 1.0 - p
    return [lo ** (1.0 - i / (n - 1)) for i in range(n)]


def cell_cost(method: str, p: float, sp: TaskSplits, s: Settings) -> tuple[int, float]:
    """(token positions forwarded, model rewrites) of evaluating ``method`` at ``p``: the ETA model.

    A rewrite is one dense copy of the model's weights; building a mask costs a few of them, a q candidate at
    drop rate p about ``1 − p`` of one (only the kept entries are written).
    """
    g = s.q_grid_size + s.q_fine_steps
    sparse = max(1.0 - p, 0.02)
    if method == "unpruned":
        return sp.test.tokens, 1.0
    if method in ("darex-q-grid", "structural"):
        return g * sp.val.tokens + sp.test.tokens, 6.0 + g * sparse
    if method == "darex-q-analytic":
        return len(s.etas) * sp.val.tokens + sp.test.tokens, 6.0 + len(s.etas) * sparse
    if method == "darex-q-unlabelled":
        return (g + 1) * sp.calib.tokens + sp.test.tokens, 6.0 + g * sparse
    return sp.test.tokens, 6.0


@dataclass
class FinetuneResult:
    """Rows of one fine-tune: accuracies, chosen q values, delta statistics and facts about the fine-tune."""

    task: str
    finetune: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    q_rows: list[dict[str, Any]] = field(default_factory=list)
    stats: DeltaStats | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def recommendations(self, ps: Sequence[float]) -> list[dict[str, Any]]:
        """What ``recommend`` picks at each ``p >= 0.9``, with labels and unlabelled data at hand.

        ``pick`` is the post-hoc choice (``can_refinetune=False``) as a method name of the study;
        ``if_refinetune`` is the pipeline's answer when re-fine-tuning is allowed.
        """
        out = []
        for p in sorted(x for x in ps if x >= 0.9):
            kw = {
                "target_p": p,
                "has_labelled_data": True,
                "has_unlabelled_data": True,
                "low_rank": self.finetune == "lora",
            }
            post = recommend(self.stats, can_refinetune=False, **kw)
            refit = recommend(self.stats, can_refinetune=True, **kw)
            pick = f"darex-q-{post.q_mode}" if post.method == "darex-q" else post.method
            out.append(
                {
                    "task": self.task,
                    "finetune": self.finetune,
                    "p": p,
                    "pick": pick,
                    "if_refinetune": refit.label,
                    "rel_norm": post.numbers["rel_norm"],
                    "dare_noise": post.numbers["dare_noise"],
                    "reason": post.reason,
                }
            )
        return out


def _forward(model: nn.Module, batch: dict[str, Tensor]) -> Any:
    return model(**batch)


class FinetuneRun:
    """A loaded fine-tune: the model (fine-tuned weights), the pretrained tensors and the fp32 delta to prune.

    Args:
        task: task name.
        finetune: recipe name; ``lora`` prunes the adapter's ``B·A`` read from ``<dir>/adapter``.
        ft_dir: the fine-tune's Hugging Face directory.
        base_dir: the task's base directory (θ_pre).
        splits: the task's evaluation sets.
        settings: study settings.
    """

    def __init__(
        self, task: str, finetune: str, ft_dir: Path, base_dir: Path, splits: TaskSplits, settings: Settings
    ) -> None:
        from safetensors.torch import load_file

        from lifelong_delta.text.module import load_classifier

        self.task, self.finetune, self.dir, self.sp, self.s = task, finetune, Path(ft_dir), splits, settings
        base_file = Path(base_dir) / "model.safetensors"
        if not base_file.is_file():
            raise ValueError(f"{base_dir}: no model.safetensors; re-run the fine-tunes (they write the base)")
        base_sd = load_file(str(base_file))
        self.model = load_classifier(self.dir).eval()
        self.ft = {n: t.detach().clone() for n, t in self.model.state_dict().items()}
        delta = self._lora_delta(base_sd) if finetune == "lora" else self._full_delta(base_sd)
        self.delta = {n: d for n, d in delta.items() if not is_excluded(n, settings.exclude)}
        if not self.delta:
            raise ValueError(f"exclude={list(settings.exclude)} leaves no tensor of {self.dir} to prune")
        self.base = {n: base_sd[n] for n in self.delta}
        self.nonzero = {n: NonZero.of(self.base[n], d) for n, d in self.delta.items()}
        self.stats = DeltaStats.from_state_dicts(base_sd, self.ft, exclude=settings.exclude)
        self._means: dict[str, Tensor] | None = None
        self._norms: dict[str, Tensor] | None = None

    def _full_delta(self, base_sd: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n, t in self.ft.items():
            if not t.is_floating_point() or is_excluded(n, self.s.exclude):
                continue
            if n not in base_sd or base_sd[n].shape != t.shape:
                raise ValueError(f"tensor {n!r} of {self.dir} is missing from the base model or has another shape")
            out[n] = t.float() - base_sd[n].float()
            if not torch.isfinite(out[n]).all():
                raise ValueError(f"tensor {n!r} of {self.dir} has a non-finite delta")
        return out

    def _lora_delta(self, base_sd: dict[str, Tensor]) -> dict[str, Tensor]:
        deltas = lora_deltas(load_lora_adapter(self.dir / "adapter"))
        for n, d in deltas.items():
            if n not in self.ft or self.ft[n].shape != d.shape:
                raise ValueError(f"LoRA delta {n!r} of {self.dir / 'adapter'} matches no tensor of the model")
            merged = self.ft[n].float() - base_sd[n].float()
            if float((merged - d).abs().max()) > 1e-5 + 1e-3 * float(d.abs().max()):
                raise ValueError(f"{self.dir}: the merged model.safetensors does not equal base + B·A for {n!r}")
        return deltas

    # ------------------------------------------------------------------ calibration
    def _calibration(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Mean and WANDA norms of the pruned linears' inputs on the calibration set (fine-tuned weights)."""
        if self._means is None:
            restore_(self.model, {n: self.ft[n] for n in self.delta})
            linear = [f"{m}.weight" for m, mod in self.model.named_modules() if isinstance(mod, nn.Linear)]
            names = [n for n in linear if n in self.delta]
            stats = collect_input_stats(self.model, self.sp.calib.batches, _forward, names=names)
            self._means = {n: s.mean for n, s in stats.items()}
            self._norms = input_norms(self.model, self.sp.calib.batches, list(self.delta))
        assert self._norms is not None
        return self._means, self._norms

    # ------------------------------------------------------------------ q choices
    def _grid(self, masked: RescaledDelta, p: float) -> tuple[float, int]:
        def val_acc(q: float) -> float:
            masked.apply_(self.model, q)
            return accuracy(self.model, self.sp.val)

        res = select_q_grid(val_acc, p, q_grid(p, self.s.q_grid_size), self.s.q_fine_steps)
        return res.q, len(res.table)

    def _analytic(self, masked: RescaledDelta, p: float) -> tuple[dict[str, float], float, int]:
        """Per-layer q from the authors' bound, with its one free parameter η chosen on the validation split.

        The bound's η balances its two terms and is not fixed by the theory: the authors' ``find_q_encoder.py
        --analytical`` searches it on the validation metric (``find_optimal_param``), and their README lists
        η = 0.27–1.01 for BERT on GLUE. Candidates: ``Settings.etas`` (default :data:`ETA_GRID`). The scan runs
        in ``Settings.analytic_arithmetic`` (float16 as the authors' code; in float64 rows whose ``Σ_j c_ij`` is
        negative scan to the end of the grid and every layer's q lands near 0.5 whatever p is).
        """
        means, _ = self._calibration()
        best: tuple[float, dict[str, float], float] | None = None
        for eta in self.s.etas:
            qs = analytic_q_per_layer(
                masked, means, eta=eta, arithmetic=self.s.analytic_arithmetic, tie_rtol=self.s.analytic_tie_rtol
            )
            masked.apply_(self.model, qs)
            acc = accuracy(self.model, self.sp.val)
            if best is None or acc > best[0]:
                best = (acc, qs, eta)
        assert best is not None
        return best[1], best[2], len(self.s.etas)

    def _unlabelled(self, masked: RescaledDelta, p: float) -> tuple[float, int]:
        restore_(self.model, {n: self.ft[n] for n in self.delta})  # the reference is the fine-tuned model
        res = select_q_unlabelled(
            self.model,
            masked,
            list(self.sp.calib.batches),
            last_hidden,
            p,
            q_grid(p, self.s.q_grid_size),
            self.s.q_fine_steps,
        )
        mark_dirty(self.model)  # select_q_unlabelled restored the fine-tuned weights
        return res.q, len(res.table)

    def _q_for(self, method: str, masked: RescaledDelta, p: float) -> tuple[float | dict[str, float], dict]:
        if method == "dare":
            return 1.0 - p, {}
        if method in ("darex-q-grid", "structural"):
            q, n = self._grid(masked, p)
        elif method == "darex-q-unlabelled":
            q, n = self._unlabelled(masked, p)
        elif method == "darex-q-analytic":
            qs, eta, n = self._analytic(masked, p)
            layer = [qs[n] for n in self._calibration()[0] if n in qs] or list(qs.values())
            return qs, {
                "q": statistics.median(layer),
                "q_min": min(layer),
                "q_max": max(layer),
                "candidates": n,
                "eta": eta,
            }
        else:
            raise AssertionError(method)
        return q, {"q": q, "q_min": q, "q_max": q, "candidates": n}

    def probe_speed(self) -> tuple[float, float]:
        """(seconds per forwarded token position, seconds per dense rewrite of the model), measured now."""
        accuracy(self.model, self.sp.calib)  # warm-up
        start = time.perf_counter()
        accuracy(self.model, self.sp.val)
        per_token = (time.perf_counter() - start) / max(self.sp.val.tokens, 1)
        start = time.perf_counter()
        with torch.no_grad():
            for t in self.model.state_dict().values():
                t.clone()
        return per_token, 2.0 * (time.perf_counter() - start)

    # ------------------------------------------------------------------ the loop
    def evaluate(self, cells: Sequence[Any], ps: Sequence[float], bar: Any = None) -> FinetuneResult:
        """Evaluate ``cells`` (this fine-tune's :class:`~lifelong_delta.studies.prune_eval_plan.Cell` s) in order."""
        result = FinetuneResult(self.task, self.finetune, stats=self.stats, info=self._info())

        def add(cell: Any, q_info: dict | None = None) -> None:
            acc = accuracy(self.model, self.sp.test)
            result.rows.append(
                {
                    "task": cell.task,
                    "finetune": cell.finetune,
                    "method": cell.method,
                    "p": cell.p,
                    "seed": cell.seed,
                    "accuracy": acc,
                }
            )
            if q_info:
                result.q_rows.append(
                    {
                        "task": cell.task,
                        "finetune": cell.finetune,
                        "method": cell.method,
                        "p": cell.p,
                        "seed": cell.seed,
                        **q_info,
                    }
                )
            if bar is not None:
                where = f"{cell.task}/{cell.finetune} {cell.method} p={cell.p:g} seed={cell.seed}"
                bar.update(1, detail=where)

        groups: dict[tuple[float, int], list[Any]] = {}
        for c in cells:
            if c.method == "unpruned":
                restore_(self.model, self.ft)
                add(c)
                result.info["unpruned_accuracy"] = result.rows[-1]["accuracy"]
            else:
                groups.setdefault((c.p, c.seed), []).append(c)
        for (p, seed), group in groups.items():
            by_method = {c.method: c for c in group}
            if any(m in by_method for m in DAREX):
                masked = build_masked("dare", self.base, self.delta, p, seed, nonzero=self.nonzero)
                for m in (m for m in DAREX if m in by_method):
                    q, q_info = self._q_for(m, masked, p)
                    masked.apply_(self.model, q)
                    add(by_method[m], q_info)
                del masked
            if "structural" in by_method:
                masked = build_masked("structural", self.base, self.delta, p, seed, nonzero=self.nonzero)
                q, q_info = self._q_for("structural", masked, p)
                masked.apply_(self.model, q)
                add(by_method["structural"], q_info)
            for m in ("magnitude", "wanda"):
                if m in by_method:
                    norms = self._calibration()[1] if PRUNE_METHODS[m].needs_input_norms else None
                    masked = build_masked(m, self.base, self.delta, p, input_norms=norms, nonzero=self.nonzero)
                    masked.apply_(self.model, 1.0)
                    add(by_method[m])
        restore_(self.model, self.ft)
        return result

    def _info(self) -> dict[str, Any]:
        try:
            recorded = json.loads((self.dir / "finetune.json").read_text())
        except (OSError, ValueError):
            recorded = {}
        pooled = DeltaStats.pool(self.stats.matrices or self.stats.layers)
        return {
            "task": self.task,
            "finetune": self.finetune,
            "dir": str(self.dir),
            "recorded_test_acc": recorded.get("test_acc"),
            "recorded_val_acc": recorded.get("val_acc"),
            "rel_norm": pooled.rel_norm,
            "mean_abs_delta": pooled.mean_abs,
            "std_delta": pooled.std,
            "pruned_tensors": len(self.delta),
            "pruned_numel": sum(d.numel() for d in self.delta.values()),
        }
