from __future__ import annotations

import pytest
import torch

from slim_trt.algorithms.gptq import gptq_quantize
from slim_trt.algorithms.prune import is_nm, magnitude_scores, nm_violations, prune, wanda_scores
from slim_trt.algorithms.quantize import quantize_weight
from slim_trt.algorithms.sparsegpt import sparsegpt
from slim_trt.config import Sparsity


def test_sparsegpt_2_4_beats_magnitude_and_wanda(layer, output_error):
    W, X, H = layer
    sp = Sparsity.parse("2:4")
    W_new, mask, qt = sparsegpt(W, H, sp)
    assert qt is None
    assert nm_violations(mask, 2, 4) == 0 and bool((mask.reshape(128, -1, 4).sum(2) == 2).all())
    assert is_nm(W_new, 2, 4) and bool((W_new[~mask] == 0).all())
    err = output_error(W, W_new, X)
    err_mag = output_error(W, prune(W, magnitude_scores(W), sp)[0], X)
    err_wanda = output_error(W, prune(W, wanda_scores(W, X.norm(dim=0)), sp)[0], X)
    assert err < 0.5 * err_wanda < err_wanda < err_mag  # measured 0.058 vs 0.226 vs 0.370


@pytest.mark.parametrize("group_size", [0, -1, 128])
@pytest.mark.parametrize("scale_method", ["absmax", "slim"])
def test_joint_2_4_and_int4(layer, output_error, group_size, scale_method):
    W, X, H = layer
    sp = Sparsity.parse("2:4")
    W_new, mask, qt = sparsegpt(W, H, sp, bits=4, group_size=group_size, scale_method=scale_method)
    assert nm_violations(mask, 2, 4) == 0
    assert bool((qt.q[~mask] == 0).all())
    assert torch.equal(qt.dequantize(), W_new)
    assert int(qt.q.min()) >= -8 and int(qt.q.max()) <= 7
    # against the SLiM-paper order without compensation: Wanda 2:4, then round to nearest
    Wp, _ = prune(W, wanda_scores(W, X.norm(dim=0)), sp)
    rtn = quantize_weight(Wp, scale_method, 4, group_size)
    assert output_error(W, W_new, X) < 0.5 * output_error(W, rtn.dequantize(), X)  # measured 0.25x


def test_unstructured_prunes_the_exact_ratio_per_block(layer, output_error):
    W, X, H = layer
    W_new, mask, _ = sparsegpt(W, H, "unstructured:0.5", blocksize=64)
    for b in range(0, 256, 64):
        assert int((~mask[:, b:b + 64]).sum()) == 128 * 64 // 2
    assert bool((W_new[~mask] == 0).all())
    Wp, _ = prune(W, wanda_scores(W, X.norm(dim=0)), Sparsity.parse("unstructured:0.5"))
    assert output_error(W, W_new, X) < 0.5 * output_error(W, Wp, X)  # measured 0.047 vs 0.150


def test_dense_sparsegpt_is_gptq(layer):
    W, _, H = layer
    W_new, mask, qt = sparsegpt(W, H, "none", bits=4, group_size=64)
    ref = gptq_quantize(W, H, 4, group_size=64)
    assert bool(mask.all()) and torch.equal(qt.q, ref.q) and torch.equal(qt.scale, ref.scale)


def test_sparsegpt_is_deterministic_and_leaves_inputs_alone(layer):
    W, _, H = layer
    W0, H0 = W.clone(), H.clone()
    a = sparsegpt(W, H, "2:4", bits=8, group_size=32)
    b = sparsegpt(W, H, "2:4", bits=8, group_size=32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2].q, b[2].q)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_sparsegpt_shape_errors(layer):
    W, _, H = layer
    with pytest.raises(ValueError, match="K % m == 0"):
        sparsegpt(W[:, :250], H[:250, :250], "2:4")
    with pytest.raises(ValueError, match="multiple of m"):
        sparsegpt(W, H, "2:4", blocksize=30)
    with pytest.raises(ValueError, match="expected"):
        sparsegpt(W, H[:128, :128], "2:4")
