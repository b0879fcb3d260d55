"""Forward passes of a Hugging Face model whose weights stay on disk, one stage at a time.

Calibration (WANDA's input norms, DAREx-q's q) needs forward passes of the fine-tuned model and of pruned versions
of it. :class:`LayeredModel` runs them in bounded memory, the way the reference code of WANDA and SparseGPT does. The
model is built with empty (meta) parameters, and its weights are read from the checkpoints one *stage* at a time:

* the *outer* parameters (embeddings, final norm, heads), read once to embed the batches, before the blocks;
* each repeated block (a decoder or encoder layer) in turn;
* the outer parameters again, to finish the pass (final norm, head, logits).

Every calibration batch goes through a stage before the next stage is read, so memory holds one stage's weights in
fp32 plus the batches' activations, never the model.

A pass runs *candidates* side by side through each stage: the fine-tuned weights (``None``), and pruned models
``θ_pre + kept / q`` for float q's, with the keep-mask of the prune's method
(:class:`~lifelong_delta.delta.darex.MaskedDelta`, built once per stage and pass). The modules and operations are the
whole model's, in fp32 and in the same order, so every result equals that of the model loaded whole in fp32, bit for
bit; the tests check it on Llama, Qwen2, Mistral, GPT-2, BERT and MPNet.

:meth:`LayeredModel.run_sequential` is the other kind of pass, the reference code's layer-wise prune: each block
runs fine-tuned to measure its inputs, is pruned from those statistics, and runs again pruned to give the next
block its inputs.

A stage sees its inputs without the model's own loop: stubs in place of the blocks' ``forward`` record
the arguments each block is called with (:mod:`lifelong_delta.delta.layered_blocks`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lifelong_delta.delta.darex import MaskedDelta
from lifelong_delta.delta.importance import InputRecorder, InputStats, linear_modules
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.layered_blocks import BlockCall, find_blocks, finish_stubs, record_calls, stubbed

__all__ = ["Candidate", "LayeredModel", "Pruning", "free_large_allocations"]

#: ``None``: the fine-tuned weights; a float q: ``θ_pre + kept / q``.
Candidate = float | None
Batch = dict[str, torch.Tensor]
#: ``finish(candidate index, batch index, model output)``, called once per candidate and batch.
Finish = Callable[[int, int, Any], None]


@dataclass(frozen=True)
class Pruning:
    """How the float candidates are pruned: the drop rate, the seed and the method's keep-mask.

    Attributes:
        p: Drop rate.
        seed: Mask seed.
        keep_fn: ``keep_fn(name, fp32 delta) -> bool mask`` (:func:`~lifelong_delta.delta.methods.keep_mask_for`).
        base: The pretrained checkpoint θ_pre.
        base_names: Fine-tuned tensor name → base tensor name, where they differ.
    """

    p: float
    seed: int
    keep_fn: Callable[[str, torch.Tensor], torch.Tensor]
    base: CheckpointReader
    base_names: Mapping[str, str]


def free_large_allocations(threshold: int = 1 << 20) -> None:
    """Make glibc serve allocations of ``threshold`` bytes or more from their own memory maps, from now on, so that
    a freed stage's weights go back to the system.

    glibc's default threshold rises to the size of the first large block freed, after which blocks of that size come
    from the heap, which keeps freed memory: on the 1 GB Llama pair of ``bench/calibrated_rss.py`` the grid q then
    peaked at 2.6 GB instead of 2.2 GB. A no-op where ``mallopt`` is missing (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD; a fixed value also stops the dynamic adjustment
    except (OSError, AttributeError):
        pass


class LayeredModel:
    """A Hugging Face model whose parameters are read from safetensors checkpoints one stage at a time.

    Args:
        cls: The model class (from the checkpoint's ``config.json``).
        config: Its config.
        finetuned: Reader of the fine-tuned checkpoint; tensor names are the model's ``state_dict`` names.
        what: How error messages name the checkpoint (``--finetuned DIR``).

    Raises:
        ValueError: the checkpoint lacks a parameter of the model, or the model has no repeated blocks.
    """

    def __init__(self, cls: type, config: Any, finetuned: CheckpointReader, *, what: str) -> None:
        from accelerate import init_empty_weights

        if hasattr(config, "use_cache"):
            config.use_cache = False
        with init_empty_weights(include_buffers=False):
            model = cls._from_config(config, dtype=torch.float32)
        model.tie_weights()  # outside the context, which would give the tied head a new parameter of its own
        self.model = model.eval()
        self.ft = finetuned
        self.blocks, self._prefix = find_blocks(model, what)
        # tied parameters (a tied lm_head) are one group: one tensor, set on every alias
        groups: dict[int, list[str]] = {}
        self._shapes: dict[str, torch.Size] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
            self._shapes[name] = param.shape
        self.source: dict[str, str] = {}  # first alias -> the name the checkpoint stores it under
        missing = []
        for names in groups.values():
            src = next((n for n in names if n in finetuned), None)
            if src is None:
                missing.append(names[0])
            else:
                self.source[names[0]] = src
        if missing:
            raise ValueError(
                f"{what}: its weights lack {len(missing)} tensor(s) that a {cls.__name__} needs, e.g. "
                f"{missing[0]!r}; calibration needs the complete model"
            )
        self._aliases = {names[0]: names for names in groups.values()}
        self.stages: list[list[str]] = [[] for _ in range(len(self.blocks) + 1)]  # [outer, block 0, block 1, ...]
        for first in self._aliases:
            self.stages[self._stage_of(first)].append(first)
        self._tuple_out: int | None = None  # a block returns (hidden, ...) of this length, or a tensor (0)

    def _stage_of(self, name: str) -> int:
        """0 for an outer parameter, ``i + 1`` for one of block ``i``."""
        head = f"{self._prefix}."
        if not name.startswith(head):
            return 0
        index = name[len(head) :].split(".", 1)[0]
        return int(index) + 1 if index.isdigit() and int(index) < len(self.blocks) else 0

    def names(self) -> list[str]:
        """Every checkpoint tensor name the model reads."""
        return list(self.source.values())

    # parameters -------------------------------------------------------------------------------------------------

    def _set(self, first: str, tensor: torch.Tensor | None) -> None:
        """Give a parameter (and its tied aliases) ``tensor``, or an empty meta tensor again (``None``)."""
        value = torch.empty(self._shapes[first], device="meta") if tensor is None else tensor
        param = nn.Parameter(value, requires_grad=False)
        for name in self._aliases[first]:
            path, _, attr = name.rpartition(".")
            self.model.get_submodule(path)._parameters[attr] = param

    def _ft(self, name: str) -> torch.Tensor:
        t = self.ft.get(name)
        return t.to(torch.float32) if t.is_floating_point() else t

    def masked(self, firsts: Sequence[str], pruning: Pruning | None, pruned: Collection[str]) -> MaskedDelta | None:
        """The masked delta of the pruned tensors among the parameters ``firsts`` (θ_pre read from the base)."""
        if pruning is None:
            return None
        wanted = set(pruned)
        return self.masked_tensors([self.source[f] for f in firsts if self.source[f] in wanted], pruning)

    def masked_tensors(self, names: Sequence[str], pruning: Pruning) -> MaskedDelta:
        """The masked delta of the checkpoint tensors ``names`` (θ_pre read from the base)."""
        base = {n: pruning.base.get(pruning.base_names.get(n, n)) for n in names}
        return MaskedDelta.build(
            base, {n: self._ft(n) for n in names}, pruning.p, seed=pruning.seed, keep_fn=pruning.keep_fn
        )

    def _load(self, firsts: Sequence[str], candidate: Candidate, masked: MaskedDelta | None) -> None:
        for first in firsts:
            src = self.source[first]
            if candidate is not None and masked is not None and src in masked.keep:
                self._set(first, masked.merged(src, candidate))
            else:
                self._set(first, self._ft(src))

    def _unload(self, firsts: Sequence[str]) -> None:
        for first in firsts:
            self._set(first, None)

    @contextmanager
    def _outer(self, pruning: Pruning | None, pruned: Collection[str]) -> Iterator[Callable[[Candidate], None]]:
        """Outer parameters loaded when their module is first called, for the candidate last passed to the yielded
        ``use(candidate)``; unloaded on the next ``use`` and on exit. So the embedding pass reads the embeddings
        but not the head, and the finishing pass (given ``inputs_embeds``) the head but not the embeddings."""
        alias_of = {a: first for first, names in self._aliases.items() for a in names}
        owned: dict[nn.Module, list[str]] = {}
        for path, module in self.model.named_modules():
            firsts = [
                alias_of[f"{path}.{attr}" if path else attr] for attr, p in module._parameters.items() if p is not None
            ]
            firsts = [f for f in dict.fromkeys(firsts) if self._stage_of(f) == 0]
            if firsts:
                owned[module] = firsts
        masks: dict[str, MaskedDelta | None] = {}
        loaded: list[str] = []
        current: list[Candidate] = [None]

        def load(module: nn.Module, args: Any) -> None:
            for first in owned[module]:
                if first not in loaded:
                    if first not in masks:
                        masks[first] = self.masked([first], pruning, pruned)
                    self._load([first], current[0], masks[first])
                    loaded.append(first)

        def use(candidate: Candidate) -> None:
            self._unload(loaded)
            loaded.clear()
            current[0] = candidate

        handles = [m.register_forward_pre_hook(load) for m in owned]
        try:
            yield use
        finally:
            for h in handles:
                h.remove()
            use(None)

    # the pass ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self,
        batches: Sequence[Batch],
        candidates: Sequence[Candidate],
        finish: Finish,
        *,
        pruning: Pruning | None = None,
        pruned: Sequence[str] = (),
        measure: Sequence[str] = (),
        output_hidden_states: bool = False,
    ) -> dict[str, InputStats]:
        """One forward pass of every candidate over every batch, stage by stage.

        Args:
            batches: Tokenized calibration batches (``model(**batch)``'s keyword arguments).
            candidates: ``None`` (fine-tuned) and/or float q's; float q's need ``pruning``.
            finish: Receives each candidate's model output on each batch, batch by batch.
            pruning: How float candidates are pruned.
            pruned: Checkpoint names of the tensors the prune changes (the others keep their fine-tuned values).
            measure: Weight names of linear modules whose inputs are measured on the fine-tuned candidate.
            output_hidden_states: Passed to the model when finishing (the unlabelled q reads the last one).

        Returns:
            ``{weight name: InputStats}`` of ``measure`` (empty when nothing is measured).
        """
        if any(c is not None for c in candidates) and pruning is None:
            raise ValueError("pruned candidates need pruning= (p, seed, mask and base)")
        if measure and None not in candidates:
            raise ValueError("input statistics are measured on the fine-tuned candidate (None); add it")
        if all(c is None for c in candidates):
            pruning = None
        pruned_set = set(pruned)
        hooks = _Hooks(self, measure)
        measured = hooks.on_finetuned(candidates)
        calls = self._embed(batches, candidates, pruning, pruned_set, measured)
        hidden = [[b[0].hidden for b in per_c] for per_c in calls]
        for i in range(len(self.blocks)):
            stage = self.stages[i + 1]
            masked = self.masked(stage, pruning, pruned_set)
            for ci, c in enumerate(candidates):
                self._load(stage, c, masked)
                with measured(ci, i + 1):
                    hidden[ci] = self._block(i, calls[ci], hidden[ci])
            self._unload(stage)
            del masked
        self._finish(batches, candidates, hidden, finish, pruning, pruned_set, measured, output_hidden_states)
        return hooks.stats()

    @torch.no_grad()
    def run_sequential(
        self,
        batches: Sequence[Batch],
        prune_block: Callable[[list[str], dict[str, InputStats]], Mapping[str, torch.Tensor]],
        *,
        measure: Sequence[str],
    ) -> dict[str, InputStats]:
        """The layer-wise procedure of WANDA's and SparseGPT's reference code (``prune_wanda``): each block's
        inputs are measured on the outputs of the blocks before it *as pruned*.

        The batches are embedded with the fine-tuned outer weights. Then, per block: its fine-tuned weights run
        every batch with the measured linears hooked (the outputs are dropped); ``prune_block`` turns the
        statistics into the block's pruned tensors; those run every batch again, and their outputs are the next
        block's inputs. Finally the outer modules measured after the blocks (an untied ``lm_head``, a classifier)
        see the last pruned block's outputs through the fine-tuned final norm. So each block runs twice, and memory
        holds one block's weights plus the tensors ``prune_block`` returns for it.

        Args:
            batches: Tokenized calibration batches.
            prune_block: ``prune_block(names, stats)`` gets the checkpoint names of one block's parameters and the
                input statistics of its measured linears, and returns ``{checkpoint name: tensor}`` of the tensors
                it prunes, as the prune writes them; the block's other parameters keep their fine-tuned values.
            measure: Weight names of linear modules whose inputs are measured.

        Returns:
            ``{weight name: InputStats}`` of ``measure``.
        """
        hooks = _Hooks(self, measure)
        measured = hooks.on_finetuned([None])
        calls = self._embed(batches, [None], None, set(), measured)[0]
        hidden = [b[0].hidden for b in calls]
        for i in range(len(self.blocks)):
            stage = self.stages[i + 1]
            self._load(stage, None, None)
            with measured(0, i + 1):
                self._block(i, calls, hidden)
            names = [self.source[f] for f in stage]
            merged = prune_block(names, hooks.stats(i + 1))
            for first in stage:
                tensor = merged.get(self.source[first])
                if tensor is not None:
                    self._set(first, tensor.to(torch.float32) if tensor.is_floating_point() else tensor)
            del merged
            hidden = self._block(i, calls, hidden)
            self._unload(stage)
        if hooks.names(0):
            self._finish(batches, [None], [hidden], lambda *_: None, None, set(), measured, False)
        return hooks.stats()

    def _embed(
        self,
        batches: Sequence[Batch],
        candidates: Sequence[Candidate],
        pruning: Pruning | None,
        pruned: Collection[str],
        measured: Callable[[int, int], Any],
    ) -> list[list[list[BlockCall]]]:
        """The embedding part of every candidate: ``[candidate][batch][block]`` recorded block arguments."""
        calls: list[list[list[BlockCall]]] = []
        with self._outer(pruning, pruned) as use:
            for ci, c in enumerate(candidates):
                use(c)
                with measured(ci, 0):
                    calls.append([record_calls(self.model, self.blocks, batch) for batch in batches])
        return calls

    def _block(
        self, i: int, calls: Sequence[Sequence[BlockCall]], hidden: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Block ``i`` (its weights loaded) on every batch: the hidden states it returns, batch by batch."""
        block, out_hidden = self.blocks[i], []
        for bi, h in enumerate(hidden):
            out = calls[bi][i].run(block, h)
            if self._tuple_out is None:
                self._tuple_out = len(out) if isinstance(out, tuple) else 0
            out_hidden.append(out[0] if isinstance(out, tuple) else out)
        return out_hidden

    def _finish(
        self,
        batches: Sequence[Batch],
        candidates: Sequence[Candidate],
        hidden: Sequence[Sequence[torch.Tensor]],
        finish: Finish,
        pruning: Pruning | None,
        pruned: Collection[str],
        measured: Callable[[int, int], Any],
        output_hidden_states: bool,
    ) -> None:
        """The final norm and head of every candidate on the last block's hidden states; ``finish`` gets the
        outputs."""
        embeds = self._takes_embeds()
        with self._outer(pruning, pruned) as use:
            for ci, c in enumerate(candidates):
                use(c)
                with measured(ci, 0):
                    for bi, batch in enumerate(batches):
                        final = hidden[ci][bi]
                        if embeds:  # the blocks' input is replaced anyway: spare reading the embeddings
                            batch = {
                                **{k: v for k, v in batch.items() if k != "input_ids"},
                                "inputs_embeds": torch.zeros_like(final),
                            }
                        with stubbed(self.blocks, finish_stubs(len(self.blocks), final, self._tuple_out or 0)):
                            out = self.model(**batch, output_hidden_states=output_hidden_states)
                        finish(ci, bi, out)

    def _takes_embeds(self) -> bool:
        import inspect

        return "inputs_embeds" in inspect.signature(self.model.forward).parameters


class _Hooks:
    """The measured linears of a pass, hooked stage by stage on the fine-tuned candidate only."""

    def __init__(self, model: LayeredModel, measure: Sequence[str]) -> None:
        wanted = set(measure)
        self.measure = list(measure)
        self.recorder = InputRecorder()
        self.linears = {n: m for n, m in linear_modules(model.model).items() if n in wanted}
        self.stage_of = {n: model._stage_of(n) for n in self.linears}

    def names(self, stage: int) -> list[str]:
        """The measured weights of ``stage``."""
        return [n for n, s in self.stage_of.items() if s == stage]

    def on_finetuned(self, candidates: Sequence[Candidate]) -> Callable[[int, int], Any]:
        """``measured(candidate index, stage)``: a context that hooks the stage's measured linears when the
        candidate is the fine-tuned one, and nothing otherwise."""

        def measured(ci: int, stage: int) -> Any:
            mine = {n: self.linears[n] for n in self.names(stage)} if candidates[ci] is None else {}
            return self.recorder.attached(mine)

        return measured

    def stats(self, stage: int | None = None) -> dict[str, InputStats]:
        """The statistics of every measured weight, or of those of one stage."""
        names = self.measure if stage is None else self.names(stage)
        return self.recorder.stats(names) if names else {}
