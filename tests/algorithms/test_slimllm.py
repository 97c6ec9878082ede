"""SliM-LLM on one layer (issue 14): the allocation keeps the average, salient groups get more bits, and the
mixed grid beats uniform at equal bits on a layer whose groups differ in salience."""
import pytest
import torch

from slim_trt.algorithms.gptq import gptq_quantize
from slim_trt.algorithms.pipeline import output_rel_error
from slim_trt.algorithms.slimllm import (allocation, allocation_errors, column_salience, group_salience,
                                         slimllm_grid)
from slim_trt.algorithms.zeropoint import signed_codes, uniform_grid


def _skewed_layer(seed=0, N=64, K=512):
    """Inputs whose RMS grows ~30x across the columns: the last groups are far more salient than the first."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    X = torch.randn(4096, K, generator=g) * torch.linspace(0.1, 3.0, K) ** 2
    return W, 2.0 / X.shape[0] * X.T @ X


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_allocation_keeps_the_average_exactly(bits):
    sal = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0])
    for k in range(0, 4):
        a = allocation(sal, bits, k)
        assert int(a.sum()) == bits * 7 and int((a == bits + 1).sum()) == k == int((a == bits - 1).sum())
    a = allocation(sal, bits, 3)
    assert a.tolist() == [bits, bits - 1, bits + 1, bits - 1, bits + 1, bits - 1, bits + 1]
    with pytest.raises(ValueError):
        allocation(sal, bits, 4)


def test_salient_groups_get_more_bits_and_the_error_search_picks_k():
    W, H = _skewed_layer()
    sal = group_salience(column_salience(W, H), 128)
    assert sal.argmax() == 3 and sal.argmin() == 0  # salience follows the input scale
    errs = allocation_errors(W, H, 3, 128, sal)
    assert errs.shape == (3,) and float(errs.min()) < float(errs[0])  # some k > 0 beats uniform
    grid = slimllm_grid(W, H, 3, 128)
    assert grid.group_bits.tolist() == [2, 3, 3, 4] or grid.group_bits.tolist() == [2, 2, 4, 4]
    assert int(grid.group_bits.sum()) == 3 * 4
    # the incremental error bookkeeping equals a direct evaluation
    from slim_trt.algorithms.zeropoint import GroupGrid, rtn
    for k in range(3):
        E = W - rtn(W, GroupGrid(128, allocation(sal, 3, k), (4,)))
        assert float(errs[k]) == pytest.approx(float(((E @ H) * E).sum()), rel=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_slimllm_beats_uniform_gptq_at_equal_bits(bits):
    W, H = _skewed_layer()
    uni = gptq_quantize(W, H, bits, 128, grid=uniform_grid(W.shape[1], bits, 128))
    mixed = gptq_quantize(W, H, bits, 128, grid=slimllm_grid(W, H, bits, 128))
    e_uni = output_rel_error(W - uni.dequantize(), W, H)
    e_mix = output_rel_error(W - mixed.dequantize(), W, H)
    assert e_mix < 0.9 * e_uni, (e_mix, e_uni)
    assert mixed.code_bits() == bits * W.numel()  # equal information bits
    # averages 2 and 3 fold into signed INT4 (TensorRT's form); 5-bit groups at average 4 do not
    assert (signed_codes(mixed) is not None) == (bits < 4)
    assert mixed.bits == (4 if bits < 4 else 8)


def test_storage_bits_count_information_bits_as_planned():
    """storage_bits of a SliM-LLM layer = layer_bits from the shapes: N bits per weight on average, a 16-bit scale
    and an N-bit zero point per group (the groups' own widths sum to N per group)."""
    from slim_trt.algorithms.pipeline import CompressedWeight, layer_bits, storage_bits
    from slim_trt.config import PRESETS, CompressConfig

    W, H = _skewed_layer()
    cfg = CompressConfig(**{**PRESETS["int4-dense"], **dict(bits=3, quantizer="gptq", sparsity="none", lowrank="none",
                                                           bit_allocation="slim-llm")})
    qt = gptq_quantize(W, H, 3, 128, grid=slimllm_grid(W, H, 3, 128))
    assert qt.group_bits is not None
    cw = CompressedWeight(weight=qt, mask=None, lora_L=None, lora_R=None, rel_error_base=0.0, rel_error=0.0)
    got = storage_bits(cw, "none")
    assert got["base_bits"] == layer_bits(64, 512, 0, cfg)[0] == 64 * 512 * 3 + 64 * 4 * (16 + 3)
