"""SliM-LLM (Huang et al. 2024, "SliM-LLM: Salience-Driven Mixed-Precision Quantization for Large Language
Models") on one layer, as pure functions: which bits each group of input columns gets, and the calibrated grid
the GPTQ sweep then rounds it with (zeropoint.GroupGrid).

Salience of weight (i, j): w_ij^2 / U_jj^2, U the upper Cholesky factor of H^-1 (the OBS cost of a unit change
of w_ij, the term GPTQ minimises). A group's salience is its sum over all rows and its columns.

Salience-determined bit allocation (SBA): the groups ranked by salience, the k least salient get N-1 bits and the
k most salient N+1, the rest N: the average stays N for every k (per group, so per weight when every group is
full). k runs from 0 (uniform) to ngroups // 2 and is chosen by the layer's output error on the calibration
tokens after rounding to nearest. The paper scores k by a KL divergence between the float and the quantized
layer outputs; we score it by the squared output error tr(E H E^T), E = W - RTN(W): it is exactly the mean
squared output error over the calibration tokens (H = 2/n X^T X), the quantity GPTQ then minimises and every
row of this project reports, and H is all the pipeline keeps of a layer's inputs (no activations to softmax).
k = 0 is a candidate, so the allocation never scores worse than uniform on that measure.

Salience-weighted quantizer calibration (SQC): each group's clip factor is searched (zeropoint.CLIP_CANDIDATES)
to minimise the weighted squared rounding error, each weight counting 1 / U_jj^2 (its OBS cost per unit error)
times SALIENT_WEIGHT when it is a salient outlier of its group (salience more than 2 standard deviations above
the group's mean, the paper's rule).

Grids: 1-bit groups (N = 2) are the sign grid +-s; 2- and 3-bit groups min-max with a zero point; 4-bit groups
the symmetric INT4 grid (zero point 8), so that at averages 2 and 3 every group folds into a signed INT4 code
(zeropoint.signed_codes) and runs on TensorRT; 5-bit groups (average 4) need an INT8 container.
"""
from __future__ import annotations

import torch

from .obs import inverse_hessian_factor
from .zeropoint import GroupGrid, rtn, uniform_grid

AVERAGE_BITS = (2, 3, 4)  # --bits with --bit-allocation slim-llm: groups get N-1, N, N+1
SALIENT_WEIGHT = 2.0  # how much more a salient outlier's rounding error counts in the clip search
SIGNED_BITS = (4,)  # the widths that use the symmetric grid (see the module docstring)


def column_salience(W: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """w_ij^2 / U_jj^2 for every weight [N, K] (U: upper Cholesky factor of (H + damp I)^-1)."""
    U, dead = inverse_hessian_factor(H, percdamp)
    d = U.diagonal().to(torch.float32)
    S = W.detach().to(torch.float32).square() / d.square()[None, :]
    S[:, dead] = 0.0  # a channel never active in calibration carries no salience (the sweep zeroes it)
    return S


def group_salience(S: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum of the salience over each group of `group_size` columns: [ngroups]."""
    return torch.stack([S[:, c:c + group_size].sum() for c in range(0, S.shape[1], group_size)])


def allocation(salience: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int8 [ngroups]: the k least salient groups N-1 bits, the k most salient N+1, the others N."""
    salience = salience.detach().cpu()  # the widths are bookkeeping: kept on the host whatever the device
    n = salience.numel()
    if not 0 <= 2 * k <= n:
        raise ValueError(f"k must be in [0, {n // 2}] for {n} groups, got {k}")
    out = torch.full((n,), bits, dtype=torch.int8)
    order = torch.argsort(salience, stable=True)
    out[order[:k]] = bits - 1
    out[order[n - k:]] = bits + 1
    return out


def allocation_errors(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int,
                      salience: torch.Tensor) -> torch.Tensor:
    """tr(E_k H E_k^T) for k = 0 .. ngroups // 2, E_k = W - RTN(W) with allocation(salience, bits, k).

    Each step moves one group down and one up; the error is updated for those columns only
    (err(E + D) = err(E) + 2 <D, E H> + <D H, D>, with E H kept current), so all k cost about two evaluations."""
    W = W.detach().to(torch.float32)
    H = H.to(torch.float32)
    n = salience.numel()
    G = group_size
    err_at = {b: W - rtn(W, GroupGrid(G, torch.full((n,), b, dtype=torch.int8), SIGNED_BITS))
              for b in (bits - 1, bits, bits + 1)}
    E = err_at[bits].clone()
    M = E @ H
    errors = [float((M * E).sum())]
    order = torch.argsort(salience, stable=True)
    for k in range(1, n // 2 + 1):
        cols, D = [], []
        for g, b in ((int(order[k - 1]), bits - 1), (int(order[n - k]), bits + 1)):
            c = torch.arange(g * G, min(g * G + G, W.shape[1]))
            cols.append(c)
            D.append(err_at[b][:, c] - E[:, c])
        c = torch.cat(cols)
        Dc = torch.cat(D, dim=1)
        DH = Dc @ H[c]  # [N, K]
        errors.append(errors[-1] + 2.0 * float((Dc * M[:, c]).sum()) + float((DH[:, c] * Dc).sum()))
        M += DH
        E[:, c] += Dc
    return torch.tensor(errors, dtype=torch.float64)


def sqc_weights(S: torch.Tensor, d2inv: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-weight error weights of the clip search: 1 / U_jj^2, times SALIENT_WEIGHT on each group's outliers."""
    wts = d2inv[None, :].expand_as(S).clone()
    for c in range(0, S.shape[1], group_size):
        g = S[:, c:c + group_size]
        if g.numel() > 1:
            salient = g > g.mean() + 2.0 * g.std()
            wts[:, c:c + group_size][salient] *= SALIENT_WEIGHT
    return wts


def slimllm_grid(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int,
                 percdamp: float = 0.01) -> GroupGrid:
    """The SliM-LLM grid of one layer: SBA's per-group bits (k by the output error) and SQC's weights."""
    if bits not in AVERAGE_BITS:
        raise ValueError(f"SliM-LLM allocates around an average of {AVERAGE_BITS} bits, got {bits}")
    if group_size <= 0:
        raise ValueError(f"SliM-LLM allocates bits per group of columns: group_size must be > 0, got {group_size}")
    S = column_salience(W, H, percdamp)
    sal = group_salience(S, group_size)
    k = int(torch.argmin(allocation_errors(W, H, bits, group_size, sal)))  # ties: the smaller k
    U, _ = inverse_hessian_factor(H, percdamp)
    d2inv = U.diagonal().to(torch.float32).square().reciprocal()
    return GroupGrid(group_size, allocation(sal, bits, k), SIGNED_BITS, sqc_weights(S, d2inv, group_size))


def grid_for(T: torch.Tensor, H: torch.Tensor, cfg) -> GroupGrid | None:
    """The zero-point grid a CompressConfig asks for on target T (None: the symmetric grids of the other
    quantizers): SliM-LLM's, or plain min-max at cfg.bits (GPTQ's asymmetric quantizer)."""
    if cfg.bits == 16 or not cfg.zero_points:
        return None
    G = cfg.effective_group_size
    if cfg.bit_allocation == "slim-llm":
        return slimllm_grid(T, H, cfg.bits, G, cfg.percdamp)
    return uniform_grid(T.shape[1], cfg.bits, G)
