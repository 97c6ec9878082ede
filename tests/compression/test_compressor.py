import itertools
import json

import pytest
import torch

import slim_trt
from slim_trt.algorithms.prune import nm_violations
from slim_trt.compression.compressor import compress, compress_model
from slim_trt.checkpoint.compressed_linear import compressed_layers
from slim_trt.config import PRESETS, CalibConfig, CompressConfig
from slim_trt.errors import SlimError
from tests.conftest import slim_2to4, calib_windows, tiny_model


def _logit_err(model, ref, x):
    with torch.no_grad():
        return float((model(x).logits - ref).norm() / ref.norm())


def test_every_block_linear_is_compressed_2to4_along_k(family):
    model = tiny_model(family)
    report = compress(model, CompressConfig(**PRESETS["slim-paper"]), calib_windows(n=6, seqlen=24), progress=False)
    layers = dict(compressed_layers(model))
    n_blocks = model.config.num_hidden_layers
    assert len(layers) == len(report.layers) == n_blocks * (7 if family != "opt" else 6)
    assert "lm_head" not in layers and not any("embed" in n for n in layers)
    for name, layer in layers.items():
        W = layer.base_weight()
        N, K = W.shape
        assert nm_violations(W, 2, 4) == 0, name
        # exactly 2 of every 4 consecutive input columns are kept (q == 0 can only remove more)
        assert int(layer.mask.sum()) == N * K // 2
        assert layer.mask.reshape(N, K // 4, 4).sum(-1).eq(2).all()
        L, R = layer.lowrank_factors()
        assert L.shape == (N, max(1, -(-min(N, K) // 10))) and R.shape == (L.shape[1], K)
        scale = layer.qweight.scale
        assert scale.numel() == 1  # SLiM-Quant: one scale per tensor
        q = layer.qweight.q
        assert q.min() >= -8 and q.max() <= 7


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_default_recipe_gives_group_scales_and_4bit_adapters(family):
    from slim_trt.algorithms.pipeline import plan_ranks
    from slim_trt.compression.compressor import compressed_shapes

    model = tiny_model(family)
    # On these 64-wide layers rank 0.23 would cost more than the 4.5-bit budget: the plan lowers the ratio.
    planned, ratio = plan_ranks(compressed_shapes(model, slim_2to4()), slim_2to4())
    assert 0 < ratio < 0.23
    report = compress(model, slim_2to4(), calib_windows(n=6, seqlen=24), progress=False)
    assert report.bits_per_param(True) <= 4.5 and report.rank_ratio == ratio
    for name, layer in compressed_layers(model):
        N, K = layer.base_weight().shape
        assert nm_violations(layer.base_weight(), 2, 4) == 0 and int(layer.mask.sum()) == N * K // 2, name
        assert layer.qweight.scale.shape == (N, -(-K // 128))  # one SLiM-Quant scale per 128 input columns
        assert layer.rank == planned[name] == -(-round(min(N, K) * ratio, 9) // 1)  # ceil(ratio x min(N, K))
        for q in (layer.lora_L_q, layer.lora_R_q):
            assert q is not None and q.bits == 4 and q.q.min() >= -8 and q.q.max() <= 7


def test_adapters_lower_the_model_output_error():
    windows = calib_windows(n=8, seqlen=32)
    x = calib_windows(n=4, seqlen=32, seed=5)
    ref = tiny_model("llama")(x).logits
    errs = {}
    for lowrank in ("none", "svd", "slim", "hessian"):
        model = tiny_model("llama")
        cfg = CompressConfig(**{**PRESETS["slim-paper"], "lowrank": lowrank, "rank_ratio": 0.25})
        compress(model, cfg, windows, progress=False)
        errs[lowrank] = _logit_err(model, ref, x)
    assert errs["slim"] < 0.9 * errs["none"], errs
    assert errs["svd"] < errs["none"], errs
    assert errs["hessian"] < errs["slim"], errs


def test_report_counts_bits_exactly():
    model = tiny_model("llama")
    cfg = CompressConfig(**{**PRESETS["slim-paper"], "lowrank": "none"})
    rep = compress(model, cfg, calib_windows(n=2, seqlen=16), progress=False)
    # 2:4 INT4: 2 kept values x 4 bits + 2 x 2-bit indices per group of 4 = 3 bits/weight, plus one fp16 scale
    params = sum(v["params"] for v in rep.layers.values())
    assert rep.bits_per_param(False) == pytest.approx(3.0 + 16 * len(rep.layers) / params)
    assert rep.bits_per_param(True) == rep.bits_per_param(False)


def test_skip_list_and_indivisible_k_stay_dense():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="not a multiple of 3"):
        rep = compress(model, slim_2to4(sparsity="2:3", skip_layers=("*.q_proj",)), calib_windows(n=2, seqlen=16),
                       progress=False)
    # K = 64 (attention inputs) and 128 (down_proj) are not multiples of 3: everything stays dense
    assert dict(compressed_layers(model)) == {}
    assert len(rep.skipped) == 14


def test_non_finite_weights_name_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SlimError, match=r"model\.layers\.1\.mlp\.up_proj"):
        compress(model, slim_2to4(), calib_windows(n=2, seqlen=16), progress=False)


def _interrupt_after_first_block(monkeypatch, run):
    """Run `run` with a Ctrl-C while the second block is being saved to OUT.partial."""
    import slim_trt.compression.calibration.resume as R

    real, calls = R.save_layers, {"n": 0}

    def crash_after_first_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(R, "save_layers", crash_after_first_block)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(R, "save_layers", real)


def test_resume_after_interruption_gives_the_same_result(tiny_model_dir, tmp_path, monkeypatch):
    cfg = slim_2to4()
    calib = CalibConfig(nsamples=4, seqlen=16)
    out_a = tmp_path / "a"
    compress_model(str(tiny_model_dir), out_a, cfg, calib, progress=False)

    out_b = tmp_path / "b"
    _interrupt_after_first_block(monkeypatch, lambda: compress_model(str(tiny_model_dir), out_b, cfg, calib,
                                                                     progress=False))
    assert not out_b.exists() and (tmp_path / "b.partial" / "block_0000.json").exists()

    # a different config must not silently mix with the saved blocks
    with pytest.raises(SlimError, match="different"):
        compress_model(str(tiny_model_dir), out_b, slim_2to4(rank_ratio=0.3), calib, progress=False)
    compress_model(str(tiny_model_dir), out_b, cfg, calib, progress=False)
    assert not (tmp_path / "b.partial").exists()
    a, b = slim_trt.load(out_a), slim_trt.load(out_b)
    x = calib_windows(n=2, seqlen=12, seed=1)
    assert torch.equal(a(x).logits, b(x).logits)
    ma = json.loads((out_a / "slim_manifest.json").read_text())
    mb = json.loads((out_b / "slim_manifest.json").read_text())
    assert ma["layers"] == mb["layers"]  # same tensors, same checksums


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPT_BLOCK = {
    "flipped tensor byte": lambda d: _flip_last_byte(d / "block_0000.safetensors"),
    "truncated tensors": lambda d: (d / "block_0000.safetensors").write_bytes(b"\0" * 7),
    "edited record": lambda d: (d / "block_0000.json").write_text(
        (d / "block_0000.json").read_text().replace('"rank": ', '"rank": 1', 1)),
    "record not JSON": lambda d: (d / "block_0000.json").write_text("{"),
    "record missing": lambda d: (d / "block_0000.json").unlink(),
    # Issue 25: without its digest an edited group_size failed every re-run with a RuntimeError traceback
    "record without its digest": lambda d: _edit_record_without_digest(d / "block_0000.json"),
}


def _edit_record_without_digest(path):
    record = json.loads(path.read_text())
    del record["content_sha256"]
    for meta in record["layers"].values():
        meta["group_size"] = 7
    record["skipped"] = ["model.layers.0.evil"]
    path.write_text(json.dumps(record))


def test_a_corrupt_block_in_the_partial_folder_is_dropped_and_recomputed(tiny_model_dir, tmp_path, monkeypatch):
    """Issue 11: a damaged block in OUT.partial failed every re-run with advice that could not work. Now the
    block is dropped with a warning naming OUT.partial and compressed again, to the same checkpoint."""
    import shutil

    cfg, calib = slim_2to4(refit_rounds=0), CalibConfig(nsamples=2, seqlen=16)
    ref = slim_trt.load(compress_model(str(tiny_model_dir), tmp_path / "ref", cfg, calib, progress=False)[0])
    _interrupt_after_first_block(monkeypatch, lambda: compress_model(str(tiny_model_dir), tmp_path / "cut", cfg,
                                                                     calib, progress=False))
    x = calib_windows(n=2, seqlen=12, seed=1)
    for i, (kind, corrupt) in enumerate(CORRUPT_BLOCK.items()):
        out = tmp_path / f"run{i}"
        partial = tmp_path / f"run{i}.partial"
        shutil.copytree(tmp_path / "cut.partial", partial)
        corrupt(partial)
        with pytest.warns(UserWarning, match=rf"{partial}: block 0 is corrupt .*compressing it again"):
            compress_model(str(tiny_model_dir), out, cfg, calib, progress=False)
        assert not partial.exists(), kind
        assert torch.equal(slim_trt.load(out)(x).logits, ref(x).logits), kind



def test_the_partial_folder_takes_one_run_at_a_time_and_checks_its_state(tiny_model_dir, tmp_path, monkeypatch):
    """Issue 25: two runs to one -o shared OUT.partial (the second died with a SafetensorError traceback); a
    state.json that is a folder gave IsADirectoryError; junk block files were counted as resumed blocks."""
    import subprocess
    import sys

    import shutil

    from slim_trt.compression.calibration.resume import BlockStore, PartialLock

    cfg, calib = slim_2to4(refit_rounds=0), CalibConfig(nsamples=2, seqlen=16)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from slim_trt.compression.calibration.resume import "
                               "PartialLock; PartialLock(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
                               str(partial)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SlimError, match=rf"{partial} is in use by another compress run \(pid {holder.pid}\)"):
            compress_model(str(tiny_model_dir), out, cfg, calib, progress=False)
        assert partial.is_dir()  # the other run's folder is left alone
    finally:
        holder.kill()
        holder.wait()
    # its lock file still names the dead run: stale, taken over
    assert (partial / "lock").read_text().strip() == str(holder.pid)
    lock = PartialLock(partial)
    assert (partial / "lock").read_text().strip() == str(__import__("os").getpid())
    lock.release()

    (partial / "state.json").mkdir()
    (partial / "block_0009.json").write_text("{}")
    with pytest.raises(SlimError, match="state.json is missing or damaged"):
        compress_model(str(tiny_model_dir), out, cfg, calib, progress=False)
    assert BlockStore(partial).count(2) == 0
    shutil.rmtree(partial)
    compress_model(str(tiny_model_dir), out, cfg, calib, progress=False)
    assert not partial.exists() and (out / "slim_manifest.json").is_file()


W8A8 = CompressConfig(**PRESETS["trt-int8-sparse"])


@pytest.mark.parametrize("family,smooth", [("llama", None), ("gemma3", None), ("llama", 0.5), ("gemma3", 0.5)])
def test_w8a8_preset_int8_weights_per_channel_and_static_activation_scales(family, smooth):
    """The preset (SmoothQuant alpha 0.5) and the same without smoothing."""
    model = tiny_model(family)
    windows = calib_windows(n=6, seqlen=24)
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0].detach()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers.0." in n]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    assert W8A8.smooth_alpha == 0.5
    report = compress(model, CompressConfig(**{**PRESETS["trt-int8-sparse"], "smooth_alpha": smooth}), windows,
                      progress=False)
    assert report.summary()["mean_rel_error"] < report.summary()["mean_rel_error_base"]
    for name, layer in compressed_layers(model):
        N, K = layer.base_weight().shape
        assert layer.qweight.bits == 8 and layer.qweight.group_size == -1 and layer.qweight.scale.shape == (N, 1)
        assert nm_violations(layer.base_weight(), 2, 4) == 0 and int(layer.mask.sum()) == N * K // 2, name
        assert layer.act_bits == 8 and layer.act_scale > 0 and report.layers[name]["act_scale"] == layer.act_scale
        assert float(torch.tensor(layer.act_scale).half()) == layer.act_scale  # an fp16 value: same grid in fp16
        if name in inputs and smooth is None:  # block 0 saw the dense, unsmoothed inputs: the MSE scale clips at
            # most the largest values
            amax = float(torch.cat(inputs[name]).abs().max())
            assert 0.25 * amax / 127 < layer.act_scale <= amax / 127 * 1.001, name


def test_load_reproduces_the_fake_quantized_activations(tmp_path):
    """The checkpoint's forward is W_c Q(x) + L R x: base on the INT8 grid of the stored scale, adapters on x."""
    model = tiny_model("llama")
    compress(model, W8A8, calib_windows(n=4, seqlen=16), progress=False)
    from slim_trt.checkpoint.format import save

    save(model, tmp_path / "ckpt")
    layer = dict(compressed_layers(slim_trt.load(tmp_path / "ckpt")))["model.layers.1.mlp.down_proj"]
    x = torch.randn(3, 5, layer.in_features) * 4 * layer.act_scale * 127 / 3
    s = layer.act_scale
    xq = torch.clamp(torch.round(x / s), -128, 127) * s
    assert float((xq / s - torch.round(xq / s)).abs().max()) < 1e-4 and (x.abs() > 127 * s).any()  # on the grid, clipped
    L, R = layer.lowrank_factors()
    want = xq @ layer.base_weight().T + (x @ R.T) @ L.T
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    unquantized = x @ layer.base_weight().T + (x @ R.T) @ L.T
    assert float((got - unquantized).abs().max()) > 1e-3  # the quantization is really applied


def test_w8a8_resume_with_smoothing_gives_the_same_result(tiny_model_dir, tmp_path, monkeypatch):
    """Smoothing changes the norms of each block; a resumed run must restore them with the compressed layers."""
    cfg = CompressConfig(**{**PRESETS["trt-int8-sparse"], "smooth_alpha": 0.5, "refit_rounds": 1})
    calib = CalibConfig(nsamples=4, seqlen=16)
    compress_model(str(tiny_model_dir), tmp_path / "a", cfg, calib, progress=False)
    _interrupt_after_first_block(monkeypatch, lambda: compress_model(str(tiny_model_dir), tmp_path / "b", cfg,
                                                                     calib, progress=False))
    assert (tmp_path / "b.partial" / "block_0000.dense.safetensors").exists()
    import shutil

    shutil.copytree(tmp_path / "b.partial", tmp_path / "c.partial")
    compress_model(str(tiny_model_dir), tmp_path / "b", cfg, calib, progress=False)
    # the block's smoothed state is checksummed like its layers: a damaged one is dropped and recomputed
    _flip_last_byte(tmp_path / "c.partial" / "block_0000.dense.safetensors")
    with pytest.warns(UserWarning, match=r"block 0 is corrupt .*dense\.safetensors"):
        compress_model(str(tiny_model_dir), tmp_path / "c", cfg, calib, progress=False)
    a, b, c = (slim_trt.load(tmp_path / n) for n in "abc")
    x = calib_windows(n=2, seqlen=12, seed=1)
    assert torch.equal(a(x).logits, b(x).logits) and torch.equal(a(x).logits, c(x).logits)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(a.state_dict()[norm], b.state_dict()[norm])
    from tests.conftest import tiny_model as fresh

    assert not torch.equal(a.state_dict()[norm], fresh("llama").state_dict()[norm])  # smoothing did change it


# --- issue 15: cost, threads and device -------------------------------------------------------------------------

def test_the_report_splits_the_time_by_phase_and_names_the_device():
    model = tiny_model("llama")
    rep = compress(model, slim_2to4(), calib_windows(n=4, seqlen=16), progress=False, device="cpu")
    ph = rep.summary()["phases"]
    for key in ("calibration_forward", "hessian", "sweep", "adapter_svd", "adapter_rounding", "refit_round_1",
                "block_output", "layer_other", "other"):
        assert ph[key] >= 0.0, key
    assert ph["sweep"] > 0 and ph["adapter_svd"] > 0 and ph["refit_round_1"] > 0
    assert sum(rep.phases.values()) == pytest.approx(rep.seconds, rel=1e-6)
    assert rep.summary()["device"] == "cpu" and rep.summary()["peak_device_gb"] is None
    assert rep.threads >= 1 and rep.peak_rss_gb > 0


def test_layers_that_read_the_same_input_share_one_hessian(monkeypatch):
    from slim_trt.compression.calibration import runner

    def first_block_stats():
        seen = {}

        def keep_stats(i, block, linears, stats):
            if i == 0:
                seen.update(stats)
            return {}

        with torch.no_grad():
            runner.run_layerwise(tiny_model("llama"), calib_windows(n=4, seqlen=16), keep_stats, batch_size=2)
        return seen

    seen = first_block_stats()
    H = seen["self_attn.q_proj"].hessian
    assert seen["self_attn.k_proj"].hessian is H and seen["self_attn.v_proj"].hessian is H
    assert seen["mlp.up_proj"].hessian is seen["mlp.gate_proj"].hessian
    assert seen["self_attn.o_proj"].hessian is not H

    class Unshared(runner.InputProducts):  # every layer computes its own products, as before issue 15
        def __call__(self, x):
            self._x = None
            return super().__call__(x)

    monkeypatch.setattr(runner, "InputProducts", Unshared)
    alone = first_block_stats()
    for name, st in seen.items():
        assert torch.equal(alone[name].hessian, st.hessian) and torch.equal(alone[name].sq_sum, st.sq_sum), name


def test_compress_uses_every_core_it_is_given(monkeypatch):
    from slim_trt.resources import available_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rep = compress(tiny_model("llama"), slim_2to4(refit_rounds=0), calib_windows(n=2, seqlen=16),
                       progress=False)
        assert rep.threads == available_cores()
        assert torch.get_num_threads() == 1  # restored afterwards
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_changes():
    model = tiny_model("llama")
    with pytest.raises(SlimError, match="no usable CUDA GPU"):
        compress(model, slim_2to4(), calib_windows(n=2, seqlen=16), progress=False, device="cuda")
    assert dict(compressed_layers(model)) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_compresses_each_block_on_the_gpu_and_keeps_the_model_on_the_host():
    windows = calib_windows(n=4, seqlen=16)
    cpu_model, gpu_model = tiny_model("llama"), tiny_model("llama")
    cpu = compress(cpu_model, slim_2to4(), windows, progress=False, device="cpu")
    gpu = compress(gpu_model, slim_2to4(), windows, progress=False, device="cuda")
    assert gpu.device.startswith("cuda") and gpu.peak_device_gb > 0
    assert all(t.device.type == "cpu" for t in itertools.chain(gpu_model.parameters(), gpu_model.buffers()))
    for name, layer in compressed_layers(gpu_model):
        assert layer.qweight.q.device.type == "cpu"
    # Other kernels, other rounding: the same quality, not the same bits.
    assert gpu.summary()["mean_rel_error"] == pytest.approx(cpu.summary()["mean_rel_error"], rel=0.05)


def test_mlp_permutation_and_mask_reselection_save_reload_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    """Issue 23's options: the permuted MLP is saved as the block's state (its float order is the checkpoint's),
    reloads to the same logits, resumes to the same result, and every layer stays 2:4 along K."""
    cfg = slim_2to4(channel_permutation="mlp", refit_mask="reselect", refit_rounds=2)
    calib = CalibConfig(nsamples=4, seqlen=16)
    _, report = compress_model(str(tiny_model_dir), tmp_path / "a", cfg, calib, progress=False)
    shares = report.summary()["permutation"]
    assert sorted(shares) == ["0.mlp.down_proj", "0.mlp.down_proj:after", "1.mlp.down_proj", "1.mlp.down_proj:after"]
    assert all(shares[f"{i}.mlp.down_proj:after"] > shares[f"{i}.mlp.down_proj"] for i in (0, 1))
    _interrupt_after_first_block(monkeypatch, lambda: compress_model(str(tiny_model_dir), tmp_path / "b", cfg,
                                                                     calib, progress=False))
    compress_model(str(tiny_model_dir), tmp_path / "b", cfg, calib, progress=False)
    a, b = slim_trt.load(tmp_path / "a"), slim_trt.load(tmp_path / "b")
    x = calib_windows(n=2, seqlen=12, seed=1)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
        dense = tiny_model("llama")(x).logits
        # the tiny random model is far from its dense self at 64 calibration tokens; the options must not break it
        compress_model(str(tiny_model_dir), tmp_path / "c", slim_2to4(refit_rounds=2), calib, progress=False)
        assert _logit_err(a, dense, x) < 1.1 * _logit_err(slim_trt.load(tmp_path / "c"), dense, x)
    for name, layer in compressed_layers(a):
        assert nm_violations(layer.base_weight(), 2, 4) == 0, name
    # the MLP really was reordered: the compressed gate rows follow a permutation of the source's
    src = tiny_model("llama").model.layers[0].mlp.gate_proj.weight
    got = dict(compressed_layers(a))["model.layers.0.mlp.gate_proj"].base_weight()
    order = torch.stack([torch.argmax(got @ src[j]) for j in range(src.shape[0])])
    assert not torch.equal(order, torch.arange(src.shape[0]))


def test_all_permutations_save_reload_resume_and_stay_2to4(tiny_model_dir, tmp_path, monkeypatch):
    """mlp,attn,residual (issue 23): the residual permutation is chosen once and saved in OUT.partial, so a resumed
    run re-applies it (the search is not run again) and ends with the same checkpoint; the model is loaded whole
    (the permutation precedes the first block), its embedding, norms and head are saved permuted and reload to the
    same logits; every layer stays 2:4 along K."""
    import slim_trt.compression.calibration.residual as residual

    cfg = slim_2to4(channel_permutation="mlp,attn,residual", refit_rounds=1)
    calib = CalibConfig(nsamples=4, seqlen=16)
    _, report = compress_model(str(tiny_model_dir), tmp_path / "a", cfg, calib, progress=False)
    shares = report.summary()["permutation"]
    assert {k.split(".", 1)[1] for k in shares if not k.endswith(":after")} == {
        "mlp.down_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "mlp.gate_proj", "mlp.up_proj"}
    assert report.streamed is False
    _interrupt_after_first_block(monkeypatch, lambda: compress_model(str(tiny_model_dir), tmp_path / "b", cfg,
                                                                     calib, progress=False))
    assert (tmp_path / "b.partial" / "residual_permutation.safetensors").is_file()

    def no_search(*a, **k):
        raise AssertionError("a resumed run re-applies the saved permutation")

    monkeypatch.setattr(residual, "nm_permutation", no_search)
    compress_model(str(tiny_model_dir), tmp_path / "b", cfg, calib, progress=False)
    a, b = slim_trt.load(tmp_path / "a"), slim_trt.load(tmp_path / "b")
    x = calib_windows(n=2, seqlen=12, seed=1)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    src = tiny_model("llama")
    # the embedding and the final norm were saved permuted: the same columns, in another order
    emb = a.model.embed_tokens.weight
    assert not torch.equal(emb, src.model.embed_tokens.weight)
    assert torch.equal(emb.sum(0).sort().values, src.model.embed_tokens.weight.sum(0).sort().values)
    for name, layer in compressed_layers(a):
        assert nm_violations(layer.base_weight(), 2, 4) == 0, name


def test_residual_permutation_refuses_a_streamed_model(tmp_path):
    import types

    model = tiny_model("llama")
    weights = types.SimpleNamespace(home=torch.device("cpu"))
    with pytest.raises(SlimError, match="residual permutes the whole model before its first block: it cannot "
                                        "stream the blocks from disk; use --no-stream or drop residual"):
        compress(model, slim_2to4(channel_permutation="residual"), calib_windows(n=2, seqlen=16),
                 resume_dir=tmp_path / "partial", weights=weights, progress=False)
    assert not (tmp_path / "partial").exists() or not any((tmp_path / "partial").iterdir())


def test_dense_target_resumes_to_the_same_result_and_reports_the_drift(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """dense_target (asymmetric calibration) on the defaults: an interrupted run resumes to the same
    checkpoint (the restored block passes the dense model's hidden states on), every block reports how far the
    compressed model has drifted from the dense one, and the layers fit a target other than their own weight."""
    cfg = CompressConfig(dense_target=0.25, refit_rounds=1)
    calib = CalibConfig(nsamples=4, seqlen=16)
    _, report = compress_model(str(tiny_model_dir), tmp_path / "a", cfg, calib, progress=False)
    drifts = [b["drift_rel_error"] for b in report.blocks]
    assert len(drifts) == 2 and all(d > 0 for d in drifts)
    assert report.phases["asymmetric_target"] > 0  # block 1's layers were refitted to the dense model's output
    _interrupt_after_first_block(monkeypatch, lambda: compress_model(str(tiny_model_dir), tmp_path / "b", cfg,
                                                                     calib, progress=False))
    compress_model(str(tiny_model_dir), tmp_path / "b", cfg, calib, progress=False)
    _, own = compress_model(str(tiny_model_dir), tmp_path / "c", CompressConfig(refit_rounds=1, dense_target=0.0),
                            calib, progress=False)
    assert "drift_rel_error" not in own.blocks[0]
    a, b, c = (slim_trt.load(tmp_path / n) for n in "abc")
    x = calib_windows(n=2, seqlen=12, seed=1)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
        assert not torch.equal(a(x).logits, c(x).logits)


def test_block_tuning_saves_reloads_and_resumes_to_the_same_result(tiny_model_dir, tmp_path, monkeypatch):
    """Block-wise adapter tuning toward the dense stream: the tuned adapters are what the checkpoint stores (a
    reload computes what the run's report measured), and an interrupted run resumes to the same checkpoint."""
    cfg = CompressConfig(refit_rounds=1, block_tune_epochs=8, block_tune_lr=3e-3, block_tune_target="dense")
    calib = CalibConfig(nsamples=4, seqlen=16)
    _, report = compress_model(str(tiny_model_dir), tmp_path / "a", cfg, calib, progress=False)
    assert all(b["tuning"]["steps"] == 16 for b in report.blocks)  # 4 windows in steps of 2, 8 epochs
    assert all(b["tuning"]["kept"] and b["tuning"]["loss_after"] < b["tuning"]["loss_before"] for b in report.blocks)
    _interrupt_after_first_block(monkeypatch, lambda: compress_model(str(tiny_model_dir), tmp_path / "b", cfg,
                                                                     calib, progress=False))
    compress_model(str(tiny_model_dir), tmp_path / "b", cfg, calib, progress=False)
    _, untuned = compress_model(str(tiny_model_dir), tmp_path / "c", CompressConfig(refit_rounds=1), calib,
                                progress=False)
    a, b, c = (slim_trt.load(tmp_path / n) for n in "abc")
    x = calib_windows(n=2, seqlen=12, seed=1)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
        assert not torch.equal(a(x).logits, c(x).logits)
