"""One weight matrix through the SLiM pipeline: quantize -> prune -> low-rank adapters on the total error
(-> optional base/adapter refit rounds), and the block-level rank allocation by sensitivity.

Pure: a weight, its input statistics and a config in; integer tensors, a mask and adapters out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import CompressConfig
from ..errors import SlimError
from ..timing import phase
from .lowrank import hessian_root, rank_for
from .lrc import ActErrorMoments, LRCSystem, lrc_fit, lrc_rel_error
from .obs import one_thread
from .prune import magnitude_scores, prune, pruned_count, wanda_scores
from .qtensor import QuantizedTensor
from .refit import base_on_mask, fit_adapters, refit
from .slimllm import grid_for
from .sparsegpt import sparsegpt
from .spqr import DEFAULT_STAT_BITS, DEFAULT_STAT_GROUP, OUTLIER_BITS, SpQRTensor, statistic_bits


@dataclass
class CompressedWeight:
    weight: QuantizedTensor | torch.Tensor  # a float tensor when bits == 16 (no quantization)
    mask: torch.Tensor | None  # bool keep-mask [N, K], None when dense
    lora_L: QuantizedTensor | torch.Tensor | None
    lora_R: QuantizedTensor | torch.Tensor | None
    rel_error_base: float  # ||(W - W_c) X|| / ||W X|| over the calibration tokens
    rel_error: float  # the same with the adapters added
    refit_rounds: int = 0  # base/adapter refit rounds that were kept (CompressConfig.refit_rounds)

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


def compress_base(W: torch.Tensor, H: torch.Tensor, act_norm: torch.Tensor,
                  cfg: CompressConfig) -> tuple[QuantizedTensor | torch.Tensor, torch.Tensor]:
    """Quantize and prune W: (base weight, bool keep-mask [N, K], all True when dense)."""
    W = W.detach().to(torch.float32)
    sp = cfg.sparsity_spec
    if cfg.quantizer == "spqr" and cfg.pruner == "sparsegpt" and sp.kind != "none":
        # SpQR needs the mask before its own sweep (outliers only at kept positions): SparseGPT's mask from a
        # prune-only sweep, then the SpQR sweep on that mask (base_on_mask).
        _, mask, _ = sparsegpt(W, H, sp, bits=None, blocksize=cfg.blocksize, percdamp=cfg.percdamp)
        return base_on_mask(W, H, mask, cfg), mask
    if cfg.pruner == "sparsegpt" and sp.kind != "none":
        # SparseGPT prunes and (when asked) GPTQ-quantizes jointly, column by column.
        bits = None if cfg.bits == 16 else cfg.bits
        scale_method = cfg.scale_method
        W_c, mask, qt = sparsegpt(W, H, sp, bits=bits, group_size=cfg.effective_group_size,
                                  scale_method=scale_method, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                                  grid=grid_for(W, H, cfg))
        return (qt if qt is not None else W_c), mask
    # The mask is chosen from the original weights (more information than the quantized ones); the
    # quantization scale is chosen on the dense weights, before pruning, as in SLiM.
    scores = wanda_scores(W, act_norm) if cfg.pruner == "wanda" else magnitude_scores(W)
    _, mask = prune(W, scores, sp)
    return base_on_mask(W, H, mask, cfg), mask


def compress_weight(W: torch.Tensor, H: torch.Tensor, act_norm: torch.Tensor, saliency: torch.Tensor,
                    cfg: CompressConfig, *, rank: int | None = None,
                    base: tuple[QuantizedTensor | torch.Tensor, torch.Tensor] | None = None,
                    act: ActErrorMoments | None = None, timer=None) -> CompressedWeight:
    """quantize -> prune -> adapters (-> refit rounds). `rank` overrides the config's rank (sensitivity
    allocation); `base` is a (weight, mask) pair from compress_base already computed by the caller.

    act: the moments of the layer's activation-quantization error (W8A8). The errors reported then include it
    (lrc.lrc_rel_error), and lowrank "lrc" fits base and adapters to that objective (lrc.py); the other
    lowrank methods fit to the weight error only, as without act.

    timer: a slim_trt.timing.PhaseTimer that only measures (phases sweep, adapter_svd, adapter_rounding,
    refit_round_K); None measures nothing.

    Runs on one CPU thread (obs.one_thread): the sweeps, factorisations and SVDs of one layer are sequences of
    small ops and LAPACK calls that barely gain from a second core and collapse when the cores are shared (2
    threads on 2 cores at load 10-15: 240-330 s for Gemma 3 270M's block 0, 30 s on one thread). The compressor
    uses the other cores by compressing several layers at once (compression/layer_pool.py)."""
    with one_thread():
        return _compress_weight(W, H, act_norm, saliency, cfg, rank, base, act, timer)


def _compress_weight(W, H, act_norm, saliency, cfg: CompressConfig, rank, base, act, timer) -> CompressedWeight:
    W = W.detach().to(torch.float32)
    if cfg.lowrank == "lrc":
        if act is None:
            raise ValueError("lowrank 'lrc' needs the activation-quantization moments (act)")
        return _compress_lrc(W, H, act_norm, cfg, act, rank, timer)
    with phase(timer, "sweep"):
        weight, mask = base if base is not None else compress_base(W, H, act_norm, cfg)
    E = W - _as_float(weight)
    base_q = _as_float(weight)
    base_err = output_rel_error(E, W, H)
    L = R = None
    rounds = 0
    r = rank if rank is not None else rank_for(W.shape[0], W.shape[1], cfg.rank_ratio, cfg.rank_multiple)
    if cfg.lowrank != "none" and r > 0:  # rank 0: the bits budget left no room for adapters (plan_ranks)
        L, R = fit_adapters(E, saliency, r, cfg, H, timer)
        if cfg.refit_rounds:
            res = refit(W, H, saliency, weight, mask, L, R, cfg, cfg.refit_rounds, timer)
            weight, L, R, rounds, mask = res.weight, res.lora_L, res.lora_R, res.rounds_kept, res.mask
            E = W - _as_float(weight)
        E = E - _as_float(L) @ _as_float(R)
    if cfg.sparsity_spec.kind == "none":
        mask = None
    rel_error = output_rel_error(E, W, H)
    if act is not None:  # the same layers, measured with their quantized inputs
        base_err = lrc_rel_error(W, base_q, None, H, act)
        rel_error = base_err if L is None else lrc_rel_error(W, _as_float(weight), _as_float(L) @ _as_float(R), H, act)
    return CompressedWeight(weight=weight, mask=mask, lora_L=L, lora_R=R, rel_error_base=base_err,
                            rel_error=rel_error, refit_rounds=rounds)


def _compress_lrc(W, H, act_norm, cfg: CompressConfig, act: ActErrorMoments, rank: int | None,
                  timer=None) -> CompressedWeight:
    """LRC: the base fitted for Q(x) (target base_target, Hessian H_qq), adapters on E_eff, refit rounds."""
    system = LRCSystem(H, act)
    with phase(timer, "sweep"):
        weight, mask = compress_base(system.base_target(W, None), act.H_qq, act_norm, cfg)
    r = rank if rank is not None else rank_for(W.shape[0], W.shape[1], cfg.rank_ratio, cfg.rank_multiple)
    with phase(timer, "lrc_fit"):
        res = lrc_fit(W, system, cfg, weight, mask, r, cfg.refit_rounds)
    den = float(((W @ H) * W).sum())
    rel = [(j / den) ** 0.5 if den > 0 else 0.0 for j in res.objectives]
    return CompressedWeight(weight=res.weight, mask=None if cfg.sparsity_spec.kind == "none" else res.mask,
                            lora_L=res.lora_L, lora_R=res.lora_R, rel_error_base=rel[0], rel_error=rel[-1],
                            refit_rounds=res.rounds_kept)


# ---------------------------------------------------------------------------------------------------------------
# Sensitivity-based ranks: one block's uniform adapter budget, spent where the error is
# ---------------------------------------------------------------------------------------------------------------

def error_spectrum(W: torch.Tensor, E: torch.Tensor, saliency: torch.Tensor, lowrank: str,
                   H: torch.Tensor | None = None, percdamp: float = 0.01) -> torch.Tensor:
    """Singular values of the error in the norm the adapters minimise, relative to the weight in that norm:
    svd(E diag(s)) / ||W diag(s)||_F for SLiM-LoRA, svd(E C) / ||W C||_F (C C^T = H) for "hessian",
    svd(E) / ||W||_F for plain SVD. The sum of the squares past rank r is the squared relative error rank-r
    adapters leave (Eckart-Young)."""
    W, E = W.detach().to(torch.float32), E.detach().to(torch.float32)
    C = hessian_root(H, percdamp) if lowrank == "hessian" and H is not None else None
    if C is not None:
        W, E = W @ C, E @ C
    elif lowrank == "slim" and float(saliency.max()) > 0:  # slim_lowrank falls back to plain SVD on s == 0
        s = saliency.detach().to(torch.float32).reshape(1, -1)
        W, E = W * s, E * s
    den = float(torch.linalg.norm(W))
    S = torch.linalg.svdvals(E)
    return S / den if den > 0 else torch.zeros_like(S)


def allocate_ranks(spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int,
                   caps: dict[str, int], multiple: int = 1) -> dict[str, int]:
    """Greedy ranks under a parameter budget: sum_i r_i * costs[i] <= budget, r_i <= caps[i].

    Every layer starts at min(multiple, cap); then rank is handed out `multiple` at a time to the layer whose
    next singular values remove the most squared (normalised) error per parameter, sum(sigma^2) / (step * cost),
    skipping steps that no longer fit the budget. Squared because the errors of different layers add up as
    energies; with decreasing singular values the gains diminish, so greedy is the optimum up to the last step.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    names = sorted(spectra)
    ranks = {n: min(multiple, caps[n]) for n in names}
    spent = sum(ranks[n] * costs[n] for n in names)
    if spent > budget:
        raise ValueError(f"the budget {budget} does not cover the minimum ranks (cost {spent})")
    energy = {n: spectra[n].detach().to(torch.float64).square() for n in names}

    def next_step(n: str) -> tuple[float, int] | None:
        step = min(multiple, caps[n] - ranks[n])
        if step <= 0:
            return None
        gain = float(energy[n][ranks[n]:ranks[n] + step].sum())
        return gain / (step * costs[n]), step

    while True:
        best = None
        for n in names:  # a handful of layers per block: a linear scan is clearer than a heap
            s = next_step(n)
            if s is not None and spent + s[1] * costs[n] <= budget and (best is None or s[0] > best[1]):
                best = (n, s[0], s[1])
        if best is None or best[1] <= 0.0:
            return ranks
        n, _, step = best
        ranks[n] += step
        spent += step * costs[n]


def plan_block_ranks(weights: dict[str, torch.Tensor], bases: dict[str, QuantizedTensor | torch.Tensor],
                     saliencies: dict[str, torch.Tensor], cfg: CompressConfig,
                     hessians: dict[str, torch.Tensor] | None = None,
                     ranks: dict[str, int] | None = None) -> dict[str, int]:
    """Ranks for the linears of one block: the block's uniform budget sum_i r_i (N_i + K_i), r_i from `ranks`
    (the model-wide plan, see plan_ranks) or rank_for, shared out by allocate_ranks on the errors the bases
    leave."""
    spectra, costs, caps, budget = {}, {}, {}, 0
    for n, W in weights.items():
        N, K = W.shape
        E = W.detach().to(torch.float32) - _as_float(bases[n])
        spectra[n] = error_spectrum(W, E, saliencies[n], cfg.lowrank, (hessians or {}).get(n), cfg.percdamp)
        costs[n], caps[n] = N + K, min(N, K)
        r = (ranks or {}).get(n)
        budget += (r if r is not None else rank_for(N, K, cfg.rank_ratio, cfg.rank_multiple)) * (N + K)
    return allocate_ranks(spectra, costs, budget, caps, cfg.rank_multiple)


def storage_bits(cw: CompressedWeight, sparsity_kind: str, n: int = 2, m: int = 4) -> dict:
    """Bits the deployed layer stores, counted exactly (see docs/recipes.md, "Bits per parameter").

    base: kept values x bits + sparsity metadata (N:M: ceil(log2 m) bits per kept value, as NVIDIA's 2:4 format
    stores a 2-bit index per kept value; unstructured: a 1-bit mask per weight) + 16-bit scales (+ one zero point
    per group as wide as the group's codes; SliM-LLM groups count their own widths: information bits).
    adapters: (N + K) x r x adapter bits (16 when not quantized) + 16-bit adapter scales.
    SpQR: its statistics as the paper counts them (SpQRTensor.scale_bits) + 32 bits per outlier.
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
    codes = kept * wbits
    if isinstance(cw.weight, SpQRTensor):  # the paper's count: 32 bits per fp16 outlier
        codes += cw.weight.outlier_bits()
    elif isinstance(cw.weight, QuantizedTensor) and cw.weight.zero is not None:
        # Zero-point grids count their information bits: each group's own width (SliM-LLM), over the kept share.
        codes = cw.weight.code_bits() * kept // numel
    base = codes + meta + scales
    adapters = 0
    for f in (cw.lora_L, cw.lora_R):
        if f is None:
            continue
        adapters += f.q.numel() * f.bits + f.scale_bits() if isinstance(f, QuantizedTensor) else f.numel() * 16
    return {"params": numel, "base_bits": base, "adapter_bits": adapters}


# ---------------------------------------------------------------------------------------------------------------
# The bits budget: ranks planned from the layer shapes before anything is computed
# ---------------------------------------------------------------------------------------------------------------

def _groups(cols: int, group_size: int, rows: int) -> int:
    """How many scales a [rows, cols] tensor quantized with `group_size` stores (see qtensor)."""
    if group_size == 0:
        return 1
    if group_size == -1:
        return rows
    return rows * -(-cols // group_size)


def layer_bits(N: int, K: int, rank: int, cfg: CompressConfig) -> tuple[int, int]:
    """(base bits, adapter bits) an N x K layer will store with `cfg` and `rank`: storage_bits from the shapes
    alone (for unstructured sparsity the kept count is the mask's nominal one)."""
    sp = cfg.sparsity_spec
    numel = N * K
    if sp.kind == "nm":
        kept, meta = numel * sp.n // sp.m, numel * sp.n // sp.m * max(1, (sp.m - 1).bit_length())
    elif sp.kind == "unstructured":
        kept, meta = N * (K - pruned_count(K, sp.ratio)), numel
    else:
        kept, meta = numel, 0
    if cfg.quantizer == "spqr":  # bilevel statistics and the outlier budget (its nominal maximum)
        base = (kept * cfg.bits + meta + statistic_bits(N, K, cfg.effective_group_size, DEFAULT_STAT_BITS,
                                                        DEFAULT_STAT_GROUP)
                + OUTLIER_BITS * math.floor(cfg.outlier_share * kept))
    elif cfg.bits == 16:
        base = kept * 16 + meta
    else:
        base = kept * cfg.bits + meta + 16 * _groups(K, cfg.effective_group_size, N)
    if cfg.bits != 16 and cfg.zero_points:  # one zero point per group, as wide as its codes (SliM-LLM: N on average)
        base += cfg.bits * _groups(K, cfg.effective_group_size, N)
    if cfg.lowrank == "none" or rank == 0:
        return base, 0
    if not cfg.quantize_adapters:
        return base, (N + K) * rank * 16
    g = cfg.adapter_group_size
    return base, (N + K) * rank * cfg.adapter_bits + 16 * (_groups(rank, g, N) + _groups(K, g, rank))


def bits_per_param(shapes: dict[str, tuple[int, int]], ranks: dict[str, int], cfg: CompressConfig) -> float:
    """Bits per parameter of the compressed layers (adapters included), as the formula in docs/recipes.md counts them."""
    total = sum(sum(layer_bits(N, K, ranks.get(n, 0), cfg)) for n, (N, K) in shapes.items())
    params = sum(N * K for N, K in shapes.values())
    return total / params if params else 0.0


def plan_ranks(shapes: dict[str, tuple[int, int]], cfg: CompressConfig) -> tuple[dict[str, int], float]:
    """Adapter ranks for every compressed layer {name: (N, K)}, and the rank ratio they come from.

    rank_i = rank_for(N_i, K_i, ratio, cfg.rank_multiple) with ratio = cfg.rank_ratio, unless that takes the
    model past cfg.max_bits bits/param: then ratio is the largest value below it whose ranks fit (bits grow with
    the ratio, so a bisection over the ratios where some rank changes finds it). The budget is a rule over the
    whole model, not per layer, so the advertised bits hold on any shape while each layer keeps the same share.
    """
    if cfg.lowrank == "none" or not shapes:
        return {n: 0 for n in shapes}, 0.0

    def ranks_at(ratio: float) -> dict[str, int]:
        return {n: rank_for(N, K, ratio, cfg.rank_multiple) for n, (N, K) in shapes.items()}

    ranks = ranks_at(cfg.rank_ratio)
    if cfg.max_bits is None or bits_per_param(shapes, ranks, cfg) <= cfg.max_bits:
        return ranks, cfg.rank_ratio
    fulls = {min(N, K) for N, K in shapes.values()}
    ratios = sorted({r / f for f in fulls for r in range(1, f + 1) if r / f < cfg.rank_ratio})
    lo, hi = 0, len(ratios) - 1  # invariant: ratios[i] fits for i < lo, does not for i > hi
    while lo <= hi:
        mid = (lo + hi) // 2
        if bits_per_param(shapes, ranks_at(ratios[mid]), cfg) <= cfg.max_bits:
            lo = mid + 1
        else:
            hi = mid - 1
    if hi < 0:
        # Not even rank 1 fits: on small shapes (a 64-wide toy model) one rank costs more than the budget leaves
        # over a dense INT4 base. Lowering the ratio ends at no adapters, if the base alone fits; else refuse.
        none = {n: 0 for n in shapes}
        floor = bits_per_param(shapes, none, cfg)
        if floor > cfg.max_bits:
            raise SlimError(f"--max-bits {cfg.max_bits:g} cannot be met: this recipe stores {floor:.3f} bits/param "
                            f"without any adapters; raise --max-bits, use fewer weight bits, or pass --max-bits none")
        if cfg.lowrank == "lrc":  # LRC is its adapters: none would leave the activation error uncorrected
            raise SlimError(f"--max-bits {cfg.max_bits:g} leaves no room for rank-1 LRC adapters on these shapes: "
                            f"raise --max-bits or pass --max-bits none")
        return none, 0.0
    return ranks_at(ratios[hi]), ratios[hi]
