"""Tiny compressed models for the exporter tests, built without the compressor.

Each decoder-layer nn.Linear becomes a CompressedLinear whose QuantizedTensor is a 2:4-masked (along K),
symmetric abs-max quantized copy of the weight, with random rank-4 adapters (optionally 4-bit quantized).
"""
from __future__ import annotations

import torch
from torch import nn

from slim_trt.algorithms.qtensor import INT_RANGE, QuantizedTensor
from slim_trt.checkpoint.compressed_linear import CompressedLinear, compressed_layers
from tests.conftest import tiny_model


# Export options whose ONNX Runtime session runs the graph's own fp32 arithmetic: a float head, fp32 activations in
# MatMulNBits (the product defaults, an int8 head and int8 activations, move logits by int8 rounding).
EXACT = {"head": "none", "ort_accuracy_level": 1}


def mask_2to4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive input columns (rows = outputs, as torch stores them)."""
    n, k = w.shape
    g = w.abs().reshape(n, k // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, dim=-1).indices, True)
    return keep.reshape(n, k)


def absmax_quantize(w: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Symmetric abs-max quantization: per tensor (0), per output channel (-1) or per G input columns (G > 0)."""
    lo, hi = INT_RANGE[bits]
    rows, cols = w.shape
    if group_size == 0:
        scale = (w.abs().max() / hi).clamp_min(1e-8).reshape(())
    elif group_size == -1:
        scale = (w.abs().amax(dim=1, keepdim=True) / hi).clamp_min(1e-8)
    else:
        ng = -(-cols // group_size)
        padded = torch.nn.functional.pad(w.abs(), (0, ng * group_size - cols))
        scale = (padded.reshape(rows, ng, group_size).amax(-1) / hi).clamp_min(1e-8)
    qt = QuantizedTensor(torch.zeros(rows, cols, dtype=torch.int8), scale.float(), bits, group_size)
    from slim_trt.algorithms.qtensor import expand_scale

    s = expand_scale(qt.scale, group_size, (rows, cols))
    qt.q = torch.round(w / s).clamp(lo, hi).to(torch.int8)
    return qt


def compress_tiny(model: nn.Module, *, bits: int = 4, group_size: int = 0, rank: int = 4,
                  quantize_adapters: bool = False, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers = model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers
    targets = [(parent, attr, child) for block in layers for parent in block.modules()
               for attr, child in parent.named_children() if type(child) is nn.Linear]
    for parent, attr, lin in targets:
        w = lin.weight.detach().float()
        n, k = w.shape
        mask = mask_2to4(w)
        qt = absmax_quantize(w * mask, bits, group_size)
        L = torch.randn(n, rank, generator=g) * 0.1
        R = torch.randn(rank, k, generator=g) * 0.1
        if quantize_adapters:
            L, R = absmax_quantize(L, 4, 128), absmax_quantize(R, 4, 128)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        setattr(parent, attr, CompressedLinear(qt, mask=mask, sparsity="2:4", lora_L=L, lora_R=R, bias=bias))
    return model.eval()


def compressed_model(family: str = "llama", **kw) -> nn.Module:
    return compress_tiny(tiny_model(family), **kw)


def w8a8_model(family: str = "llama", **kw) -> nn.Module:
    """compressed_model with INT8 per-channel weights and a static INT8 activation scale per layer (absmax of its
    input on a few random windows, rounded to fp16 as the compressor rounds them): a W8A8 checkpoint's layers."""
    from slim_trt.algorithms.actquant import round_scale
    from slim_trt.exporter.calibrate import activation_scales

    model = compressed_model(family, bits=8, group_size=-1, **kw)
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(7))
    scales = activation_scales(model, windows)
    for name, layer in compressed_layers(model):
        layer.act_scale = round_scale(0.7 * scales[name])  # 0.7: some values clip, as calibrated scales do
    return model


def save_compressed_checkpoint(path, family: str = "llama", w8a8: bool = False, **kw):
    """A tiny compressed model saved as a slim-trt checkpoint folder with a tokenizer (what `compress` writes)."""
    from slim_trt.checkpoint.format import save
    from tests.conftest import tiny_tokenizer

    model = (w8a8_model if w8a8 else compressed_model)(family, **kw)
    save(model, path, tokenizer=tiny_tokenizer(model.config.vocab_size))
    return path
