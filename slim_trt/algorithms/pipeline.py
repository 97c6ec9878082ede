"""One weight matrix through the SLiM pipeline: quantize -> prune -> low-rank adapters on the total error.

Pure: a weight, its input statistics and a config in; integer tensors, a mask and adapters out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import CompressConfig
from .gptq import gptq_quantize
from .lowrank import quantize_adapter, rank_for, slim_lowrank, svd_lowrank
from .prune import magnitude_scores, prune, wanda_scores
from .qtensor import QuantizedTensor
from .quantize import quantize_weight
from .sparsegpt import sparsegpt


@dataclass
class CompressedWeight:
    weight: QuantizedTensor | torch.Tensor  # a float tensor when bits == 16 (no quantization)
    mask: torch.Tensor | None  # bool keep-mask [N, K], None when dense
    lora_L: QuantizedTensor | torch.Tensor | None
    lora_R: QuantizedTensor | torch.Tensor | None
    rel_error_base: float  # ||(W - W_c) X|| / ||W X|| over the calibration tokens
    rel_error: float  # the same with the adapters added

    def base_float(self) -> torch.Tensor:
        w = self.weight
        return w.dequantize() if isinstance(w, QuantizedTensor) else w


def output_rel_error(E: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """sqrt(tr(E H E^T) / tr(W H W^T)): the relative output error over the tokens H was built from."""
    num = float(((E @ H) * E).sum())
    den = float(((W @ H) * W).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def _as_float(x):
    return x.dequantize() if isinstance(x, QuantizedTensor) else x


def compress_weight(W: torch.Tensor, H: torch.Tensor, act_norm: torch.Tensor, saliency: torch.Tensor,
                    cfg: CompressConfig) -> CompressedWeight:
    W = W.detach().to(torch.float32)
    sp = cfg.sparsity_spec
    group = cfg.effective_group_size
    bits = None if cfg.bits == 16 else cfg.bits
    scale_method = "slim" if cfg.quantizer == "slim" else "absmax"

    if cfg.pruner == "sparsegpt" and sp.kind != "none":
        # SparseGPT prunes and (when asked) GPTQ-quantizes jointly, column by column.
        W_c, mask, qt = sparsegpt(W, H, sp, bits=bits, group_size=group, scale_method=scale_method,
                                  blocksize=cfg.blocksize, percdamp=cfg.percdamp)
        weight = qt if qt is not None else W_c
    else:
        # The mask is chosen from the original weights (more information than the quantized ones); the
        # quantization scale is chosen on the dense weights, before pruning, as in SLiM.
        scores = wanda_scores(W, act_norm) if cfg.pruner == "wanda" else magnitude_scores(W)
        _, mask = prune(W, scores, sp)
        if bits is None:
            weight = W * mask
        elif cfg.quantizer == "gptq":
            weight = gptq_quantize(W, H, bits, group_size=group, scale_method="absmax", mask=mask,
                                   blocksize=cfg.blocksize, percdamp=cfg.percdamp)
        else:
            qt = quantize_weight(W, cfg.quantizer, bits, group)
            weight = QuantizedTensor(q=qt.q * mask.to(torch.int8), scale=qt.scale, bits=bits,
                                     group_size=qt.group_size)
    if sp.kind == "none":
        mask = None

    W_c = _as_float(weight)
    E = W - W_c
    base_err = output_rel_error(E, W, H)
    L = R = None
    if cfg.lowrank != "none":
        r = rank_for(W.shape[0], W.shape[1], cfg.rank_ratio, cfg.rank_multiple)
        L, R = slim_lowrank(E, saliency, r) if cfg.lowrank == "slim" else svd_lowrank(E, r)
        if cfg.quantize_adapters:
            L = quantize_adapter(L, cfg.adapter_bits, cfg.adapter_group_size)
            R = quantize_adapter(R, cfg.adapter_bits, cfg.adapter_group_size)
        E = E - _as_float(L) @ _as_float(R)
    return CompressedWeight(weight=weight, mask=mask, lora_L=L, lora_R=R, rel_error_base=base_err,
                            rel_error=output_rel_error(E, W, H))


def storage_bits(cw: CompressedWeight, sparsity_kind: str, n: int = 2, m: int = 4) -> dict:
    """Bits the deployed layer stores, counted exactly (see README "Bits per parameter").

    base: kept values x bits + sparsity metadata (N:M: ceil(log2 m) bits per kept value, as NVIDIA's 2:4 format
    stores a 2-bit index per kept value; unstructured: a 1-bit mask per weight) + 16-bit scales.
    adapters: (N + K) x r x adapter bits (16 when not quantized) + 16-bit adapter scales.
    """
    N, K = cw.weight.shape
    numel = N * K
    wbits = cw.weight.bits if isinstance(cw.weight, QuantizedTensor) else 16
    if sparsity_kind == "nm":
        kept = numel * n // m
        meta = kept * max(1, (m - 1).bit_length())
    elif sparsity_kind == "unstructured":
        kept = int(cw.mask.sum()) if cw.mask is not None else numel
        meta = numel
    else:
        kept, meta = numel, 0
    scales = cw.weight.scale_bits() if isinstance(cw.weight, QuantizedTensor) else 0
    base = kept * wbits + meta + scales
    adapters = 0
    for f in (cw.lora_L, cw.lora_R):
        if f is None:
            continue
        adapters += f.q.numel() * f.bits + f.scale_bits() if isinstance(f, QuantizedTensor) else f.numel() * 16
    return {"params": numel, "base_bits": base, "adapter_bits": adapters}
