"""The quantized-tensor container shared by every quantizer, the checkpoint and the exporter.

Layout (rows = output channels N, cols = input channels K, as in torch `Linear.weight`):
  q      int8 [rows, cols], values in [-8, 7] (4 bit) or [-128, 127] (8 bit); symmetric, zero point 0.
  scale  float32: shape [] (group_size 0, per tensor), [rows, 1] (group_size -1, per output channel),
         or [rows, ceil(cols / G)] (group_size G > 0, groups of G consecutive input columns).
  value  = q * scale of its group.
  zero   optional, int8, the shape of scale: asymmetric grids (the low-bit quantizers of issue 14). Then q holds
         unsigned codes in [0, 2^bits - 1] and value = (q - zero) * scale; zero is an integer in the same range,
         so ONNX DequantizeLinear (uint4 / uint8 zero_point) carries it exactly.
  FP8 (issue 24): q may instead be float8_e4m3fn codes (algorithms/fp8.py) with bits 8, no zero point and one
         scale per output channel or per tensor; value = q * scale all the same (`is_fp8`).
  group_bits optional, int8, the shape of scale (with zero, G > 0): mixed precision (SliM-LLM). `bits` is then the
         container (4 or 8) and group g's codes lie in its own range [0, 2^group_bits - 1]. A 1-bit group is the
         sign grid +-scale: zero point 1 and codes {0, 2} (its information is one bit, code / 2).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

INT_RANGE = {4: (-8, 7), 8: (-128, 127)}
# Asymmetric codes (with a zero point). 2- and 3-bit grids live in INT4 containers (storage and export).
UINT_RANGE = {b: (0, 2 ** b - 1) for b in (2, 3, 4, 8)}


def expand_scale(scale: torch.Tensor, group_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """Broadcast a scale of any supported granularity to the full [rows, cols] shape."""
    rows, cols = shape
    if group_size == 0:
        return scale.reshape(()).expand(rows, cols)
    if group_size == -1:
        return scale.reshape(rows, 1).expand(rows, cols)
    return scale.repeat_interleave(group_size, dim=1)[:, :cols]


@dataclass
class QuantizedTensor:
    q: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int
    zero: torch.Tensor | None = None
    group_bits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.q.dtype == torch.float8_e4m3fn:
            if self.bits != 8 or self.zero is not None or self.group_bits is not None or self.group_size not in (0, -1):
                raise ValueError("FP8 codes need bits 8, no zero point and one scale per output channel or tensor")
            if self.q.dim() != 2:
                raise ValueError(f"q must be 2-D [rows, cols], got shape {tuple(self.q.shape)}")
            return
        lo, hi = (INT_RANGE if self.zero is None else UINT_RANGE)[self.bits]
        if self.zero is not None:
            if self.zero.shape != self.scale.shape:
                raise ValueError(f"zero must have the scale's shape {tuple(self.scale.shape)}, got "
                                 f"{tuple(self.zero.shape)}")
            if self.zero.numel() and (int(self.zero.min()) < lo or int(self.zero.max()) > hi):
                raise ValueError(f"zero out of the unsigned {self.bits}-bit range [{lo}, {hi}]")
        if self.group_bits is not None:
            self._check_group_bits()
        if self.q.dtype != torch.int8:
            raise TypeError(f"q must be int8, got {self.q.dtype}")
        if self.q.dim() != 2:
            raise ValueError(f"q must be 2-D [rows, cols], got shape {tuple(self.q.shape)}")
        if self.q.numel() and (int(self.q.min()) < lo or int(self.q.max()) > hi):
            raise ValueError(f"q out of the {self.bits}-bit range [{lo}, {hi}]")

    def _check_group_bits(self) -> None:
        gb = self.group_bits
        if self.zero is None or self.group_size <= 0 or gb.shape != self.scale.shape:
            raise ValueError("group_bits needs zero points, group_size > 0 and the scale's shape "
                             f"{tuple(self.scale.shape)}")
        if gb.numel() and (int(gb.min()) < 1 or int(gb.max()) > self.bits):
            raise ValueError(f"group_bits must lie in [1, {self.bits}] (the container), got "
                             f"[{int(gb.min())}, {int(gb.max())}]")
        rows, cols = self.q.shape
        g = expand_scale(gb.to(torch.int32), self.group_size, (rows, cols))
        hi = torch.where(g == 1, 2, (1 << g) - 1)
        q = self.q.to(torch.int32)
        if bool(((q < 0) | (q > hi) | ((g == 1) & (q % 2 == 1))).any()):
            raise ValueError("a code lies outside its group's range (group_bits)")
        z = self.zero.to(torch.int32)
        if bool(((z > torch.where(gb == 1, 2, (1 << gb.to(torch.int32)) - 1)) | ((gb == 1) & (z != 1))).any()):
            raise ValueError("a zero point lies outside its group's range (group_bits)")

    def to(self, device) -> "QuantizedTensor":
        """The same tensor on `device`: every tensor field moves together, and replace() keeps a subclass's own
        fields (SpQR's outlier table stays where it is)."""
        if self.q.device == torch.device(device):
            return self

        def mv(t):
            return None if t is None else t.to(device)
        return dataclasses.replace(self, q=mv(self.q), scale=mv(self.scale), zero=mv(self.zero),
                                   group_bits=mv(self.group_bits))

    @property
    def is_fp8(self) -> bool:
        return self.q.dtype == torch.float8_e4m3fn

    def code_bits(self) -> int:
        """Information bits of the codes: bits per weight, or each group's own width (group_bits)."""
        if self.group_bits is None:
            return self.bits * self.q.numel()
        rows, cols = self.q.shape
        return int(expand_scale(self.group_bits.to(torch.int64), self.group_size, (rows, cols)).sum())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s = expand_scale(self.scale.to(torch.float32), self.group_size, self.shape)
        q = self.q.to(torch.float32)
        if self.zero is not None:
            q = q - expand_scale(self.zero.to(torch.float32), self.group_size, self.shape)
        return (q * s).to(dtype)

    def scale_bits(self) -> int:
        """Bits spent on scales (stored as fp16 in the deployed engine)."""
        if self.zero is None:
            return 16 * self.scale.numel()
        zero_bits = self.bits * self.zero.numel() if self.group_bits is None else int(self.group_bits.sum())
        return 16 * self.scale.numel() + zero_bits
