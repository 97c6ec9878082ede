"""SpQR (Dettmers et al. 2023, "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight Compression").

The GPTQ column sweep (the OBS update of obs.py, on the same Cholesky factor of H^-1) with three changes:
- small groups of `group_size` (16) input columns, each row's group on its own asymmetric min-max grid:
  value = (q - zero) * scale, q and zero unsigned `bits`-bit integers (the zero-point contract of qtensor);
- bilevel statistics: the group's per-row scales and zeros are themselves quantized to `stat_bits` (3) bits in
  groups of `stat_group` (16) consecutive output rows, each such group with a 16-bit offset and step;
- outliers: a weight whose Hessian-weighted rounding error err^2 / U_jj^2 exceeds tau (U_jj the pivot of the
  upper Cholesky factor of H^-1, the quantity OBS divides by; the SparseGPT criterion with the rounding error in
  place of the weight) is kept in fp16 in a row-compressed table; its base code is the zero point (value 0), so
  weight = base + outliers and the runtime may add the outliers as a separate sparse or dense term.

How the second-level zero statistics stay integers: first-level zeros are integers (round(-min / scale)); per
group of `stat_group` rows the zero grid has offset min(z) and step max(1, ceil((max z - min z) / (2^stat_bits -
1))), both integers, so every reconstructed zero min(z) + code * step is an integer (clamped into the code range)
and ONNX DequantizeLinear's uint4/uint8 zero_point carries it exactly. Second-level scale statistics are rounded
to fp16 and the reconstructed scales too, so an fp16 export stores exactly the scales the sweep used.

tau: a pre-pass scores every kept weight on its group's plain min-max grid; tau is the score that leaves
floor(outlier_share * kept) weights above it. The sweep then keeps, per column, the weights scoring above tau,
but never more than the budget left (highest scores first), so the share is a hard upper bound. Groups leave
their pre-pass outliers out of their min-max statistics (the paper's motivation for the outliers: a wide group
range costs every other weight of the group precision); the paper's leave-one-out search is simplified to this
one exclusion.

Pure: tensors in, tensors out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .obs import inverse_hessian_factor
from .qtensor import UINT_RANGE, QuantizedTensor
from .quantize import SCALE_FLOOR

SPQR_BITS = (2, 3, 4)  # unsigned codes in INT4 containers (int8 holds no unsigned 8-bit code)
DEFAULT_GROUP = 16
DEFAULT_STAT_BITS = 3
DEFAULT_STAT_GROUP = 16
# The paper's LLaMA configurations keep ~1% of the weights as outliers (and count 32 bits for each).
DEFAULT_OUTLIER_SHARE = 0.01
OUTLIER_BITS = 32  # a 16-bit value and a 16-bit column index; the row pointers are amortised (as the paper)
STAT_PARAM_BITS = 16  # each second-level statistic (offset, step) is stored in 16 bits


@dataclass
class OutlierTable:
    """Sparse fp16 weights in CSR form (rows = output channels): row r holds col[crow[r]:crow[r+1]] (ascending),
    val the same slice. crow int32 [N + 1], col int32 [nnz], val float16 [nnz]."""

    shape: tuple[int, int]
    crow: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor

    def __post_init__(self) -> None:
        N, K = self.shape
        if self.crow.dtype != torch.int32 or self.col.dtype != torch.int32 or self.val.dtype != torch.float16:
            raise TypeError("outlier table: crow and col must be int32 and val float16")
        if self.crow.shape != (N + 1,) or self.col.shape != self.val.shape or self.col.dim() != 1:
            raise ValueError(f"outlier table: crow must have {N + 1} entries and col/val the same length")
        if int(self.crow[0]) != 0 or int(self.crow[-1]) != self.col.numel() or bool((self.crow.diff() < 0).any()):
            raise ValueError("outlier table: crow must rise from 0 to nnz")
        if self.col.numel() and (int(self.col.min()) < 0 or int(self.col.max()) >= K):
            raise ValueError(f"outlier table: a column index is outside [0, {K})")

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def rows(self) -> torch.Tensor:
        """The row of every entry (int64 [nnz])."""
        return torch.repeat_interleave(torch.arange(self.shape[0]), self.crow.diff().to(torch.int64))

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=dtype)
        out[self.rows(), self.col.to(torch.int64)] = self.val.to(dtype)
        return out

    @staticmethod
    def from_dense(values: torch.Tensor, where: torch.Tensor) -> "OutlierTable":
        """The entries of `values` [N, K] where the bool `where` is True, as fp16."""
        N, K = values.shape
        values, where = values.cpu(), where.cpu()  # the table lives on the host
        rows, cols = where.nonzero(as_tuple=True)  # row-major order: rows ascending, columns ascending in a row
        crow = torch.zeros(N + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows, minlength=N).cumsum(0)
        return OutlierTable((N, K), crow.to(torch.int32), cols.to(torch.int32), values[rows, cols].to(torch.float16))


@dataclass
class SpQRTensor(QuantizedTensor):
    """A zero-point QuantizedTensor plus its outliers; dequantize() returns base + outliers, base_dequantize() the
    grid part alone. stat_bits / stat_group describe how the statistics were quantized (for the bits count; the
    stored scale and zero are their exact reconstructed values)."""

    outliers: OutlierTable | None = None
    stat_bits: int = DEFAULT_STAT_BITS  # 0: the statistics are not quantized
    stat_group: int = DEFAULT_STAT_GROUP

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero is None:
            raise ValueError("an SpQR tensor needs zero points")
        if self.outliers is not None and tuple(self.outliers.shape) != self.shape:
            raise ValueError(f"outlier table shape {self.outliers.shape} differs from the weight's {self.shape}")

    def base_dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return QuantizedTensor.dequantize(self, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.base_dequantize(torch.float32)
        if self.outliers is not None and self.outliers.nnz:
            w = w + self.outliers.to_dense(torch.float32).to(w.device)  # the table lives on the host
        return w.to(dtype)

    @property
    def outlier_count(self) -> int:
        return 0 if self.outliers is None else self.outliers.nnz

    def scale_bits(self) -> int:
        """The statistics as the paper counts them: stat_bits per first-level scale and zero, plus a 16-bit offset
        and step per second-level group of each (see spqr_bits_per_param)."""
        return statistic_bits(self.shape[0], self.shape[1], self.group_size, self.stat_bits, self.stat_group,
                              self.bits)

    def outlier_bits(self) -> int:
        return OUTLIER_BITS * self.outlier_count


def statistic_bits(N: int, K: int, group_size: int, stat_bits: int, stat_group: int, bits: int = 4) -> int:
    """Bits of the statistics of an [N, K] SpQR weight; stat_bits 0: unquantized (a 16-bit scale and a `bits`-bit
    zero per group)."""
    first = N * -(-K // group_size)  # first-level groups: one scale and one zero each
    if stat_bits == 0:
        return first * (STAT_PARAM_BITS + bits)
    second = -(-N // stat_group) * -(-K // group_size)  # second-level groups, for scales and zeros each
    return 2 * stat_bits * first + 2 * 2 * STAT_PARAM_BITS * second


def spqr_bits_per_param(bits: int, group_size: int = DEFAULT_GROUP, stat_bits: int = DEFAULT_STAT_BITS,
                        stat_group: int = DEFAULT_STAT_GROUP, outlier_share: float = 0.0) -> float:
    """The paper's average: bits + 2 stat_bits / g1 + 2 * 2 * 16 / (g1 g2) + 32 * share (dense, divisible shapes)."""
    return (bits + 2 * stat_bits / group_size + 4 * STAT_PARAM_BITS / (group_size * stat_group)
            + OUTLIER_BITS * outlier_share)


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------

