"""Prompt baselines: key-query selection, CODA-P orthogonality and freezing, what trains, and a 2-process DDP run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lifelong_delta.continual.prompts import (
    L2P,
    CodaPrompt,
    CodaPromptPool,
    DualPrompt,
    DualPromptPool,
    L2PPool,
    gram_schmidt_,
    orthogonality_loss,
    select_prompts,
)
from tests.continual.prompt_probe import TINY, run_ddp

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- selection
def test_topk_selection_picks_the_matching_keys() -> None:
    keys = torch.randn(10, 16)
    order = torch.tensor([7, 2, 4])
    # each query is a positive multiple of its key, plus a little of a second key: top-2 = (own, second)
    query = 3.0 * keys[order] + 0.2 * keys[[1, 5, 9]]
    idx, sim = select_prompts(query, keys, top_k=1)
    assert idx[:, 0].tolist() == order.tolist()
    torch.testing.assert_close(sim, F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T)

    orth = torch.linalg.qr(torch.randn(16, 10)).Q.T  # 10 orthonormal keys: the match is unambiguous
    query = 2.0 * orth[[3, 8]] + 0.5 * orth[[6, 0]]
    idx, _ = select_prompts(query, orth, top_k=2)
    assert idx.tolist() == [[3, 6], [8, 0]]


def test_l2p_pool_returns_the_selected_prompts_and_pull_loss() -> None:
    pool = L2PPool(pool_size=6, length=2, top_k=2, embed_dim=4, key_dim=8)
    with torch.no_grad():
        pool.keys.copy_(torch.linalg.qr(torch.randn(8, 6)).Q.T)
    query = pool.keys.detach()[[4, 1]] * 5.0
    tokens, idx, pull = pool(query)
    assert idx[:, 0].tolist() == [4, 1]
    assert tokens.shape == (2, 4, 4)
    assert torch.equal(tokens[0, :2], pool.prompts[4]) and torch.equal(tokens[1, :2], pool.prompts[1])
    # the top-1 key equals the query direction: its term 1 - cos is 0; the second (orthogonal) adds 1
    torch.testing.assert_close(pull, torch.tensor(1.0))


def test_dualprompt_uses_the_task_prompt_in_training_and_the_best_key_at_test() -> None:
    pool = DualPromptPool([0, 1], 3, [2, 3], 4, pool_size=5, embed_dim=8, key_dim=6)
    query = pool.keys.detach()[[2, 4, 2]].clone()
    prefixes, idx, pull = pool(query, task=None)
    assert idx.tolist() == [2, 4, 2] and float(pull) == 0.0
    assert torch.equal(prefixes[2][0][1], pool.e[4, 0, 0]) and torch.equal(prefixes[3][1][0], pool.e[2, 1, 1])
    assert prefixes[0][0].shape == (3, 3, 8) and torch.equal(prefixes[1][1][0], pool.g[1, 1])

    prefixes, idx, pull = pool(query, task=2)  # task identity: prompt 2 for every example, key 2 pulled
    assert idx.tolist() == [2, 2, 2]
    expected = (1 - F.cosine_similarity(query, pool.keys[2].expand(3, -1), dim=1)).mean()
    torch.testing.assert_close(pull, expected)


# ------------------------------------------------------------------------------------------- CODA-P
def test_orthogonality_loss_is_zero_for_orthonormal_components_only() -> None:
    q = torch.linalg.qr(torch.randn(12, 5)).Q.T  # 5 orthonormal rows
    assert float(orthogonality_loss(q)) < 1e-12
    skew = q.clone()
    skew[1] += 0.3 * skew[0]
    assert float(orthogonality_loss(skew)) > 1e-3
    assert float(orthogonality_loss(2.0 * q)) > 1e-3


def test_gram_schmidt_new_components_are_orthogonal_to_the_old() -> None:
    w = torch.randn(9, 12)
    old = w[:4].clone()
    gram_schmidt_(w, 4, 9, torch.Generator().manual_seed(0))
    assert torch.equal(w[:4], old)
    torch.testing.assert_close(w[4:] @ w[4:].T, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(old @ w[4:].T, torch.zeros(4, 5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pool_size"):
        gram_schmidt_(torch.randn(20, 12), 0, 13)


def test_coda_pool_starts_orthonormal_and_redraws_each_task_once() -> None:
    pool = CodaPromptPool([0, 2], pool_size=8, length=2, embed_dim=6, key_dim=10)
    for j in range(2):
        for m in (pool.keys.detach()[j], pool.attn.detach()[j], pool.prompts.detach()[j].reshape(8, -1)):
            assert float(orthogonality_loss(m)) < 1e-10
    with torch.no_grad():
        pool.keys.add_(0.1 * torch.randn_like(pool.keys))  # "training" moves task 0's components
    before = pool.keys.detach().clone()
    assert pool.start_task_(1, 4, 8, seed=3)
    assert torch.equal(pool.keys[:, :4], before[:, :4])
    torch.testing.assert_close(pool.keys[0, :4] @ pool.keys[0, 4:].T, torch.zeros(4, 4), atol=1e-5, rtol=0)
    after = pool.keys.detach().clone()
    assert not pool.start_task_(1, 4, 8, seed=3) and torch.equal(pool.keys, after)  # idempotent
    other = CodaPromptPool([0, 2], pool_size=8, length=2, embed_dim=6, key_dim=10)
    other.keys.data.copy_(before)
    other.start_task_(1, 4, 8, seed=3)
    assert torch.equal(other.keys, after)  # a pure function of (seed, task, block): equal on every rank


def test_coda_freezes_old_components_and_ignores_future_ones() -> None:
    pool = CodaPromptPool([0], pool_size=9, length=2, embed_dim=4, key_dim=12)
    prefixes, alpha, _ = pool(torch.randn(5, 12), start=3, stop=6, training=True)
    assert alpha.shape == (1, 5, 6)
    (prefixes[0][0].sum() + prefixes[0][1].pow(2).sum()).backward()
    for p in (pool.keys, pool.attn, pool.prompts):
        norms = p.grad[0].flatten(1).norm(dim=1)
        assert torch.all(norms[:3] == 0) and torch.all(norms[3:6] > 0) and torch.all(norms[6:] == 0)


def test_coda_prompt_is_the_attention_weighted_sum_of_components() -> None:
    pool = CodaPromptPool([1], pool_size=4, length=3, embed_dim=5, key_dim=6)
    q = torch.randn(2, 6)
    prefixes, alpha, _ = pool(q, start=0, stop=4, training=False)
    K, A, P = pool.keys[0], pool.attn[0], pool.prompts[0]
    for b in range(2):
        a = torch.stack([F.cosine_similarity(q[b] * A[m], K[m], dim=0) for m in range(4)])
        torch.testing.assert_close(alpha[0, b], a)
        torch.testing.assert_close(prefixes[1][0][b], sum(a[m] * P[m, 0] for m in range(4)))


# ------------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("method", ["l2p", "dualprompt", "codap"])
def test_only_prompts_and_head_train(method: str) -> None:
    kwargs = {"backbone_kwargs": TINY, "num_classes": 4}
    module = {
        "l2p": lambda: L2P(**kwargs),
        "dualprompt": lambda: DualPrompt(e_layers=[2, 3], **kwargs),
        "codap": lambda: CodaPrompt(layers=[0, 1, 2, 3], pool_size=20, ortho_weight=0.1, **kwargs),
    }[method]()
    module.train()
    x = torch.randn(3, 1, 8, 8)
    feats, logits = module.features_and_logits(x)
    assert feats.shape == (3, 32) and logits.shape == (3, 4)
    aux = module.extra_losses()
    assert set(aux) == {"codap": {"ortho"}}.get(method, {"pull"}) and module.extra_losses() == {}
    (logits.sum() + sum(aux.values())).backward()
    trained = {id(p) for _, p in module.trainable_parameters()}
    for name, p in module.named_parameters():
        if name.startswith("net.") and not name.startswith("net.head."):
            assert id(p) not in trained and p.grad is None, name
        else:
            assert id(p) in trained and p.grad is not None, name
    module.eval()
    torch.testing.assert_close(module(x), module.features_and_logits(x)[1])


def test_prompt_modules_validate_their_options() -> None:
    with pytest.raises(ValueError, match="pred_kd must be 0"):
        L2P(pred_kd=1.0)
    with pytest.raises(ValueError, match="top_k"):
        L2P(pool_size=3, top_k=5)
    with pytest.raises(ValueError, match="prompt layer 4 does not exist"):
        DualPrompt(backbone_kwargs=TINY, num_classes=4)  # e_layers 2-4 on a 4-block ViT
    with pytest.raises(ValueError, match="pool_size=100 exceeds the key width 32"):
        CodaPrompt(backbone_kwargs=TINY, num_classes=4, layers=[0])
    with pytest.raises(TypeError, match="VisionTransformer"):
        L2P(backbone="resnet18", backbone_kwargs={"in_chans": 1}, num_classes=4, trainable=["fc.*"])


def test_codap_checkpoint_restores_prompts_and_pool_state(tmp_path: Path) -> None:
    from lifelong_delta.cli import lightning_main

    cfg = ROOT / "configs" / "cl_eval" / "mnist"
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(f"""
trainer:
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  logger: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path}, save_last: true, save_top_k: 0}}
model:
  init_args: {{pretrained: false, backbone_kwargs: {TINY}, pool_size: 20}}
