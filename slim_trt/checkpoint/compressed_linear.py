"""The compressed Linear: y = W_c x + L (R x) + b, or y = W_c Q(x) + L (R x) + b with static INT8 activations.

W_c is the quantized (and pruned) base weight, L [out, r] and R [r, in] the low-rank adapters. The module
keeps both the integer form (for saving and for the ONNX exporter) and the dequantized float form (for a
fast forward pass); the float form is derived, never saved.

For adapter fine-tuning, train_adapters() turns L and R into fp32 Parameters (master copies; quantized adapters
are fake-quantized in the forward with a straight-through estimator) and freeze_adapters() turns them back into
buffers plus their integer form, re-quantized on the same grid.

With `act_scale` (W8A8 checkpoints) the base GEMM reads Q(x) = clamp(round(x / act_scale), -128, 127) *
act_scale, exactly what the exported QuantizeLinear -> DequantizeLinear pair computes; the adapters read x.
With act_format "fp8" Q(x) is the E4M3 code of x / act_scale times act_scale, and the weight's codes may be
float8_e4m3fn (QuantizedTensor.is_fp8): W8A8 in FP8 (issue 24), computed as the FP8 export computes it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..algorithms.actquant import fake_quant
from ..algorithms.lowrank import quantize_adapter
from ..algorithms.qtensor import QuantizedTensor

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
        act_scale: float | None = None,
        act_bits: int = 8,
        act_format: str = "int",
    ) -> None:
        super().__init__()
        if act_scale is not None and not (act_scale > 0 and act_bits == 8):
            raise ValueError(f"act_scale must be > 0 with act_bits 8, got {act_scale} / {act_bits}")
        if act_format not in ("int", "fp8"):
            raise ValueError(f"act_format must be 'int' or 'fp8', got {act_format!r}")
        self.act_format = act_format  # "fp8": E4M3 activation codes (algorithms/fp8.py), issue 24
        # Kept as the float32 value the checkpoint stores, so a reloaded layer quantizes on the very same grid.
        self.act_scale = None if act_scale is None else float(torch.tensor(act_scale, dtype=torch.float32))
        self.act_bits = act_bits
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
        self._fake_quant: dict[str, tuple[int, int]] = {}  # adapter name -> (bits, group_size) while training
        # adapter name -> ((version, data pointer) of the master, q(A) - A): the straight-through offset, see _adapter
        self._fake_quant_offsets: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}

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

    def _adapter(self, name: str) -> torch.Tensor:
        A = getattr(self, name)
        spec = self._fake_quant.get(name)
        if spec is not None:
            # Straight-through estimator: the forward sees the quantized value, the gradient passes unchanged.
            # The offset q(A) - A is kept until A changes (the optimizer's in-place step bumps its version): the
            # micro-batches of one step share it instead of quantizing every adapter again in each forward.
            key = (A._version, A.data_ptr())
            hit = self._fake_quant_offsets.get(name)
            if hit is None or hit[0] != key:
                with torch.no_grad():
                    hit = self._fake_quant_offsets[name] = (key, quantize_adapter(A, *spec).dequantize() - A)
            A = A + hit[1]
        return A

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the base GEMM reads: x itself, or its INT8 fake quantization (straight-through when training)."""
        if self.act_scale is None:
            return x
        xq = fake_quant(x, self.act_scale, self.act_bits, self.act_format)
        return x + (xq - x).detach() if x.requires_grad else xq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(self.quantized_input(x), self.weight.to(x.dtype),
                                 None if self.bias is None else self.bias.to(x.dtype))
        if self.lora_L is not None:
            L, R = self._adapter("lora_L"), self._adapter("lora_R")
            y = y + nn.functional.linear(nn.functional.linear(x, R.to(x.dtype)), L.to(x.dtype))
        return y

    def train_adapters(self) -> list[nn.Parameter]:
        """Make L and R trainable fp32 Parameters (nothing else of the layer trains); returns them.

        Quantized adapters keep their bits and group size: the forward fake-quantizes the master copies on the
        AbsMax grid quantize_adapter uses, so freeze_adapters() can store exactly what training saw."""
        if self.lora_L is None:
            return []
        if "lora_L" in self._parameters:
            return [self.lora_L, self.lora_R]
        for name in ("lora_L", "lora_R"):
            master = getattr(self, name).detach().to(torch.float32).clone()
            delattr(self, name)
            self.register_parameter(name, nn.Parameter(master))
            q = getattr(self, f"{name}_q")
            if q is not None:
                self._fake_quant[name] = (q.bits, q.group_size)
        return [self.lora_L, self.lora_R]

    def freeze_adapters(self) -> None:
        """Back to buffers after training: quantized adapters are re-quantized from the masters (same grid as the
        training forward), float adapters keep the masters' values."""
        if "lora_L" not in self._parameters:
            return
        dtype = self.weight.dtype
        for name in ("lora_L", "lora_R"):
            master = self._parameters[name].detach().to(torch.float32)
            delattr(self, name)
            spec = self._fake_quant.pop(name, None)
            self._fake_quant_offsets.pop(name, None)
            if spec is not None:
                q = quantize_adapter(master, *spec)
                setattr(self, f"{name}_q", q)
                master = q.dequantize()
            self.register_buffer(name, master.to(dtype), persistent=False)

    def extra_repr(self) -> str:
        act = "" if self.act_scale is None else f", act_bits={self.act_bits}, act_scale={self.act_scale:g}"
        act += ", fp8" if self.act_format == "fp8" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"sparsity={self.sparsity}, rank={self.rank}{act}")


def compressed_layers(model: nn.Module):
    """Yield (name, layer) for every CompressedLinear in `model`."""
    for name, mod in model.named_modules():
        if isinstance(mod, CompressedLinear):
            yield name, mod
