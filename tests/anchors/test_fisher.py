"""diagonal_fisher: every (label × estimator × head) option against a brute-force per-sample autograd loop."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lifelong_delta.anchors.fisher import diagonal_fisher, fisher_targets


def tiny() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))


def data(n_batches: int = 3, batch: int = 5):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(batch, 4, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n_batches)]


def nll(logits: torch.Tensor, target: torch.Tensor, head: str) -> torch.Tensor:
    """Brute-force loss of ONE sample (logits [C]); written independently of fisher.head_loss."""
    if head == "softmax":
        return F.cross_entropy(logits[None], target.reshape(1))
    t = F.one_hot(target, logits.shape[-1]).float() if not target.is_floating_point() else target
    return F.binary_cross_entropy_with_logits(logits, t, reduction="sum")


def brute_force(model, names, batches, head, label, estimator, seed, logits_fn=None, cap=None):
    """Python loop with torch.autograd; labels for 'sampled' come from the same generator stream."""
    logits_fn = logits_fn or (lambda m, x: m(x))
    model.eval()
    params = [dict(model.named_parameters())[n] for n in names]
    g = torch.Generator().manual_seed(seed)
    total = [torch.zeros_like(p) for p in params]
    count, seen = 0, 0
    for x, y in batches:
        if cap is not None:
            x, y = x[: cap - seen], y[: cap - seen]
            if len(x) == 0:
                break
        seen += len(x)
        with torch.no_grad():
            logits = logits_fn(model, x)
        if label == "true":
            targets = y
        elif label == "argmax":
            targets = logits.argmax(-1)
        else:
            targets = fisher_targets(logits, y, head=head, label="sampled", generator=g)
        if estimator == "per_sample":
            for i in range(len(x)):
                loss = nll(logits_fn(model, x[i : i + 1])[0], targets[i], head)
                for t, gr in zip(total, torch.autograd.grad(loss, params)):
                    t += gr**2
                count += 1
        else:
            out = logits_fn(model, x)
            loss = torch.stack([nll(out[i], targets[i], head) for i in range(len(x))]).mean()
            for t, gr in zip(total, torch.autograd.grad(loss, params)):
                t += gr**2
            count += 1
    return {n: t / count for n, t in zip(names, total)}


@pytest.mark.parametrize(
    "label, estimator, head",
    list(itertools.product(["true", "argmax", "sampled"], ["per_sample", "batch"], ["softmax", "bce"])),
)
def test_fisher_matches_brute_force(label, estimator, head):
    model = tiny()
    names = ["0.weight", "3.weight", "3.bias"]
    batches = data()
    got = diagonal_fisher(
        model,
        names,
        batches,
        head=head,
        label=label,
        estimator=estimator,
        generator=torch.Generator().manual_seed(7),
        chunk_size=2,
    )
    want = brute_force(model, names, batches, head, label, estimator, seed=7)
    assert list(got) == names
    for n in names:
        assert got[n].dtype == torch.float32 and got[n].shape == want[n].shape
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
        assert want[n].abs().sum() > 0


def test_logits_fn_masks_classes_and_n_samples_caps():
    model = tiny()
    names = ["3.weight"]
    batches = data()

    def current_task(m, x):  # only classes 1 and 2; targets index the returned columns
        return m(x)[:, 1:]

    batches = [(x, y.clamp_max(1)) for x, y in batches]
    for estimator in ("per_sample", "batch"):
        got = diagonal_fisher(model, names, batches, logits_fn=current_task, estimator=estimator, n_samples=7)
        want = brute_force(model, names, batches, "softmax", "true", estimator, 0, logits_fn=current_task, cap=7)
        torch.testing.assert_close(got["3.weight"], want["3.weight"], rtol=1e-5, atol=1e-7)
        assert torch.equal(got["3.weight"][0], torch.zeros(6))  # the masked class row gets no gradient


def test_sampled_softmax_fisher_is_unbiased_for_the_true_fisher():
    """E_y~p[g_y²] = Σ_c p_c g_c²: the Monte-Carlo estimate converges to the enumeration."""
    model = tiny().eval()
    x = torch.randn(1, 4)
    w = model[3].weight
    logits = model(x)[0]
    p = logits.softmax(-1).detach()
    exact = sum(
        p[c] * torch.autograd.grad(F.cross_entropy(logits[None], torch.tensor([c])), w, retain_graph=True)[0] ** 2
        for c in range(3)
    )
    xs = x.expand(4000, 4)
    mc = diagonal_fisher(
        model,
        ["3.weight"],
        [(xs, torch.zeros(4000, dtype=torch.long))],
        label="sampled",
        generator=torch.Generator().manual_seed(0),
        chunk_size=1000,
    )["3.weight"]
    assert ((mc - exact).norm() / exact.norm()).item() < 0.06


def test_sampled_bce_fisher_is_unbiased_for_the_true_fisher():
    """Independent Bernoulli outputs: E[(Σ_c (σ_c − y_c) ∂l_c)²] = Σ_c σ_c(1 − σ_c) (∂l_c)²."""
    model = tiny().eval()
    x = torch.randn(1, 4)
    b = model[3].bias
    logits = model(x)[0]
    s = logits.sigmoid().detach()
    exact = sum(s[c] * (1 - s[c]) * torch.autograd.grad(logits[c], b, retain_graph=True)[0] ** 2 for c in range(3))
    xs = x.expand(4000, 4)
    mc = diagonal_fisher(
        model,
        ["3.bias"],
        [(xs, torch.zeros(4000, dtype=torch.long))],
        label="sampled",
        head="bce",
        generator=torch.Generator().manual_seed(0),
        chunk_size=1000,
    )["3.bias"]
    assert ((mc - exact).norm() / exact.norm()).item() < 0.06


def test_eval_mode_used_and_training_flags_restored():
    model = tiny().train()
    model[1].eval()  # a mixed state must survive
    batches = data(1)
    a = diagonal_fisher(model, ["0.weight"], batches)
    b = diagonal_fisher(model, ["0.weight"], batches)
    assert torch.equal(a["0.weight"], b["0.weight"])  # dropout off
    assert model.training and model[2].training and not model[1].training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"label": "soft"}, "label must be one of"),
        ({"estimator": "exact"}, "estimator must be one of"),
        ({"head": "sigmoid"}, "head must be one of"),
        ({"n_samples": 0}, "n_samples"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diagonal_fisher(tiny(), ["0.weight"], data(1), **kwargs)


def test_no_data_and_unknown_name():
    with pytest.raises(ValueError, match="yielded no sample"):
        diagonal_fisher(tiny(), ["0.weight"], [])
    with pytest.raises(ValueError, match="not parameters of the model"):
        diagonal_fisher(tiny(), ["head.weight"], data(1))
    with pytest.raises(ValueError, match=r"\(x, y\) pairs"):
        diagonal_fisher(tiny(), ["0.weight"], [torch.randn(2, 4)])


@pytest.mark.parametrize("estimator", ["per_sample", "batch"])
def test_frozen_parameters_get_a_fisher_too(estimator):
    model = tiny()
    batches = data(2)
    want = diagonal_fisher(model, ["0.weight"], batches, estimator=estimator)["0.weight"]
    for p in model.parameters():
        p.requires_grad_(False)
    got = diagonal_fisher(model, ["0.weight"], batches, estimator=estimator)["0.weight"]
    torch.testing.assert_close(got, want)
    assert want.abs().sum() > 0


def test_per_sample_on_a_tiny_timm_vit_matches_brute_force():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=4,
        in_chans=1,
        embed_dim=8,
        depth=1,
        num_heads=2,
        num_classes=3,
    )
    names = ["blocks.0.attn.qkv.weight", "head.weight", "cls_token"]
    batches = [(torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1]))]
    got = diagonal_fisher(vit, names, batches, head="bce", chunk_size=2)
    want = brute_force(vit, names, batches, "bce", "true", "per_sample", 0)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-8)