def minmax_stats(x: torch.Tensor, use: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [N, g]: (scale, zero) of the asymmetric min-max grid over the entries where `use`, the range
    always including 0 (as GPTQ's quantizer, so a pruned or absent weight is representable). zero is an integer
    in [0, maxq] (float tensor)."""
    big = torch.finfo(torch.float32).max
    lo = torch.where(use, x, big).amin(dim=1).clamp(max=0.0)
    hi = torch.where(use, x, -big).amax(dim=1).clamp(min=0.0)
    scale = ((hi - lo) / maxq).clamp_min(SCALE_FLOOR)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _row_groups(v: torch.Tensor, g: int) -> tuple[torch.Tensor, int]:
    N = v.numel()
    pad = (-N) % g
    return torch.nn.functional.pad(v, (0, pad), value=float(v[-1]) if N else 0.0).reshape(-1, g), N


def quantize_scales(scale: torch.Tensor, stat_bits: int, stat_group: int) -> torch.Tensor:
    """Second level for the scales [N]: per group of stat_group rows, an fp16 offset (min) and step
    ((max - min) / (2^stat_bits - 1)); the reconstructed scales are rounded to fp16 and kept positive."""
    G, N = _row_groups(scale, stat_group)
    top = 2 ** stat_bits - 1
    lo = G.amin(dim=1, keepdim=True).half().float()
    step = ((G.amax(dim=1, keepdim=True) - lo) / top).half().float()
    code = torch.where(step > 0, torch.round((G - lo) / step.clamp_min(1e-30)), 0.0).clamp(0, top)
    return (lo + code * step).half().float().clamp_min(SCALE_FLOOR).reshape(-1)[:N]


def quantize_zeros(zero: torch.Tensor, stat_bits: int, stat_group: int, maxq: int) -> torch.Tensor:
    """Second level for the integer zeros [N]: per group of stat_group rows, an integer offset (min) and an
    integer step max(1, ceil(range / (2^stat_bits - 1))), so every reconstructed zero is an integer."""
    G, N = _row_groups(zero, stat_group)
    top = 2 ** stat_bits - 1
    lo = G.amin(dim=1, keepdim=True)
    step = torch.ceil((G.amax(dim=1, keepdim=True) - lo) / top).clamp_min(1.0)
    code = torch.round((G - lo) / step).clamp(0, top)
    return (lo + code * step).clamp(0, maxq).reshape(-1)[:N]


# ---------------------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------------------

def outlier_threshold(W: torch.Tensor, d: torch.Tensor, keep: torch.Tensor, bits: int, group_size: int,
                      share: float, stat_bits: int | None, stat_group: int) -> float:
    """tau: the Hessian-weighted rounding error err^2 / d_j^2 on each group's min-max grid (with its statistics
    quantized as the sweep will quantize them, so the scores are on the sweep's scale) that exactly
    floor(share * kept) kept weights exceed (inf when the budget is 0)."""
    budget = int(math.floor(share * int(keep.sum())))
    if budget <= 0:
        return math.inf
    N, K = W.shape
    maxq = UINT_RANGE[bits][1]
    scores = torch.empty(N, K, device=W.device)
    for c0 in range(0, K, group_size):
        x, use = W[:, c0:c0 + group_size], keep[:, c0:c0 + group_size]
        s, z = minmax_stats(x, use, maxq)
        if stat_bits:
            s, z = quantize_scales(s, stat_bits, stat_group), quantize_zeros(z, stat_bits, stat_group, maxq)
        q = torch.clamp(torch.round(x / s[:, None]) + z[:, None], 0, maxq)
        err = x - (q - z[:, None]) * s[:, None]
        scores[:, c0:c0 + group_size] = torch.where(use, err.square() / d[c0:c0 + group_size].square()[None, :], -1.0)
    flat = scores.flatten()
    if budget >= int(keep.sum()):
        return -0.5  # every kept weight may be an outlier (scores of kept weights are >= 0)
    return float(torch.topk(flat, budget + 1).values[-1])


def spqr_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, *, group_size: int = DEFAULT_GROUP,
                  stat_bits: int | None = DEFAULT_STAT_BITS, stat_group: int = DEFAULT_STAT_GROUP,
                  outlier_share: float = DEFAULT_OUTLIER_SHARE, mask: torch.Tensor | None = None,
                  blocksize: int = 128, percdamp: float = 0.01) -> SpQRTensor:
    """SpQR-compress W [N, K] with the input second moment H [K, K]; see the module docstring.

    bits: 2, 3 or 4 (codes in INT4 containers). stat_bits None keeps the first-level statistics unquantized
    (fp16 scales, integer zeros). mask (bool, True = keep): pruned weights get their group's zero-point code
    (value exactly 0), are never outliers, and their removal is compensated like a rounding error.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [N, K], got {tuple(W.shape)}")
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected [{K}, {K}]")
    if bits not in SPQR_BITS:
        raise ValueError(f"bits must be one of {SPQR_BITS}, got {bits}")
    if group_size < 1 or blocksize % group_size:
        raise ValueError(f"group_size must be >= 1 and divide blocksize {blocksize}, got {group_size}")
    if not 0.0 <= outlier_share < 1.0:
        raise ValueError(f"outlier_share must be in [0, 1), got {outlier_share}")
    if mask is not None and mask.shape != W.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(W.shape)}")
    maxq = UINT_RANGE[bits][1]

    U, dead = inverse_hessian_factor(H, percdamp)
    Wc = W.detach().to(torch.float32).clone()
    Wc[:, dead] = 0.0
    d = U.diagonal()
    dev = W.device
    keep = torch.ones(N, K, dtype=torch.bool, device=dev) if mask is None else mask.to(torch.bool)
    tau = outlier_threshold(Wc, d, keep, bits, group_size, outlier_share, stat_bits, stat_group)
    budget = int(math.floor(outlier_share * int(keep.sum())))

    ngroups = -(-K // group_size)
    q = torch.zeros(N, K, dtype=torch.int8, device=dev)
    scale = torch.empty(N, ngroups, device=dev)
    zero = torch.empty(N, ngroups, device=dev)
    is_outlier = torch.zeros(N, K, dtype=torch.bool, device=dev)
    out_val = torch.zeros(N, K, device=dev)
    # The sweep works on each block transposed (a column of W is a contiguous row), as obs_sweep does.
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = Wc[:, i1:i2].T.contiguous()
        C1 = torch.empty_like(W1)  # the compressed value of every column
        U1 = U[i1:i2, i1:i2]
        pivots = U1.diagonal()
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                end = min(col + group_size, K)
                cur, use = W1[i:end - i1].T, keep[:, col:end]
                s, z = minmax_stats(cur, use, maxq)
                if tau < math.inf:  # leave the group's likely outliers out of its range
                    err = cur - (torch.clamp(torch.round(cur / s[:, None]) + z[:, None], 0, maxq) - z[:, None]) * s[:, None]
                    likely = use & (err.square() / d[col:end].square()[None, :] > tau)
                    if bool(likely.any()):
                        s, z = minmax_stats(cur, use & ~likely, maxq)
                if stat_bits is not None:
                    s, z = quantize_scales(s, stat_bits, stat_group), quantize_zeros(z, stat_bits, stat_group, maxq)
                else:
                    s = s.half().float().clamp_min(SCALE_FLOOR)
                scale[:, g], zero[:, g] = s, z
            w = W1[i]
            kept = keep[:, col]
            qc = torch.where(kept, torch.clamp(torch.round(w / s) + z, 0, maxq), z)
            c = (qc - z) * s
            if budget > 0:
                score = torch.where(kept, (w - c).square() / d[col].square(), -1.0)
                over = score > tau
                n_over = int(over.sum())
                if n_over > budget:  # the share is a hard bound: the highest scores first
                    top = torch.topk(score, budget).indices
                    over = torch.zeros_like(over)
                    over[top] = True
                    n_over = budget
                if n_over:
                    budget -= n_over
                    v = w.half().float()
                    is_outlier[over, col] = True
                    out_val[over, col] = v[over]
                    qc = torch.where(over, z, qc)
                    c = torch.where(over, v, c)
            q[:, col] = qc.to(torch.int8)
            C1[i] = c
            err = (w - c) / pivots[i]
            W1[i + 1:] -= U1[i, i + 1:, None] * err[None, :]
        Err1 = (W1 - C1) / pivots[:, None]
        Wc[:, i2:] -= Err1.T.contiguous() @ U[i1:i2, i2:]
    table = OutlierTable.from_dense(out_val, is_outlier)
    return SpQRTensor(q=q, scale=scale, bits=bits, group_size=group_size, zero=zero.to(torch.int8), outliers=table,
                      stat_bits=stat_bits or 0, stat_group=stat_group)
