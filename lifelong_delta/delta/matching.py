"""How the tensors of a fine-tuned checkpoint pair with its base: by name, or through a dotted prefix.

Shared by the streaming commands (:func:`match_tensors` raises the user-facing errors for missing or extra tensors,
dtype and shape mismatches) and by ``--exclude`` (:func:`is_excluded`). Reads headers only; no torch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lifelong_delta.delta.dtypes import FLOAT_CODES, dtype_name

__all__ = ["TensorMatch", "is_excluded", "match_tensors", "non_finite_error"]


def non_finite_error(name: str, which: str, count: int) -> ValueError:
    """The error for NaN/inf values in tensor ``name`` of the ``which`` model (``"base"``, ``"fine-tuned"``)."""
    return ValueError(f"tensor {name!r} of the {which} model has {count} non-finite value(s) (NaN or inf)")


def is_excluded(name: str, exclude: Sequence[str]) -> bool:
    """Whether ``name`` matches any ``fnmatch`` glob in ``exclude`` (e.g. ``"lm_head.*"``, ``"*embed*"``)."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in exclude)


_LIST = 5  # names listed in an error message before "and N more"


class _Checkpoint(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def code(self, name: str) -> str: ...
    def __contains__(self, name: object) -> bool: ...


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LIST])
    return shown + (f" and {len(names) - _LIST} more" if len(names) > _LIST else "")


@dataclass(frozen=True)
class TensorMatch:
    """How the tensors of a fine-tuned checkpoint pair with its base (name lists in fine-tuned file order).

    Attributes:
        pruned: Fine-tuned tensors that are pruned against a base tensor.
        copied: Fine-tuned tensors copied unchanged (non-floating, excluded, or only in the fine-tuned model).
        base_names: ``{fine-tuned name: base name}`` where the two differ (a prefix mapping); see :meth:`base_name`.
        finetuned_only: Floating tensors with no base counterpart under the prefix mapping (e.g. a classifier head);
            they are among ``copied``.
        base_only: Base tensors that no fine-tuned tensor maps to under the prefix mapping (e.g. a head the
            fine-tuned model dropped); they are not used.
        prefix: ``(base prefix, fine-tuned prefix)`` of the mapping (one of them empty), or None for equal names.
    """

    pruned: list[str]
    copied: list[str]
    base_names: dict[str, str] = field(default_factory=dict)
    finetuned_only: list[str] = field(default_factory=list)
    base_only: list[str] = field(default_factory=list)
    prefix: tuple[str, str] | None = None

    def base_name(self, name: str) -> str:
        """The base checkpoint's name of fine-tuned tensor ``name``."""
        return self.base_names.get(name, name)

    def describe(self) -> str | None:
        """One line on the prefix mapping and the unmatched tensors, or None when names were equal."""
        if self.prefix is None:
            return None
        pb, pf = self.prefix
        line = (
            f"tensor names differ by a prefix: base '{pb}X' = fine-tuned '{pf}X' ({len(self.pruned)} tensors matched)"
        )
        if self.finetuned_only:
            line += (
                f"; {len(self.finetuned_only)} only in the fine-tuned model, copied unchanged: "
                f"{_listing(self.finetuned_only)}"
            )
        if self.base_only:
            line += f"; {len(self.base_only)} only in the base model, not used: {_listing(self.base_only)}"
        return line


def _prefix_candidates(names: Sequence[str], others: set[str]) -> dict[str, int]:
    """``{prefix: count}`` of the names that become a name of ``others`` once a dotted prefix is stripped."""
    counts: dict[str, int] = {}
    for n in names:
        for i, ch in enumerate(n):
            if ch == "." and n[i + 1 :] in others:
                counts[n[: i + 1]] = counts.get(n[: i + 1], 0) + 1
    return counts


