"""One fine-tune of the decoder study: load it once, then prune every planned way and score held-out perplexity.

The methods and their definitions are those of ``make prune-eval`` (:mod:`lifelong_delta.studies.prune_eval_run`),
with perplexity in place of accuracy:

* ``dare``: the counter-hash Bernoulli keep-mask of the seed, kept entries ×1/(1−p) (arXiv 2311.03099);
* ``darex-q-grid``: the same mask ×1/q, q from a coarse geometric grid over [1−p, 1] and a fine step, minimising
  the perplexity of the validation text (arXiv 2410.09344);
* ``darex-q-analytic``: per-layer q from the authors' bound on ``c_ij = δ_ij · mean(x_j)``, with the mean inputs of
  every ``nn.Linear`` measured on the fine-tuned model over the calibration blocks, in the authors' float16
  arithmetic; its free parameter η is chosen from ``Settings.etas`` on the validation perplexity;
* ``darex-q-unlabelled``: global q minimising the mean change of the last hidden state (after the final norm) on
  the calibration blocks, against the fine-tuned model;
* ``magnitude`` / ``wanda``: the top 1−p of each output row by ``|δ|`` / ``|δ|·‖x_j‖₂`` (norms measured on the
  fine-tuned model's inputs), no rescale.

Every tensor is pruned: embeddings, RMSNorm weights and the output head included (a causal LM has no fresh head to
leave out). Two reference rows come with each fine-tune: ``unpruned`` (p = 0) and ``pretrained`` (p = 1, the
whole delta dropped: the base model).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lifelong_delta.delta.analytic_q import Arithmetic, analytic_q_per_layer
from lifelong_delta.delta.calibration import causal_lm_perplexity, input_norms
from lifelong_delta.delta.darex import select_q_grid, select_q_unlabelled
from lifelong_delta.delta.importance import collect_input_stats
from lifelong_delta.delta.methods import METHODS as PRUNE_METHODS
from lifelong_delta.delta.stats import DeltaStats
from lifelong_delta.studies.decoder_data import Batch
from lifelong_delta.studies.decoder_models import load_lm
from lifelong_delta.studies.prune_eval_masks import NonZero, RescaledDelta, build_masked, mark_dirty, restore_
from lifelong_delta.studies.prune_eval_run import q_grid

__all__ = ["DAREX", "METHODS", "Cell", "DecoderRun", "EvalSets", "Settings", "plan_cells"]

DAREX = ("dare", "darex-q-grid", "darex-q-analytic", "darex-q-unlabelled")  # share the DARE mask of a seed
METHODS: tuple[str, ...] = (*DAREX, "magnitude", "wanda")
#: deterministic methods (their registry rows are not ``seeded``): one row per p, with the first seed
SEEDLESS = frozenset(m for m in METHODS if m in PRUNE_METHODS and not PRUNE_METHODS[m].seeded)
#: a non-finite perplexity counts as this in a q search (which needs finite values)
_WORST = 1e30


@dataclass(frozen=True)
class Cell:
    """One row of ``results.csv``: the perplexity of ``finetune`` pruned by ``method`` at ``p`` with mask ``seed``."""

    finetune: str
    method: str
    p: float
    seed: int


@dataclass(frozen=True)
class Settings:
    """How the q of each DAREx-q mode is searched (see ``prune_eval_decoder``)."""

    q_grid_size: int = 4
    q_fine_steps: int = 1
    etas: tuple[float, ...] = (0.1, 0.27, 0.5, 1.0)
    analytic_arithmetic: Arithmetic = "float16"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalSets:
    """Held-out fine-tune-domain blocks: ``test`` (reported), ``val`` (q and η searches) and ``calib`` (unlabelled
    training blocks: input statistics and the unlabelled q)."""

    test: list[Batch]
    val: list[Batch]
    calib: list[Batch]

    @staticmethod
    def tokens(bs: Sequence[Batch]) -> int:
        return sum(b["input_ids"].numel() for b in bs)


def plan_cells(
    finetunes: Sequence[str], methods: Sequence[str], ps: Sequence[float], seeds: Sequence[int]
) -> list[Cell]:
    """Every cell of the study, in evaluation order: per fine-tune ``unpruned`` and ``pretrained``, then each p with
    every method (every seed for the random ones, the first seed for magnitude and WANDA)."""
    cells = []
    for ft in finetunes:
        cells += [Cell(ft, "unpruned", 0.0, seeds[0]), Cell(ft, "pretrained", 1.0, seeds[0])]
        for p in sorted(ps):
            for m in methods:
                cells += [Cell(ft, m, float(p), s) for s in (seeds[:1] if m in SEEDLESS else seeds)]
    return cells


def _last_hidden(model: nn.Module, batch: Batch) -> Tensor:
    return model.model(**batch).last_hidden_state  # = hidden_states[-1] of the LM, without the output head


@dataclass
class RunResult:
    """Rows of one fine-tune: perplexities, chosen q values and facts about the delta."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    q_rows: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class DecoderRun:
    """A loaded fine-tune: the model (fine-tuned weights), the base tensors and the fp32 delta of every tensor.

    Args:
        finetune: the fine-tune's name (recipe).
        ft_dir: its Hugging Face directory.
        base_dir: the pretrained base's directory.
        sets: the evaluation blocks.
        settings: the q searches.
    """

    def __init__(self, finetune: str, ft_dir: Path, base_dir: Path, sets: EvalSets, settings: Settings) -> None:
        from safetensors.torch import load_file

        self.finetune, self.dir, self.sets, self.s = finetune, Path(ft_dir), sets, settings
        base_sd = load_file(str(Path(base_dir) / "model.safetensors"))
        self.model = load_lm(ft_dir)
        self.ft = {n: t.detach().clone() for n, t in self.model.state_dict().items()}
        self.delta: dict[str, Tensor] = {}
        for n, t in self.ft.items():
            if not t.is_floating_point():
                continue
            if n not in base_sd or base_sd[n].shape != t.shape:
                raise ValueError(f"tensor {n!r} of {ft_dir} is missing from the base {base_dir} or has another shape")
            self.delta[n] = t.float() - base_sd[n].float()
        self.base = {n: base_sd[n] for n in self.delta}
        self.nonzero = {n: NonZero.of(self.base[n], d) for n, d in self.delta.items()}
        self.stats = DeltaStats.from_state_dicts(base_sd, self.ft)
        self._means: dict[str, Tensor] | None = None
        self._norms: dict[str, Tensor] | None = None

    def perplexity(self, which: str = "test") -> float:
        """Perplexity of the model as it stands on the ``test``, ``val`` or ``calib`` blocks."""
        return causal_lm_perplexity(self.model, getattr(self.sets, which))

    def _search_metric(self) -> float:
        ppl = self.perplexity("val")
        return ppl if math.isfinite(ppl) else _WORST

    def _calibration(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Mean inputs and WANDA input norms of every pruned ``nn.Linear`` on the calibration blocks (fine-tuned)."""
        if self._means is None:
            restore_(self.model, {n: self.ft[n] for n in self.delta})
            linear = [f"{m}.weight" for m, mod in self.model.named_modules() if isinstance(mod, nn.Linear)]
            names = [n for n in linear if n in self.delta]
            stats = collect_input_stats(self.model, self.sets.calib, lambda m, b: m(**b), names=names)
            self._means = {n: s.mean for n, s in stats.items()}
            self._norms = input_norms(self.model, self.sets.calib, list(self.delta))
        assert self._norms is not None
        return self._means, self._norms

    # ------------------------------------------------------------------ q choices
    def _grid(self, masked: RescaledDelta, p: float) -> tuple[float, int]:
        def val_ppl(q: float) -> float:
            masked.apply_(self.model, q)
            return self._search_metric()

        res = select_q_grid(val_ppl, p, q_grid(p, self.s.q_grid_size), self.s.q_fine_steps, mode="min")
        return res.q, len(res.table)

    def _analytic(self, masked: RescaledDelta) -> tuple[dict[str, float], float]:
        means, _ = self._calibration()
        best: tuple[float, dict[str, float], float] | None = None
        for eta in self.s.etas:
            qs = analytic_q_per_layer(masked, means, eta=eta, arithmetic=self.s.analytic_arithmetic)
            masked.apply_(self.model, qs)
            ppl = self._search_metric()
            if best is None or ppl < best[0]:
                best = (ppl, qs, eta)
        assert best is not None
        return best[1], best[2]

    def _unlabelled(self, masked: RescaledDelta, p: float) -> tuple[float, int]:
        restore_(self.model, {n: self.ft[n] for n in self.delta})  # the reference is the fine-tuned model
        res = select_q_unlabelled(
            self.model, masked, self.sets.calib, _last_hidden, p, q_grid(p, self.s.q_grid_size), self.s.q_fine_steps
        )
        mark_dirty(self.model)  # select_q_unlabelled restored the fine-tuned weights
        return res.q, len(res.table)

    def _q_for(self, method: str, masked: RescaledDelta, p: float) -> tuple[float | dict[str, float], dict]:
        if method == "dare":
            return 1.0 - p, {}
        if method == "darex-q-analytic":
            qs, eta = self._analytic(masked)
            layer = [qs[n] for n in self._calibration()[0] if n in qs] or list(qs.values())
            return qs, {
                "q": statistics.median(layer),
                "q_min": min(layer),
                "q_max": max(layer),
                "candidates": len(self.s.etas),
                "eta": eta,
            }
        q, n = self._grid(masked, p) if method == "darex-q-grid" else self._unlabelled(masked, p)
        return q, {"q": q, "q_min": q, "q_max": q, "candidates": n}

    # ------------------------------------------------------------------ the loop
    def evaluate(self, cells: Sequence[Cell], bar: Any = None) -> RunResult:
        """Score ``cells`` (this fine-tune's), grouped by (p, seed) so that the DAREx-q modes share DARE's mask."""
        result = RunResult(info=self.info())

        def add(cell: Cell, q_info: dict | None = None) -> None:
            row = {**asdict(cell), "perplexity": self.perplexity("test")}
            result.rows.append(row)
            if q_info:
                result.q_rows.append({**asdict(cell), **q_info})
            if bar is not None:
                bar.update(
                    1,
                    detail=f"{cell.finetune} {cell.method} p={cell.p:g} seed={cell.seed}: "
                    f"perplexity {row['perplexity']:.4g}",
                )

        groups: dict[tuple[float, int], dict[str, Cell]] = {}
        for c in cells:
            if c.method == "unpruned":
                restore_(self.model, self.ft)
                add(c)
            elif c.method == "pretrained":
                restore_(self.model, self.base)
                add(c)
            else:
                groups.setdefault((c.p, c.seed), {})[c.method] = c
        for (p, seed), by_method in groups.items():
            if any(m in by_method for m in DAREX):
                masked = build_masked("dare", self.base, self.delta, p, seed, nonzero=self.nonzero)
                for m in (m for m in DAREX if m in by_method):
                    q, q_info = self._q_for(m, masked, p)
                    masked.apply_(self.model, q)
                    add(by_method[m], q_info)
                del masked
            for m in ("magnitude", "wanda"):
                if m in by_method:
                    norms = self._calibration()[1] if PRUNE_METHODS[m].needs_input_norms else None
                    masked = build_masked(m, self.base, self.delta, p, input_norms=norms, nonzero=self.nonzero)
                    masked.apply_(self.model, 1.0)
                    add(by_method[m])
        restore_(self.model, self.ft)
        order = {c: i for i, c in enumerate(cells)}  # rows in the order of ``cells``, not of evaluation
        for rows in (result.rows, result.q_rows):
            rows.sort(key=lambda r: order[Cell(r["finetune"], r["method"], r["p"], r["seed"])])
        return result

    def info(self) -> dict[str, Any]:
        """Facts about the delta: ‖δ‖/‖θ_pre‖ over the weight matrices, mean |δ|, the number of pruned entries."""
        pooled = DeltaStats.pool(self.stats.matrices or self.stats.layers)
        return {
            "finetune": self.finetune,
            "dir": str(self.dir),
            "rel_norm": pooled.rel_norm,
            "mean_abs_delta": pooled.mean_abs,
            "std_delta": pooled.std,
            "pruned_tensors": len(self.delta),
            "pruned_numel": sum(d.numel() for d in self.delta.values()),
            "nonzero_delta": sum(len(z.idx) for z in self.nonzero.values()),
        }
