"""The OBS sweep gives, bit for bit, what the column-by-column loop of the reference (IST-DASLab gptq /
sparsegpt, as this project wrote it before issue 15) gives: the transposed layout changes memory order only."""
import pytest
import torch

from slim_trt.algorithms.obs import group_scale, inverse_hessian_factor, obs_sweep, one_thread
from slim_trt.algorithms.prune import mask_for, nm_mask, pruned_count
from slim_trt.algorithms.qtensor import INT_RANGE
from slim_trt.config import Sparsity


def _column_loop(W, H, *, bits, group_size=128, scale_method="absmax", mask=None, sparsity=None, blocksize=128,
                 percdamp=0.01, static_groups=False):
    """The pre-issue-15 sweep: columns of W in place, every update written column by column."""
    N, K = W.shape
    kind = "none" if sparsity is None else sparsity.kind
    U, dead = inverse_hessian_factor(H, percdamp)
    Wc = W.clone()
    Wc[:, dead] = 0.0
    d = U.diagonal()
    keep = torch.ones(N, K, dtype=torch.bool) if mask is None else mask.clone()
    estimate = mask_for(Wc.square() / d.square()[None, :], sparsity) if kind != "none" else keep.clone()
    scale = q = None
    if bits is not None:
        lo, hi = INT_RANGE[bits]
        q = torch.zeros(N, K, dtype=torch.int8)
        scale = (group_scale(Wc * estimate, bits, group_size, scale_method)
                 if group_size in (0, -1) or static_groups else torch.empty(N, -(-K // group_size)))
    out = torch.zeros(N, K)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, U1 = Wc[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        if kind == "unstructured":
            score = (W1.square() / d[i1:i2].square()[None, :]).flatten()
            block = torch.ones(score.numel(), dtype=torch.bool)
            block[torch.argsort(score, stable=True)[: pruned_count(score.numel(), sparsity.ratio)]] = False
            keep[:, i1:i2] = estimate[:, i1:i2] = block.reshape(N, i2 - i1)
        for i in range(i2 - i1):
            col = i1 + i
            if kind == "nm" and col % sparsity.m == 0:
                m = sparsity.m
                score = W1[:, i:i + m].square() / d[col:col + m].square()[None, :]
                keep[:, col:col + m] = estimate[:, col:col + m] = nm_mask(score, sparsity.n, m)
            w, kept = W1[:, i], keep[:, col]
            if bits is None:
                c = torch.where(kept, w, 0.0)
            else:
                if group_size > 0 and not static_groups and col % group_size == 0:
                    end = min(col + group_size, K)
                    cur = torch.cat([W1[:, i:end - i1], Wc[:, i2:max(i2, end)]], dim=1)
                    scale[:, col // group_size] = group_scale(
                        cur * estimate[:, col:col + cur.shape[1]], bits, -1, scale_method)[:, 0]
                s = scale if group_size == 0 else scale[:, 0] if group_size == -1 else scale[:, col // group_size]
                qc = torch.where(kept, torch.round(w / s).clamp_(lo, hi), 0.0)
                q[:, col] = qc.to(torch.int8)
                c = qc * s
            out[:, col] = c
            err = (w - c) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        Wc[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return out, keep, q, scale


def _layer(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, K, generator=g) * (torch.rand(K, generator=g) * 3)
    X[:, 3] = 0  # a dead input channel
    return torch.randn(N, K, generator=g) * 0.05, 2 * X.T @ X / X.shape[0]


CASES = [
    dict(bits=4, group_size=128, scale_method="slim", sparsity="2:4"),  # the default recipe's sweep
    dict(bits=4, group_size=64, scale_method="absmax"),  # GPTQ
    dict(bits=8, group_size=-1, scale_method="absmax", sparsity="unstructured:0.5"),
    dict(bits=None, sparsity="2:4"),  # SparseGPT without quantization
    dict(bits=4, group_size=0, scale_method="slim", sparsity="2:4"),
    dict(bits=4, group_size=32, scale_method="absmax", static_groups=True),
    dict(bits=4, group_size=128, scale_method="slim", fixed_mask=True),  # a refit round's sweep
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("N,K,blocksize", [(40, 192, 128), (24, 256, 32)])
def test_sweep_is_bit_identical_to_the_column_loop(case, N, K, blocksize):
    W, H = _layer(N, K)
    kw = dict(case)
    if kw.pop("fixed_mask", False):
        kw["mask"] = torch.rand(N, K, generator=torch.Generator().manual_seed(5)) > 0.4
    if "sparsity" in kw:
        kw["sparsity"] = Sparsity.parse(kw["sparsity"])
    new = obs_sweep(W, H, blocksize=blocksize, **kw)
    ref = _column_loop(W, H, blocksize=blocksize, **kw)
    for a, b in zip(new, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))  # every bit, -0.0 too


@pytest.mark.parametrize("case", [CASES[0], CASES[-1]], ids=["sparsegpt-2:4", "refit-fixed-mask"])
def test_sweep_on_one_thread_matches_the_multithreaded_loop(case):
    """The column loop runs on one thread (obs.one_thread); a layer wide enough for torch to split its ops across
    threads (rank-1 updates of 127 x 640 values) gives the bits the reference loop gives on two threads, and the
    caller's thread count is back afterwards."""
    W, H = _layer(640, 256)
    kw = dict(case)
    if kw.pop("fixed_mask", False):
        kw["mask"] = torch.rand(640, 256, generator=torch.Generator().manual_seed(5)) > 0.4
    if "sparsity" in kw:
        kw["sparsity"] = Sparsity.parse(kw["sparsity"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = _column_loop(W, H, **kw)
        new = obs_sweep(W, H, **kw)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for a, b in zip(new, ref):
        assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


def test_one_thread_restores_the_count_after_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError):
            with one_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
