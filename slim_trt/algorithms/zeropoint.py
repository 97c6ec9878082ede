"""Zero-point (asymmetric) grids for low-bit weights, and the per-group grid the OBS sweep rounds with.

Why zero points at <= 3 bits: a symmetric b-bit grid is {-2^(b-1), ..., 2^(b-1) - 1} * s, so at 2 bits it has a
single positive level and at 3 bits three; the groups of a weight are rarely centred on 0 that exactly. Min-max
with an integer zero point z spreads all 2^b levels over [min(w, 0), max(w, 0)] of each group:
value = (q - z) * s, q in [0, 2^b - 1]. It is the grid GPTQ uses at 2 and 3 bits, so it is the fair baseline.
At 4 bits and up the symmetric grid loses little, and it is the only one TensorRT's INT4 DequantizeLinear takes
(zero points must be 0), so the default stays symmetric there.

Every b <= 3 grid folds exactly into a signed INT4 code: q - z lies in [-(2^b - 1), 2^b - 1], inside [-7, 7].
So is a 4-bit group whose zero point is 8 (the symmetric INT4 grid, "signed"). The exporter uses this: such
weights run as plain signed INT4 blocked DequantizeLinear (zero point 0) on ONNX Runtime and TensorRT alike.

Pure tensor functions: no I/O, inputs never modified.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .qtensor import QuantizedTensor, expand_scale
from .quantize import SCALE_FLOOR

# The clip factors a calibrated grid tries (1.0 = plain min-max / abs-max). Above 1 the range grows: with an
# integer zero point a slightly wider grid can put a level closer to the bulk of a skewed group.
CLIP_CANDIDATES = tuple(round(0.8 + 0.02 * i, 2) for i in range(16))  # 0.80 ... 1.10


def maxq(bits: int) -> int:
    """Largest code of a b-bit group (a 1-bit group uses codes {0, 2}, see qtensor)."""
    return 2 if bits == 1 else (1 << bits) - 1


def fit_rows(W: torch.Tensor, bits: int, signed: bool = False, clip: torch.Tensor | float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [..., rows], zero [..., rows]) of one group per row of W [..., rows, g].

    bits 1: the sign grid +-s with s = clip * mean|w| (zero point 1).
    signed: the symmetric grid, zero point 2^(b-1), s = clip * max|w| / (2^(b-1) - 1).
    otherwise min-max: the range [min(w, 0), max(w, 0)] times clip, s = range / (2^b - 1), z = round(-min / s).
    clip may be a tensor broadcasting against [..., rows] (one factor per candidate)."""
    W = W.to(torch.float32)
    if bits == 1:
        s = W.abs().mean(dim=-1) * clip
        return s.clamp_min(SCALE_FLOOR), torch.ones_like(s)
    if signed:
        half = 1 << (bits - 1)
        s = W.abs().amax(dim=-1) * clip / (half - 1)
        return s.clamp_min(SCALE_FLOOR), torch.full_like(s, float(half))
    top = maxq(bits)
    lo = W.amin(dim=-1).clamp_max(0.0) * clip
    hi = W.amax(dim=-1).clamp_min(0.0) * clip
    s = ((hi - lo) / top).clamp_min(SCALE_FLOOR)
    z = torch.round(-lo / s).clamp(0, top)
    return s, z


def codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Round w to the grid (s, z) of `bits`: float codes in [0, maxq(bits)] (value = (code - z) * s)."""
    if bits == 1:  # the sign grid: no level at 0
        return torch.where(w >= 0, 2.0, 0.0).to(w.dtype)
    return (torch.round(w / s) + z).clamp_(0, maxq(bits))


def quantize_rows(W: torch.Tensor, bits: int, signed: bool = False, clip=1.0) -> torch.Tensor:
    """W [..., rows, g] rounded to its own fitted grid, as float values."""
    s, z = fit_rows(W, bits, signed, clip)
    s, z = s[..., None], z[..., None]
    return (codes(W, s, z, bits) - z) * s


@dataclass
class GroupGrid:
    """How the OBS sweep rounds each group of `group_size` input columns with a zero point.

    group_bits [ngroups]: each group's width (all equal for a uniform grid; SliM-LLM mixes N-1, N, N+1).
    signed_bits: widths that use the symmetric grid (zero point 2^(b-1)); the others are min-max.
    weights: optional per-element error weights [rows, cols] for the clip search (SliM-LLM's SQC: salience);
    with them each group's clip factor is searched over CLIP_CANDIDATES, without them it is 1 (plain GPTQ).
    container: the bits of the stored codes (4 when every group has <= 4 bits, else 8)."""

    group_size: int
    group_bits: torch.Tensor
    signed_bits: tuple[int, ...] = ()
    weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.group_size <= 0:
            raise ValueError(f"zero-point grids need groups (group_size > 0), got {self.group_size}")
        gb = self.group_bits
        if gb.dim() != 1 or not gb.numel() or int(gb.min()) < 1 or int(gb.max()) > 8:
            raise ValueError("group_bits must be a 1-D tensor of widths in [1, 8]")

    @property
    def container(self) -> int:
        return 4 if int(self.group_bits.max()) <= 4 else 8

    @property
    def mixed(self) -> bool:
        return bool((self.group_bits != self.group_bits[0]).any())

    def bits_of(self, group: int) -> int:
        return int(self.group_bits[group])

    def fit(self, cur: torch.Tensor, group: int, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [rows], zero [rows]) for the group starting at column `col`, from its current values cur."""
        b = self.bits_of(group)
        signed = b in self.signed_bits
        if self.weights is None:
            return fit_rows(cur, b, signed)
        wts = self.weights[:, col:col + cur.shape[1]].to(torch.float32)
        clips = torch.tensor(CLIP_CANDIDATES, dtype=torch.float32, device=cur.device)[:, None]  # [P, 1]
        s, z = fit_rows(cur[None], b, signed, clips)  # [P, rows]
        err = (((codes(cur[None], s[..., None], z[..., None], b) - z[..., None]) * s[..., None] - cur[None])
               .square() * wts[None]).sum(dim=-1)  # [P, rows]
        best = err.argmin(dim=0)  # ties: the first candidate
        pick = best[None]
        return s.gather(0, pick)[0], z.gather(0, pick)[0]

    def quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> QuantizedTensor:
        """The sweep's codes as a QuantizedTensor (group_bits kept only when the widths differ)."""
        ngroups = scale.shape[1]
        gb = self.group_bits[:ngroups].to(device=q.device, dtype=torch.int8)
        rows = q.shape[0]
        group_bits = gb[None].expand(rows, ngroups).contiguous() if self.mixed else None
        bits = self.container if self.mixed else self.bits_of(0)
        return QuantizedTensor(q=q, scale=scale, bits=bits, group_size=self.group_size,
                               zero=zero.to(torch.int8), group_bits=group_bits)


def uniform_grid(cols: int, bits: int, group_size: int) -> GroupGrid:
    """Plain min-max zero-point grid at `bits` for every group (GPTQ's asymmetric quantizer)."""
    ngroups = -(-cols // group_size)
    return GroupGrid(group_size, torch.full((ngroups,), bits, dtype=torch.int8))


def rtn(W: torch.Tensor, grid: GroupGrid) -> torch.Tensor:
    """Round each group of W to its grid (no error feedback): the float values. Used to score allocations."""
    W = W.detach().to(torch.float32)
    out = torch.empty_like(W)
    G = grid.group_size
    for g, c in enumerate(range(0, W.shape[1], G)):
        b = grid.bits_of(g)
        out[:, c:c + G] = quantize_rows(W[:, c:c + G], b, b in grid.signed_bits)
    return out


def signed_codes(qt: QuantizedTensor) -> torch.Tensor | None:
    """q - zero as int8 when every value fits signed INT4 [-8, 7] (the zero point folded away: the same values,
    exactly, with zero point 0), else None."""
    if qt.zero is None:
        return qt.q
    rows, cols = qt.shape
    d = qt.q.to(torch.int16) - expand_scale(qt.zero.to(torch.int16), qt.group_size, (rows, cols))
    if d.numel() and (int(d.min()) < -8 or int(d.max()) > 7):
        return None
    return d.to(torch.int8)
