from __future__ import annotations

import pytest
import torch

from slim_trt.algorithms.prune import nm_mask
from slim_trt.algorithms.qtensor import expand_scale
from slim_trt.algorithms.quantize import (
    SCALE_FLOOR, absmax_scale, nm_compress, nm_decompress, pack_bits, pack_int4, quantize, quantize_weight,
    slim_quant_scale, unpack_bits, unpack_int4,
)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


# --- scales -------------------------------------------------------------------------------------------------

def test_absmax_scale_each_granularity():
    W = torch.randn(6, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(absmax_scale(W, 4, 0), W.abs().max() / 7)
    assert torch.equal(absmax_scale(W, 8, -1), W.abs().amax(1, keepdim=True) / 127)
    s = absmax_scale(W, 4, 32)  # 100 columns: groups of 32, 32, 32 and a partial 4
    assert s.shape == (6, 4)
    for g, (a, b) in enumerate([(0, 32), (32, 64), (64, 96), (96, 100)]):
        assert torch.equal(s[:, g], W[:, a:b].abs().amax(1) / 7)


@pytest.mark.parametrize("method", ["absmax", "slim"])
@pytest.mark.parametrize("group_size", [0, -1, 16])
def test_zero_groups_get_a_tiny_positive_scale(method, group_size):
    W = torch.zeros(4, 48)
    W[1, 20:30] = torch.linspace(-1, 1, 10)  # one row / group is live, the rest are all zero
    qt = quantize_weight(W, method, 4, group_size)
    assert bool(torch.isfinite(qt.scale).all()) and bool((qt.scale > 0).all())
    assert float(qt.scale.min()) >= SCALE_FLOOR
    assert bool((qt.dequantize()[W == 0] == 0).all())
    if group_size != 0:
        assert float(qt.scale.min()) == SCALE_FLOOR  # the all-zero rows / groups


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [0, -1, 32, 48])  # 48 leaves a partial last group of 160 columns
def test_round_to_nearest_is_on_the_symmetric_grid(bits, group_size, student_t):
    W = 0.02 * student_t((64, 160), seed=3)
    qt = quantize(W, absmax_scale(W, bits, group_size), bits, group_size)
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    assert qt.q.dtype == torch.int8 and int(qt.q.min()) >= lo and int(qt.q.max()) <= hi
    s = expand_scale(qt.scale, group_size, qt.shape)
    assert torch.equal(qt.dequantize(), qt.q.float() * s)  # value = q * scale, zero point 0
    assert float(((W - qt.dequantize()).abs() / s).max()) <= 0.5 + 1e-5  # AbsMax never clips: |err| <= step/2
    neg = quantize(-W, absmax_scale(W, bits, group_size), bits, group_size)
    assert torch.equal(neg.q, -qt.q)  # symmetric: no zero point, no offset


def test_quantize_rejects_a_scale_of_the_wrong_shape():
    W = torch.randn(4, 64)
    with pytest.raises(ValueError, match="scale shape"):
        quantize(W, absmax_scale(W, 4, 32), 4, 16)
    with pytest.raises(ValueError, match="unknown scale method"):
        quantize_weight(W, "minmax", 4, 0)


# --- SLiM-Quant ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, max_ratio", [(4, 0.25), (8, 0.85)])
def test_slim_quant_beats_absmax_per_tensor_on_heavy_tails(bits, max_ratio, student_t):
    W = 0.02 * student_t((256, 256), seed=0)
    err_absmax = mse(quantize_weight(W, "absmax", bits, 0).dequantize(), W)
    err_slim = mse(quantize_weight(W, "slim", bits, 0).dequantize(), W)
    # measured: 4 bit 0.17x, 8 bit 0.74x the AbsMax error
    assert err_slim < max_ratio * err_absmax


def test_slim_quant_beats_absmax_on_laplace():
    W = torch.distributions.Laplace(0.0, 1.0).icdf(torch.rand(256, 256, generator=torch.Generator().manual_seed(5)))
    for group_size, max_ratio in [(0, 0.4), (-1, 0.85), (128, 0.9)]:  # measured 0.30, 0.70, 0.79
        err_absmax = mse(quantize_weight(W, "absmax", 4, group_size).dequantize(), W)
        err_slim = mse(quantize_weight(W, "slim", 4, group_size).dequantize(), W)
        assert err_slim < max_ratio * err_absmax, group_size


def test_group_scales_beat_per_tensor(student_t):
    W = 0.02 * student_t((256, 256), seed=0)
    for method in ("absmax", "slim"):
        errs = [mse(quantize_weight(W, method, 4, g).dequantize(), W) for g in (0, -1, 128, 32)]
        assert errs[0] > errs[1] > errs[2] > errs[3], (method, errs)
    # measured per-tensor AbsMax 9.4e-4 vs groups of 128 6.1e-5
    assert mse(quantize_weight(W, "absmax", 4, 128).dequantize(), W) < 0.1 * mse(
        quantize_weight(W, "absmax", 4, 0).dequantize(), W)


