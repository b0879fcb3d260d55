"""Decoder models as inputs: tiny random Llama, Qwen2 and Mistral causal LMs (GQA, tied or untied embeddings, a
tokenizer without a padding token) and GPT-2 through every calibrated method and q mode of ``lifelong-delta prune``."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

from lifelong_delta.delta import calibration as cal
from lifelong_delta.delta.analytic_q import analytic_q_per_layer
from lifelong_delta.delta.darex import MaskedDelta
from lifelong_delta.delta.importance import collect_input_stats
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.methods import PruneSpec
from tests.delta._checkpoints import (
    CALIB_TEXT,
    calib_args,
    read_checkpoint,
    run_cli,
    tiny_gpt2_pair,
    tiny_llama_pair,
    whole_model,
    write_text_data,
)


def _decoder_pair(root: Path, arch: str, tied: bool = False) -> Path:
    """A tiny random decoder pair under ``root`` (``gpt2``, or an ``arch`` of :func:`tiny_llama_pair`) and
    :data:`CALIB_TEXT` as ``root/calib.jsonl``, which is returned."""
    if arch == "gpt2":
        tiny_gpt2_pair(root)
    else:
        tiny_llama_pair(root, tie_word_embeddings=tied, arch=arch)
    return write_text_data(root / "calib.jsonl", CALIB_TEXT)


def _prune(
    root: Path, data: Path, out: Path, method: str, q_mode: str | None = None, progress: str | None = "false"
) -> subprocess.CompletedProcess:
    """``lifelong-delta prune`` of ``root``'s pair by ``method`` as :func:`calib_args` sets it, which must succeed
    (``progress=None``: the default progress lines)."""
    options = [*(["--q_mode", q_mode] if q_mode else []), *(["--progress", progress] if progress else [])]
    res = run_cli("prune", *calib_args(root, data, "--out", out, "--method", method, *options))
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(
    scope="module",
    params=[("llama", True), ("llama", False), ("qwen2", True), ("mistral", False)],
    ids=["llama-tied", "llama-untied", "qwen2-tied", "mistral-untied"],
)
def llama(request, tmp_path_factory) -> tuple[Path, Path]:
    arch, tied = request.param
    root = tmp_path_factory.mktemp(arch)
    return root, _decoder_pair(root, arch, tied)


CASES = [
    ("wanda", None),
    ("darex-q", "grid"),
    ("darex-q", "unlabelled"),
    ("darex-q", "analytic"),
    ("magnitude", "grid"),
    ("structural", "unlabelled"),
]


@pytest.mark.parametrize(("method", "q_mode"), CASES, ids=[f"{m}-{q}" for m, q in CASES])
def test_every_calibrated_method_prunes_a_causal_lm(tmp_path, llama, method, q_mode):
    root, data = llama
    res = _prune(root, data, tmp_path / "out", method, q_mode)
    base, ft, out = (read_checkpoint(p) for p in (root / "base", root / "ft", tmp_path / "out"))
    assert out.keys() == ft.keys()  # a tied lm_head stays absent, an untied one is pruned like any matrix
    for name in out:
        changed = (ft[name] != base[name]).sum()
        kept = (out[name] != base[name]).sum()
        assert 0 < kept < changed or ft[name].dim() < 2, name
    if q_mode == "grid":  # the perplexity grid chose the best of the q's it printed
        chosen = float(re.search(r"chose q = ([0-9.]+)", res.stdout).group(1))
        table = dict((float(q), float(v)) for q, v in re.findall(r"([0-9.]+)→([0-9.e+]+)", res.stdout))
        best = min(table.values())  # printed to 4 digits, so neighbours may tie
        assert table[min(table, key=lambda q: abs(q - chosen))] == best


REST = [("dare", None), ("magnitude", "unlabelled"), ("wanda", "grid"), ("wanda", "unlabelled"), ("structural", "grid")]


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2"])
@pytest.mark.parametrize(("method", "q_mode"), REST, ids=[f"{m}-{q}" for m, q in REST])
def test_the_other_method_and_q_mode_pairs_prune_a_causal_lm(tmp_path, arch, method, q_mode):
    """With the cases above, every method x q mode of the CLI on a tied Llama and on GPT-2 (Conv1D weights)."""
    data = _decoder_pair(tmp_path, "gpt2" if arch == "gpt2" else "llama", tied=True)
    res = _prune(tmp_path, data, tmp_path / "out", method, q_mode)
    assert ("chose q" in res.stdout) == (q_mode is not None)
    base, ft, out = (read_checkpoint(tmp_path / d) for d in ("base", "ft", "out"))
    changed = sum(int((ft[n] != base[n]).sum()) for n in out)
    kept = sum(int((out[n] != base[n]).sum()) for n in out)
    assert 0.3 * changed < kept < 0.7 * changed  # p = 0.5 of the changed entries, whichever way they are chosen


def test_causal_lm_perplexity_is_the_mean_token_loss_over_real_tokens(llama):
    """Brute force: each text alone (no padding), HF's own shifted loss, weighted by its token count."""
    root, data = llama
    with cal.load(str(root / "ft"), str(data), need_labels=True, samples=5, batch_size=2, max_length=64) as calib:
        assert calib.labels is None  # a causal LM is scored on its text, so grid needs no label column
    model = whole_model(root / "ft")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(root / "ft")
    total = count = 0.0
    with torch.no_grad():
        for text in CALIB_TEXT:
            ids = tok(text, return_tensors="pt")["input_ids"]
            n = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    assert cal.causal_lm_perplexity(model, calib.batches) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_wanda_measures_every_linear_of_the_decoder_layers(llama):
    root, data = llama
    names = [n for n, p in read_checkpoint(root / "ft").items() if p.dim() == 2]
    with cal.load(str(root / "ft"), str(data), need_labels=False, samples=5, batch_size=2, max_length=64) as calib:
        norms = calib.input_norms(names)
    for layer in range(2):
        for proj in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            n = f"model.layers.{layer}.{proj}.weight"
            assert n in norms and not torch.equal(norms[n], torch.ones_like(norms[n])), n
    assert torch.equal(norms["model.embed_tokens.weight"], torch.ones(32))  # no per-column input: magnitude


