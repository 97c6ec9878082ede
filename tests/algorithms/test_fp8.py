"""FP8 E4M3: the codes (round to nearest even, saturation, +0), the scales, the OBS sweep on the E4M3 grid and
the activation scales (issue 24)."""
import pytest
import torch

from slim_trt.algorithms.actquant import accumulate_abs_histogram, act_scale, clip_error, fake_quant
from slim_trt.algorithms.fp8 import FP8_MAX, fp8_codes, fp8_fake_quant, fp8_quantize, fp8_round, fp8_scale
from slim_trt.algorithms.qtensor import QuantizedTensor
from slim_trt.algorithms.sparsegpt import sparsegpt


def test_codes_round_to_nearest_even_and_saturate():
    # 1.0625 lies halfway between 1 and 1.125 (E4M3 step 1/8 in [1, 2)): ties go to the even mantissa, 1.0;
    # 1.1875 halfway between 1.125 and 1.25 goes to 1.25. 449 and 1e4 saturate to 448, -1e4 to -448.
    x = torch.tensor([1.0625, 1.1875, 0.3, -3.14, 449.0, 1e4, -1e4, 17.0])
    assert fp8_round(x).tolist() == [1.0, 1.25, 0.3125, -3.25, 448.0, 448.0, -448.0, 16.0]
    assert fp8_codes(x).view(torch.uint8).tolist() == [56, 58, 42, 197, 126, 126, 254, 88]


def test_every_zero_is_plus_zero():
    # -0.0, a tiny negative (rounds to -0) and a pruned negative weight times a mask: all byte 0x00, never 0x80
    x = torch.tensor([-0.0, -1e-9, 0.0, -5.0]) * torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert fp8_codes(x).view(torch.uint8).tolist() == [0, 0, 0, 0]


def test_scales_are_absmax_over_448_in_fp16():
    W = torch.tensor([[448.0, -1.0], [0.0, 0.0], [-3.0, 1.5]])
    s = fp8_scale(W)
    assert s.shape == (3, 1)
    assert s[0, 0] == 1.0 and s[1, 0] == 2.0 ** -24  # an all-zero row: the smallest fp16 scale, never 0
    assert s[2, 0] == torch.tensor(3.0 / 448).half().float()
    assert fp8_scale(W, 0) == 1.0
    codes = fp8_quantize(W, s)
    assert codes.dtype == torch.float8_e4m3fn and float(codes.float().abs().max()) == FP8_MAX
    with pytest.raises(ValueError, match="per output channel"):
        fp8_scale(W, 128)


def test_fake_quant_matches_the_code_times_the_scale_in_fp16_and_fp32():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3
    s = 0.0125
    want = fp8_codes(x / torch.tensor(s)).float() * s
    assert torch.equal(fp8_fake_quant(x, s), want)
    assert torch.equal(fake_quant(x, s, 8, "fp8"), want)
    # fp16 activations: the division in fp32 (as ONNX Runtime at opset 21), the product in fp16
    xh = x.half()
    assert torch.equal(fp8_fake_quant(xh, s), fp8_codes(xh.float() / torch.tensor(s)).half() * torch.tensor(s).half())


def test_sparsegpt_fp8_sweep_is_2to4_and_exactly_its_codes():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 128, generator=g)
    X = torch.randn(400, 128, generator=g) @ torch.randn(128, 128, generator=g)  # correlated inputs
    H = X.T @ X
    W_new, keep, qt = sparsegpt(W, H, "2:4", bits=8, group_size=-1, scale_method="fp8")
    assert isinstance(qt, QuantizedTensor) and qt.is_fp8 and qt.q.dtype == torch.float8_e4m3fn
    assert torch.equal(qt.dequantize(), W_new)  # the sweep's compressed values are the stored codes x scales
    assert torch.equal(qt.scale, qt.scale.half().float())  # fp16 scales: an fp16 export reads the same
    assert int((keep.reshape(48, -1, 4).sum(-1) != 2).sum()) == 0
    assert int((qt.q.view(torch.uint8) == 0x80).sum()) == 0 and bool((qt.q.float()[~keep] == 0).all())
    # the OBS compensation beats plain rounding on the same mask (output error on the calibration tokens)
    rtn = fp8_quantize(W * keep, fp8_scale(W * keep)).float() * fp8_scale(W * keep)
    err = lambda Wc: float(((X @ (W - Wc).T) ** 2).sum())  # noqa: E731
    assert err(W_new) < 0.8 * err(rtn)


def test_fp8_mse_scale_beats_max_on_an_outlier():
    """E4M3's relative grid: the MSE clip on the FP8 grid gives less total error than absmax/448, and the
    histogram's error model agrees with the direct sum."""
    x = torch.cat([torch.randn(100_000, generator=torch.Generator().manual_seed(1)), torch.tensor([300.0])])
    hist = accumulate_abs_histogram(None, x)
    s_max, s_mse = act_scale(hist, "max", fmt="fp8"), act_scale(hist, "mse", fmt="fp8")
    assert s_max == torch.tensor(300.0 / 448).half().item()
    err = {s: float(((fake_quant(x, s, 8, "fp8") - x) ** 2).sum()) for s in (s_max, s_mse)}
    assert err[s_mse] <= err[s_max]
    model = clip_error(hist, torch.tensor([s_mse * FP8_MAX], dtype=torch.float64), fmt="fp8")
    assert float(model) == pytest.approx(err[s_mse], rel=0.05)
