"""Low-rank adapters for the compression error E = W - W_c, so that W_c + L R ~ W (y = W_c x + L (R x)).

Plain SVD minimises ||E - L R||_F. SLiM-LoRA minimises the error the layer output actually sees: with
H = E[x x^T] approximated by its diagonal, ||(E - L R) x||^2 averages to sum_j ||(E - L R)[:, j]||^2 * s_j^2
with s_j = the RMS (L2 norm) of input channel j, i.e. ||(E - L R) diag(s)||_F^2. By Eckart-Young the best
rank-r L R in that norm is the truncated SVD of E diag(s) with the diag(s) taken back out of R.

The diagonal is an approximation: input channels are correlated, and H's off-diagonal terms are as large as the
diagonal on real activations. `hessian_lowrank` keeps all of H: with H = C C^T (Cholesky),
||(E - L R) X||^2 = ||(E - L R) C||_F^2 and the best rank-r L R is U_r U_r^T E, U_r the top left singular
vectors of E C. Same cost (one SVD of an N x K matrix, plus one K x K Cholesky), never a worse output error.
"""
from __future__ import annotations

import math

import torch

from .memo import per_tensor
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
    return _factors_in_metric(E, E * s[None, :], rank)


def top_singular(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r [N, r], S_r [r]): the top `rank` left singular vectors and values of A [N, K], from the eigenvectors
    of its Gram matrix on the smaller side (A A^T or A^T A, in float64), not from a full SVD.

    Same subspace and values as torch.linalg.svd up to rounding (the signs of the vectors may differ, which
    L R = U_r U_r^T E does not see); 2-5x faster on the layer shapes here (one GEMM and a symmetric eigensolver
    on min(N, K)^2 instead of the bidiagonalisation of N x K). float64 keeps the squared singular values exact
    far below the float32 noise floor of A itself (sigma_i / sigma_1 down to ~1e-7)."""
    N, K = A.shape
    A64 = A.to(torch.float64)
    if N <= K:
        w, V = torch.linalg.eigh(A64 @ A64.T)
        w, U = w.flip(0)[:rank].clamp_min(0.0), V.flip(1)[:, :rank]
        S = w.sqrt()
    else:
        w, V = torch.linalg.eigh(A64.T @ A64)
        w, Vr = w.flip(0)[:rank].clamp_min(0.0), V.flip(1)[:, :rank]
        S = w.sqrt()
        U = (A64 @ Vr) / torch.where(S > 0, S, 1.0)[None, :]  # A v_i = s_i u_i
    return U.to(A.dtype), S.to(A.dtype)


def _factors_in_metric(E: torch.Tensor, EC: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r L R for ||(E - L R) C||_F given EC = E C (C invertible): L R = U_r U_r^T E with U_r the
    top left singular vectors of E C, split as L = U_r sqrt(S_r), R = S_r^-1/2 U_r^T E so that both factors
    have the same scale (what the 4-bit adapter quantizer wants)."""
    Ur, Sr = top_singular(EC, rank)
    root = Sr.sqrt()
    # Directions below the numerical rank of E C carry no signal; give them R = 0 rather than 1/~0.
    live = Sr > Sr[0] * max(E.shape) * torch.finfo(torch.float32).eps
    inv_root = torch.where(live, 1.0 / torch.where(live, root, 1.0), 0.0)
    L = Ur * root[None, :]
    R = inv_root[:, None] * (Ur.T @ E)
    return L.contiguous(), R.contiguous()


@per_tensor
def hessian_root(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor | None:
    """Lower-triangular C with C C^T = H + damp I (damp = percdamp x mean diagonal, raised x10 until the
    Cholesky succeeds, as GPTQ does for a singular H); None when H is all zero (no tokens reached the layer)."""
    H = H.detach().to(torch.float64)
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H must be finite")
    mean_diag = float(H.diagonal().mean())
    if mean_diag <= 0.0:
        return None
    damp = max(percdamp, 1e-6) * mean_diag
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(8):
        C, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            return C.to(torch.float32)
        damp *= 10.0
    raise ValueError("H is not positive semi-definite even after damping")


def hessian_lowrank(E: torch.Tensor, H: torch.Tensor, rank: int,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """E ~ L R minimising the layer's output error ||(E - L R) X||_F^2 = tr((E - L R) H (E - L R)^T) with the
    full input second moment H [K, K] (lightly damped, as GPTQ damps it), not only its diagonal."""
    _check_rank(E, rank)
    E = E.detach().to(torch.float32)
    if H.shape != (E.shape[1], E.shape[1]):
        raise ValueError(f"H must be [{E.shape[1]}, {E.shape[1]}] for a {tuple(E.shape)} error, got {tuple(H.shape)}")
    C = hessian_root(H, percdamp)
    if C is None:
        return svd_lowrank(E, rank)
    return _factors_in_metric(E, E @ C, rank)


def quantize_adapter(A: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantizedTensor:
    """AbsMax round-to-nearest of an adapter factor, one scale per `group_size` consecutive columns of each row."""
    return quantize(A, absmax_scale(A, bits, group_size), bits, group_size)


def gptq_adapters(E: torch.Tensor, L: torch.Tensor, R: torch.Tensor, H: torch.Tensor, bits: int = 4,
                  group_size: int = 128, percdamp: float = 0.01) -> tuple[QuantizedTensor, QuantizedTensor]:
    """Quantize adapters for the error E [N, K] so that the layer output, not the factors, stays close.

    R [r, K] reads the layer input x exactly as a linear layer does, so GPTQ with the layer's H is the
    output-aware way to round it (each row of R is one "output channel"; L's columns only rescale them). With
    R_q fixed, the best L is the least-squares L = E H R_q^T (R_q H R_q^T)^-1, which also absorbs part of R's
    rounding; L then reads R_q x, whose second moment is R_q H R_q^T, and is rounded by GPTQ with that.
    Round-to-nearest of both factors loses most of what the adapters recover at rank 0.2 (tests/algorithms);
    this keeps nearly all of it, on the same grid and with the same storage (AbsMax group scales).
    """
    from .gptq import gptq_quantize

    E, L, R, H = (t.detach().to(torch.float32) for t in (E, L, R, H))
    Rq = gptq_quantize(R, H, bits, group_size=group_size, percdamp=percdamp)
    Rf = Rq.dequantize()
    H_r = Rf @ H @ Rf.T  # [r, r]: the second moment of R_q x
    damp = percdamp * float(H_r.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny))
    eye = torch.eye(H_r.shape[0], device=H_r.device)
    L_new = torch.linalg.solve((H_r + damp * eye).double(), (Rf @ H @ E.T).double()).T.to(torch.float32)
    if not bool(torch.isfinite(L_new).all()):  # a degenerate R_q (e.g. no calibration tokens): keep L as fitted
        L_new = L
    return gptq_quantize(L_new, H_r, bits, group_size=group_size, percdamp=percdamp), Rq


def weighted_error(E_approx: torch.Tensor, E: torch.Tensor, saliency: torch.Tensor) -> float:
    """||(E - E_approx) diag(s)||_F / ||E diag(s)||_F (0.0 when both are 0; 1.0 means "no adapter")."""
    s = saliency.detach().to(torch.float64).reshape(1, -1)
    E64 = E.detach().to(torch.float64)
    num = float(torch.linalg.norm((E64 - E_approx.detach().to(torch.float64)) * s))
    den = float(torch.linalg.norm(E64 * s))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
