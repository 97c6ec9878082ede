"""verify: ONNX Runtime vs PyTorch metrics, thresholds, Polygraphy files, and the checkpoint-level API."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from onnx import numpy_helper

from slim_trt.errors import SlimError
from slim_trt.exporter import ExportOptions, export, export_model
from slim_trt.verification.ort_vs_torch import Thresholds, compare_logits, format_report, verify, verify_model
from tests.exporter.conftest import EXACT, compressed_model, save_compressed_checkpoint


def _ids(n=2, length=20):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))


def test_compare_logits_metrics():
    ref = torch.randn(1, 5, 7, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 7, (1, 5), generator=torch.Generator().manual_seed(1))
    same = compare_logits(ref, ref, ids)
    assert same["max_abs"] == 0 and same["top1"] == 1.0 and same["ppl_rel"] == 0
    assert same["cosine_min"] == pytest.approx(1.0)
    shifted = compare_logits(ref + 0.5, ref, ids)  # softmax is shift invariant: same ppl and top-1
    assert shifted["max_abs"] == pytest.approx(0.5) and shifted["mean_abs"] == pytest.approx(0.5)
    assert shifted["ppl_rel"] < 1e-6 and shifted["top1"] == 1.0
    flipped = compare_logits(-ref, ref, ids)
    assert flipped["cosine_min"] == pytest.approx(-1.0) and flipped["top1"] == 0.0


@pytest.mark.parametrize("lowrank", ["decomposed", "plugin"])
def test_verify_model_passes_and_saves_polygraphy_files(lowrank, tmp_path):
    model = compressed_model("gemma3")
    export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32", lowrank=lowrank))
    report = verify_model(tmp_path / "e" / "model.onnx", model, _ids(), decode_steps=4,
                          save_inputs=tmp_path / "in.json", save_outputs=tmp_path / "out.json")
    assert report.ok, format_report(report)
    assert report.metrics["max_abs"] < 1e-4 and report.metrics["positions"] == 40
    assert report.settings["decode_steps"] == 4 and report.settings["with_cache"]
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    feeds = load_json(str(tmp_path / "in.json"))
    assert len(feeds) == 5  # prefill + 4 decode steps
    assert feeds[0]["input_ids"].shape == (2, 16) and feeds[1]["past_key_values.0.key"].shape[2] == 16
    results = RunResults.load(str(tmp_path / "out.json"))
    (_, iterations), = results.items()
    assert len(iterations) == 5 and iterations[-1]["present.1.value"].shape[2] == 20


def test_verify_model_fails_on_a_broken_graph(tmp_path):
    model = compressed_model("llama")
    export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32"))
    path = tmp_path / "e" / "model.onnx"
    m = onnx.load(str(path))
    t = next(t for t in m.graph.initializer if t.name == "model.layers.0.self_attn.o_proj.lora_L")
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 3.0, t.name))
    onnx.save(m, str(path))
    report = verify_model(path, model, _ids(), decode_steps=2)
    assert not report.ok and not report.checks["max_abs"]
    assert "FAIL" in format_report(report)


def test_fp16_thresholds_and_overrides():
    t = Thresholds.for_dtype("fp16")
    assert t.max_abs > Thresholds.for_dtype("fp32").max_abs
    assert t.replace(max_abs=0.5, top1_min=None).max_abs == 0.5 and t.replace(top1_min=None).top1_min == t.top1_min


def test_verify_checkpoint_end_to_end(tmp_path):
    ckpt = save_compressed_checkpoint(tmp_path / "ckpt", "llama")
    export(ckpt, tmp_path / "e", dtype="fp32", lowrank="plugin", progress=False)
    report = verify(tmp_path / "e" / "model.onnx", ckpt, windows=2, seqlen=24, decode_steps=3)
    assert report.ok, format_report(report)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["settings"]["reference"] == str(ckpt) and d["checks"]["top1"] is True
    # Another checkpoint is refused unless asked.
    other = save_compressed_checkpoint(tmp_path / "other", "llama", seed=5)
    with pytest.raises(SlimError, match="exported from another checkpoint"):
        verify(tmp_path / "e" / "model.onnx", other)


def test_verify_bad_inputs(tmp_path):
    model = compressed_model("llama")
    export_model(model, tmp_path / "bf", options=ExportOptions(dtype="bf16"))
    with pytest.raises(SlimError, match="bf16"):
        verify_model(tmp_path / "bf" / "model.onnx", model, _ids())
    with pytest.raises(SlimError, match="does not exist"):
        verify_model(tmp_path / "nope.onnx", model, _ids())
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(SlimError, match="not an ONNX"):
        verify_model(junk, model, _ids())
    with pytest.raises(SlimError, match="not a slim-trt checkpoint"):
        verify(tmp_path / "bf" / "model.onnx", tmp_path)


def _set_session_config(folder, **entries):
    path = folder / "slim_export.json"
    meta = json.loads(path.read_text())
    meta["onnxruntime"]["session_config"].update(entries)
    path.write_text(json.dumps(meta))


def test_verify_runs_the_session_config_the_export_declares(tmp_path):
    model = compressed_model("llama", group_size=16)
    export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32"))
    path = tmp_path / "e" / "model.onnx"
    fused = verify_model(path, model, _ids(), decode_steps=2, plain=True)
    assert fused.ok, format_report(fused)
    assert fused.settings["session_config"] == {"session.disable_quant_qdq": "0",
                                                "session.qdq_matmulnbits_accuracy_level": "1"}
    # one MatMulNBits per input the 14 quantized weights read (q/k/v, o, gate/up, down per layer: ort_rewrite)
    assert fused.settings["kernels"]["matmul_nbits"] == 8 and fused.plain["max_abs"] < 1e-4
    assert "8 MatMulNBits" in format_report(fused) and "plain arithmetic" in format_report(fused)
    assert not fused.settings["int8_activations"] and fused.thresholds == Thresholds.for_dtype("fp32")
    _set_session_config(tmp_path / "e", **{"session.qdq_matmulnbits_accuracy_level": "4"})
    int8_activations = verify_model(path, model, _ids(), decode_steps=2)
    assert int8_activations.settings["kernels"]["matmul_nbits"] == 8
    assert int8_activations.metrics["max_abs"] > 20 * fused.metrics["max_abs"]  # int8 activations move the logits
    # ... which the default limits for such a session allow, and say so
    assert int8_activations.settings["int8_activations"] and int8_activations.ok
    assert int8_activations.metrics["max_abs"] > Thresholds.for_dtype("fp32").max_abs
    assert "int8 on the fly" in format_report(int8_activations)
    _set_session_config(tmp_path / "e", **{"session.disable_quant_qdq": "1"})
    unfused = verify_model(path, model, _ids(), decode_steps=2)
    assert unfused.settings["kernels"]["matmul_nbits"] == 0 and unfused.metrics["max_abs"] < 1e-4


def test_verify_a_quantized_head_against_the_same_head(tmp_path):
    ckpt = save_compressed_checkpoint(tmp_path / "ckpt", "gemma3")
    export(ckpt, tmp_path / "e", dtype="fp32", head="int4", progress=False)
    report = verify(tmp_path / "e" / "model.onnx", ckpt, windows=2, seqlen=24, decode_steps=3)
    assert report.ok, format_report(report)
    m = report.metrics
    assert report.settings["head"] == "int4" and m["ppl_reference_unquantized_head"] != m["ppl_torch"]
    assert "--head int4" in format_report(report)
