"""Input-channel permutations that make N:M groups keep more of a weight's saliency (issue 23).

An N:M mask keeps the n largest of each m consecutive input columns of every row. Which columns share a group is
an accident of the channel order; where that order is free (the MLP's intermediate channels: gate/up output rows
and down input columns permute together, exactly), a better order keeps more. The objective is the saliency an
N:M mask can keep, sum over rows and groups of the n largest scores (Wanda's |W_ij| ||x_j|| as the score),
maximised as Pool and Yu (NeurIPS 2021, NVIDIA apex ASP's permutation search) and RIA (ICLR 2024) do: a
balanced start (every group gets channels from each importance band) and then swaps of one channel between two
groups, kept when the objective rises.

Pure: a score matrix in, a permutation out.
"""
from __future__ import annotations

import torch

# Elements of the swap tensor evaluated at once ([pairs, m*m swaps, 2 groups, N rows, m]): bounds the memory of
# one search step on wide layers (about 256 MB in float32).
_CHUNK_ELEMENTS = 64 * 2**20


def nm_retained(score: torch.Tensor, n: int = 2, m: int = 4) -> float:
    """Sum over rows and groups of m consecutive columns of the n largest scores: what an N:M mask keeps."""
    N, K = score.shape
    if K % m:
        raise ValueError(f"N:M groups along K need K % m == 0, got K={K}, m={m}")
    return float(score.reshape(N, K // m, m).topk(n, dim=-1).values.sum())


def _kept(groups: torch.Tensor, n: int) -> torch.Tensor:
    """groups [..., N, m] -> the kept score of each group, summed over rows: [...]."""
    return groups.topk(n, dim=-1).values.sum(dim=(-1, -2))


# For each of a group's 4 members, the other three: 2:4's swap search scores a swap from them (_swap_kept_2of4).
_OTHERS_OF_4 = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])