def test_gpt2_conv1d_weights_rank_within_output_columns(tmp_path):
    """GPT-2 stores its projections input-major (``Conv1D``, ``[in, out]``): WANDA measures their inputs and ranks
    |δ_ij|·‖x_i‖ within each output column (checked by brute force on the written checkpoint); the analytic q reads
    them transposed (equal to the q of the transposed weight); the perplexity grid prunes GPT-2."""
    data = _decoder_pair(tmp_path, "gpt2")
    _prune(tmp_path, data, tmp_path / "w", "wanda", progress=None)
    calib = cal.load(str(tmp_path / "ft"), str(data), need_labels=False, samples=5, batch_size=2, max_length=128)
    name = "transformer.h.0.attn.c_attn.weight"  # [in 32, out 96]
    norms = calib.input_norms([name])[name]
    assert norms.shape == (32, 1)
    base, ft, out = (read_checkpoint(p)[name] for p in (tmp_path / "base", tmp_path / "ft", tmp_path / "w"))
    delta = ft.float() - base.float()
    want = torch.zeros_like(delta, dtype=torch.bool)
    for j in range(delta.shape[1]):  # brute force: the top half of each output column by |δ_ij|·‖x_i‖
        want[(delta[:, j].abs() * norms[:, 0]).topk(16).indices, j] = True
    assert torch.equal(out != base, want)

    _prune(tmp_path, data, tmp_path / "a", "darex-q", "analytic", progress=None)
    loaded = whole_model(tmp_path / "ft")
    means = {
        n: s.mean for n, s in collect_input_stats(loaded, calib.batches, lambda m, b: m(**b), names=[name]).items()
    }
    bias = name[: -len("weight")] + "bias"
    with calib, CheckpointReader(tmp_path / "base") as rb:
        got = calib.analytic_q(calib.pruning(PruneSpec("darex-q", 0.5, q=0.5), rb), [name, bias], arithmetic="float64")[
            name
        ]  # float16 keeps a small delta's q at 1 - p: no contrast
    want = analytic_q_per_layer(_transposed_masked(tmp_path, name), {name: means[name]}, arithmetic="float64")[name]
    transposed_wrongly = analytic_q_per_layer(
        _transposed_masked(tmp_path, name, transpose=False), {name: means[name].repeat(3)[:96]}, arithmetic="float64"
    )[name]
    assert got == want and want != transposed_wrongly
    res = _prune(tmp_path, data, tmp_path / "g", "darex-q", "grid", progress=None)
    assert "chose q" in res.stdout, res.stderr


def _transposed_masked(root: Path, name: str, transpose: bool = True) -> MaskedDelta:
    """The masked delta of ``name`` stored output-major, ``[out, in]``: the reference for an input-major weight
    (``transpose=False``: as stored, the mistake the reference must differ from)."""
    base, ft = (read_checkpoint(root / d)[name].float() for d in ("base", "ft"))
    if transpose:
        base, ft = base.T.contiguous(), ft.T.contiguous()
    bias = name[: -len("weight")] + "bias"
    b_base, b_ft = (read_checkpoint(root / d)[bias].float() for d in ("base", "ft"))
    return MaskedDelta.build({name: base, bias: b_base}, {name: ft, bias: b_ft}, 0.5)
