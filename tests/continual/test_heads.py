"""Class masking, masked BCE/CE losses and prediction against brute-force references."""

import math

import pytest
import torch

from lifelong_delta.continual.heads import class_mask, masked_loss, predict


def _logits(B=5, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, generator=g, dtype=torch.float64) * 2).requires_grad_(True)


def test_class_mask_range_list_tensor():
    assert class_mask(6, range(2, 4)).tolist() == [False, False, True, True, False, False]
    assert class_mask(6, [0, 5]).tolist() == [True, False, False, False, False, True]
    assert class_mask(4, torch.tensor([1])).tolist() == [False, True, False, False]
    assert not class_mask(3, range(0)).any()
    with pytest.raises(ValueError, match="num_classes"):
        class_mask(4, [4])
    with pytest.raises(ValueError):
        class_mask(4, range(2, 6))


def test_ce_masks_inactive_classes_like_a_brute_force_softmax():
    logits = _logits()
    active = range(2, 5)
    targets = torch.tensor([2, 3, 4, 4, 2])
    loss = masked_loss(logits, targets, active, loss="ce")
    ref = 0.0
    for b in range(5):
        z = [logits[b, c].item() for c in active]
        lse = math.log(sum(math.exp(v) for v in z))
        ref += lse - logits[b, targets[b]].item()
    assert loss.item() == pytest.approx(ref / 5, rel=1e-12)
    loss.backward()
    inactive = [c for c in range(7) if c not in active]
    assert torch.all(logits.grad[:, inactive] == 0)
    assert torch.any(logits.grad[:, list(active)] != 0)


def test_bce_over_active_columns_like_a_brute_force_loop():
    logits = _logits()
    active = range(3, 6)
    targets = torch.tensor([3, 5, 4, 3, 5])
    loss = masked_loss(logits, targets, active, loss="bce")
    ref = 0.0
    for b in range(5):
        for c in active:
            p = 1 / (1 + math.exp(-logits[b, c].item()))
            y = 1.0 if targets[b].item() == c else 0.0
            ref -= y * math.log(p) + (1 - y) * math.log(1 - p)
    assert loss.item() == pytest.approx(ref / (5 * len(active)), rel=1e-12)
    loss.backward()
    assert torch.all(logits.grad[:, [0, 1, 2, 6]] == 0)


def test_bce_list_of_classes_equals_range_and_full_head():
    logits = _logits(seed=1).detach()
    targets = torch.tensor([1, 2, 0, 2, 1])
    by_range = masked_loss(logits, targets, range(0, 3), "bce")
    by_list = masked_loss(logits, targets, [2, 0, 1], "bce")
    torch.testing.assert_close(by_range, by_list)
    full = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nn.functional.one_hot(targets, 7).double()
    )
    torch.testing.assert_close(masked_loss(logits, targets, range(7), "bce"), full)


def test_masked_loss_rejects_bad_input():
    logits = _logits().detach()
    with pytest.raises(ValueError, match="loss"):
        masked_loss(logits, torch.zeros(5, dtype=torch.long), range(2), loss="mse")
    with pytest.raises(ValueError, match="targets"):
        masked_loss(logits, torch.zeros(4, dtype=torch.long), range(2))


def test_predict_ignores_unseen_columns():
    logits = torch.tensor([[0.1, 0.5, 9.0, 0.0], [2.0, 0.3, 8.0, 7.0]])
    assert predict(logits, range(0, 2)).tolist() == [1, 0]
    assert predict(logits, range(0, 4)).tolist() == [2, 2]
    assert predict(logits, [0, 3]).tolist() == [0, 3]  # ids in the full class space
    with pytest.raises(ValueError, match="empty"):
        predict(logits, range(0))
