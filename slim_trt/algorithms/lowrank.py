"""Low-rank adapters for the compression error E = W - W_c, so that W_c + L R ~ W (y = W_c x + L (R x)).

Plain SVD minimises ||E - L R||_F. SLiM-LoRA minimises the error the layer output actually sees: with
H = E[x x^T] approximated by its diagonal, ||(E - L R) x||^2 averages to sum_j ||(E - L R)[:, j]||^2 * s_j^2
with s_j = the RMS (L2 norm) of input channel j, i.e. ||(E - L R) diag(s)||_F^2. By Eckart-Young the best
rank-r L R in that norm is the truncated SVD of E diag(s) with the diag(s) taken back out of R.
"""
from __future__ import annotations

import math

import torch

from .qtensor import QuantizedTensor
from .quantize import absmax_scale, quantize


def rank_for(d_out: int, d_in: int, ratio: float, multiple: int = 1) -> int:
    """ceil(ratio * min(d_in, d_out)) rounded up to a multiple of `multiple`, then clamped to [1, min(d_in, d_out)]
    (so when min(d_in, d_out) is not itself a multiple, the cap wins)."""
    if d_out < 1 or d_in < 1:
        raise ValueError(f"layer dims must be >= 1, got {d_out} x {d_in}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"rank ratio must be in (0, 1], got {ratio}")
    if multiple < 1:
        raise ValueError(f"rank multiple must be >= 1, got {multiple}")
    full = min(d_in, d_out)
    r = math.ceil(round(ratio * full, 9))  # round first: 0.1 * 640 is 64.00000000000001 in floating point
    r = -(-r // multiple) * multiple
    return max(1, min(r, full))


def _check_rank(E: torch.Tensor, rank: int) -> None:
    if E.dim() != 2:
        raise ValueError(f"expected a 2-D error matrix [N, K], got {tuple(E.shape)}")
    if not 1 <= rank <= min(E.shape):
        raise ValueError(f"rank must be in [1, {min(E.shape)}] for a {tuple(E.shape)} matrix, got {rank}")


def svd_lowrank(E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD E ~ L R, L = U_r sqrt(S_r) [N, r], R = sqrt(S_r) V_r^T [r, K]."""
    _check_rank(E, rank)
    U, S, Vh = torch.linalg.svd(E.detach().to(torch.float32), full_matrices=False)
    root = S[:rank].sqrt()
    return (U[:, :rank] * root[None, :]).contiguous(), (root[:, None] * Vh[:rank]).contiguous()


def slim_lowrank(E: torch.Tensor, saliency: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SLiM-LoRA: E ~ L R minimising ||(E - L R) diag(s)||_F, s = per-input-channel saliency [K] (>= 0).

    The reference (Mohammad-Mozaffari/slim, lora.py `add_lora`) uses s = sqrt(scaler_row), with scaler_row the
    running mean over samples of ||x_j||_2^2: the per-channel L2 norm of the activations (Wanda's act_norm up to a
    constant factor), not the mean |x|. Only the ratios between the s_j matter, so act_norm can be passed as is.

    With E diag(s) = U S V^T we return L = U_r sqrt(S_r) and R = S_r^-1/2 U_r^T E. Where s_j > 0 this R equals
    "R' = sqrt(S_r) V_r^T un-scaled by 1/s_j"; where s_j == 0 (a dead channel) it is still defined: the
    projection of E's column onto the kept subspace, where dividing by s_j would give 0/0.
    """
    _check_rank(E, rank)
    E = E.detach().to(torch.float32)
    s = saliency.detach().to(torch.float32).reshape(-1)
    if s.shape[0] != E.shape[1]:
        raise ValueError(f"saliency must have one value per input channel ({E.shape[1]}), got {s.shape[0]}")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("saliency must be finite and >= 0")
    if float(s.max()) == 0.0:  # no channel was ever active: there is nothing to weight by
        return svd_lowrank(E, rank)
    U, S, _ = torch.linalg.svd(E * s[None, :], full_matrices=False)
    Ur, Sr = U[:, :rank], S[:rank]
    root = Sr.sqrt()
    # Directions below the numerical rank of E diag(s) carry no signal; give them R = 0 rather than 1/~0.
    live = Sr > S[0] * max(E.shape) * torch.finfo(torch.float32).eps
    inv_root = torch.where(live, 1.0 / torch.where(live, root, 1.0), 0.0)
    L = Ur * root[None, :]
    R = inv_root[:, None] * (Ur.T @ E)
    return L.contiguous(), R.contiguous()


def quantize_adapter(A: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantizedTensor:
    """AbsMax round-to-nearest of an adapter factor, one scale per `group_size` consecutive columns of each row."""
    return quantize(A, absmax_scale(A, bits, group_size), bits, group_size)


def weighted_error(E_approx: torch.Tensor, E: torch.Tensor, saliency: torch.Tensor) -> float:
    """||(E - E_approx) diag(s)||_F / ||E diag(s)||_F (0.0 when both are 0; 1.0 means "no adapter")."""
    s = saliency.detach().to(torch.float64).reshape(1, -1)
    E64 = E.detach().to(torch.float64)
    num = float(torch.linalg.norm((E64 - E_approx.detach().to(torch.float64)) * s))
    den = float(torch.linalg.norm(E64 * s))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
