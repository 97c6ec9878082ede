import json

import pytest
import torch

from slim_trt.checkpoint.format import MANIFEST, load, pack_uint, save, unpack_uint
from slim_trt.compression.compressor import compress
from slim_trt.checkpoint.compressed_linear import compressed_layers
from slim_trt.config import PRESETS, CompressConfig
from slim_trt.errors import SlimError
from tests.conftest import slim_2to4, calib_windows, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
def test_pack_uint_round_trip(nbits):
    x = torch.randint(0, 2**nbits, (3, 13), dtype=torch.uint8)
    assert torch.equal(unpack_uint(pack_uint(x, nbits), nbits, 13), x)


CONFIGS = {
    "slim-2:4": slim_2to4(),
    "absmax-g32-unstructured-q-adapters": slim_2to4(sparsity="unstructured:0.5", quantizer="absmax",
                                                         group_size=32, quantize_adapters=True, adapter_group_size=16),
    "int8-dense-svd": slim_2to4(sparsity="none", bits=8, lowrank="svd", max_bits=None),
    "fp-2:4-noadapters": slim_2to4(bits=16, lowrank="none"),
    "w8a8-2:4-lrc-smooth": CompressConfig(**PRESETS["trt-int8-sparse"]),
    "w8a8-2:4-lrc": CompressConfig(**{**PRESETS["trt-int8-sparse"], "smooth_alpha": None}),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    model = tiny_model("llama")
    compress(model, CONFIGS[request.param], calib_windows(n=4, seqlen=16), progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save(model, path, tokenizer=tiny_tokenizer())
    return model, path


def test_round_trip_identical_logits(saved):
    model, path = saved
    loaded = load(path)
    x = calib_windows(n=2, seqlen=12, seed=9)
    assert torch.equal(model(x).logits, loaded(x).logits)
    a, b = dict(compressed_layers(model)), dict(compressed_layers(loaded))
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        assert torch.equal(a[name].base_weight(), b[name].base_weight())
        fa, fb = a[name].lowrank_factors(), b[name].lowrank_factors()
        assert (fa is None) == (fb is None)
        if fa:
            assert torch.equal(fa[0], fb[0]) and torch.equal(fa[1], fb[1])


def test_existing_output_refused(saved, tmp_path):
    model, path = saved
    with pytest.raises(SlimError, match="--force"):
        save(model, path)
    save(model, path, force=True)  # replaced atomically
    assert (path / MANIFEST).exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_tampered_and_truncated_checkpoints_refused(saved, tmp_path):
    import shutil

    _, path = saved
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    f = bad / "slim_layers.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SlimError, match="checksum"):
        load(bad)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SlimError, match="checksum"):
        load(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(SlimError, match="missing"):
        load(bad)
    with pytest.raises(SlimError, match="not a slim-trt checkpoint"):
        load(tmp_path)


def test_manifest_records_layers(saved):
    _, path = saved
    m = json.loads((path / MANIFEST).read_text())
    assert m["schema_version"] == 2 and m["architecture"] == "llama"
    layer = m["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["shape"] == [64, 128]
    assert all(len(sha) == 64 for sha in layer["tensors"].values())
    # every file of the folder has a checksum, and the manifest one over its own content
    assert sorted(m["files"]) == sorted(p.name for p in path.iterdir() if p.name != MANIFEST)
    assert {"config.json", "generation_config.json", "model.safetensors",
            "slim_layers.safetensors"} <= set(m["files"])
    assert len(m["content_sha256"]) == 64


def test_activation_scales_are_stored_and_reloaded_exactly(tmp_path):
    model = tiny_model("gemma3")
    compress(model, CompressConfig(**PRESETS["trt-int8-sparse"]), calib_windows(n=4, seqlen=16), progress=False)
    save(model, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    loaded = dict(compressed_layers(load(tmp_path / "ckpt")))
    assert len(loaded) == 14
    for name, layer in compressed_layers(model):
        entry = manifest["layers"][name]
        assert entry["act_bits"] == 8 and entry["act_scale"] == layer.act_scale == loaded[name].act_scale
        assert "act_scale" in entry["tensors"]  # the stored tensor is checksummed like the weights
    # a layer without activation quantization stores none
    plain = tiny_model("llama")
    compress(plain, slim_2to4(), calib_windows(n=4, seqlen=16), progress=False)
    save(plain, tmp_path / "plain")
    assert not any("act_scale" in e for e in json.loads((tmp_path / "plain" / MANIFEST).read_text())["layers"].values())


def test_zero_point_weights_round_trip_exactly():
    """Asymmetric low-bit grids (issue 14): unsigned codes + integer zero points survive the stored form."""
    from slim_trt.algorithms.qtensor import QuantizedTensor
    from slim_trt.checkpoint.format import layer_from_tensors, layer_to_tensors
    from slim_trt.checkpoint.compressed_linear import CompressedLinear

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 8, (6, 37), generator=g, dtype=torch.int8)  # 3-bit codes, odd column count
    scale = torch.rand(6, 3, generator=g) + 0.1
    zero = torch.randint(0, 8, (6, 3), generator=g, dtype=torch.int8)
    qt = QuantizedTensor(q=q, scale=scale, bits=3, group_size=16, zero=zero)
    expected = (q.float() - zero.float().repeat_interleave(16, 1)[:, :37]) * scale.repeat_interleave(16, 1)[:, :37]
    assert torch.equal(qt.dequantize(), expected)
    t, meta = layer_to_tensors("l", CompressedLinear(qt, sparsity="none"))
    back = layer_from_tensors("l", t, meta).qweight
    assert meta["zero_point"] and torch.equal(back.q, q) and torch.equal(back.zero, zero)
    assert torch.equal(back.dequantize(), expected)
    with pytest.raises(ValueError, match="zero out of"):
        QuantizedTensor(q=q, scale=scale, bits=3, group_size=16, zero=zero + 8)


def test_mixed_group_bits_and_zero_point_2to4_round_trip_exactly():
    """SliM-LLM widths per group (group_bits) and 2:4 weights with zero points (stored with their keep-mask,
    since a pruned weight's code is its zero point, not 0) reload bit for bit."""
    from slim_trt.algorithms.gptq import gptq_quantize
    from slim_trt.algorithms.slimllm import slimllm_grid
    from slim_trt.algorithms.zeropoint import uniform_grid
    from slim_trt.checkpoint.format import layer_from_tensors, layer_to_tensors
    from slim_trt.checkpoint.compressed_linear import CompressedLinear

    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 256, generator=g)
    X = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 3.0, 256) ** 2
    H = 2.0 / 512 * X.T @ X
    mixed = gptq_quantize(W, H, 2, 64, grid=slimllm_grid(W, H, 2, 64))
    assert mixed.group_bits is not None and set(mixed.group_bits.unique().tolist()) >= {1, 3}
    t, meta = layer_to_tensors("l", CompressedLinear(mixed, sparsity="none"))
    back = layer_from_tensors("l", t, meta).qweight
    assert meta["group_bits"] and torch.equal(back.group_bits, mixed.group_bits) and torch.equal(back.q, mixed.q)
    assert torch.equal(back.dequantize(), mixed.dequantize())

    mask = torch.ones_like(W, dtype=torch.bool)
    mask[:, 0::4] = mask[:, 3::4] = False
    pruned = gptq_quantize(W, H, 3, 64, mask=mask, grid=uniform_grid(256, 3, 64))
    layer = CompressedLinear(pruned, mask=mask, sparsity="2:4")
    t, meta = layer_to_tensors("l", layer)
    assert meta["storage"] == "masked" and meta["zero_point"]
    loaded = layer_from_tensors("l", t, meta)
    assert torch.equal(loaded.mask, mask) and torch.equal(loaded.qweight.dequantize(), pruned.dequantize())
    assert bool((loaded.qweight.dequantize()[~mask] == 0).all())


def test_fp8_checkpoint_stores_f8_e4m3_and_reloads_exactly(tmp_path):
    """Issue 24: --preset trt-fp8-sparse stores its 2:4 weights as F8_E4M3 values (N:M form) with fp32 scales and
    FP8 activation scales, checksummed; the reloaded model computes the same logits bit for bit."""
    from safetensors import safe_open

    model = tiny_model("llama")
    compress(model, CompressConfig(**PRESETS["trt-fp8-sparse"]), calib_windows(n=4, seqlen=16), progress=False)
    save(model, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    entries = manifest["layers"]
    assert len(entries) == 14 and all(e["weight_format"] == "fp8" and e["act_format"] == "fp8" and
                                      e["storage"] == "nm" and "weight.values" in e["tensors"] for e in entries.values())
    with safe_open(str(tmp_path / "ckpt" / "slim_layers.safetensors"), "pt") as f:
        name = next(iter(entries))
        assert f.get_slice(f"{name}.weight.values").get_dtype() == "F8_E4M3"
    loaded = load(tmp_path / "ckpt")
    for (n, a), (_, b) in zip(compressed_layers(model), compressed_layers(loaded)):
        assert a.qweight.is_fp8 and b.qweight.is_fp8 and b.act_format == "fp8"
        assert torch.equal(a.qweight.q.view(torch.uint8), b.qweight.q.view(torch.uint8)), n
        assert torch.equal(a.mask, b.mask) and a.act_scale == b.act_scale
    ids = calib_windows(n=2, seqlen=16)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