def _swap_kept_2of4(S: torch.Tensor) -> torch.Tensor:
    """S [P, N, 8]: the scores of two groups of 4 (A = columns 0-3, B = 4-7) -> [P, 16], the kept score of both
    groups after swapping A's member a with B's member b (index 4 a + b), what _kept gives on the swapped
    groups, without building them: a group that loses a and gains v keeps r1 + max(r2, v), r1 >= r2 the top two of
    its other three members (v > r1 gives v + r1 = r1 + max(r2, v) too). Elementwise max/min instead of top-k
    over 16 built copies of the pair: the whole search takes 2.2-2.4x less CPU on 2:4, the product's pattern
    (640 x 2048 scores: 4.5 s -> 2.0 s); the sums may differ from _kept's in the last bits (the caller's margin
    covers that)."""
    P, N, _ = S.shape
    A, B = S[..., :4], S[..., 4:]

    def top_two_of_others(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = X[..., _OTHERS_OF_4]  # [P, N, 4, 3]
        a, b, c = o.unbind(-1)
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        return torch.maximum(hi, c), torch.maximum(lo, torch.minimum(hi, c))  # max, median: exact comparisons

    a1, a2 = top_two_of_others(A)  # [P, N, 4] by the member a that leaves A
    b1, b2 = top_two_of_others(B)
    kept_a = (a1[..., :, None] + torch.maximum(a2[..., :, None], B[..., None, :])).sum(1)  # [P, 4 (a), 4 (b)]
    kept_b = (b1[..., None, :] + torch.maximum(b2[..., None, :], A[..., :, None])).sum(1)
    return (kept_a + kept_b).reshape(P, 16)


def _balanced_start(score: torch.Tensor, m: int) -> torch.Tensor:
    """Channels sorted by total score, dealt to the groups in a snake order (group g gets ranks g, 2G - 1 - g,
    2G + g, ...): every group holds one channel of each of the m importance bands, so two strong channels rarely
    compete for the same group."""
    K = score.shape[1]
    G = K // m
    order = torch.argsort(score.sum(0), descending=True, stable=True)
    slots = torch.arange(K).reshape(m, G)  # band b, group g -> rank b * G + g
    slots[1::2] = slots[1::2].flip(-1)
    perm = torch.empty(K, dtype=torch.long)
    perm.view(G, m)[:] = order[slots.T]  # group g's m channels, one from each band
    return perm


def nm_permutation(score: torch.Tensor, n: int = 2, m: int = 4, *, steps: int = 10, patience: int = 3,
                   seed: int = 0) -> torch.Tensor:
    """A permutation `perm` of the K input columns such that score[:, perm] keeps at least as much under an N:M
    mask as score does (nm_retained), usually more.

    Start from the better of the identity and the balanced start; then each step pairs the groups at random and,
    for every pair, tries all m * m single-channel swaps between its two groups and applies the best one if it
    raises the pair's kept score. Stops after `steps` steps, or `patience` steps in a row without a gain.
    Deterministic for a given seed."""
    score = score.detach().to(torch.float32)
    N, K = score.shape
    if K % m:
        raise ValueError(f"N:M groups along K need K % m == 0, got K={K}, m={m}")
    G = K // m
    identity = torch.arange(K)
    start = _balanced_start(score, m)
    perm = start if nm_retained(score[:, start], n, m) > nm_retained(score, n, m) else identity
    if G < 2:
        return perm
    gen = torch.Generator().manual_seed(seed)
    # all m * m swaps (a in group A <-> b in group B) as index maps into the 2m columns [A | B]
    swaps = []
    for a in range(m):
        for b in range(m):
            idx = list(range(2 * m))
            idx[a], idx[m + b] = m + b, a
            swaps.append(idx)
    swaps = torch.tensor(swaps)  # [m*m, 2m]
    chunk = max(1, _CHUNK_ELEMENTS // (m * m * 2 * N * m))
    idle = 0
    for _ in range(steps):
        order = torch.randperm(G, generator=gen)
        pairs = order[: 2 * (G // 2)].reshape(-1, 2)  # [P, 2] group indices
        cols = perm.view(G, m)
        gained = False
        for p0 in range(0, pairs.shape[0], chunk):
            pr = pairs[p0:p0 + chunk]
            both = torch.cat([cols[pr[:, 0]], cols[pr[:, 1]]], dim=1)  # [P, 2m] channel ids
            S = score[:, both].permute(1, 0, 2)  # [P, N, 2m]
            before = _kept(S.reshape(-1, N, 2, m).transpose(1, 2), n).sum(-1)  # [P]
            if (n, m) == (2, 4):
                after = _swap_kept_2of4(S)  # [P, m*m]
            else:
                cand = S[:, :, swaps]  # [P, N, m*m, 2m]
                cand = cand.reshape(cand.shape[0], N, m * m, 2, m).permute(0, 2, 3, 1, 4)  # [P, m*m, 2, N, m]
                after = _kept(cand, n).sum(-1)  # [P, m*m]
            best, which = after.max(dim=1)
            # a relative margin: float sums of equal sets may differ in the last bits
            better = best > before * (1 + 1e-6)
            if bool(better.any()):
                gained = True
                new = torch.gather(both, 1, swaps[which])  # [P, 2m]
                rows = better.nonzero().flatten()
                cols[pr[rows, 0]] = new[rows, :m]
                cols[pr[rows, 1]] = new[rows, m:]
        idle = 0 if gained else idle + 1
        if idle >= patience:
            break
    return perm


def head_permutation(score: torch.Tensor, head_dim: int, heads_per_group: int, n: int = 2, m: int = 4, *,
                     seed: int = 0) -> torch.Tensor:
    """A permutation of the H * head_dim input columns of score [N, H * head_dim] (o_proj's, query head h's
    columns at h * head_dim) that moves channels only within a head and moves every head of one KV group alike:
    the order attention allows, as each KV head's value channels can be permuted (P_g), and every query head
    reading that KV head then produces its output in the order P_g. P_g is chosen by nm_permutation on the stacked
    scores of the group's heads ([N * heads_per_group, head_dim]), so it is good for all of them at once.

    Returns the column permutation perm (score[:, perm]); the value rows of KV head g move by
    perm[g * heads_per_group * head_dim:][:head_dim] - g * heads_per_group * head_dim (kv_rows below)."""
    N, K = score.shape
    if K % (head_dim * heads_per_group):
        raise ValueError(f"{K} columns are not whole groups of {heads_per_group} heads of {head_dim}")
    groups = K // (head_dim * heads_per_group)
    perm = torch.empty(K, dtype=torch.long)
    for g in range(groups):
        cols = score[:, g * heads_per_group * head_dim:(g + 1) * heads_per_group * head_dim]
        stacked = cols.reshape(N, heads_per_group, head_dim).transpose(0, 1).reshape(-1, head_dim)
        p_g = nm_permutation(stacked, n, m, seed=seed + g)
        for j in range(heads_per_group):
            h = g * heads_per_group + j
            perm[h * head_dim:(h + 1) * head_dim] = h * head_dim + p_g
    return perm


def kv_rows(perm: torch.Tensor, head_dim: int, heads_per_group: int) -> torch.Tensor:
    """The value projection's output-row permutation that goes with head_permutation's column permutation: each
    KV head's P_g, read off its first query head."""
    K = perm.numel()
    groups = K // (head_dim * heads_per_group)
    rows = []
    for g in range(groups):
        first = g * heads_per_group * head_dim
        rows.append(perm[first:first + head_dim] - first + g * head_dim)
    return torch.cat(rows)


def stacked_scores(scores: list[torch.Tensor], max_rows: int = 8192, seed: int = 0) -> torch.Tensor:
    """One score matrix [rows, K] for a permutation shared by many layers reading the same K channels: each
    layer's scores divided by their total (so every layer counts alike in the kept share, whatever its size or
    scale), at most max_rows rows in all, an equal random share of each layer's rows (a model-wide search over
    every row of every layer would hold a billion scores on a 7B model)."""
    gen = torch.Generator().manual_seed(seed)
    per_layer = max(1, max_rows // max(1, len(scores)))
    out = []
    for s in scores:
        s = s.detach().to(torch.float32)
        s = s / (float(s.sum()) or 1.0)
        if s.shape[0] > per_layer:
            s = s[torch.randperm(s.shape[0], generator=gen)[:per_layer]]
        out.append(s)
    return torch.cat(out)
