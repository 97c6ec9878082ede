"""Pruning scores and masks (magnitude, Wanda; N:M and unstructured), all along the input dimension K.

Masks are bool with True = keep. Ties are broken deterministically by a stable sort: among equal scores the
lower column index ranks first (kept first for N:M, pruned first for unstructured).
"""
from __future__ import annotations

import torch

from ..config import Sparsity


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """|W| in float32."""
    return W.detach().to(torch.float32).abs()


def wanda_scores(W: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2, with act_norm [K] the L2 norm of input channel j over the calibration tokens."""
    if act_norm.dim() != 1 or act_norm.shape[0] != W.shape[1]:
        raise ValueError(f"act_norm must have shape [{W.shape[1]}] (one norm per input channel), "
                         f"got {tuple(act_norm.shape)}")
    return magnitude_scores(W) * act_norm.detach().to(torch.float32)[None, :]


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each row, every group of m consecutive columns keeps exactly its n highest scores."""
    rows, cols = scores.shape
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")
    if cols % m:
        raise ValueError(f"N:M sparsity along K needs K % m == 0, got K={cols}, m={m}")
    g = scores.detach().to(torch.float32).reshape(rows, cols // m, m)
    keep = torch.argsort(g, dim=2, descending=True, stable=True)[:, :, :n]
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool, device=scores.device)
    mask.scatter_(2, keep, True)
    return mask.reshape(rows, cols)


def pruned_count(total: int, ratio: float) -> int:
    """How many of `total` weights an unstructured `ratio` prunes: the nearest integer to ratio * total (Wanda
    floors, which turns 0.29 * 100 into 28 through floating-point error)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"unstructured ratio must be in [0, 1], got {ratio}")
    return int(round(ratio * total))


def unstructured_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the `ratio` fraction of each row with the lowest scores (Wanda's per-output comparison group)."""
    rows, cols = scores.shape
    k = pruned_count(cols, ratio)
    order = torch.argsort(scores.detach().to(torch.float32), dim=1, stable=True)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order[:, :k], False)
    return mask


def mask_for(scores: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """The keep-mask `sparsity` asks for, from `scores` (higher = more important)."""
    if sparsity.kind == "none":
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if sparsity.kind == "nm":
        return nm_mask(scores, sparsity.n, sparsity.m)
    if sparsity.kind == "unstructured":
        return unstructured_mask(scores, sparsity.ratio)
    raise ValueError(f"unknown sparsity kind {sparsity.kind!r}")


def prune(W: torch.Tensor, scores: torch.Tensor, sparsity: Sparsity) -> tuple[torch.Tensor, torch.Tensor]:
    """(W with the pruned weights set to 0, in float32; the keep-mask)."""
    if scores.shape != W.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} differs from weight shape {tuple(W.shape)}")
    mask = mask_for(scores, sparsity)
    return W.detach().to(torch.float32) * mask, mask


def _group_nonzeros(W_or_mask: torch.Tensor, m: int) -> torch.Tensor:
    rows, cols = W_or_mask.shape
    if cols % m:
        raise ValueError(f"N:M check along K needs K % m == 0, got K={cols}, m={m}")
    nz = W_or_mask if W_or_mask.dtype == torch.bool else W_or_mask != 0
    return nz.reshape(rows, cols // m, m).sum(dim=2)


def nm_violations(W_or_mask: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of m consecutive columns holding more than n non-zeros (or True entries)."""
    return int((_group_nonzeros(W_or_mask, m) > n).sum())


def is_nm(W_or_mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive columns holds at most n non-zeros (False when K % m != 0)."""
    if W_or_mask.shape[1] % m:
        return False
    return nm_violations(W_or_mask, n, m) == 0