data:
  init_args: {{dataset: digits, n_tasks: 4, classes_per_task: 2, max_per_class: 16, batch_size: 16,
               val_fraction: 0.2, max_eval_per_class: null}}
""")
    lightning_main(["fit", "-c", str(cfg / "base.yaml"), "-c", str(cfg / "codap.yaml"), "-c", str(tiny)])
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    loaded = CodaPrompt.load_from_checkpoint(tmp_path / "last.ckpt").eval()  # no datamodule, no trainer
    for name, value in loaded.prompts.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][f"prompts.{name}"]), name
    assert int(loaded.prompts.task_initialised) == 3 and int(loaded.prompts.n_tasks) == 4
    assert loaded.tasks_seen() == 4 and loaded.component_range(3) == (15, 20)
    assert loaded(torch.randn(2, 1, 8, 8)).shape == (2, 8)


# ------------------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
@pytest.mark.parametrize("method", ["l2p", "dualprompt", "codap"])
def test_ddp_two_processes_agree_on_prompt_selection(tmp_path: Path, method: str) -> None:
    """A prompt method on a tiny stream with 2 gloo processes: equal prompts and equal picks on every rank."""
    run_ddp(tmp_path, method, "SelectionDump", model_extra="pool_size: 20" if method == "codap" else "")
    dumps = [torch.load(tmp_path / f"selection_rank{r}.pt") for r in (0, 1)]
    assert dumps[0]["pool"].keys() == dumps[1]["pool"].keys()
    for name, value in dumps[0]["pool"].items():
        assert torch.equal(value, dumps[1]["pool"][name]), name
    assert torch.equal(dumps[0]["selection"], dumps[1]["selection"])
    assert dumps[0]["selection"].shape[1 if method == "codap" else 0] == 16  # CODA-P: α [blocks, 16, components]
    if method == "codap":
        assert int(dumps[0]["pool"]["task_initialised"]) == 1  # task 1's components were re-drawn on both ranks
    assert len(list(tmp_path.glob("ddp/version_*/cl_metrics.json"))) == 1