def _match_by_prefix(
    base_float: list[str], ft_float: list[str]
) -> tuple[str, str, dict[str, str], list[str], list[str]] | None:
    """The consistent prefix mapping between two name lists, or None.

    One side's names carry an extra dotted prefix P (``bert.``, ``model.``). The mapping is accepted when every name
    of the side with P that starts with P has a counterpart, and every name of the other side is matched. Names of
    the side with P that lack it are that side's extras (a head). The P matching most tensors wins.
    """
    ft_set, base_set = set(ft_float), set(base_float)
    options = [(c, "", p) for p, c in _prefix_candidates(ft_float, base_set).items()]
    options += [(c, p, "") for p, c in _prefix_candidates(base_float, ft_set).items()]
    for _, pb, pf in sorted(options, key=lambda o: (-o[0], o[1], o[2])):
        if pf:
            mapped = {n: n[len(pf) :] for n in ft_float if n.startswith(pf)}
            if not all(b in base_set for b in mapped.values()):
                continue
            if set(mapped.values()) != base_set:
                continue
            ft_only = [n for n in ft_float if not n.startswith(pf)]
            return pb, pf, mapped, ft_only, []
        mapped = {n: pb + n for n in ft_float}
        if not all(b in base_set for b in mapped.values()):
            continue
        if {b for b in base_float if b.startswith(pb)} != set(mapped.values()):
            continue
        return pb, pf, mapped, [], [b for b in base_float if not b.startswith(pb)]
    return None


def match_tensors(base: _Checkpoint, finetuned: _Checkpoint, exclude: Sequence[str] = ()) -> TensorMatch:
    """Pair the floating tensors of two checkpoints and check that they line up.

    Every floating tensor of the fine-tuned model that no ``exclude`` pattern matches must exist in the base with the
    same shape, and vice versa. Non-floating tensors (e.g. ``position_ids``) and excluded ones are copied from the
    fine-tuned model unchanged.

    When the names differ by a consistent dotted prefix (a ``BertModel`` base ``embeddings.*`` against a
    ``BertForSequenceClassification`` fine-tune ``bert.embeddings.*``, or the reverse), the tensors are paired through
    that prefix; fine-tuned tensors outside the prefix (the classifier head) are copied unchanged and listed in
    :attr:`TensorMatch.finetuned_only`, base tensors outside it are listed in :attr:`TensorMatch.base_only`.

    Raises:
        ValueError: naming the missing/extra tensors (when no prefix mapping explains them) or the first tensor whose
            shape differs.
    """

    def floating(ckpt: _Checkpoint, name: str) -> bool:
        return ckpt.code(name) in FLOAT_CODES and not is_excluded(name, tuple(exclude))

    ft_names = finetuned.names()
    for n in ft_names:
        if (
            n in base
            and not is_excluded(n, tuple(exclude))
            and ((base.code(n) in FLOAT_CODES) != (finetuned.code(n) in FLOAT_CODES))
        ):
            raise ValueError(
                f"tensor {n!r} is {dtype_name(base.code(n))} in the base model but "
                f"{dtype_name(finetuned.code(n))} in the fine-tuned model; a delta needs both "
                f"floating (pass --exclude '{n}' to copy the fine-tuned one unchanged)"
            )
    pruned = [n for n in ft_names if floating(finetuned, n)]
    missing = [n for n in pruned if n not in base]
    extra = [n for n in base.names() if floating(base, n) and not (n in finetuned and floating(finetuned, n))]
    if missing or extra:
        found = _match_by_prefix([n for n in base.names() if floating(base, n)], pruned)
        if found is not None:
            pb, pf, mapped, ft_only, base_only = found
            for n, b in mapped.items():
                if base.shape(b) != finetuned.shape(n):
                    raise ValueError(
                        f"tensor {n!r} has shape {list(finetuned.shape(n))} in the fine-tuned model but "
                        f"{list(base.shape(b))} as {b!r} in the base model"
                    )
            kept = [n for n in ft_names if n in mapped]
            return TensorMatch(
                pruned=kept,
                copied=[n for n in ft_names if n not in mapped],
                base_names={n: b for n, b in mapped.items() if n != b},
                finetuned_only=ft_only,
                base_only=base_only,
                prefix=(pb, pf),
            )
    if missing:
        raise ValueError(
            f"{len(missing)} tensor(s) of the fine-tuned model are missing from the base model: "
            f"{_listing(missing)} (pass --exclude PATTERN to copy them unchanged)"
        )
    if extra:
        raise ValueError(
            f"{len(extra)} tensor(s) of the base model are missing from the fine-tuned model: "
            f"{_listing(extra)} (pass --exclude PATTERN to skip them)"
        )
    for n in pruned:
        if base.shape(n) != finetuned.shape(n):
            raise ValueError(
                f"tensor {n!r} has shape {list(base.shape(n))} in the base model but "
                f"{list(finetuned.shape(n))} in the fine-tuned model"
            )
    kept = set(pruned)
    return TensorMatch(pruned=pruned, copied=[n for n in ft_names if n not in kept])
