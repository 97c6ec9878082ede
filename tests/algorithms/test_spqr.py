"""SpQR (issue 14): bilevel group statistics with integer zero points, fp16 outliers under a hard share, the
paper's bits count, 2:4 masks carried, and the Hessian-weighted error against plain group quantization."""
from __future__ import annotations

import math

import pytest
import torch

from slim_trt.algorithms.gptq import gptq_quantize
from slim_trt.algorithms.pipeline import CompressedWeight, layer_bits, output_rel_error, storage_bits
from slim_trt.algorithms.prune import is_nm
from slim_trt.algorithms.qtensor import expand_scale
from slim_trt.algorithms.spqr import (OutlierTable, SpQRTensor, quantize_scales, quantize_zeros, spqr_bits_per_param,
                                      spqr_quantize)
from slim_trt.config import PRESETS, CompressConfig


def planted_layer(N=256, K=512, seed=0):
    """A random layer with 0.5% planted large weights, and H from inputs with unequal channel scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.02
    planted = torch.rand(N, K, generator=g) < 0.005
    W[planted] += torch.randn(int(planted.sum()), generator=g) * 0.3
    X = torch.randn(4096, K, generator=g) * (torch.rand(K, generator=g) * 2 + 0.1)
    return W, 2 * X.T @ X / X.shape[0]


@pytest.fixture(scope="module")
def layer():
    return planted_layer()


def paper_bits(qt) -> float:
    """Bits per parameter of one dense layer as storage_bits counts them (the formula in docs/recipes.md)."""
    cw = CompressedWeight(weight=qt, mask=None, lora_L=None, lora_R=None, rel_error_base=0.0, rel_error=0.0)
    s = storage_bits(cw, "none")
    return s["base_bits"] / s["params"]


@pytest.mark.parametrize("share", [0.0, 0.002, 0.01, 0.03])
def test_the_outlier_share_is_a_hard_upper_bound(layer, share):
    W, H = layer
    qt = spqr_quantize(W, H, 3, outlier_share=share)
    budget = math.floor(share * W.numel())
    assert qt.outlier_count <= budget
    if share:  # planted weights exist: the budget is (nearly) used
        assert qt.outlier_count >= 0.5 * budget
    else:
        assert qt.outlier_count == 0


def test_outliers_are_kept_in_fp16_and_their_codes_are_the_zero_point(layer):
    W, H = layer
    qt = spqr_quantize(W, H, 4, outlier_share=0.01)
    where = qt.outliers.to_dense() != 0
    z = expand_scale(qt.zero.float(), qt.group_size, qt.shape)
    assert torch.equal(qt.q[where].float(), z[where])  # base value 0 at an outlier
    assert torch.equal(qt.dequantize()[where], qt.outliers.val.float())  # the fp16 value itself (row-major order)
    assert torch.equal(qt.dequantize(), qt.base_dequantize() + qt.outliers.to_dense())
    # The criterion weighs the rounding error by the input's activity: outliers crowd into the busiest channels.
    busy = H.diagonal() >= H.diagonal().median()
    assert where[:, busy].sum() >= 0.8 * where.sum()  # the busier half of the columns: 92% of the outliers


def test_bilevel_statistics_give_integer_zeros_and_3_bit_scales(layer):
    W, H = layer
    qt = spqr_quantize(W, H, 4, group_size=16, stat_bits=3, stat_group=16, outlier_share=0.01)
    N, G = qt.scale.shape
    assert (N, G) == (256, 32) and qt.zero.dtype == torch.int8
    assert int(qt.zero.min()) >= 0 and int(qt.zero.max()) <= 15
    for r0 in range(0, N, 16):  # each group of 16 rows: at most 2^3 distinct values per statistic and column group
        for g in range(G):
            assert qt.scale[r0:r0 + 16, g].unique().numel() <= 8
            assert qt.zero[r0:r0 + 16, g].unique().numel() <= 8
    assert torch.equal(qt.scale, qt.scale.half().float())  # fp16-exact: an fp16 export stores what the sweep used


def test_second_level_zero_grid_is_integer_and_exact_on_small_ranges():
    z = torch.tensor([3.0, 4, 5, 9, 3, 3, 4, 10, 0, 15, 7, 7, 8, 1, 2, 2])
    out = quantize_zeros(z, 3, 16, 15)
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 15
    assert (out - z).abs().max() <= 1.0  # range 15 -> integer step ceil(15/7) = 3, error <= 1.5 rounded to <= 1
    small = torch.tensor([2.0, 3, 4, 5, 6, 7, 8, 9] * 2)  # range 7: step 1, exact
    assert torch.equal(quantize_zeros(small, 3, 16, 15), small)
    s = torch.linspace(0.01, 0.02, 16)
    qs = quantize_scales(s, 3, 16)
    assert qs.unique().numel() <= 8 and (qs - s).abs().max() <= (0.01 / 7) / 2 + 1e-5


def test_outliers_lower_the_hessian_weighted_error_below_plain_group_quantization_at_fewer_bits(layer):
    W, H = layer
    spqr3 = spqr_quantize(W, H, 3, outlier_share=0.01)
    spqr3_none = spqr_quantize(W, H, 3, outlier_share=0.0)
    gptq4 = gptq_quantize(W, H, 4, 128)
    err = {k: output_rel_error(W - q.dequantize(), W, H) for k, q in
           [("spqr3", spqr3), ("spqr3_none", spqr3_none), ("gptq4", gptq4)]}
    bits = paper_bits(spqr3)
    assert bits == pytest.approx(3.625 + 32 * spqr3.outlier_count / W.numel())
    assert bits < 3.95 < 4.125  # fewer bits than GPTQ 4-bit g128 ...
    assert err["spqr3"] < 0.6 * err["gptq4"]  # ... and much less output error (measured 0.116 vs 0.275)
    assert err["spqr3"] < 0.85 * err["spqr3_none"]  # the outliers do the work (0.116-0.120 vs 0.161)


def test_bits_formula_matches_the_paper_and_the_planner():
    assert spqr_bits_per_param(3, 16, 3, 16, 0.01) == pytest.approx(3 + 6 / 16 + 64 / 256 + 0.32)  # 3.945
    assert spqr_bits_per_param(4, 16, 3, 16, 0.0) == pytest.approx(4.625)
    N, K = 64, 128
    W, H = planted_layer(N, K, seed=3)
    qt = spqr_quantize(W, H, 3, outlier_share=0.01)
    cfg = CompressConfig(**{**PRESETS["int4-dense"], **dict(quantizer="spqr", bits=3, group_size=16, sparsity="none",
                                                           lowrank="none", max_bits=None)})
    planned, _ = layer_bits(N, K, 0, cfg)
    budget = math.floor(0.01 * N * K)
    # The planner counts the nominal budget; the layer stores what it used (<= the budget).
    assert planned == N * K * 3 + N * K // 16 * 6 + (N // 16) * (K // 16) * 64 + 32 * budget
    assert paper_bits(qt) * N * K == planned - 32 * (budget - qt.outlier_count)


def test_a_2to4_mask_is_carried_outliers_only_where_kept(layer):
    W, H = layer
    from tests.exporter.conftest import mask_2to4

    mask = mask_2to4(W)
    qt = spqr_quantize(W, H, 4, outlier_share=0.01, mask=mask)
    Wq = qt.dequantize()
    assert is_nm(Wq, 2, 4) and bool((Wq[~mask] == 0).all())
    assert not bool((qt.outliers.to_dense() != 0)[~mask].any()) and qt.outlier_count > 0
    assert qt.outlier_count <= math.floor(0.01 * int(mask.sum()))


def test_outlier_table_round_trip_and_validation():
    dense = torch.zeros(3, 5)
    dense[0, 4], dense[2, 1], dense[2, 3] = 1.5, -2.0, 0.25
    t = OutlierTable.from_dense(dense, dense != 0)
    assert t.crow.tolist() == [0, 1, 1, 3] and t.col.tolist() == [4, 1, 3] and t.nnz == 3
    assert torch.equal(t.to_dense(), dense)
    with pytest.raises(ValueError, match="column index"):
        OutlierTable((3, 4), t.crow, t.col, t.val)
    with pytest.raises(TypeError):
        OutlierTable((3, 5), t.crow, t.col.long(), t.val)
    with pytest.raises(ValueError, match="zero points"):
        SpQRTensor(q=torch.zeros(3, 5, dtype=torch.int8), scale=torch.ones(3, 1), bits=4, group_size=16)


def test_bad_arguments_are_refused(layer):
    W, H = layer
    with pytest.raises(ValueError, match="bits"):
        spqr_quantize(W, H, 8)
    with pytest.raises(ValueError, match="divide"):
        spqr_quantize(W, H, 4, group_size=24)
    with pytest.raises(ValueError, match="outlier_share"):
        spqr_quantize(W, H, 4, outlier_share=1.5)


def test_moving_an_spqr_weight_keeps_its_outliers_and_zero_points():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 64, generator=g)
    X = torch.randn(256, 64, generator=g)
    w = spqr_quantize(W, X.T @ X / 256, 3, group_size=16, outlier_share=0.02)
    # "cpu:0" is not the tensors' device object, so this takes the copying path a GPU move takes
    moved = w.to("cpu:0")
    assert moved is not w and isinstance(moved, SpQRTensor) and moved.outliers is w.outliers and w.outlier_count > 0
    assert torch.equal(moved.dequantize(), w.dequantize()) and torch.equal(moved.zero, w.zero)
    assert w.to("cpu") is w
