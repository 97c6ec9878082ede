"""Low-rank correction of activation quantization (LRC, "Low-Rank Correction for Quantized LLMs", Scetbon and
Hensman, arXiv 2412.07902), for W8A8 layers y = W_q Q(x) + L R x: the base reads the quantized input Q(x), the
adapters the full-precision x.

The objective is the layer's output error with both quantizations,

    J(W_q, M) = E || W x - W_q Q(x) - M x ||^2,   M = L R of rank r.

With e = Q(x) - x, D = W - M - W_q and the second moments H = E[x x^T] (the runner's H), H_xe = E[x e^T],
H_ee = E[e e^T] (all with the runner's 2/n normalisation),

    J = tr(D H D^T) - 2 tr(D H_xe W_q^T) + tr(W_q H_ee W_q^T).

The error moments are accumulated directly (H_xq and H_qq differ from H by 1e-4 of their size at 8 bits, and
J would be lost to float32 rounding if formed from them); H_xq = H + H_xe. H_qq = E[Q(x) Q(x)^T], the Hessian of
the base's own problem, is accumulated directly too: a channel that quantizes to zero on every token has an
exactly zero row there, where H + H_xe + H_xe^T + H_ee would leave rounding noise (and lose definiteness).

Adapters (W_q fixed): J is a quadratic in M, ||(M - E_eff) C||_F^2 + const with C C^T = H and
E_eff = (W - W_q) - W_q H_xe^T H^-1, the weight error plus the part of the activation error the full-precision
input can predict. The best rank-r M is H-LoRA's solution for E_eff (lowrank.hessian_lowrank). With no
activation error E_eff = W - W_q: LRC is H-LoRA.
Base (M fixed): J = E || T Q(x) - W_q Q(x) ||^2 + const with T = (W - M) H_xq H_qq^-1
= (W - M) - (W - M)(H_xe^T + H_ee) H_qq^-1, so the base is the usual GPTQ / SparseGPT problem for target T with
the Hessian H_qq of the quantized input.
The two steps alternate (refit rounds), each kept only if J goes down.

Pure: tensors and a config in, tensors out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import CompressConfig
from .gram import gram
from .lowrank import _factors_in_metric
from .qtensor import QuantizedTensor
from .refit import as_float, quantized_adapters, refit_base

Factor = QuantizedTensor | torch.Tensor
# Ridge for LRC's solves, relative to each channel's own second moment: 1e-4 keeps the Cholesky factors well
# defined while leaving the least-squares answers unbiased (1e-2, GPTQ's damping, cost 15% more output error on
# the base's target in tests/algorithms/test_lrc.py; the solves are float64).
LRC_DAMP = 1e-4


@dataclass
class ActErrorMoments:
    """Second moments of a layer's input x, its quantized copy q = Q(x) and the error e = q - x, each 2/n sum."""

    H_xe: torch.Tensor  # [K, K] x e^T
    H_ee: torch.Tensor  # [K, K] e e^T
    H_qq: torch.Tensor  # [K, K] q q^T

    def H_xq(self, H: torch.Tensor) -> torch.Tensor:
        return H + self.H_xe


def accumulate_error_moments(m: ActErrorMoments | None, nsamples: int, x: torch.Tensor,
                             xq: torch.Tensor) -> tuple[ActErrorMoments, int]:
    """Fold a batch (x and its quantized copy xq, [..., K]) into the running moments, counting tokens as
    gptq.accumulate_hessian does (same 2/n normalisation, so the moments combine with H)."""
    K = x.shape[-1]
    X = x.detach().reshape(-1, K).to(torch.float32)
    Q = xq.detach().reshape(-1, K).to(torch.float32)
    Err = Q - X
    if m is None:
        m = ActErrorMoments(*(torch.zeros(K, K, device=X.device) for _ in range(3)))
    t = X.shape[0]
    if t == 0:
        return m, nsamples
    total = nsamples + t
    keep, add = nsamples / total, 2.0 / total
    return ActErrorMoments(m.H_xe * keep + add * (X.T @ Err), m.H_ee * keep + add * gram(Err),
                           m.H_qq * keep + add * gram(Q)), total


