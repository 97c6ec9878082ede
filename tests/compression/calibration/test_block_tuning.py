import pytest
import torch

from slim_trt.checkpoint.compressed_linear import CompressedLinear, compressed_layers
from slim_trt.compression.calibration.block_tuning import BlockTuning, tune_block
from slim_trt.compression.calibration.families import decoder_blocks
from slim_trt.compression.compressor import compress
from slim_trt.config import CompressConfig
from slim_trt.errors import SlimError
from tests.conftest import calib_windows, tiny_model


def _compressed_block(family: str):
    """Block 1 of a tiny model compressed with the defaults (W8A8 2:4 + 4-bit LRC adapters), the dense copy of it,
    the hidden states entering it and the keyword arguments it takes."""
    dense = tiny_model(family)
    model = tiny_model(family)
    windows = calib_windows(n=4, seqlen=16)
    compress(model, CompressConfig(dense_target=0.0, channel_permutation="none"), windows, batch_size=4,
             progress=False)
    seen = {}

    def grab(_m, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
        seen["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    h = decoder_blocks(model)[1].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(windows, use_cache=False)
    h.remove()
    kw = {**seen["kw"], "use_cache": False}
    kw.pop("past_key_values", None)
    return decoder_blocks(model)[1], decoder_blocks(dense)[1], seen["x"], kw


def _out(block, x, kw):
    with torch.no_grad():
        y = block(x, **kw)
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tuning_lowers_the_block_error_and_changes_only_the_adapters(family):
    block, dense, x, kw = _compressed_block(family)
    target = _out(dense, x, kw)
    frozen = {k: v.clone() for k, v in block.state_dict().items()}
    bases = {n: m.weight.clone() for n, m in compressed_layers(block)}
    before = ((_out(block, x, kw) - target).pow(2).mean() / target.pow(2).mean()).item()
    rep = tune_block(block, [x], [target], lambda b: kw, BlockTuning(epochs=16, lr=3e-3, micro_batch=4))
    after = ((_out(block, x, kw) - target).pow(2).mean() / target.pow(2).mean()).item()
    assert rep["kept"] and rep["steps"] == 16  # one step per epoch: the 4 windows are one micro-batch
    assert rep["loss_before"] == pytest.approx(before, rel=1e-4)
    assert rep["loss_after"] == pytest.approx(after, rel=1e-4)
    assert after < 0.9 * before
    # Norms and every other tensor of the block are as they were; the base weights too.
    for k, v in block.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    for n, m in compressed_layers(block):
        assert torch.equal(m.weight, bases[n])
        assert not isinstance(m.lora_L, torch.nn.Parameter)
        # The adapters are back on their 4-bit grid: the float form is the integer form, dequantized.
        assert torch.equal(m.lora_L, m.lora_L_q.dequantize().to(m.lora_L.dtype))
        assert torch.equal(m.lora_R, m.lora_R_q.dequantize().to(m.lora_R.dtype))
    assert all(p.requires_grad for p in block.parameters())  # the norms are given back as they came


def test_a_tuning_that_makes_the_block_worse_is_undone():
    block, dense, x, kw = _compressed_block("llama")
    target = _out(dense, x, kw)
    adapters = {n: (m.lora_L.clone(), m.lora_R.clone(), m.lora_L_q) for n, m in compressed_layers(block)}
    out = _out(block, x, kw)
    rep = tune_block(block, [x], [target], lambda b: kw, BlockTuning(epochs=2, lr=0.9, micro_batch=4))
    assert not rep["kept"] and rep["loss_after"] == rep["loss_before"]
    for n, m in compressed_layers(block):
        L, R, Lq = adapters[n]
        assert torch.equal(m.lora_L, L) and torch.equal(m.lora_R, R) and m.lora_L_q is Lq
    assert torch.equal(_out(block, x, kw), out)


def test_the_channel_loss_weighs_every_hidden_unit_alike():
    """loss "channel": each hidden unit's squared error relative to its own mean square, averaged over units; a
    unit with massive activations counts as much as any other (with "mse" it decides the loss)."""
    block, dense, x, kw = _compressed_block("llama")
    target = _out(dense, x, kw).clone()
    target[..., 0] *= 1000.0  # one massive unit, far from what the block computes
    err = (_out(block, x, kw) - target).pow(2).reshape(-1, target.shape[-1])
    ms = target.pow(2).reshape(-1, target.shape[-1]).mean(0)
    got = {loss: tune_block(block, [x], [target], lambda b: kw, BlockTuning(epochs=0, lr=1e-3, loss=loss))
           for loss in ("mse", "channel")}
    assert got["channel"]["loss_before"] == pytest.approx((err.mean(0) / ms).mean().item(), rel=1e-4)
    assert got["mse"]["loss_before"] == pytest.approx((err.mean() / ms.mean()).item(), rel=1e-4)
    assert got["mse"]["loss_before"] > 0.9  # the massive unit's error is nearly all of it
    assert got["channel"]["loss_before"] < 0.1


@pytest.mark.parametrize("target", ["layer", "dense"])
def test_compress_reports_each_block_tuning(target):
    model = tiny_model("llama")
    windows = calib_windows(n=4, seqlen=16)
    cfg = CompressConfig(block_tune_epochs=2, block_tune_lr=1e-3, block_tune_target=target)
    report = compress(model, cfg, windows, batch_size=4, progress=False)
    tunings = [b["tuning"] for b in report.blocks]
    assert len(tunings) == 2 and all(t["steps"] == 2 * 2 for t in tunings)  # 4 windows in steps of 2, 2 epochs
    assert all(t["loss_after"] <= t["loss_before"] for t in tunings)
    assert "block_tuning" in report.phases
    assert all(isinstance(m, CompressedLinear) for _, m in compressed_layers(model))


def test_the_dense_target_is_the_dense_streams_hidden_states():
    """With target "dense" the second block is tuned toward the dense model's own hidden states: its loss before
    tuning is the distance from those, larger than from the dense block's output on the compressed inputs."""
    windows = calib_windows(n=4, seqlen=16)
    reports = {}
    for target in ("layer", "dense"):
        cfg = CompressConfig(dense_target=0.0, block_tune_epochs=1, block_tune_target=target)
        reports[target] = compress(tiny_model("llama"), cfg, windows, batch_size=4, progress=False).blocks
    # block 0 sees the dense inputs either way: the same targets
    assert reports["dense"][0]["tuning"]["loss_before"] == pytest.approx(reports["layer"][0]["tuning"]["loss_before"])
    assert reports["dense"][1]["tuning"]["loss_before"] > reports["layer"][1]["tuning"]["loss_before"]
    assert "drift_rel_error" in reports["dense"][1] and "drift_rel_error" not in reports["layer"][1]


@pytest.mark.parametrize("field,value", [("block_tune_epochs", -1), ("block_tune_epochs", 1.5),
                                         ("block_tune_lr", 0.0), ("block_tune_lr", 2.0),
                                         ("block_tune_target", "model"), ("block_tune_loss", "l1")])
def test_bad_block_tuning_settings_are_refused(field, value):
    with pytest.raises(SlimError, match=field.replace("_", "-")):
        CompressConfig(**{field: value})


def test_a_dense_tuning_target_carries_the_dense_stream_without_the_drift():
    """The block tuning's "dense" target needs the dense model's hidden states, not the asymmetric drift: the runner
    carries the stream (each block reports its distance from it) and gives the layers no drift to fit."""
    from slim_trt.compression.calibration.runner import BlockTune, run_layerwise

    model = tiny_model("llama")
    drifts = []

    def keep(i, block, linears, stats):
        drifts.extend(st.drift for st in stats.values())
        return {}

    tune = BlockTune(BlockTuning(epochs=1, lr=1e-3), target="dense")
    results = run_layerwise(model, calib_windows(n=4, seqlen=16), keep, batch_size=4, tune=tune)
    assert drifts and all(d is None for d in drifts)
    assert all(r.drift_rel_error is not None for r in results)
    drifts.clear()  # with the asymmetric targets on, block 1's layers get their drift
    run_layerwise(tiny_model("llama"), calib_windows(n=4, seqlen=16), keep, batch_size=4, tune=tune, asymmetric=True)
    assert any(d is not None for d in drifts)
