"""GPTQ / OPTQ (Frantar et al. 2022): quantize W column by column, compensating each rounding error on the
columns not yet quantized through the inverse input Hessian. Reference: github.com/IST-DASLab/gptq."""
from __future__ import annotations

import torch

from .gram import gram
from .obs import sweep
from .qtensor import QuantizedTensor
from .zeropoint import GroupGrid


def accumulate_hessian(H: torch.Tensor | None, nsamples: int, x: torch.Tensor,
                       xtx: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs x [..., K] into the running H = 2/n * sum_t x_t x_t^T (float32).

    n counts TOKENS (every row of x reshaped to [-1, K]), so each token weighs the same however the caller
    batches them. The reference counts batch rows (sequences) instead; with equal-length windows that only
    multiplies H by the sequence length, and GPTQ / SparseGPT do not change when H is scaled (the damping is
    relative to mean(diag H)). Same update rule as the reference: H <- H * n/(n+t) + 2/(n+t) * X^T X.
    diag(H) = 2/n * sum_t x_tj^2, so Wanda's act_norm_j = sqrt(diag(H)_j * n / 2) if it is needed from H.
    xtx: X^T X of this batch when the caller already has it (layers that read the same input share it).
    """
    K = x.shape[-1]
    X = x.detach().reshape(-1, K).to(torch.float32)
    if H is None:
        H = torch.zeros(K, K, dtype=torch.float32, device=X.device)
    elif H.shape != (K, K):
        raise ValueError(f"running H has shape {tuple(H.shape)}, but x has {K} channels")
    t = X.shape[0]
    if t == 0:
        return H.clone(), nsamples
    total = nsamples + t
    return H.to(torch.float32) * (nsamples / total) + (2.0 / total) * (gram(X) if xtx is None else xtx), total


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    scale_method: str = "absmax",
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    static_groups: bool = False,
    grid: GroupGrid | None = None,
) -> QuantizedTensor:
    """GPTQ with lazy block updates and a Cholesky-factored inverse Hessian.

    group_size 0: one scale for the tensor, -1: one per row, both computed once from W before the sweep.
    G > 0: each group's scale is computed from the group's current (error-updated) weights when the sweep
    reaches its first column, or from W for all groups up front with static_groups (needed when the caller
    wants scales independent of the order of the sweep). scale_method "absmax" or "slim" (SLiM-Quant clip).
    mask (bool, True = keep): pruned weights are forced to q = 0 and their removal is compensated like a
    rounding error; scales are computed from the kept weights only.
    Input channels with H_jj == 0 (never active in calibration) are set to 0, as in the reference.
    grid (zeropoint.GroupGrid): zero-point grids per group (2-3 bit GPTQ, SliM-LLM); bits is then unused.
    """
    _, _, q, scale, zero = sweep(W, H, bits=bits, group_size=group_size, scale_method=scale_method, mask=mask,
                                 blocksize=blocksize, percdamp=percdamp, static_groups=static_groups, grid=grid)
    if grid is not None:
        return grid.quantized(q, scale, zero)
    return QuantizedTensor(q=q, scale=scale, bits=bits, group_size=group_size)
