"""The Optimal-Brain-Surgeon column sweep shared by GPTQ and SparseGPT.

Both walk the columns of W (input channels) left to right. Each column is replaced by its compressed value
(pruned to 0 and/or rounded to the grid); the error, divided by the pivot of the upper Cholesky factor U of
H^-1, is pushed onto the columns not yet visited, so that the layer output X W^T changes as little as possible
on the calibration inputs. Updates inside a block of `blocksize` columns are immediate, updates of later
columns are applied once per block (the "lazy batch" of GPTQ). Follows IST-DASLab/gptq and sparsegpt.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..config import Sparsity
from .memo import per_tensor
from .prune import mask_for, nm_mask, pruned_count
from .qtensor import INT_RANGE
from .zeropoint import GroupGrid, codes as grid_codes
from .quantize import absmax_scale, slim_quant_scale
from .fp8 import FP8_DTYPE, fp8_round, fp8_scale

# scale_method "fp8" (issue 24): the columns are rounded on the E4M3 grid (algorithms/fp8.py) instead of the
# integer one, with absmax / 448 scales per output channel or tensor; q is then float8_e4m3fn.
FP8 = "fp8"


def group_scale(W: torch.Tensor, bits: int, group_size: int, method: str) -> torch.Tensor:
    if method == FP8:
        return fp8_scale(W, group_size)
    if method == "absmax":
        return absmax_scale(W, bits, group_size)
    if method == "slim":
        return slim_quant_scale(W, bits, group_size)
    raise ValueError(f"unknown scale method {method!r}: use 'absmax' or 'slim'")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside, then restore the count.

    The column loop issues ~15 small ops per column (vectors of N values, a rank-1 update of at most blocksize x N),
    thousands per layer: each is too small to split across cores, and with several threads every op ends in a
    barrier that waits for the slowest thread. On a machine shared with other jobs (more runnable threads than
    cores) a descheduled thread stalls every barrier: measured on 2 cores at load 10, one SparseGPT sweep of a
    2048 x 640 layer took 6.4 s with 2 threads and 0.52 s with 1. Element-wise ops, sorts and gathers give the
    same bits on any thread count, so the sweep's results do not change; the block-wise GEMMs stay outside."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@per_tensor
def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U = upper Cholesky factor of (H + damp I)^-1 in float32, damp = percdamp * mean(diag H);
    dead = input channels with H_ii == 0 (never active in calibration). Those get H_ii = 1 so the factorisation
    exists; they are decoupled from every other channel. Factorised in float64: H of real layers is badly
    conditioned and float32 Cholesky can fail on it."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square [K, K], got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H contains NaN or inf: the calibration activations overflowed")
    H = H.detach().to(torch.float64).clone()
    diag = H.diagonal()
    dead = diag == 0
    H[dead, dead] = 1.0
    diag.add_(percdamp * diag.mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"H + {percdamp:g} * mean(diag H) * I is not positive definite: raise percdamp "
                         "(e.g. 0.1) or calibrate on more tokens")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return U.to(torch.float32), dead


def obs_sweep(W: torch.Tensor, H: torch.Tensor, **kw
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """sweep without zero points: (W_new float32, keep mask, q int8 or None, scale or None)."""
    if kw.get("grid") is not None:
        raise ValueError("obs_sweep has no zero points to return: call sweep with a grid")
    return sweep(W, H, **kw)[:4]


def sweep(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int | None,
    group_size: int = 128,
    scale_method: str = "absmax",
    mask: torch.Tensor | None = None,
    sparsity: Sparsity | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    static_groups: bool = False,
    grid: GroupGrid | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Compress W [N, K] column by column; returns (W_new float32, keep mask, q int8 or None, scale or None,
    zero int8 or None).

    mask: a fixed keep-mask (GPTQ on a pruned weight). sparsity: choose the mask during the sweep with the
    SparseGPT criterion w^2 / U_jj^2 (N:M per group of m columns when the group is reached; unstructured per
    block of columns). bits None: prune only. Pruned entries are exactly 0 in W_new and in q (without a grid).
    grid (zeropoint.GroupGrid): round each group of grid.group_size columns on its own zero-point grid, fitted
    (clip searched when the grid has weights) from the group's current values when the sweep reaches it; q then
    holds unsigned codes, pruned entries the code of 0 (their zero point). `bits` and `scale_method` are unused.
    scale: the scales to round with (the shape group_size gives), used as they are instead of being searched
    (not with a grid).
    """
    if grid is not None:
        if group_size != grid.group_size or static_groups:
            raise ValueError("a zero-point grid needs group_size == grid.group_size and no static groups")
        bits = grid.container
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [N, K], got {tuple(W.shape)}")
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected [{K}, {K}] for W of shape {tuple(W.shape)}")
    if mask is not None and sparsity is not None:
        raise ValueError("give either a fixed mask or a sparsity to choose one, not both")
    if mask is not None and mask.shape != W.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(W.shape)}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    kind = "none" if sparsity is None else sparsity.kind
    if kind == "nm":
        if K % sparsity.m:
            raise ValueError(f"N:M sparsity along K needs K % m == 0, got K={K}, m={sparsity.m}")
        if blocksize % sparsity.m:
            raise ValueError(f"blocksize {blocksize} must be a multiple of m={sparsity.m}")
    if bits is not None and bits not in INT_RANGE:
        raise ValueError(f"bits must be one of {sorted(INT_RANGE)} or None, got {bits}")

    U, dead = inverse_hessian_factor(H, percdamp)
    Wc = W.detach().to(torch.float32).clone()
    Wc[:, dead] = 0.0  # as in the reference: a channel that is always 0 carries no information about its weight
    d = U.diagonal()

    keep = torch.ones(N, K, dtype=torch.bool, device=W.device) if mask is None else mask.to(torch.bool).clone()
    if kind in ("nm", "unstructured"):
        # Scales must exist before the final mask does; estimate it once with the same criterion on W.
        estimate = mask_for(Wc.square() / d.square()[None, :], sparsity)
    else:
        estimate = keep.clone()

    lo = hi = 0
    given, scale, q, zero = scale, None, None, None
    if grid is not None:
        q = torch.zeros(N, K, dtype=torch.int8, device=W.device)
        scale = torch.empty(N, -(-K // group_size), device=W.device)
        zero = torch.empty_like(scale)
    elif bits is not None:
        lo, hi = INT_RANGE[bits]
        if scale_method == FP8 and (group_size not in (0, -1) or static_groups):
            raise ValueError(f"FP8 weights take one scale per output channel or tensor, got group_size {group_size}")
        q = torch.zeros(N, K, dtype=FP8_DTYPE if scale_method == FP8 else torch.int8, device=W.device)
        if given is not None:
            want = () if group_size == 0 else (N, 1) if group_size == -1 else (N, -(-K // max(group_size, 1)))
            if tuple(given.shape) != want:
                raise ValueError(f"scale has shape {tuple(given.shape)}, expected {want} for group_size {group_size}")
            scale, static_groups = given.detach().to(torch.float32).clone(), True
        elif group_size in (0, -1) or static_groups:
            scale = group_scale(Wc * estimate, bits, group_size, scale_method)
        elif group_size > 0:
            scale = torch.empty(N, -(-K // group_size), device=W.device)
        else:
            raise ValueError(f"group_size must be 0, -1 or a positive integer, got {group_size}")

    out = torch.zeros(N, K, device=W.device)
    group_state: list = []  # the zero-point grid's current group (scale, zero, bits): a group may span blocks
    # The sweep works on the transpose of each block of columns: a column of W is then a contiguous row, so the
    # per-column vector ops and the rank-1 update read and write contiguous memory. Every value is computed by
    # the same float operations as the column layout would (products and differences are exactly rounded, so
    # the layout cannot change a bit); only the order in memory differs.
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = Wc[:, i1:i2].T.contiguous()  # [columns, N]
        Q1 = torch.zeros_like(W1) if bits is not None else None
        S1 = torch.empty_like(W1) if bits is not None else None  # the scale each column was rounded with
        Z1 = torch.empty_like(W1) if grid is not None else None  # ... and its zero point
        U1 = U[i1:i2, i1:i2]
        pivots = U1.diagonal()
        if kind == "unstructured":
            # SparseGPT's adaptive mask: the lowest-scoring fraction of the whole block (all rows together).
            score = (W1.T.square() / d[i1:i2].square()[None, :]).flatten()
            block = torch.ones(score.numel(), dtype=torch.bool, device=W.device)
            block[torch.argsort(score, stable=True)[: pruned_count(score.numel(), sparsity.ratio)]] = False
            keep[:, i1:i2] = estimate[:, i1:i2] = block.reshape(N, i2 - i1)
        keep1 = keep[:, i1:i2].T.contiguous() if kind != "nm" else None
        with one_thread():
            _sweep_block(W1, Q1, S1, U1, pivots.tolist(), keep, keep1, estimate, Wc, scale, d, i1, i2, bits, lo, hi,
                         group_size, static_groups, scale_method, sparsity if kind == "nm" else None,
                         grid, zero, Z1, group_state)
            # The compressed columns and their errors, from the same float operations as inside the loop.
            if bits is None:
                C1 = torch.where(keep[:, i1:i2].T, W1, 0.0)
            else:
                C1 = Q1 * S1 if grid is None else (Q1 - Z1) * S1
                q[:, i1:i2] = Q1.T.to(q.dtype)  # exact: Q1 holds integers, or E4M3 values for FP8
            out[:, i1:i2] = C1.T
            Err1 = (W1 - C1) / pivots[:, None]
        Wc[:, i2:] -= Err1.T.contiguous() @ U[i1:i2, i2:]
    return out, keep, q, scale, (None if zero is None else zero.to(torch.int8))


def _sweep_block(W1, Q1, S1, U1, pivots: list[float], keep, keep1, estimate, Wc, scale, d, i1: int, i2: int,
                 bits, lo: int, hi: int, group_size: int, static_groups: bool, scale_method: str,
                 nm: Sparsity | None, grid: GroupGrid | None = None, zero=None, Z1=None,
                 group_state: list | None = None) -> None:
    """The column loop of one block (columns i1..i2 of W, transposed in W1), in place: Q1 / S1 (/ Z1) get each
    column's integer values and the scale (and zero point) it was rounded with, W1 the updated values (column i
    keeps the value it had when it was compressed), keep / estimate the N:M choices. group_state carries a
    zero-point grid's current group (scale, zero, bits) across blocks. Dividing by a pivot taken out as a Python
    float rounds exactly as dividing by the 0-d tensor does (the float32 value converts back exactly)."""
    N = W1.shape[1]
    K = Wc.shape[1]
    s = None
    for i in range(i2 - i1):
        col = i1 + i
        if nm is not None and col % nm.m == 0:
            m = nm.m
            score = W1[i:i + m].T.square() / d[col:col + m].square()[None, :]
            keep[:, col:col + m] = estimate[:, col:col + m] = nm_mask(score, nm.n, m)
        w = W1[i]
        kept = keep[:, col] if keep1 is None else keep1[i]
        if bits is None:
            c = torch.where(kept, w, 0.0)
        elif grid is not None:
            if col % group_size == 0:
                end = min(col + group_size, K)
                cur = torch.cat([W1[i:end - i1].T, Wc[:, i2:max(i2, end)]], dim=1)
                g = col // group_size
                scale[:, g], zero[:, g] = grid.fit(cur * estimate[:, col:col + cur.shape[1]], g, col)
                group_state[:] = [scale[:, g], zero[:, g], grid.bits_of(g)]
            gs, gz, gbits = group_state
            qc = torch.where(kept, grid_codes(w, gs, gz, gbits), gz)  # a pruned weight: the code of 0
            Q1[i], S1[i], Z1[i] = qc, gs, gz
            c = (qc - gz) * gs
        else:
            new_group = group_size > 0 and col % group_size == 0
            if new_group and not static_groups:
                # The group's current values (already updated by every earlier column of this block;
                # columns past the block still lack this block's pending lazy update, as in the reference).
                end = min(col + group_size, K)
                cur = torch.cat([W1[i:end - i1].T, Wc[:, i2:max(i2, end)]], dim=1)
                scale[:, col // group_size] = group_scale(
                    cur * estimate[:, col:col + cur.shape[1]], bits, -1, scale_method)[:, 0]
            if s is None or new_group:
                s = scale if group_size == 0 else scale[:, 0] if group_size == -1 else scale[:, col // group_size]
                # Every column up to the next group (or the block's end) is rounded with this scale.
                span = (i2 - i1 - i) if group_size <= 0 else min(group_size - col % group_size, i2 - col)
                S1[i:i + span] = s.expand(N)
            qc = fp8_round(w / s) if scale_method == FP8 else torch.round(w / s).clamp_(lo, hi)
            qc = torch.where(kept, qc, 0.0)
            Q1[i] = qc
            c = qc * s
        err = (w - c) / pivots[i]
        # Column i itself is never read again (so it keeps w, which the block's end reads back), and the
        # update starts at i + 1.
        W1[i + 1:] -= U1[i, i + 1:, None] * err[None, :]
