"""Asymmetric calibration (GPTAQ, Li et al. 2025): fit each layer to the dense model's output, not to its own.

Sequential calibration gives layer l the inputs X of the already compressed layers before it and asks Ŵ X to
match W X: the error the earlier layers made is taken as given. The dense model computed W X̃ on its own inputs
X̃, and that is what the next layers expect. Minimising ||W X̃ - Ŵ X||² instead (tokens as columns) is the same
problem with another weight: the least-squares split of W X̃ over the row space of X gives

    ||W X̃ - Ŵ X||² = ||(W* - Ŵ) X||² + const,   W* = W X̃ X^T (X X^T)^-1 = W + W D H^-1,

with H = 2/n X X^T (the GPTQ Hessian) and D = 2/n (X̃ - X) X^T (the drift of the inputs, times the inputs). So
every compressor (SparseGPT, GPTQ, the adapters, the refit rounds) runs unchanged on the target W*, with the
same H. Written as W + W D H^-1 (not W C H^-1 with C = 2/n X̃ X^T) so that no drift leaves W exactly as it is:
the damping of H would otherwise shrink W along the directions the inputs barely excite.
"""
from __future__ import annotations

import torch

from .lowrank import hessian_root


def accumulate_drift(D: torch.Tensor | None, nsamples: int, X: torch.Tensor, X_ref: torch.Tensor) -> torch.Tensor:
    """Fold a batch into the running D = 2/n sum_t (x̃_t - x_t) x_t^T, with the same token weighting as
    gptq.accumulate_hessian (nsamples: tokens before this batch). X, X_ref: float32 rows [t, K] of the same
    tokens, X as the compressed model feeds the layer and X_ref as the dense model does."""
    if X.shape != X_ref.shape:
        raise ValueError(f"the dense model's inputs {tuple(X_ref.shape)} do not pair with the compressed model's "
                         f"{tuple(X.shape)}")
    t = X.shape[0]
    batch = (X_ref - X).T @ X
    if D is None:
        return batch * (2.0 / t) if t else batch
    total = nsamples + t
    return D * (nsamples / total) + (2.0 / total) * batch


def source_ridge(H: torch.Tensor, s: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The ridge percdamp x mean(diag H) of the layer's inputs as the source model computes them, x = x_s * s,
    expressed for the inputs x_s = x / s the layer reads after SmoothQuant: percdamp * mean(s^2 diag H) / s^2 per
    channel. With it the step is the one the unsmoothed layer would take (SmoothQuant is an exact
    reparametrisation, so it should not move the step); a ridge relative to the smoothed H is weaker on most
    channels, as SmoothQuant evens the diagonal out."""
    s2 = s.detach().to(torch.float64) ** 2
    return percdamp * float((H.detach().to(torch.float64).diagonal() * s2).mean()) / s2


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, percdamp: float = 0.01,
                      alpha: float = 1.0, ridge: torch.Tensor | None = None) -> torch.Tensor:
    """W + alpha W D (H + damp I)^-1 [N, K] in float32; alpha 1: the weight whose output on the compressed model's
    inputs best matches the dense model's output on its own (module docstring), alpha < 1 a step toward it (the
    full step also shrinks W where the drift looks like noise, as any regression on noisy inputs does). W when H
    is all zero. ridge: a per-channel ridge [K] in place of percdamp x mean(diag H) (source_ridge)."""
    W = W.detach().to(torch.float32)
    if ridge is None:
        root = hessian_root(H, percdamp)  # memoised: the sweeps that follow factorise the same H
    elif float(H.diagonal().sum()) <= 0.0:
        root = None
    else:
        root = torch.linalg.cholesky(H.detach().to(torch.float64) + torch.diag(ridge.to(torch.float64)))
        root = root.to(torch.float32)
    if root is None:
        return W.clone()
    Z = W @ D.to(torch.float32)  # [N, K]
    # (H_d^-1 Z^T)^T = Z H_d^-1, H_d symmetric
    return W + alpha * torch.cholesky_solve(Z.T.contiguous(), root).T
