"""FP8 E4M3 (float8e4m3fn) quantization: the grid TensorRT's FP8 tensor cores (Hopper, Ada, Thor) read.

E4M3 has 3 mantissa bits, exponents 2^-6..2^8 (subnormals down to 2^-9) and a largest finite value of 448; the
"fn" variant has no infinities. A value v is stored as the code nearest v / scale (round to nearest even), clamped
to +-448 (saturation: ONNX QuantizeLinear saturate=1, what TensorRT always does), and read back as code * scale.

Weights: one scale per output channel, absmax / 448 (or one per tensor), rounded to an fp16 value so an fp16
export dequantizes on exactly the scales the checkpoint holds. Activations: one static scale per tensor
(algorithms/actquant.py calibrates it). Zero is always stored as +0 (code 0x00): a negative value that rounds
or is pruned to zero would otherwise be the code 0x80 (-0), which the N:M storage and a sparsity check reading
bytes would count as a kept weight.

Pure: tensors in, tensors out. ONNX Runtime's CPU QuantizeLinear (opset 21) computes the same codes bit for bit
(x / scale in fp32, then the saturating cast).
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# fp16 limits for the scales (as actquant.round_scale): a scale of 0 is refused by TensorRT's DequantizeLinear.
_FP16_TINY, _FP16_MAX = 2.0 ** -24, 65504.0


def fp8_codes(x: torch.Tensor) -> torch.Tensor:
    """x (already divided by its scale) as float8_e4m3fn codes: round to nearest even, saturate at +-448, every
    zero +0."""
    c = x.to(torch.float32).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return torch.where(c.view(torch.uint8) == 0x80, torch.zeros((), dtype=torch.uint8), c.view(torch.uint8)).view(FP8_DTYPE)


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """The E4M3 value nearest x (saturating), as float32: fp8_codes read back."""
    return fp8_codes(x).to(torch.float32)


def fp8_scale(W: torch.Tensor, group_size: int = -1) -> torch.Tensor:
    """absmax / 448 per output channel ([rows, 1], group_size -1) or per tensor ([], group_size 0), each rounded
    to the nearest fp16 value in [2^-24, 65504] (an all-zero row gets the smallest)."""
    a = W.detach().to(torch.float32).abs()
    if group_size == -1:
        amax = a.amax(dim=1, keepdim=True) if a.numel() else a.new_zeros(a.shape[0], 1)
    elif group_size == 0:
        amax = a.max() if a.numel() else a.new_zeros(())
    else:
        raise ValueError(f"FP8 weights take one scale per output channel (-1) or per tensor (0), got {group_size}")
    return (amax / FP8_MAX).clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(torch.float32)


def fp8_quantize(W: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The codes of W [rows, cols] on `scale` ([rows, 1] or []), float8_e4m3fn."""
    return fp8_codes(W.detach().to(torch.float32) / scale.to(torch.float32))


def fp8_fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    """QuantizeLinear (float8e4m3fn zero point 0, saturate=1) -> DequantizeLinear on an activation, in x's dtype.
    The division runs in fp32 whatever x's dtype (as ONNX Runtime does at opset 21), the product in x's dtype."""
    s = torch.tensor(scale, dtype=torch.float32, device=x.device)
    codes = fp8_codes(x.to(torch.float32) / s)
    return codes.to(x.dtype) * s.to(x.dtype)
