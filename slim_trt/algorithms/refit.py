"""Re-fit the base to what the adapters leave, alternating with the adapters (issue 7).

One-shot SLiM fits the adapters to the error of a base that was chosen without them. Once L R exists, the
base can do better: quantize W - L R instead of W (with the same mask and the same quantizer/scale rule, as the
reference code's Q(mask(W - L R))), then re-fit the adapters to the new error W - W_c. Each half-step is a
minimisation of (a proxy of) the same objective, so alternating them a few rounds is the classic low-rank +
sparse/quantized decomposition. The proxies differ (SLiM-LoRA weights by diag(s), the base rule by nothing or by
H; lowrank "hessian" uses H on both sides), so a round is kept only if the activation-weighted output error
tr(E H E^T) actually goes down.

Pure: tensors and a config in, tensors out.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..config import CompressConfig
from ..timing import phase
from .gptq import gptq_quantize
from .lowrank import gptq_adapters, hessian_lowrank, quantize_adapter, slim_lowrank, svd_lowrank
from .obs import sweep
from .qtensor import QuantizedTensor
from .fp8 import fp8_quantize, fp8_scale
from .quantize import quantize_weight
from .spqr import spqr_quantize
from .slimllm import grid_for

Factor = QuantizedTensor | torch.Tensor


def as_float(x: Factor) -> torch.Tensor:
    return x.dequantize() if isinstance(x, QuantizedTensor) else x


def base_on_mask(T: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, cfg: CompressConfig,
                 scale: torch.Tensor | None = None) -> Factor:
    """The base weight for target T with a fixed keep-mask, by the config's quantizer and scale rule.

    slim / absmax: scale chosen on the dense T (as SLiM chooses it before pruning), round to nearest, zero the
    pruned entries. gptq, or sparsegpt with a sparsity: the H-based OBS sweep with the mask fixed (for sparsegpt
    the mask is the one its first sweep chose). spqr: the SpQR sweep on the mask (outliers at kept positions only).
    bits 16: the masked T (or the OBS-compensated one for sparsegpt).
    scale: for sparsegpt, round on these scales instead of searching them again (CompressConfig.refit_scales);
    zero-point grids (and SliM-LLM's widths) are always fitted again for the new target.
    """
    T = T.detach().to(torch.float32)
    bits = None if cfg.bits == 16 else cfg.bits
    group = cfg.effective_group_size
    if cfg.quantizer == "spqr":  # pruned weights are compensated in the SpQR sweep itself
        return spqr_quantize(T, H, cfg.bits, group_size=group, outlier_share=cfg.outlier_share,
                             mask=None if cfg.sparsity_spec.kind == "none" else mask, blocksize=cfg.blocksize,
                             percdamp=cfg.percdamp)
    grid = grid_for(T, H, cfg)  # zero points / SliM-LLM: re-allocated for this target
    if cfg.pruner == "sparsegpt" and cfg.sparsity_spec.kind != "none":
        scale_method = cfg.scale_method
        W_new, _, q, scale, zero = sweep(T, H, bits=bits, group_size=group, scale_method=scale_method, mask=mask,
                                         blocksize=cfg.blocksize, percdamp=cfg.percdamp, grid=grid,
                                         scale=None if bits is None or grid is not None else scale)
        if grid is not None:
            return grid.quantized(q, scale, zero)
        return W_new if q is None else QuantizedTensor(q=q, scale=scale, bits=bits, group_size=group)
    if bits is None:
        return T * mask
    if cfg.quantizer == "gptq":
        return gptq_quantize(T, H, bits, group_size=group, scale_method="fp8" if cfg.weight_format == "fp8" else "absmax", mask=mask,
                             blocksize=cfg.blocksize, percdamp=cfg.percdamp, grid=grid)
    if cfg.weight_format == "fp8":  # round to nearest on the E4M3 grid (the dense FP8 reference), pruned = +0
        scale = fp8_scale(T, group)
        return QuantizedTensor(q=fp8_quantize(T * mask, scale), scale=scale, bits=bits, group_size=group)
    qt = quantize_weight(T, cfg.quantizer, bits, group)
    return QuantizedTensor(q=qt.q * mask.to(torch.int8), scale=qt.scale, bits=bits, group_size=qt.group_size)


def refit_base(T: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, cfg: CompressConfig,
               scale: torch.Tensor | None = None) -> tuple[Factor, torch.Tensor]:
    """A refit round's base for target T and its keep-mask: base_on_mask with `mask` (cfg.refit_mask "keep"), or
    (cfg.refit_mask "reselect") SparseGPT's sweep choosing the mask again on T by its OBS criterion
    w^2 / [H^-1]_jj^2, as the first sweep chose it on W. With adapters L R in the target, the mask is chosen for
    what the base has to carry once the adapters hold the rest."""
    if not cfg.reselects_mask:  # keep, or no SparseGPT sweep to choose the mask again in
        return base_on_mask(T, H, mask, cfg, scale), mask
    T = T.detach().to(torch.float32)
    bits = None if cfg.bits == 16 else cfg.bits
    grid = grid_for(T, H, cfg)
    W_new, keep, q, scale, zero = sweep(T, H, bits=bits, group_size=cfg.effective_group_size,
                                        scale_method=cfg.scale_method,
                                        sparsity=cfg.sparsity_spec, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                                        grid=grid, scale=None if bits is None or grid is not None else scale)
    if grid is not None:
        return grid.quantized(q, scale, zero), keep
    if q is None:
        return W_new, keep
    return QuantizedTensor(q=q, scale=scale, bits=bits, group_size=cfg.effective_group_size), keep


def fit_adapters(E: torch.Tensor, saliency: torch.Tensor, rank: int, cfg: CompressConfig,
                 H: torch.Tensor | None = None, timer=None) -> tuple[Factor, Factor]:
    """L, R for the error E by the config's low-rank method, quantized when the config asks for it.
    `H` (the layer's input second moment) is needed by lowrank "hessian" and used by adapter_quantizer "gptq"
    (without it the adapters are rounded to nearest). `timer` (slim_trt.timing.PhaseTimer) only measures."""
    with phase(timer, "adapter_svd"):
        if cfg.lowrank == "hessian":
            if H is None:
                raise ValueError("lowrank 'hessian' needs the layer's H")
            L, R = hessian_lowrank(E, H, rank, cfg.percdamp)
        elif cfg.lowrank == "slim":
            L, R = slim_lowrank(E, saliency, rank)
        else:
            L, R = svd_lowrank(E, rank)
    with phase(timer, "adapter_rounding"):
        return quantized_adapters(E, L, R, H, cfg)


def quantized_adapters(E: torch.Tensor, L: torch.Tensor, R: torch.Tensor, H: torch.Tensor | None,
                       cfg: CompressConfig) -> tuple[Factor, Factor]:
    """L, R fitted to E, stored as the config asks: float, rounded to nearest, or GPTQ-rounded with H."""
    if cfg.quantize_adapters and cfg.adapter_quantizer == "gptq" and H is not None:
        return gptq_adapters(E, L, R, H, cfg.adapter_bits, cfg.adapter_group_size, cfg.percdamp)
    if cfg.quantize_adapters:
        return (quantize_adapter(L, cfg.adapter_bits, cfg.adapter_group_size),
                quantize_adapter(R, cfg.adapter_bits, cfg.adapter_group_size))
    return L, R


def output_energy(E: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T): the squared output error over the tokens H was built from (up to H's normalisation)."""
    return max(float(((E @ H) * E).sum()), 0.0)


@dataclass
class RefitResult:
    weight: Factor
    lora_L: Factor
    lora_R: Factor
    energies: list[float] = field(default_factory=list)  # tr(E H E^T) before round 1, then after each kept round
    rounds_kept: int = 0
    mask: torch.Tensor | None = None  # the weight's keep-mask (a new one only with cfg.refit_mask "reselect")


def refit(W: torch.Tensor, H: torch.Tensor, saliency: torch.Tensor, weight: Factor, mask: torch.Tensor,
          lora_L: Factor, lora_R: Factor, cfg: CompressConfig, rounds: int, timer=None) -> RefitResult:
    """Up to `rounds` rounds of: base <- base_on_mask(W - L R), then (L, R) <- fit_adapters(W - base).

    The returned error is never above the input's, and the rank of the adapters never changes.
    cfg.refit_mask "reselect": each round's sweep chooses the mask again on W - L R (refit_base); the result's
    mask is that of the kept state.
    cfg.refit_scales "first": every round's base is rounded on the scales of `weight` (the first sweep's).
    cfg.refit_rounding "every": each round's adapters are rounded as the config stores them; the rounds stop at
    the first one that does not lower tr(E H E^T) (E = W - base - L R) and the previous state is kept.
    "last" (with quantized adapters): the adapters stay in float between rounds (the next base is fitted to the
    float L R); the rounds stop at the first one whose float error does not drop; the last state's adapters are
    then rounded once, and the result is kept only if it beats the input. Measured with refit_scales "first" on
    Gemma 3 270M (blocks 0/5/11/17, 32 x 512 windows): every one of the 28 layers ends with a lower output
    error than with "every"/"every" (1.5-1.7% lower block means), with 3 fewer adapter GPTQs per layer.
    `timer` (slim_trt.timing.PhaseTimer) only measures: each round is its phase "refit_round_K" (with "last",
    the final rounding is charged to the last round run).
    """
    W = W.detach().to(torch.float32)
    scale = weight.scale if cfg.refit_scales == "first" and isinstance(weight, QuantizedTensor) else None
    if cfg.refit_rounding == "last" and cfg.quantize_adapters:
        return _refit_round_last(W, H, saliency, weight, mask, lora_L, lora_R, cfg, rounds, scale, timer)
    rank = int(as_float(lora_R).shape[0])
    best = RefitResult(weight, lora_L, lora_R, mask=mask)
    err = output_energy(W - as_float(weight) - as_float(lora_L) @ as_float(lora_R), H)
    best.energies.append(err)
    for k in range(rounds):
        with phase(timer, f"refit_round_{k + 1}"):
            with phase(timer, "sweep"):
                base, new_mask = refit_base(W - as_float(best.lora_L) @ as_float(best.lora_R), H, best.mask, cfg,
                                            scale)
            E = W - as_float(base)
            L, R = fit_adapters(E, saliency, rank, cfg, H, timer)
            new_err = output_energy(E - as_float(L) @ as_float(R), H)
        if not new_err < err:
            break  # the next round would start from the same state and give the same answer
        best.weight, best.lora_L, best.lora_R, best.mask = base, L, R, new_mask
        best.energies.append(new_err)
        best.rounds_kept += 1
        err = new_err
    return best


def _refit_round_last(W, H, saliency, weight, mask, lora_L, lora_R, cfg: CompressConfig, rounds: int, scale,
                      timer) -> RefitResult:
    """refit with cfg.refit_rounding "last": energies = [input's, final] (the final one only when it is kept)."""
    rank = int(as_float(lora_R).shape[0])
    first = output_energy(W - as_float(weight) - as_float(lora_L) @ as_float(lora_R), H)
    best = RefitResult(weight, lora_L, lora_R, energies=[first], mask=mask)
    float_cfg = dataclasses.replace(cfg, quantize_adapters=False)
    cur_base, cur_L, cur_R, cur_mask = weight, as_float(lora_L), as_float(lora_R), mask
    err, kept, name = None, 0, None
    for k in range(rounds):
        name = f"refit_round_{k + 1}"
        with phase(timer, name):
            with phase(timer, "sweep"):
                base, new_mask = refit_base(W - cur_L @ cur_R, H, cur_mask, cfg, scale)
            E = W - as_float(base)
            L, R = fit_adapters(E, saliency, rank, float_cfg, H, timer)
            new_err = output_energy(E - L @ R, H)
        if err is not None and not new_err < err:
            break
        cur_base, cur_L, cur_R, cur_mask, err, kept = base, L, R, new_mask, new_err, kept + 1
    if kept == 0:
        return best
    with phase(timer, name):
        with phase(timer, "adapter_rounding"):
            E = W - as_float(cur_base)
            Lq, Rq = quantized_adapters(E, cur_L, cur_R, H, cfg)
        final = output_energy(E - as_float(Lq) @ as_float(Rq), H)
    if final < first:
        best.weight, best.lora_L, best.lora_R, best.rounds_kept, best.mask = cur_base, Lq, Rq, kept, cur_mask
        best.energies.append(final)
    return best