def lrc_objective(W: torch.Tensor, W_q: torch.Tensor, M: torch.Tensor | None, H: torch.Tensor,
                  act: ActErrorMoments) -> float:
    """J(W_q, M) = E||W x - W_q Q(x) - M x||^2 (up to H's normalisation), from the moments; M None = no adapters."""
    W, W_q = W.detach().to(torch.float32), W_q.detach().to(torch.float32)
    D = W - W_q if M is None else W - M.detach().to(torch.float32) - W_q
    j = ((D @ H) * D).sum() - 2.0 * ((D @ act.H_xe) * W_q).sum() + ((W_q @ act.H_ee) * W_q).sum()
    return max(float(j), 0.0)


def lrc_rel_error(W: torch.Tensor, W_q: torch.Tensor, M: torch.Tensor | None, H: torch.Tensor,
                  act: ActErrorMoments) -> float:
    """sqrt(J / E||W x||^2): the layer's relative output error with quantized activations."""
    den = float(((W.to(torch.float32) @ H) * W.to(torch.float32)).sum())
    return (lrc_objective(W, W_q, M, H, act) / den) ** 0.5 if den > 0 else 0.0


def damped_root(H: torch.Tensor, percdamp: float = LRC_DAMP) -> torch.Tensor | None:
    """Lower-triangular C with C C^T = H + percdamp * diag(H) (channels that never fired get percdamp x the mean
    diagonal), damping raised x10 until the Cholesky succeeds; None when H is all zero.

    Damping relative to each channel's own diagonal, not to the mean as GPTQ does: LLM inputs have a few channels
    100x larger than the rest, whose diagonal dominates the mean, and a mean-based ridge would then swamp (and
    bias the fit on) every ordinary channel."""
    H = H.detach().to(torch.float64)
    d = H.diagonal()
    mean = float(d.mean())
    if mean <= 0.0:
        return None
    base = torch.where(d > 0, d, torch.full_like(d, mean))
    damp = max(percdamp, 1e-6)
    for _ in range(8):
        C, info = torch.linalg.cholesky_ex(H + torch.diag(damp * base))
        if int(info) == 0:
            return C
        damp *= 10.0
    raise ValueError("H is not positive semi-definite even after damping")


