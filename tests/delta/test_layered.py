"""Layer-by-layer calibration equals calibration on the model loaded whole in fp32, bit for bit.

The reference is built from the in-memory primitives (the whole model, ``MaskedDelta.apply_``, ``select_q_grid``,
``select_q_unlabelled``, ``collect_input_stats``, ``analytic_q_per_layer``) on tiny random Llama (tied and untied),
Qwen2, Mistral, GPT-2, BERT and MPNet checkpoints. Equal outputs, input norms and q tables mean the stages were
read, masked, rescaled and run exactly as the whole model runs them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lifelong_delta.delta import calibration as cal
from lifelong_delta.delta.analytic_q import analytic_q_per_layer
from lifelong_delta.delta.darex import MaskedDelta, select_q_grid, select_q_unlabelled
from lifelong_delta.delta.importance import collect_input_stats
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.methods import PruneSpec, keep_mask_for
from tests.delta._checkpoints import (
    CALIB_TEXT,
    read_checkpoint,
    save_pair,
    tiny_bert_pair,
    tiny_gpt2_pair,
    tiny_llama_pair,
    whole_model,
)

TEXT = CALIB_TEXT


def _mpnet(root: Path) -> None:
    """MPNet passes a relative position bias, computed from an outer (pruned) parameter, to every layer."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=30527,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        num_labels=2,
    )
    save_pair(MPNetForSequenceClassification(config), root)


BUILDERS = {
    "llama-tied": lambda r: tiny_llama_pair(r, tie_word_embeddings=True),
    "llama-untied": lambda r: tiny_llama_pair(r, tie_word_embeddings=False),
    "qwen2": lambda r: tiny_llama_pair(r, tie_word_embeddings=True, arch="qwen2"),
    "mistral": lambda r: tiny_llama_pair(r, arch="mistral"),
    "gpt2": tiny_gpt2_pair,
    "bert": tiny_bert_pair,
    "mpnet": _mpnet,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](root)
    data = root / "calib.jsonl"
    data.write_text("".join(f'{{"text": "{t}", "label": {i % 2}}}\n' for i, t in enumerate(TEXT)))
    return request.param, root, data


def _open(root: Path, data: Path) -> cal.Calibration:
    return cal.load(str(root / "ft"), str(data), need_labels=True, samples=5, batch_size=2, max_length=64)


def _pruned(root: Path) -> list[str]:
    return [n for n, t in read_checkpoint(root / "ft").items() if t.is_floating_point()]


def test_outputs_of_the_finetuned_model_equal_the_whole_models(pair):
    arch, root, data = pair
    model = whole_model(root / "ft")
    with _open(root, data) as calib:
        got: dict[int, object] = {}
        calib.model.run(calib.batches, [None], lambda c, b, out: got.__setitem__(b, out), output_hidden_states=True)
        for b, batch in enumerate(calib.batches):
            with torch.no_grad():
                want = model(**batch, output_hidden_states=True)
            assert torch.equal(got[b].logits, want.logits), (arch, b)
            assert torch.equal(got[b].hidden_states[-1], want.hidden_states[-1]), (arch, b)
        assert all(p.device.type == "meta" for p in calib.model.model.parameters())  # every stage was freed


def test_input_norms_equal_the_whole_models(pair):
    arch, root, data = pair
    names = _pruned(root)
    model = whole_model(root / "ft")
    with _open(root, data) as calib:
        got = calib.input_norms(names)
        want = cal.input_norms(model, calib.batches, names)
    assert got.keys() == want.keys() and len(got) > 4
    for n in want:
        assert torch.equal(got[n], want[n]), (arch, n)


def _reference_masked(
    model: torch.nn.Module, root: Path, names: list[str], spec: PruneSpec, norms: dict[str, torch.Tensor] | None = None
) -> MaskedDelta:
    sd = model.state_dict()
    with CheckpointReader(root / "base") as rb:
        base = {n: rb.get(n) for n in names if n in sd}
    return MaskedDelta.build(
        base,
        {n: sd[n] for n in base},
        spec.p,
        seed=spec.seed,
        keep_fn=lambda n, d: keep_mask_for(n, d, spec, input_norms=(norms or {}).get(n)),
    )


