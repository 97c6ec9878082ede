"""SpQR checkpoints (issue 14): codes, zero points, scales and the CSR outlier table are stored exactly and
checksummed; load() reproduces W_q + outliers (+ L R); 2:4 + adapters + refit rounds combine with SpQR."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slim_trt.algorithms.prune import is_nm
from slim_trt.algorithms.spqr import SpQRTensor
from slim_trt.checkpoint.format import LAYERS_FILE, MANIFEST, load, load_layers, read_manifest, save
from slim_trt.checkpoint.compressed_linear import compressed_layers
from slim_trt.compression.compressor import compress
from slim_trt.config import PRESETS, CompressConfig
from slim_trt.errors import SlimError
from tests.conftest import calib_windows, tiny_model

SPQR_24_HLORA = CompressConfig(**{**PRESETS["int4-dense"], **dict(
    quantizer="spqr", bits=4, group_size=16, sparsity="2:4", lowrank="hessian", rank_ratio=0.1, refit_rounds=1,
    max_bits=None)})


@pytest.fixture(scope="module")
def compressed():
    model = tiny_model("llama")
    report = compress(model, SPQR_24_HLORA, calib_windows(n=4, seqlen=32), progress=False)
    return model, report


def test_spqr_with_2to4_and_adapters(compressed):
    model, report = compressed
    for name, layer in compressed_layers(model):
        qt = layer.qweight
        assert isinstance(qt, SpQRTensor) and qt.outlier_count > 0 and layer.rank > 0
        assert is_nm(layer.base_weight(), 2, 4)  # outliers only at kept positions: the 2:4 pattern survives
        info = report.layers[name]
        assert info["rel_error"] < info["rel_error_base"]  # the adapters fit what SpQR leaves
    s = report.summary()
    # 2:4: 0.5 x (4 + 2) bits + statistics over all groups (6/16 + 64/256) + 32 per outlier (<= 1% of the kept)
    assert 3.625 < s["bits_per_param"] <= 3.625 + 0.16 + 1e-9


def test_round_trip_is_exact_and_the_outlier_table_is_checksummed(compressed, tmp_path):
    model, _ = compressed
    save(model, tmp_path / "ck")
    back = load(tmp_path / "ck")
    before, after = dict(compressed_layers(model)), dict(compressed_layers(back))
    for name, layer in before.items():
        a, b = layer.qweight, after[name].qweight
        assert isinstance(b, SpQRTensor)
        for f in ("q", "scale", "zero"):
            assert torch.equal(getattr(a, f), getattr(b, f))
        for f in ("crow", "col", "val"):
            assert torch.equal(getattr(a.outliers, f), getattr(b.outliers, f))
        assert torch.equal(layer.weight, after[name].weight)  # W_q + outliers
        assert torch.equal(layer.lora_L, after[name].lora_L) and torch.equal(layer.lora_R, after[name].lora_R)
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(model(ids).logits, back(ids).logits)
    meta = read_manifest(tmp_path / "ck")["layers"]
    first = next(iter(meta))
    assert meta[first]["storage"] == "masked" and meta[first]["outliers"]["nnz"] == before[first].qweight.outlier_count
    assert {"weight.outliers.crow", "weight.outliers.col", "weight.outliers.val"} <= set(meta[first]["tensors"])
    # One flipped outlier value is caught by its checksum.
    t = load_file(str(tmp_path / "ck" / LAYERS_FILE))
    key = f"{first}.weight.outliers.val"
    t[key] = t[key].clone()
    t[key][0] = -t[key][0]
    save_file(t, str(tmp_path / "tampered.safetensors"))
    with pytest.raises(SlimError, match="outliers.val"):
        load_layers(tmp_path / "tampered.safetensors", meta)
