"""Symmetric weight quantization (AbsMax, SLiM-Quant) and the storage forms (INT4 nibbles, bit masks, N:M).

Every function is pure: it takes tensors, returns new tensors and never touches its inputs.
Granularity (`group_size`) always runs along the input dimension K (the columns of a torch `Linear.weight`):
0 = one scale per tensor, -1 = one per row, G > 0 = one per G consecutive columns (the last group may be partial).
"""
from __future__ import annotations

import torch

from .qtensor import INT_RANGE, QuantizedTensor, expand_scale

QMAX = {bits: hi for bits, (lo, hi) in INT_RANGE.items()}  # 7 for INT4, 127 for INT8

# The smallest positive float16 (a subnormal): an all-zero group gets this scale, so the scale stays positive
# even after the engine stores it as fp16 (a DequantizeLinear with a zero scale is rejected by TensorRT).
SCALE_FLOOR = 2.0 ** -24


def _qmax(bits: int) -> int:
    if bits not in QMAX:
        raise ValueError(f"bits must be one of {sorted(QMAX)}, got {bits}")
    return QMAX[bits]


def _check_2d(W: torch.Tensor) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight [rows, cols], got shape {tuple(W.shape)}")


def _groups(x: torch.Tensor, group_size: int, fill: float = 0.0) -> torch.Tensor:
    """[rows, cols] -> [rows, ceil(cols / G), G], the partial last group padded with `fill`."""
    rows, cols = x.shape
    ngroups = -(-cols // group_size)
    pad = ngroups * group_size - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.reshape(rows, ngroups, group_size)


def _reduce_abs_max(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """max |w| over each scale group; shape [] / [rows, 1] / [rows, ngroups]."""
    A = W.detach().to(torch.float32).abs()
    if group_size == 0:
        return A.max() if A.numel() else torch.zeros((), device=A.device)
    if group_size == -1:
        return A.amax(dim=1, keepdim=True)
    if group_size > 0:
        return _groups(A, group_size).amax(dim=2)
    raise ValueError(f"group_size must be 0, -1 or a positive integer, got {group_size}")


def absmax_scale(W: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """AbsMax: scale = max|w| / qmax per tensor (0), row (-1) or group of `group_size` columns (> 0)."""
    _check_2d(W)
    qmax = _qmax(bits)
    return (_reduce_abs_max(W, group_size) / qmax).clamp_min(SCALE_FLOOR)


# ---------------------------------------------------------------------------------------------------------------
# SLiM-Quant
# ---------------------------------------------------------------------------------------------------------------

def _best_clip(values: torch.Tensor, counts: torch.Tensor, amax: torch.Tensor, qmax: int,
               candidates: int = 10, rounds: int = 5) -> torch.Tensor:
    """For each batch row b, the clip value alpha in (0, amax[b]] that minimises the modelled squared error

        err(alpha) = n_below(alpha) * step^2 / 12  +  sum_{v > alpha} count * (v - alpha)^2,   step = alpha / qmax

    over the weighted samples (values[b], counts[b]); `values` is sorted ascending along dim 1.
    Prefix sums make one evaluation O(log n) (a searchsorted), so every candidate is scored exactly against all
    samples. Coarse-to-fine: `candidates` evenly spaced values in (lo, hi], then the window shrinks to one coarse
    step either side of the best, `rounds` times (final resolution amax / 10 * (2/10)^(rounds-1)).
    """
    v = values.to(torch.float64)
    c = counts.to(torch.float64)
    zero = torch.zeros(v.shape[0], 1, dtype=torch.float64, device=v.device)
    p0 = torch.cat([zero, c.cumsum(1)], 1)  # prefix count
    p1 = torch.cat([zero, (c * v).cumsum(1)], 1)  # prefix sum of v
    p2 = torch.cat([zero, (c * v * v).cumsum(1)], 1)  # prefix sum of v^2
    v = v.contiguous()

    def error(alpha: torch.Tensor) -> torch.Tensor:  # alpha [B, C] -> err [B, C]
        idx = torch.searchsorted(v, alpha.contiguous(), right=True)  # samples <= alpha
        below = p0.gather(1, idx)
        t0 = p0[:, -1:] - below
        t1 = p1[:, -1:] - p1.gather(1, idx)
        t2 = p2[:, -1:] - p2.gather(1, idx)
        step = alpha / qmax
        clip = (t2 - 2.0 * alpha * t1 + alpha * alpha * t0).clamp_min(0.0)
        return below * step * step / 12.0 + clip

    amax = amax.to(torch.float64).reshape(-1)
    lo = torch.zeros_like(amax)
    hi = amax.clone()
    best_alpha = amax.clone()
    best_err = error(amax[:, None])[:, 0]
    t = torch.linspace(0.0, 1.0, candidates + 1, dtype=torch.float64, device=v.device)[1:]
    for _ in range(rounds):
        cand = lo[:, None] + (hi - lo)[:, None] * t[None, :]
        err = error(cand)
        e, j = err.min(dim=1)
        a = cand.gather(1, j[:, None])[:, 0]
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_alpha = torch.where(better, a, best_alpha)
        spacing = (hi - lo) / candidates
        lo = (best_alpha - spacing).clamp_min(0.0)
        hi = torch.minimum(best_alpha + spacing, amax)
    return best_alpha.to(torch.float32)


def _num_bins(numel: int) -> int:
    return max(512, min(numel // 1000, 20000))


def slim_quant_scale(W: torch.Tensor, bits: int, group_size: int = 0, rounds: int = 5) -> torch.Tensor:
    """SLiM-Quant: the clip value alpha minimising the expected squared error (rounding below alpha with the
    uniform model step^2/12, clipping above it); scale = alpha / qmax.

    group_size 0 (the paper's per-tensor form): the error is evaluated on a histogram of |W| with
    max(512, min(numel/1000, 20000)) bins, each bin at its centre.
    group_size -1 / G > 0 (one alpha per row / per group, all groups searched at once as a [rows*groups, G]
    batch): the "histogram" is the group's own sorted |w| values, one sample each, so the error is exact for
    the model and no binning resolution is lost on small groups.

    Differences from the reference (Mohammad-Mozaffari/slim, quantization.py `find_optimal_quantiztion_cap`):
    - the reference scores rounding error with a floor quantizer of step alpha / 2^bits on a density histogram;
      we use the step of the grid we actually round to (alpha / qmax, round-to-nearest) and its uniform-noise
      error step^2/12, as the SLiM paper's formulation does;
    - the reference only tries bin centres (11 coarse, then every bin between the coarse neighbours); we search
      alpha continuously, scoring each candidate exactly with prefix sums;
    - exact zeros (pruned weights) are left out: they quantize to 0 with no error whatever alpha is, and
      counting them as rounding error would pull alpha down after 2:4 pruning.
    """
    _check_2d(W)
    qmax = _qmax(bits)
    A = W.detach().to(torch.float32).abs()
    if group_size == 0:
        amax = A.max() if A.numel() else torch.zeros((), device=A.device)
        if float(amax) == 0.0:
            return torch.full((), SCALE_FLOOR, device=A.device)
        nbins = _num_bins(A.numel())
        counts = torch.histc(A, bins=nbins, min=0.0, max=float(amax)).to(torch.float64)
        counts[0] -= float((A == 0).sum())  # exact zeros cost nothing (see above)
        width = float(amax) / nbins
        centres = (torch.arange(nbins, dtype=torch.float64, device=A.device) + 0.5) * width
        alpha = _best_clip(centres[None], counts[None], amax.reshape(1), qmax, rounds=rounds)
        return (alpha.reshape(()) / qmax).clamp_min(SCALE_FLOOR)
    if group_size == -1:
        G = A[:, None, :]
    elif group_size > 0:
        G = _groups(A, group_size)  # padding is 0, which the zero rule below gives count 0
    else:
        raise ValueError(f"group_size must be 0, -1 or a positive integer, got {group_size}")
    rows, ngroups, size = G.shape
    flat = G.reshape(rows * ngroups, size)
    # Exact zeros count for nothing (counts below) and add nothing to a prefix sum, so when every group holds as
    # many (a 2:4 mask leaves half of each row) they are dropped before the sort: the same alpha bit for bit, half
    # the sort (the sweep searches a scale per output channel at every refit round).
    nonzero = flat != 0  # |w|: only the zeros go (a NaN stays where the sort puts it)
    per_group = nonzero.sum(1)
    kept = int(per_group[0]) if per_group.numel() else 0
    if 0 < kept < size and bool((per_group == kept).all()):
        flat = flat[nonzero].reshape(-1, kept)
    values, _ = flat.sort(dim=1)
    counts = (values > 0).to(torch.float64)
    amax = values[:, -1] if size else torch.zeros(rows * ngroups, device=A.device)
    alpha = torch.zeros_like(amax)
    live = amax > 0
    if bool(live.any()):
        alpha[live] = _best_clip(values[live], counts[live], amax[live], qmax, rounds=rounds)
    return (alpha.reshape(rows, ngroups) / qmax).clamp_min(SCALE_FLOOR)


# ---------------------------------------------------------------------------------------------------------------
# Round to nearest
# ---------------------------------------------------------------------------------------------------------------

def _scale_shape(rows: int, cols: int, group_size: int) -> tuple[int, ...]:
    if group_size == 0:
        return ()
    if group_size == -1:
        return (rows, 1)
    return (rows, -(-cols // group_size))


def quantize(W: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Round to nearest on the grid of `scale`, clamp to the signed range ([-8, 7] or [-128, 127])."""
    _check_2d(W)
    _qmax(bits)
    lo, hi = INT_RANGE[bits]
    rows, cols = W.shape
    want = _scale_shape(rows, cols, group_size)
    scale = scale.detach().to(torch.float32)
    if tuple(scale.shape) != want and not (group_size == 0 and scale.numel() == 1):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit weight {(rows, cols)} "
                         f"with group_size {group_size} (expected {want})")
    scale = scale.reshape(want).clone()
    s = expand_scale(scale, group_size, (rows, cols))
    q = torch.round(W.detach().to(torch.float32) / s).clamp_(lo, hi).to(torch.int8)
    return QuantizedTensor(q=q, scale=scale, bits=bits, group_size=group_size)


def quantize_weight(W: torch.Tensor, method: str, bits: int, group_size: int) -> QuantizedTensor:
    """Scale with `method` ("slim" = SLiM-Quant, "absmax"), then round to nearest."""
    if method == "slim":
        scale = slim_quant_scale(W, bits, group_size)
    elif method == "absmax":
        scale = absmax_scale(W, bits, group_size)
    else:
        raise ValueError(f"unknown scale method {method!r}: use 'slim' or 'absmax'")
    return quantize(W, scale, bits, group_size)


# ---------------------------------------------------------------------------------------------------------------
# Storage forms
# ---------------------------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols] in [-8, 7] -> uint8 [rows, ceil(cols/2)]; element 2j in the low nibble, 2j+1 in the
    high nibble, two's complement (ONNX's INT4 layout). An odd last column is paired with a zero nibble."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4 expects int8 [rows, cols], got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values outside the INT4 range [-8, 7]")
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [rows, ceil(cols/2)] -> int8 [rows, cols]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != -(-cols // 2):
        raise ValueError(f"unpack_int4 expects uint8 [rows, ceil({cols}/2)], got {packed.dtype} {tuple(packed.shape)}")
    nib = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(packed.shape[0], -1)[:, :cols].to(torch.int16)
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)]; column 8b+j is bit j of byte b (little-endian bit
    order), each row padded with zero bits on its own."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"pack_bits expects bool [rows, cols], got {mask.dtype} {tuple(mask.shape)}")
    rows, cols = mask.shape
    bits = _groups(mask.to(torch.uint8), 8)  # [rows, nbytes, 8]
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (bits * weights).sum(dim=2, dtype=torch.int32).to(torch.uint8).reshape(rows, -1)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [rows, ceil(cols/8)] -> bool [rows, cols]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != -(-cols // 8):
        raise ValueError(f"unpack_bits expects uint8 [rows, ceil({cols}/8)], got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed[:, :, None] >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].to(torch.bool)


def nm_compress(q: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense int8 [rows, cols] with at most n non-zeros per group of m columns -> (values int8 [rows, cols*n/m],
    indices uint8 [rows, cols*n/m]): each group's n stored values in column order and their positions 0..m-1.
    A group with fewer than n non-zeros stores zeros at its first unused positions, so positions stay distinct
    and ascending (the form 2:4 sparse kernels expect)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"nm_compress expects int8 [rows, cols], got {q.dtype} {tuple(q.shape)}")
    if not 0 < n < m or m > 256:
        raise ValueError(f"nm_compress needs 0 < n < m <= 256, got {n}:{m}")
    rows, cols = q.shape
    if cols % m:
        raise ValueError(f"nm_compress: {cols} columns is not a multiple of m={m}")
    g = q.reshape(rows, cols // m, m)
    nonzero = g != 0
    if bool((nonzero.sum(dim=2) > n).any()):
        raise ValueError(f"nm_compress: some group of {m} columns has more than {n} non-zeros")
    pos = torch.arange(m)
    # non-zeros first (in column order), then the zero positions (in column order); keep n, re-sort by column.
    key = (~nonzero).to(torch.int64) * m + pos
    idx = key.argsort(dim=2)[:, :, :n].sort(dim=2).values
    values = g.gather(2, idx).reshape(rows, -1)
    return values, idx.to(torch.uint8).reshape(rows, -1)


def nm_decompress(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """Inverse of nm_compress: -> int8 [rows, cols]."""
    rows = values.shape[0]
    if cols % m or values.shape != (rows, cols // m * n) or indices.shape != values.shape:
        raise ValueError(f"nm_decompress: values {tuple(values.shape)} / indices {tuple(indices.shape)} "
                         f"do not fit {cols} columns at {n}:{m}")
    idx = indices.to(torch.int64).reshape(rows, cols // m, n)
    if idx.numel() and int(idx.max()) >= m:
        raise ValueError(f"nm_decompress: an index is >= m={m}")
    out = torch.zeros(rows, cols // m, m, dtype=values.dtype)
    out.scatter_(2, idx, values.reshape(rows, cols // m, n))
    return out.reshape(rows, cols)
