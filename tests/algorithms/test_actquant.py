"""Static per-tensor activation scales: the growing |x| histogram and the three estimators."""
import pytest
import torch

from slim_trt.algorithms.actquant import (FP16_TINY, accumulate_abs_histogram, act_scale, clip_error, fake_quant,
                                          round_scale)


def test_histogram_grows_without_losing_counts():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(1000, generator=g), 10 * torch.randn(1000, generator=g), torch.tensor([-300.0])]
    hist = None
    for p in parts:
        hist = accumulate_abs_histogram(hist, p, bins=256)
    x = torch.cat(parts).abs()
    assert hist.total == 2001 and hist.absmax == 300.0
    assert 300.0 <= hist.width * 256 < 600.0  # the range doubled until 300 fitted, not more
    # every value is counted in the bin that holds it (a value on a bin edge may sit one bin over: it was binned
    # at the finer width, then merged)
    want = torch.bincount((x / hist.width).floor().long().clamp(max=255), minlength=256).double()
    assert float((hist.counts - want).abs().sum()) <= 2


def test_estimators_on_a_gaussian_with_one_outlier():
    """1e5 standard normal values plus one at 100: max keeps the outlier (step 100/127), the 99.99th percentile
    clips at ~3.9 sigma (the outlier then costs 96^2 alone), MSE balances both: the least total squared error."""
    x = torch.cat([torch.randn(100_000, generator=torch.Generator().manual_seed(1)), torch.tensor([100.0])])
    hist = accumulate_abs_histogram(None, x)
    scales = {m: act_scale(hist, m) for m in ("max", "percentile", "mse")}
    assert scales["max"] == round_scale(100.0 / 127)
    assert 3.7 < scales["percentile"] * 127 < 4.2
    assert scales["percentile"] < scales["mse"] < scales["max"]
    err = {m: float(((fake_quant(x, s) - x) ** 2).sum()) for m, s in scales.items()}
    assert err["mse"] < 0.75 * min(err["max"], err["percentile"]), err
    # the histogram's error model agrees with the direct sum within the binning's resolution
    model = clip_error(hist, torch.tensor([scales["mse"] * 127.0], dtype=torch.float64))
    assert float(model) == pytest.approx(err["mse"], rel=0.05)


def test_fake_quant_and_scale_rounding():
    s = round_scale(0.1)
    assert s == float(torch.tensor(0.1).half()) and round_scale(0.0) == FP16_TINY and round_scale(1e9) == 65504.0
    x = torch.tensor([0.05, 0.15, -0.25, 13.0, -13.0, 12.7])
    q = fake_quant(x, s)
    assert torch.equal(q, torch.clamp(torch.round(x / s), -128, 127) * s)
    assert float(q[3]) == pytest.approx(127 * s) and float(q[4]) == pytest.approx(-128 * s)  # clipped, signed range
    assert act_scale(accumulate_abs_histogram(None, torch.zeros(10)), "mse") == FP16_TINY