class LRCSystem:
    """One layer's LRC problem, factored once: every refit round then costs a few [N, K] x [K, K] products.

    C: the root of the damped H (the adapters' metric); P = H_xe^T H^-1, so E_eff = (W - W_q) - W_q P;
    G = H_xq H_qq^-1, so the base's target is T = (W - M) G. The solves run in float64."""

    def __init__(self, H: torch.Tensor, act: ActErrorMoments, percdamp: float = LRC_DAMP) -> None:
        self.H, self.act = H.detach().to(torch.float32), act
        C = damped_root(H, percdamp)
        Cq = damped_root(act.H_qq, percdamp)
        self.C = None if C is None else C.to(torch.float32)
        # P^T = H^-1 H_xe and G^T = H_qq^-1 H_xq^T (both Hessians symmetric)
        self.P = None if C is None else torch.cholesky_solve(act.H_xe.to(torch.float64), C).T.to(torch.float32)
        self.G = None if Cq is None else torch.cholesky_solve(act.H_xq(H).T.to(torch.float64), Cq).T.to(torch.float32)

    def effective_error(self, W: torch.Tensor, W_q: torch.Tensor) -> torch.Tensor:
        W, W_q = W.detach().to(torch.float32), W_q.detach().to(torch.float32)
        return W - W_q if self.P is None else (W - W_q) - W_q @ self.P

    def lowrank(self, E_eff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best rank-r M = L R for ||(E_eff - M) C||_F: H-LoRA's solution U_r U_r^T E_eff, U_r the top left
        singular vectors of E_eff C."""
        E = E_eff.detach().to(torch.float32)
        return _factors_in_metric(E, E if self.C is None else E @ self.C, rank)

    def base_target(self, W: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
        A = W.detach().to(torch.float32) if M is None else W.detach().to(torch.float32) - M.to(torch.float32)
        return A if self.G is None else A @ self.G

    def objective(self, W: torch.Tensor, W_q: torch.Tensor, M: torch.Tensor | None) -> float:
        return lrc_objective(W, W_q, M, self.H, self.act)


def effective_error(W: torch.Tensor, W_q: torch.Tensor, H: torch.Tensor, act: ActErrorMoments,
                    percdamp: float = LRC_DAMP) -> torch.Tensor:
    """E_eff = (W - W_q) - W_q H_xe^T H^-1, with H damped by damped_root."""
    return LRCSystem(H, act, percdamp).effective_error(W, W_q)


def lrc_lowrank(E_eff: torch.Tensor, H: torch.Tensor, rank: int,
                percdamp: float = LRC_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r L R for ||(E_eff - L R) C||_F, C C^T the damped H (as effective_error damps it)."""
    K = H.shape[0]
    zero = torch.zeros(K, K, device=H.device)
    return LRCSystem(H, ActErrorMoments(zero, zero, H), percdamp).lowrank(E_eff, rank)


def base_target(W: torch.Tensor, M: torch.Tensor | None, H: torch.Tensor, act: ActErrorMoments,
                percdamp: float = LRC_DAMP) -> torch.Tensor:
    """T = (W - M) H_xq H_qq^-1: the weight that, applied to Q(x), best reproduces (W - M) x (H_qq damped by
    damped_root; columns of channels that are zero on every token are left to the base's quantizer, which zeroes
    them as GPTQ zeroes dead channels)."""
    return LRCSystem(H, act, percdamp).base_target(W, M)


@dataclass
class LRCResult:
    weight: Factor
    lora_L: Factor | None
    lora_R: Factor | None
    objectives: list[float]  # J before the adapters, with the first adapters, then after each kept refit round
    rounds_kept: int = 0
    mask: torch.Tensor | None = None  # the weight's keep-mask (a new one only with cfg.refit_mask "reselect")


def lrc_fit(W: torch.Tensor, system: LRCSystem, cfg: CompressConfig, weight: Factor, mask: torch.Tensor, rank: int,
            rounds: int) -> LRCResult:
    """Adapters for a base `weight` (fitted by the caller for the target system.base_target(W, None) with H_qq),
    then up to `rounds` rounds of: base <- base_on_mask(T(L R), H_qq, mask), adapters <- LRC fit to the new base.
    A round is kept only if J drops, so the returned J never rises. cfg.refit_mask "reselect": each round's
    SparseGPT sweep chooses the mask again on T(L R) with H_qq (refit.refit_base), so the activation error is in
    the criterion; the result's mask is that of the kept state."""
    W = W.detach().to(torch.float32)
    H, act = system.H, system.act
    result = LRCResult(weight, None, None, [system.objective(W, as_float(weight), None)], mask=mask)

    def adapters(base: Factor) -> tuple[Factor, Factor, float]:
        Wq = as_float(base)
        E = system.effective_error(W, Wq)
        L, R = quantized_adapters(E, *system.lowrank(E, rank), H, cfg)
        return L, R, system.objective(W, Wq, as_float(L) @ as_float(R))

    result.lora_L, result.lora_R, j = adapters(weight)
    result.objectives.append(j)
    for _ in range(rounds):
        M = as_float(result.lora_L) @ as_float(result.lora_R)
        base, new_mask = refit_base(system.base_target(W, M), act.H_qq, result.mask, cfg)
        L, R, j_new = adapters(base)
        if not j_new < j:
            break
        result.weight, result.lora_L, result.lora_R, result.mask = base, L, R, new_mask
        result.objectives.append(j_new)
        result.rounds_kept += 1
        j = j_new
    return result