@pytest.mark.parametrize("method", ["darex-q", "wanda"])
def test_grid_q_table_equals_the_whole_models(pair, method):
    """Perplexity for a causal LM, accuracy for a classifier, every candidate q equal."""
    arch, root, data = pair
    if method == "wanda" and arch not in ("llama-tied", "gpt2", "mpnet"):
        pytest.skip("a tied decoder, an input-major decoder and an encoder cover WANDA's masks")
    names = _pruned(root)
    spec = PruneSpec(method, 0.7, seed=3)
    model = whole_model(root / "ft")
    with _open(root, data) as calib, CheckpointReader(root / "base") as rb:
        norms = calib.input_norms(names) if method == "wanda" else None
        got = calib.grid_q(calib.pruning(spec, rb, input_norms=norms), names)
        masked = _reference_masked(model, root, names, spec, norms)

        def metric(q: float) -> float:
            masked.apply_(model, q)
            if calib.causal:
                return cal.causal_lm_perplexity(model, calib.batches)
            with torch.no_grad():
                right = sum(int((model(**b).logits.argmax(-1) == y).sum()) for b, y in zip(calib.batches, calib.labels))
            return right / sum(len(y) for y in calib.labels)

        want = select_q_grid(metric, spec.p, mode="min" if calib.causal else "max")
        assert got.table == want.table and got.q == want.q, arch
        # the pruned candidates' logits themselves, not only the metric (accuracy on 5 rows is coarse)
        logits: dict[tuple[int, int], torch.Tensor] = {}
        qs = [0.3, 0.65]
        calib.model.run(
            calib.batches,
            qs,
            lambda c, b, out: logits.__setitem__((c, b), out.logits),
            pruning=calib.pruning(spec, rb, input_norms=norms),
            pruned=names,
        )
        for c, q in enumerate(qs):
            masked.apply_(model, q)
            for b, batch in enumerate(calib.batches):
                with torch.no_grad():
                    assert torch.equal(logits[c, b], model(**batch).logits), (arch, q, b)
    assert not torch.equal(logits[0, 0], logits[1, 0])


def test_unlabelled_q_table_equals_the_whole_models(pair):
    arch, root, data = pair
    names = _pruned(root)
    spec = PruneSpec("darex-q", 0.8, seed=1)
    model = whole_model(root / "ft")
    with _open(root, data) as calib, CheckpointReader(root / "base") as rb:
        got = calib.unlabelled_q(calib.pruning(spec, rb), names)
        want = select_q_unlabelled(
            model,
            _reference_masked(model, root, names, spec),
            calib.batches,
            lambda m, b: m(**b, output_hidden_states=True).hidden_states[-1],
            spec.p,
        )
    assert got.table == want.table and got.q == want.q, arch


@pytest.mark.parametrize("arithmetic", ["float16", "float64"])
def test_analytic_q_equals_the_whole_models(pair, arithmetic):
    arch, root, data = pair
    if arithmetic == "float64" and arch not in ("llama-untied", "gpt2", "bert"):
        pytest.skip("an untied decoder, an input-major decoder and an encoder cover float64")
    names = _pruned(root)
    spec = PruneSpec("darex-q", 0.9, q=0.5)
    model = whole_model(root / "ft")
    with _open(root, data) as calib, CheckpointReader(root / "base") as rb:
        got = calib.analytic_q(calib.pruning(spec, rb), names, arithmetic=arithmetic)
        measured = cal._measured_weights(model, names)
        stats = collect_input_stats(model, calib.batches, lambda m, b: m(**b), names=list(measured))
        means = {n: s.mean[:, None] if measured[n] else s.mean for n, s in stats.items()}
    want = analytic_q_per_layer(_reference_masked(model, root, names, spec), means, arithmetic=arithmetic)
    assert got == want, arch
    assert len(set(got.values())) > 2 or arithmetic == "float16"


def test_a_checkpoint_missing_a_parameter_is_refused_in_one_line(tmp_path):
    tiny_llama_pair(tmp_path)
    ft = tmp_path / "ft"
    state = read_checkpoint(ft)
    del state["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    (ft / "model.safetensors").unlink()
    save_file(state, ft / "model.safetensors")
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "a b c"}\n')
    with pytest.raises(ValueError, match=r"lack 1 tensor\(s\) .* 'model.layers.1.mlp.up_proj.weight'"):
        cal.load(str(ft), str(data), need_labels=False, samples=1, batch_size=1, max_length=8)
