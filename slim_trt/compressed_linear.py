"""The compressed Linear: y = W_c x + L (R x) + b.

W_c is the quantized (and pruned) base weight, L [out, r] and R [r, in] the low-rank adapters. The module
keeps both the integer form (for saving and for the ONNX exporter) and the dequantized float form (for a
fast forward pass); the float form is derived, never saved.
"""
from __future__ import annotations

import torch
from torch import nn

from .algorithms.qtensor import QuantizedTensor

Factor = torch.Tensor | QuantizedTensor


def _as_float(x: Factor | None) -> torch.Tensor | None:
    if x is None:
        return None
    return x.dequantize() if isinstance(x, QuantizedTensor) else x.to(torch.float32)


class CompressedLinear(nn.Module):
    def __init__(
        self,
        weight: Factor,
        *,
        mask: torch.Tensor | None = None,
        sparsity: str = "none",
        lora_L: Factor | None = None,
        lora_R: Factor | None = None,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qweight = weight if isinstance(weight, QuantizedTensor) else None
        self.sparsity = sparsity
        self.lora_L_q = lora_L if isinstance(lora_L, QuantizedTensor) else None
        self.lora_R_q = lora_R if isinstance(lora_R, QuantizedTensor) else None
        if (lora_L is None) != (lora_R is None):
            raise ValueError("lora_L and lora_R must both be given or both be None")
        if lora_L is not None:
            if lora_L.shape[0] != self.out_features or lora_R.shape[1] != self.in_features or lora_L.shape[1] != lora_R.shape[0]:
                raise ValueError(f"adapter shapes {tuple(lora_L.shape)} x {tuple(lora_R.shape)} do not fit weight {tuple(weight.shape)}")
        # Float views used by forward(); derived from the integer form, so they are not persistent.
        self.register_buffer("weight", _as_float(weight).to(compute_dtype), persistent=False)
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool), persistent=False)
        L, R = _as_float(lora_L), _as_float(lora_R)
        self.register_buffer("lora_L", None if L is None else L.to(compute_dtype), persistent=False)
        self.register_buffer("lora_R", None if R is None else R.to(compute_dtype), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype), persistent=False)

    @property
    def bits(self) -> int:
        return self.qweight.bits if self.qweight is not None else 16

    @property
    def rank(self) -> int:
        return 0 if self.lora_R is None else int(self.lora_R.shape[0])

    def base_weight(self) -> torch.Tensor:
        """W_c, dequantized and sparse, as a dense float32 tensor [out, in]."""
        return self.weight.to(torch.float32)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L [out, r], R [r, in]) as float32 (dequantized when the adapters are quantized), or None."""
        if self.lora_L is None:
            return None
        return self.lora_L.to(torch.float32), self.lora_R.to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.lora_L is not None:
            y = y + nn.functional.linear(nn.functional.linear(x, self.lora_R.to(x.dtype)), self.lora_L.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"sparsity={self.sparsity}, rank={self.rank}")


def compressed_layers(model: nn.Module):
    """Yield (name, layer) for every CompressedLinear in `model`."""
    for name, mod in model.named_modules():
        if isinstance(mod, CompressedLinear):
            yield name, mod
