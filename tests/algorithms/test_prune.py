from __future__ import annotations

import pytest
import torch

from slim_trt.algorithms.prune import (
    is_nm, magnitude_scores, nm_mask, nm_violations, prune, unstructured_mask, wanda_scores,
)
from slim_trt.config import Sparsity


def scores(rows: int = 64, cols: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_exactly_n_per_group_along_k(n, m):
    s = scores()
    mask = nm_mask(s, n, m)
    per_group = mask.reshape(64, 128 // m, m).sum(dim=2)
    assert bool((per_group == n).all())
    assert nm_violations(mask, n, m) == 0 and is_nm(mask, n, m)
    # the groups run along K (columns), not N: the transposed mask breaks the pattern
    assert nm_violations(mask.T.contiguous(), n, m) > 0
    # kept = the n largest of each group
    g = s.reshape(64, -1, m)
    gm = mask.reshape(64, -1, m)
    kept_min = torch.where(gm, g, torch.inf).amin(dim=2)
    pruned_max = torch.where(gm, -torch.inf, g).amax(dim=2)
    assert bool((kept_min >= pruned_max).all())


def test_ties_are_broken_by_column_order():
    flat = torch.ones(2, 8)
    assert nm_mask(flat, 2, 4).tolist() == [[True, True, False, False] * 2] * 2
    assert unstructured_mask(flat, 0.25).tolist() == [[False, False] + [True] * 6] * 2


def test_nm_mask_needs_k_divisible_by_m():
    with pytest.raises(ValueError, match="K % m == 0"):
        nm_mask(torch.rand(4, 10), 2, 4)
    assert not is_nm(torch.ones(4, 10), 2, 4)


@pytest.mark.parametrize("cols, ratio, pruned", [(128, 0.5, 64), (100, 0.3, 30), (100, 0.29, 29), (10, 0.75, 8)])
def test_unstructured_ratio_is_exact_per_row(cols, ratio, pruned):
    s = scores(16, cols)
    mask = unstructured_mask(s, ratio)
    assert (~mask).sum(dim=1).tolist() == [pruned] * 16
    # the pruned ones are each row's lowest scores
    assert bool((torch.where(mask, s, torch.inf).amin(1) >= torch.where(mask, -torch.inf, s).amax(1)).all())


def test_prune_zeroes_exactly_the_pruned_weights():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    before = W.clone()
    Wp, mask = prune(W, magnitude_scores(W), Sparsity.parse("2:4"))
    assert torch.equal(Wp, W * mask) and is_nm(Wp, 2, 4) and int(mask.sum()) == 32 * 64 // 2
    Wd, dense = prune(W, magnitude_scores(W), Sparsity.parse("none"))
    assert torch.equal(Wd, W) and bool(dense.all())
    Wu, umask = prune(W, magnitude_scores(W), Sparsity.parse("unstructured:0.25"))
    assert (~umask).sum(1).tolist() == [16] * 32 and torch.equal(Wu, W * umask)
    assert torch.equal(W, before)  # input untouched


def test_nm_violations_counts_groups():
    W = torch.zeros(2, 16)
    W[0, 0:3] = 1.0  # 3 non-zeros in group 0 of row 0
    W[1, 4:8] = 1.0  # 4 non-zeros in group 1 of row 1
    W[1, 8:10] = 1.0  # 2 non-zeros: fine
    assert nm_violations(W, 2, 4) == 2 and not is_nm(W, 2, 4)
    assert nm_violations(W, 3, 4) == 1


def test_wanda_scores_weight_each_input_channel():
    W = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    assert torch.equal(wanda_scores(W, torch.tensor([10.0, 0.5])), torch.tensor([[10.0, 1.0], [30.0, 2.0]]))
    with pytest.raises(ValueError, match="one norm per input channel"):
        wanda_scores(W, torch.ones(3))


def test_wanda_beats_magnitude_on_outlier_channels(layer, output_error):
    W, X, _ = layer
    sp = Sparsity.parse("2:4")
    err_mag = output_error(W, prune(W, magnitude_scores(W), sp)[0], X)
    err_wanda = output_error(W, prune(W, wanda_scores(W, X.norm(dim=0)), sp)[0], X)
    assert err_wanda < 0.75 * err_mag  # measured 0.226 vs 0.370
