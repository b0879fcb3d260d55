"""Method registry, PruneSpec validation and the per-tensor entry point."""

import pytest
import torch

from lifelong_delta.delta.dare import dare_merge
from lifelong_delta.delta.importance import importance_prune
from lifelong_delta.delta.matching import is_excluded
from lifelong_delta.delta.methods import METHODS, PruneSpec, prune_tensor
from lifelong_delta.delta.structural import structural_prune


def _pair(shape=(6, 10), dtype=torch.float32):
    torch.manual_seed(0)
    base = torch.randn(shape).to(dtype)
    return base, (base.float() + torch.randn(shape)).to(dtype)


def test_registry_lists_every_method_with_a_paper():
    assert set(METHODS) == {"dare", "darex-q", "magnitude", "wanda", "structural"}
    assert all(m.paper.startswith("https://arxiv.org/abs/") for m in METHODS.values())
    assert METHODS["wanda"].needs_input_norms and not METHODS["dare"].needs_input_norms


def test_spec_defaults_and_validation():
    assert PruneSpec("dare", 0.9).rescale == "dare"
    assert PruneSpec("darex-q", 0.9).rescale == "q"
    assert PruneSpec("magnitude", 0.9).rescale == "none"
    assert PruneSpec("structural", 0.5, exclude="lm_head.*").exclude == ("lm_head.*",)
    bad = [
        (dict(method="lottery", p=0.5), "method='lottery' is not one of"),
        (dict(method="dare", p=1.2), r"p=1.2 is outside \[0, 1\)"),
        (dict(method="darex-q", p=0.9, q=0.05), "q=0.05 is below 1-p"),
        (dict(method="darex-q", p=0.5, q=1.5), "q=1.5 is above 1"),
        (dict(method="darex-q", p=0.5, q=0.0, force=True), "q=0.0 must be > 0"),
        (dict(method="dare", p=0.5, q=0.7), "use method='darex-q'"),
        (dict(method="dare", p=0.5, rescale="none"), "does not apply to method='dare'"),
        (dict(method="magnitude", p=0.5, rescale="none", q=0.7), "rescale='none'"),
        (dict(method="magnitude", p=0.5, rescale="half"), "rescale='half'"),
        (dict(method="structural", p=0.5, structural_axis="depth"), "structural_axis='depth'"),
        (dict(method="structural", p=0.5, structural_select="best"), "structural_select='best'"),
        (dict(method="dare", p=0.5, seed=1.5), "seed=1.5"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            PruneSpec(**kwargs)
    assert PruneSpec("darex-q", 0.9, q=0.05, force=True).q == 0.05


def test_prune_tensor_dispatches_to_each_method():
    base, ft = _pair()
    d = ft - base
    out = prune_tensor("w", base, ft, PruneSpec("dare", 0.5, seed=3))
    assert torch.equal(out, dare_merge(base, ft, 0.5, seed=3, name="w"))
    out = prune_tensor("w", base, ft, PruneSpec("darex-q", 0.5, q=0.7, seed=3))
    assert torch.equal(out, dare_merge(base, ft, 0.5, seed=3, name="w", q=0.7))
    out = prune_tensor("w", base, ft, PruneSpec("darex-q", 0.5, q=0.7, seed=3), q=0.9)  # per-tensor q wins
    assert torch.equal(out, dare_merge(base, ft, 0.5, seed=3, name="w", q=0.9))
    out = prune_tensor("w", base, ft, PruneSpec("magnitude", 0.5, rescale="dare"))
    assert torch.allclose(out, base + importance_prune(d, 0.5, rescale="dare"))
    norms = torch.rand(10)
    out = prune_tensor("w", base, ft, PruneSpec("wanda", 0.7), input_norms=norms)
    assert torch.allclose(out, base + importance_prune(d, 0.7, score="wanda", input_norms=norms))
    spec = PruneSpec("structural", 0.5, structural_axis="columns", seed=2)
    out = prune_tensor("w", base, ft, spec)
    assert torch.allclose(out, base + structural_prune(d, 0.5, axis="columns", seed=2, name="w"))
    out = prune_tensor("w", base, ft, PruneSpec("structural", 0.5, rescale="none", seed=2))
    assert torch.allclose(out, base + structural_prune(d, 0.5, seed=2, name="w", q=1.0))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_keeps_the_finetuned_dtype(method):
    base, ft = _pair(dtype=torch.bfloat16)
    spec = PruneSpec(method, 0.5, q=0.8 if method == "darex-q" else None)
    norms = torch.ones(10) if method == "wanda" else None
    out = prune_tensor("w", base.float(), ft, spec, input_norms=norms)
    assert out.dtype == torch.bfloat16 and out.shape == ft.shape
    changed = (out != ft).float().mean()
    assert changed > 0.3  # roughly half the entries fall back to the base value


def test_excluded_and_non_floating_tensors_are_copied():
    base, ft = _pair()
    spec = PruneSpec("dare", 0.9, exclude=("lm_head.*", "*.embed_tokens.*"))
    assert prune_tensor("lm_head.weight", base, ft, spec) is ft
    assert prune_tensor("model.embed_tokens.weight", base, ft, spec) is ft
    assert prune_tensor("model.layers.0.w", base, ft, spec) is not ft
    ids = torch.arange(5)
    assert prune_tensor("position_ids", ids, ids + 1, spec) is not ids
    assert torch.equal(prune_tensor("position_ids", ids, ids + 1, spec), ids + 1)
    assert is_excluded("a.b", ["a.*"]) and not is_excluded("a.b", ["b.*"]) and not is_excluded("a", [])


def test_prune_tensor_errors_name_the_tensor():
    base, ft = _pair()
    with pytest.raises(ValueError, match="tensor 'w': base shape"):
        prune_tensor("w", base, ft[:3], PruneSpec("dare", 0.5))
    with pytest.raises(ValueError, match="darex-q' needs q for tensor 'w'"):
        prune_tensor("w", base, ft, PruneSpec("darex-q", 0.5))
    with pytest.raises(ValueError, match="wanda' needs input_norms for tensor 'w'"):
        prune_tensor("w", base, ft, PruneSpec("wanda", 0.5))
    with pytest.raises(ValueError, match="q=0.1 is below 1-p.*'w'"):
        prune_tensor("w", base, ft, PruneSpec("darex-q", 0.5, q=0.8), q=0.1)
    bad = ft.clone()
    bad[0, 0] = float("inf")
    for method in METHODS:
        with pytest.raises(ValueError, match="'w'.*non-finite"):
            prune_tensor(
                "w",
                base,
                bad,
                PruneSpec(method, 0.5, q=0.8 if method == "darex-q" else None),
                input_norms=torch.ones(10),
            )


def test_a_q_given_to_an_importance_method_rescales_by_it():
    spec = PruneSpec("magnitude", 0.6, q=0.8)
    assert spec.rescale == "q"
    base, ft = _pair()
    out = prune_tensor("w", base, ft, spec)
    d = ft - base
    # brute force: top round(0.4 * 10) = 4 |δ| per row, kept entries ×1/0.8
    for i in range(d.shape[0]):
        top = set(d[i].abs().topk(4).indices.tolist())
        for j in range(d.shape[1]):
            want = base[i, j] + d[i, j] * (1 / 0.8) if j in top else base[i, j]
            assert out[i, j] == pytest.approx(float(want), abs=1e-6)
    with pytest.raises(ValueError, match="q is set but rescale='dare'"):
        PruneSpec("structural", 0.5, q=0.6, rescale="dare")


@pytest.mark.parametrize(
    "spec",
    [
        PruneSpec("dare", 0.7, seed=1),
        PruneSpec("magnitude", 0.7, rescale="q"),
        PruneSpec("wanda", 0.7, rescale="q"),
        PruneSpec("structural", 0.5, structural_axis="rows", seed=2),
        PruneSpec("structural", 0.5, structural_axis="columns", structural_select="importance"),
    ],
    ids=lambda s: f"{s.method}-{s.structural_axis}",
)
def test_masked_delta_with_the_method_mask_equals_prune_tensor_for_every_q(spec):
    """A q search over magnitude/WANDA/structural masks: build once, rescale per q, same bits as the stream."""
    from dataclasses import replace

    from lifelong_delta.delta.darex import MaskedDelta
    from lifelong_delta.delta.methods import keep_mask_for

    torch.manual_seed(5)
    base = {"w": torch.randn(6, 10), "b": torch.randn(6)}
    ft = {k: v + torch.randn(v.shape) for k, v in base.items()}
    norms = {"w": torch.rand(10) + 0.1}
    masked = MaskedDelta.build(
        base, ft, spec.p, seed=spec.seed, keep_fn=lambda n, d: keep_mask_for(n, d, spec, input_norms=norms.get(n))
    )
    for q in (1 - spec.p, 0.5 * (2 - spec.p), 1.0):
        qspec = spec if spec.method == "dare" else replace(spec, q=q)
        for name in masked.names:
            want = prune_tensor(name, base[name], ft[name], qspec, input_norms=norms.get(name))
            if spec.method == "dare" and q != 1 - spec.p:
                continue  # plain DARE has one q
            assert torch.equal(masked.merged(name, q), want), (name, q)