def _model_error(v: torch.Tensor, alpha: torch.Tensor, qmax: int) -> torch.Tensor:
    """The SLiM-Quant objective written naively: v [n] samples, alpha [C] candidates -> [C]."""
    v = v[v > 0].double()[None, :]
    a = alpha.double()[:, None]
    below = (v <= a).sum(1)
    clip = ((v - a).clamp_min(0) ** 2).sum(1)
    return below * (a[:, 0] / qmax) ** 2 / 12 + clip


def test_slim_quant_search_finds_the_minimum_of_its_objective(student_t):
    W = student_t((4, 512), seed=7)
    alpha = slim_quant_scale(W, 4, -1)[:, 0] * 7
    for r in range(W.shape[0]):
        v = W[r].abs()
        grid = torch.linspace(1e-4, float(v.max()), 5000)
        best = float(_model_error(v, grid, 7).min())
        found = float(_model_error(v, alpha[r:r + 1], 7)[0])
        assert found <= best * (1 + 1e-4), r


def test_slim_quant_ignores_pruned_zeros(student_t):
    W = student_t((16, 64), seed=1)
    mask = nm_mask(W.abs(), 2, 4)
    kept = W[mask].reshape(16, 32)  # the kept values of each row, zeros removed
    assert torch.equal(slim_quant_scale(W * mask, 4, -1), slim_quant_scale(kept, 4, -1))


def test_slim_quant_scale_shapes_and_determinism(student_t):
    W = student_t((10, 100), seed=2)
    assert slim_quant_scale(W, 4, 0).shape == ()
    assert slim_quant_scale(W, 4, -1).shape == (10, 1)
    assert slim_quant_scale(W, 4, 32).shape == (10, 4)
    before = W.clone()
    assert torch.equal(slim_quant_scale(W, 8, 32), slim_quant_scale(W, 8, 32))
    assert torch.equal(W, before)  # input untouched


# --- storage forms ------------------------------------------------------------------------------------------

def test_pack_int4_layout_is_low_nibble_first():
    q = torch.tensor([[1, -1, 7], [-8, 0, -2]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert packed.tolist() == [[0xF1, 0x07], [0x08, 0x0E]]


@pytest.mark.parametrize("cols", [1, 7, 32, 33])
def test_pack_int4_round_trip(cols):
    q = torch.randint(-8, 8, (5, cols), generator=torch.Generator().manual_seed(cols), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q), cols), q)
    with pytest.raises(ValueError):
        pack_int4(torch.full((1, 2), 8, dtype=torch.int8))


@pytest.mark.parametrize("cols", [1, 8, 13, 64])
def test_pack_bits_round_trip(cols):
    mask = torch.rand(3, cols, generator=torch.Generator().manual_seed(cols)) > 0.5
    packed = pack_bits(mask)
    assert packed.shape == (3, -(-cols // 8))
    assert torch.equal(unpack_bits(packed, cols), mask)


def test_pack_bits_order_is_little_endian():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 9] = True
    mask[1, 7] = True
    assert pack_bits(mask).tolist() == [[1, 2], [128, 0]]


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_compress_round_trip(n, m):
    g = torch.Generator().manual_seed(m)
    q = torch.randint(-8, 8, (6, 64), generator=g, dtype=torch.int8)
    q = q * nm_mask(torch.rand(6, 64, generator=g), n, m)
    q[0, :m] = 0  # a group with no non-zero
    q[1, :m] = torch.tensor([0] * (m - 1) + [5], dtype=torch.int8)  # one non-zero, at the last position
    values, idx = nm_compress(q, n, m)
    assert values.shape == idx.shape == (6, 64 * n // m) and idx.dtype == torch.uint8
    i = idx.reshape(6, -1, n).to(torch.int64)
    assert bool((i[..., 1:] > i[..., :-1]).all())  # distinct, ascending positions
    assert torch.equal(nm_decompress(values, idx, n, m, 64), q)
    assert idx[1, :n].tolist() == list(range(n - 1)) + [m - 1] and values[1, :n].tolist() == [0] * (n - 1) + [5]


def test_nm_compress_rejects_a_dense_group():
    q = torch.ones(2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="more than 2 non-zeros"):
        nm_compress(q, 2, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        nm_compress(torch.zeros(2, 6, dtype=torch.int8), 2, 4)


def test_slim_quant_scale_leaves_exact_zeros_out_whatever_the_path():
    """Pruned weights cost nothing and count nothing: a 2:4-pruned row (its zeros dropped before the sort, every row
    holding as many) and a row with ragged zeros (kept through the sort) get, bit for bit, the scale of their
    nonzero values alone."""
    g = torch.Generator().manual_seed(11)
    W = 0.02 * torch.randn(16, 64, generator=g)
    pruned = W * nm_mask(W.abs(), 2, 4)
    alone = pruned[pruned != 0].reshape(16, 32)
    assert torch.equal(slim_quant_scale(pruned, 8, -1), slim_quant_scale(alone, 8, -1))
    ragged = W * (torch.rand(16, 64, generator=g) > 0.4)
    got = slim_quant_scale(ragged, 8, -1)
    for i in range(16):
        row = ragged[i][ragged[i] != 0][None]
        assert torch.equal(got[i], slim_quant_scale(row, 8, -1)[0]), i
