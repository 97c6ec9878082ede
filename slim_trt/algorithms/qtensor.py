"""The quantized-tensor container shared by every quantizer, the checkpoint and the exporter.

Layout (rows = output channels N, cols = input channels K, as in torch `Linear.weight`):
  q      int8 [rows, cols], values in [-8, 7] (4 bit) or [-128, 127] (8 bit); symmetric, zero point 0.
  scale  float32: shape [] (group_size 0, per tensor), [rows, 1] (group_size -1, per output channel),
         or [rows, ceil(cols / G)] (group_size G > 0, groups of G consecutive input columns).
  value  = q * scale of its group.
  zero   optional, int8, the shape of scale: asymmetric grids (the low-bit quantizers of issue 14). Then q holds
         unsigned codes in [0, 2^bits - 1] and value = (q - zero) * scale; zero is an integer in the same range,
         so ONNX DequantizeLinear (uint4 / uint8 zero_point) carries it exactly.
"""
from __future__ import annotations

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

    def __post_init__(self) -> None:
        lo, hi = (INT_RANGE if self.zero is None else UINT_RANGE)[self.bits]
        if self.zero is not None:
            if self.zero.shape != self.scale.shape:
                raise ValueError(f"zero must have the scale's shape {tuple(self.scale.shape)}, got "
                                 f"{tuple(self.zero.shape)}")
            if self.zero.numel() and (int(self.zero.min()) < lo or int(self.zero.max()) > hi):
                raise ValueError(f"zero out of the unsigned {self.bits}-bit range [{lo}, {hi}]")
        if self.q.dtype != torch.int8:
            raise TypeError(f"q must be int8, got {self.q.dtype}")
        if self.q.dim() != 2:
            raise ValueError(f"q must be 2-D [rows, cols], got shape {tuple(self.q.shape)}")
        if self.q.numel() and (int(self.q.min()) < lo or int(self.q.max()) > hi):
            raise ValueError(f"q out of the {self.bits}-bit range [{lo}, {hi}]")

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
        return 16 * self.scale.numel() + (0 if self.zero is None else self.bits * self.zero.numel())
