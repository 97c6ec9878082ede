"""Static symmetric per-tensor activation quantization (W8A8): the |x| histogram, three scale estimators, and
the fake quantization the checkpoint's forward and the exported Q/DQ pair share.

TensorRT's INT8 GEMMs take one constant scale per activation tensor (zero point 0). The scale is calibrated
once on the calibration windows from a histogram of |x| over every token and channel of the layer's input:

  max         absmax / 127: nothing is clipped, the step is as coarse as the largest outlier makes it.
  percentile  the p-th percentile of |x| / 127 (p = 99.99 by default): the rarest outliers are clipped.
  mse         the clip c that minimises the expected squared error of the values the histogram holds, rounding
              below c (each bin's centre rounded on the grid of step c / 127) plus clipping above it.

FP8 activations (fmt "fp8", issue 24): the same estimators on the E4M3 grid (qmax 448; the MSE rounding error is
each bin centre's distance to its nearest E4M3 value), and the fake quantization of algorithms/fp8.py.

Pure: tensors in, tensors out; the histogram is a value the caller threads through accumulate_abs_histogram.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .fp8 import FP8_MAX, fp8_fake_quant, fp8_round
from .qtensor import INT_RANGE

ACT_SCALE_METHODS = ("max", "percentile", "mse")
HIST_BINS = 1 << 16
# fp16 limits: the scale is rounded to an fp16 value so an fp16 export and the fp32 reference quantize on the
# same grid (a DequantizeLinear scale of 0 is also rejected by TensorRT, hence the floor).
FP16_TINY, FP16_MAX = 2.0 ** -24, 65504.0
_CLIPS_AT_ONCE = 8  # clip_error's batch of candidate clips: bounds its temporaries to ~5 x 8 x 65536 float64


@dataclass
class AbsHistogram:
    """Counts of |x| in HIST_BINS bins of equal `width` from 0; `absmax` is the exact largest |x| seen."""

    counts: torch.Tensor  # float64 [bins]
    width: float
    absmax: float

    @property
    def total(self) -> float:
        return float(self.counts.sum())


def accumulate_abs_histogram(hist: AbsHistogram | None, x: torch.Tensor, bins: int = HIST_BINS) -> AbsHistogram:
    """Fold the values of x (any shape) into the histogram of |x|. The range grows by doubling the bin width
    (adjacent bins merged in pairs) until the new largest value fits, so no value is ever dropped and the
    resolution stays within a factor 2 of absmax / bins."""
    a = x.detach().reshape(-1).to(torch.float32).abs()
    amax = float(a.max()) if a.numel() else 0.0
    if hist is None:
        width = max(amax, torch.finfo(torch.float32).tiny) / bins
        hist = AbsHistogram(torch.zeros(bins, dtype=torch.float64, device=a.device), width, 0.0)
    counts, width = hist.counts, hist.width
    if counts.shape[0] % 2:
        raise ValueError(f"the histogram needs an even number of bins, got {counts.shape[0]}")
    while amax > width * counts.shape[0]:
        half = counts.reshape(-1, 2).sum(1)
        counts = torch.cat([half, torch.zeros_like(half)])
        width *= 2.0
    idx = (a / width).floor().to(torch.int64).clamp_(0, counts.shape[0] - 1)
    counts = counts + torch.bincount(idx, minlength=counts.shape[0]).to(torch.float64)
    return AbsHistogram(counts, width, max(hist.absmax, amax))


def round_scale(scale: float) -> float:
    """The nearest fp16 value, kept in [2^-24, 65504] (see FP16_TINY)."""
    s = min(max(float(scale), FP16_TINY), FP16_MAX)
    return float(torch.tensor(s, dtype=torch.float32).to(torch.float16).to(torch.float32))


def _qmax(bits: int, fmt: str = "int") -> float:
    if fmt == "fp8":
        return FP8_MAX
    if fmt != "int":
        raise ValueError(f"activation format must be 'int' or 'fp8', got {fmt!r}")
    if bits not in INT_RANGE:
        raise ValueError(f"activation bits must be one of {sorted(INT_RANGE)}, got {bits}")
    return INT_RANGE[bits][1]


def clip_error(hist: AbsHistogram, clips: torch.Tensor, bits: int = 8, fmt: str = "int") -> torch.Tensor:
    """Expected squared quantization error of the histogram's values (summed over its counts) for each clip value
    in `clips` [C]: round to nearest on the grid of step clip / qmax below the clip, clip error above it."""
    qmax = _qmax(bits, fmt)
    live = hist.counts > 0
    v = ((torch.nonzero(live).reshape(-1).to(torch.float64) + 0.5) * hist.width)[None, :]  # bin centres [1, B]
    n = hist.counts[live][None, :]
    out = []
    # A few clips at a time: each one's terms are [B] float64 (up to 65536 bins), and all 128 of an MSE grid at
    # once held about 5 x 67 MB of temporaries per layer input; each clip's sum is computed alike either way.
    for c in clips.to(torch.float64).reshape(-1, 1).split(_CLIPS_AT_ONCE):
        step = c / qmax
        inside = torch.minimum(v, c)
        if fmt == "fp8":
            rounding = inside - step * fp8_round(inside / step).to(torch.float64)
        else:
            rounding = inside - step * torch.round(inside / step)
        out.append(((rounding * rounding + (v - inside) ** 2) * n).sum(1))
    return torch.cat(out)


def act_scale(hist: AbsHistogram, method: str, bits: int = 8, percentile: float = 99.99, fmt: str = "int") -> float:
    """The per-tensor scale of an activation whose |x| histogram is `hist`, by `method` (ACT_SCALE_METHODS),
    rounded to fp16 (round_scale). fmt "fp8": the scale of E4M3 activations."""
    qmax = _qmax(bits, fmt)
    if hist.absmax <= 0.0:
        return round_scale(FP16_TINY)
    if method == "max":
        return round_scale(hist.absmax / qmax)
    if method == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        cum = hist.counts.cumsum(0)
        idx = int(torch.searchsorted(cum, cum[-1] * (percentile / 100.0)))
        clip = min((idx + 1) * hist.width, hist.absmax)
        return round_scale(clip / qmax)
    if method == "mse":
        # Coarse grid over (0, absmax], then two finer grids around the best (exact scores each time).
        lo, hi = 0.0, hist.absmax
        best = hist.absmax
        for _ in range(3):
            cand = torch.linspace(lo, hi, 129, dtype=torch.float64, device=hist.counts.device)[1:]
            err = clip_error(hist, cand, bits, fmt)
            j = int(err.argmin())
            best = float(cand[j])
            spacing = (hi - lo) / 128
            lo, hi = max(best - spacing, spacing * 1e-3), min(best + spacing, hist.absmax)
        return round_scale(best / qmax)
    raise ValueError(f"unknown activation scale method {method!r}: use one of {', '.join(ACT_SCALE_METHODS)}")


def fake_quant(x: torch.Tensor, scale: float, bits: int = 8, fmt: str = "int") -> torch.Tensor:
    """QuantizeLinear -> DequantizeLinear with zero point 0: clamp(round(x / scale), lo, hi) * scale, in x's dtype
    (round half to even, as ONNX QuantizeLinear); fmt "fp8": E4M3 codes instead (fp8.fp8_fake_quant)."""
    if fmt == "fp8":
        return fp8_fake_quant(x, scale)
    lo, hi = INT_RANGE[bits]
    s = torch.tensor(scale, dtype=x.dtype, device=x.device)
    return torch.clamp(torch.round(x / s), lo, hi) * s
