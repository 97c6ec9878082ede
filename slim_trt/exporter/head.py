"""The token embedding and the LM head, optionally quantized weight-only (`--head int8|int4`).

For a small model with a large vocabulary they are the largest tensor (Gemma 3 270M: 262144 x 640, 671 MB in fp32,
read whole at every generated token by the head). Symmetric, zero-point free, round to nearest on AbsMax scales:
  int4  blocks of 128 consecutive hidden columns (one scale per vocabulary row and block)
  int8  one scale per vocabulary row (TensorRT's INT8 DequantizeLinear has no blocked form, see slim_trt/linter)

Graph forms (the file is the TensorRT contract; ONNX Runtime gets its kernels through slim_trt.runtime.ort_rewrite):
  embedding    Gather(DequantizeLinear(E_q [V, H]), input_ids)
  tied head    MatMul(h, Transpose(DequantizeLinear(E_q)))     the same E_q, stored once
  untied head  MatMul(h, DequantizeLinear(W_q [H, V], axis 0))  like every compressed linear
"""
from __future__ import annotations

import torch
from torch import nn

from ..algorithms.quantize import absmax_scale, quantize
from ..algorithms.qtensor import QuantizedTensor
from .graph import GraphBuilder
from .linear import dequantized

HEAD_GROUP = 128
_LAYOUT = {"int4": (4, HEAD_GROUP), "int8": (8, -1)}  # bits, group size along the hidden dimension


def quantize_table(weight: torch.Tensor, mode: str) -> QuantizedTensor:
    """E [rows, hidden] -> its `mode` quantization (rows = vocabulary for the embedding and the head)."""
    bits, group = _LAYOUT[mode]
    w = weight.detach().to(torch.float32)
    return quantize(w, absmax_scale(w, bits, group), bits, group)


def is_tied(model: nn.Module, embed: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return isinstance(head, nn.Linear) and head.bias is None and head.weight.data_ptr() == embed.weight.data_ptr()


@torch.no_grad()
def apply_head_quantization(model: nn.Module, mode: str) -> None:
    """Give `model` (in place) the embedding and head an export with `--head mode` computes: the numerical
    reference for verifying such an export."""
    if mode == "none":
        return
    embed = model.get_input_embeddings()
    tied = is_tied(model, embed)
    embed.weight.copy_(quantize_table(embed.weight, mode).dequantize(embed.weight.dtype))
    if not tied and isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head.weight.copy_(quantize_table(model.lm_head.weight, mode).dequantize(model.lm_head.weight.dtype))


class TokenTable:
    """Emits the embedding lookup and the LM head of one model, sharing the quantized table when they are tied."""

    def __init__(self, b: GraphBuilder, model: nn.Module, embed: nn.Module, name: str, mode: str):
        self.b, self.model, self.embed, self.name, self.mode = b, model, embed, name, mode
        self.tied = is_tied(model, embed)
        if mode == "none":
            self.table = b.weight(f"{name}.weight", embed.weight)
        else:
            self.table = dequantized(b, quantize_table(embed.weight, mode), name, transpose=False)
        self.record = {"quantization": mode, "tied": self.tied, "embedding_weight":
                       f"{name}.weight" if mode == "none" else f"{name}.qweight"}
        if mode != "none":
            bits, group = _LAYOUT[mode]
            self.record.update(bits=bits, group_size=group)

    def lookup(self, ids: str) -> str:
        return self.b.op("Gather", [self.table, ids], name=self.name)

    def head(self, h: str, linear) -> str:
        """logits = h @ W_head^T; `linear(h, module, name)` emits an untied head."""
        if self.tied:
            # Tied: the table is read transposed (TensorRT folds a constant Transpose; ONNX Runtime gets a
            # MatMulNBits over the same packed table).
            wt = self.b.op("Transpose", [self.table], name="lm_head", perm=[1, 0])
            self.record["head_weight"] = self.record["embedding_weight"]
            return self.b.op("MatMul", [h, wt], name="lm_head")
        head = self.model.lm_head
        if self.mode == "none" or not isinstance(head, nn.Linear):
            self.record["head_weight"] = "lm_head.weight"
            return linear(h, head, "lm_head")
        w = dequantized(self.b, quantize_table(head.weight, self.mode), "lm_head", transpose=True)
        self.record["head_weight"] = "lm_head.qweight"
        y = self.b.op("MatMul", [h, w], name="lm_head")
        if head.bias is not None:
            y = self.b.op("Add", [y, self.b.weight("lm_head.bias", head.bias)], name="lm_head")
        return y
