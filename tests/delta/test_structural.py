"""Structural delta pruning: whole rows/columns, exact counts, deterministic draws, importance order."""

import pytest
import torch

from lifelong_delta.delta.dare import scale_of
from lifelong_delta.delta.structural import structural_keep, structural_prune


@pytest.mark.parametrize("axis", ["rows", "columns"])
@pytest.mark.parametrize("select", ["random", "importance"])
@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.9])
def test_drops_whole_rows_or_columns_with_the_right_count(axis, select, p):
    torch.manual_seed(0)
    d = torch.randn(20, 12)
    out = structural_prune(d, p, axis=axis, select=select, seed=3, name="w")
    dim = 0 if axis == "rows" else 1
    n = d.shape[dim]
    nz = (out != 0).any(dim=1 - dim)
    assert int(nz.sum()) == round((1 - p) * n)
    # dropped slices are all zero, kept slices are complete and rescaled by 1/(1-p)
    kept = out.index_select(dim, nz.nonzero().squeeze(1))
    ref = d.index_select(dim, nz.nonzero().squeeze(1)) * scale_of(1 - p)
    assert torch.equal(kept, ref)


def test_random_choice_depends_on_seed_and_name_only():
    d = torch.randn(64, 4)
    a = structural_keep(d, 0.5, seed=1, name="x")
    assert torch.equal(a, structural_keep(torch.randn(64, 4), 0.5, seed=1, name="x"))
    assert not torch.equal(a, structural_keep(d, 0.5, seed=1, name="y"))
    assert not torch.equal(a, structural_keep(d, 0.5, seed=2, name="x"))


def test_importance_drops_the_smallest_norm_rows_and_columns():
    d = torch.tensor([[3.0, 0.1, 0.0], [0.1, 0.1, 0.1], [0.0, 5.0, 0.0], [1.0, 1.0, 1.0]])
    assert structural_keep(d, 0.5, select="importance").tolist() == [True, False, True, False]
    assert structural_keep(d, 0.34, axis="columns", select="importance").tolist() == [True, True, False]
    # column scores weighted by input norms
    norms = torch.tensor([0.01, 1.0, 100.0])
    w = structural_keep(d, 0.34, axis="columns", select="importance", input_norms=norms)
    assert w.tolist() == [False, True, True]


def test_q_rescale_one_d_and_nd():
    d = torch.randn(6, 5)
    out = structural_prune(d, 0.5, q=0.8, seed=0, name="a")
    nz = (out != 0).any(1)
    assert torch.equal(out[nz], d[nz] * scale_of(0.8))
    b = torch.randn(10)
    ob = structural_prune(b, 0.3, axis="columns", seed=0, name="bias")  # 1-D: element-wise
    assert int((ob != 0).sum()) == 7
    c = torch.randn(4, 2, 3, 3)
    oc = structural_prune(c, 0.5, seed=0, name="conv")
    assert oc.shape == c.shape and int((oc.view(4, -1) != 0).any(1).sum()) == 2


def test_errors():
    d = torch.randn(3, 4)
    with pytest.raises(ValueError, match="axis='depth'"):
        structural_prune(d, 0.5, axis="depth")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="select='best'"):
        structural_prune(d, 0.5, select="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p=-0.1 is outside"):
        structural_prune(d, -0.1)
    with pytest.raises(ValueError, match="q=0.1 is below 1-p"):
        structural_prune(d, 0.5, q=0.1, name="w")
    with pytest.raises(ValueError, match="'w'.*non-finite"):
        structural_prune(torch.tensor([[float("nan")]]), 0.5, name="w")
    with pytest.raises(ValueError, match="input_norms for tensor 'w'"):
        structural_prune(d, 0.5, axis="columns", select="importance", input_norms=torch.ones(3), name="w")
