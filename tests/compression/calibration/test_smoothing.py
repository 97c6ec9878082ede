"""SmoothQuant folding: the smoothed block computes the same function, with flatter input channels."""
import pytest
import torch

from slim_trt.algorithms.smooth import smooth_scales, tied_scales
from slim_trt.compression.calibration.families import block_linears, decoder_blocks
from slim_trt.compression.calibration.smoothing import smooth_block
from tests.conftest import calib_windows, tiny_model


def test_smooth_scales_formula():
    a, w = torch.tensor([4.0, 1.0, 0.0, 9.0]), torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smooth_scales(a, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))  # dead channels keep 1
    assert torch.allclose(smooth_scales(a[:2], w[:2], 1.0), a[:2]) and torch.allclose(smooth_scales(a[:2], w[:2], 0.0),
                                                                                     1 / w[:2])


def test_tied_scales_share_one_scale_per_value_channel():
    # 4 query heads, 2 value heads, head_dim 3: heads 0, 1 read value head 0; heads 2, 3 value head 1
    a = torch.arange(1.0, 13.0)
    s_v, s_o = tied_scales(a, torch.ones(12), 1.0, groups=2, head_dim=3)
    assert torch.equal(s_v, torch.tensor([4.0, 5.0, 6.0, 10.0, 11.0, 12.0]))  # max over the group's heads
    assert torch.equal(s_o, torch.tensor([4.0, 5, 6, 4, 5, 6, 10, 11, 12, 10, 11, 12]))


def _input_absmax(model, windows):
    out, hooks = {}, []
    for i, block in enumerate(decoder_blocks(model)):
        for n, lin in block_linears(block).items():
            def hook(_m, a, _o, key=(i, n)):
                x = a[0].detach().reshape(-1, a[0].shape[-1]).abs().amax(0)
                out[key] = torch.maximum(out[key], x) if key in out else x
            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("family,targets", [("llama", 7), ("qwen2", 7), ("gemma3", 7), ("opt", 5)])
def test_smoothing_keeps_the_function_and_flattens_the_inputs(family, targets):
    """alpha = 1 moves everything: s_j = max|x_j|, so every smoothed input channel's max becomes exactly 1 (o_proj:
    the max over the query heads sharing a value head), while the logits stay the same. The divisors returned are
    what each target's input was divided by (the runner rescales its statistics by them instead of a new pass)."""
    model = tiny_model(family)
    windows = calib_windows(n=4, seqlen=16)
    with torch.no_grad():
        ref = model(windows).logits
    before = _input_absmax(model, windows)
    divided = {}
    for i, block in enumerate(decoder_blocks(model)):
        linears = block_linears(block)
        absmax = {n: before[(i, n)] for n in linears}
        divisors = smooth_block(block, model.config, linears, absmax, 1.0)
        assert len(divisors) == targets
        for n, s in divisors.items():
            divided[(i, n)] = s
    with torch.no_grad():
        assert torch.allclose(model(windows).logits, ref, rtol=1e-4, atol=1e-4)
    after = _input_absmax(model, windows)
    for key, s in divided.items():
        assert torch.allclose(after[key], before[key] / s, rtol=1e-4, atol=1e-6), key
    cfg = model.config
    for (i, name), x in after.items():
        if name.endswith(("o_proj", "out_proj")):
            kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
            head_dim = x.numel() // cfg.num_attention_heads
            x = x.reshape(kv, -1, head_dim).amax(1)
        if family == "opt" and name == "fc2":
            continue  # behind a ReLU: not smoothed
        assert torch.allclose(x, torch.ones_like(x), atol=1e-4), (i, name, float(x.min()), float(x.max()))
