"""W8A8 checkpoints (compress --act-bits 8): the export reads the stored activation scales and puts INT8 Q/DQ on
each compressed MatMul's input, INT8 per-channel weights behind DequantizeLinear, the adapters on the float input;
ONNX Runtime matches load(), lint passes for every TensorRT target, and conflicting requests are refused."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from slim_trt.checkpoint.compressed_linear import compressed_layers
from slim_trt.errors import SlimError
from slim_trt.exporter import ExportOptions, export, export_model
from slim_trt.linter import format_report, lint
from slim_trt.verification.ort_vs_torch import Thresholds, verify, verify_model
from slim_trt.verification.ort_vs_torch import format_report as verify_text
from tests.conftest import run_cli
from tests.exporter.conftest import EXACT, save_compressed_checkpoint, w8a8_model
from tests.exporter.test_export import _ids


def _short_dtype(layer):
    return tuple(str(t).lower().replace("tensor(", "").rstrip(")") for t in (layer.dtype, layer.activation))


def _graph(path):
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return proto, inits, producers, consumers


@pytest.mark.parametrize("family,lowrank", [("llama", "decomposed"), ("gemma3", "plugin")])
def test_activation_qdq_int8_weights_and_float_adapters(family, lowrank, tmp_path):
    model = w8a8_model(family)
    meta = export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32", lowrank=lowrank))
    assert meta["act_quant"] == "int8"  # from the model's own scales, no flag
    layers = dict(compressed_layers(model))
    assert {r["name"]: r["act_scale"] for r in meta["compressed_layers"]} == {n: m.act_scale for n, m in layers.items()}
    proto, inits, producers, consumers = _graph(tmp_path / "e" / "model.onnx")
    q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == 14
    for q in q_nodes:
        name = q.name.split("/")[0]
        scale, zp = numpy_helper.to_array(inits[q.input[1]]), inits[q.input[2]]
        assert scale.shape == () and float(scale) == layers[name].act_scale  # constant per-tensor scale
        assert zp.data_type == TensorProto.INT8 and numpy_helper.to_array(zp) == 0
        (dq,) = consumers[q.output[0]]
        assert dq.op_type == "DequantizeLinear" and list(dq.input[1:]) == list(q.input[1:])
        (mm,) = consumers[dq.output[0]]
        assert mm.op_type == "MatMul" and mm.input[0] == dq.output[0]
        w_dq = producers[mm.input[1]]  # INT8 weights, one scale per output channel: axis 1 of [K, N]
        qw = inits[w_dq.input[0]]
        axis = {a.name: onnx.helper.get_attribute_value(a) for a in w_dq.attribute}["axis"]
        assert qw.data_type == TensorProto.INT8 and axis == 1
        assert list(inits[w_dq.input[1]].dims) == [layers[name].out_features]
        # the low-rank path reads the float input, never the quantized one
        x = q.input[0]
        lora = [n for n in consumers[x] if n.name.startswith(f"{name}.lora")]
        assert len(lora) == 1 and lora[0].op_type == ("MatMul" if lowrank == "decomposed" else "LowRankAdd")
    # ONNX Runtime against load()'s forward (fake quantization in PyTorch). Not bit-exact: an input within an ulp
    # of a rounding boundary can land one INT8 step apart (summation order), so the largest logit error is a
    # step's worth (measured 8e-3 on gemma3) while the mean stays at float noise.
    report = verify_model(tmp_path / "e" / "model.onnx", model, _ids(), decode_steps=3)
    assert report.ok and report.metrics["mean_abs"] < 2e-4, report.metrics


def test_fp16_export_lints_with_sparse_int8_gemms(tmp_path):
    export_model(w8a8_model("gemma3"), tmp_path / "e", options=ExportOptions(dtype="fp16"))
    for target in ("trt10", "trt11", "jetson-orin-jp6", "jetson-orin"):
        r = lint(tmp_path / "e" / "model.onnx", target=target)
        assert r.ok, format_report(r)
        # every compressed GEMM is INT8 x INT8 with a 2:4 weight: eligible for sparse INT8 tensor cores, except
        # k/v_proj whose N = 16 is not a multiple of the INT8 sparse tile (32)
        base = [x for x in r.layers if x.is_2to4]
        assert len(base) == 14, format_report(r)
        for x in base:
            want = ("shape", False) if x.N % 32 else ("eligible", True)
            assert (x.sparse_class, x.sparse_eligible) == want and _short_dtype(x) == ("int8", "int8"), x


def test_fp16_export_verifies(tmp_path):
    model = w8a8_model("gemma3")
    export_model(model, tmp_path / "e", options=ExportOptions(dtype="fp16"))
    # The fp16 weights and scales differ from the fp32 reference's by their rounding, so inputs near an INT8
    # boundary land one step from the reference's; in this 64-wide random model a step is ~1% of a layer's largest
    # input and 14 layers compound it. Measured with onnxruntime 1.32: the session (ort_rewrite: the fp16 graph
    # widened to fp32, integer GEMMs) cosine min 0.9961, top-1 93.8%, PPL +0.44%, mean 0.0259; the graph's plain
    # fp16 arithmetic 0.9964 / 91.7% / +0.28% / 0.0263: which steps flip is noise at this size. The limits below are the fp16 ones with cosine and
    # top-1 loosened to that; a wrong scale, axis or zero point fails them.
    thresholds = Thresholds.for_dtype("fp16").replace(cosine_min=0.995, top1_min=0.85)
    for form in ("u8u8", None):  # what an AVX2-only CPU gets, and this CPU's own choice: the same integers
        report = verify_model(tmp_path / "e" / "model.onnx", model, _ids(), decode_steps=3, thresholds=thresholds,
                              w8a8_form=form)
        assert report.ok, report.metrics
        assert report.metrics["ppl_rel"] < 5e-3 and report.metrics["mean_abs"] < 0.03, report.metrics
        assert report.settings["kernels"]["matmul_integer_to_float"] == 8  # q/k/v, gate/up share a GEMM
        assert not report.settings["kernels"]["unfused_dequantize"]
        # the session computes the fp16 graph in fp32 (ort_rewrite widens it) and the report says so
        assert report.settings["kernels"]["compute_dtype"] == "fp32"
        assert "computes this fp16 export in fp32" in verify_text(report)


def test_checkpoint_export_verify_and_refusals(tmp_path, capsys):
    ckpt = save_compressed_checkpoint(tmp_path / "ckpt", "llama", w8a8=True)
    meta = export(ckpt, tmp_path / "e", dtype="fp32", progress=False)
    assert meta["act_quant"] == "int8" and all(r["act_scale"] for r in meta["compressed_layers"])
    assert verify(tmp_path / "e" / "model.onnx", ckpt, windows=2, seqlen=24).ok
    # --act-quant int8 agrees with the checkpoint: same graph, the stored scales (no re-calibration)
    again = export(ckpt, tmp_path / "e2", dtype="fp32", act_quant="int8", progress=False)
    assert again["compressed_layers"] == meta["compressed_layers"]
    with pytest.raises(SlimError, match="--act-bits 8"):
        export(ckpt, tmp_path / "e3", act_quant="none", progress=False)
    with pytest.raises(SlimError, match="own activation scales"):
        export_model(w8a8_model("llama"), tmp_path / "e4", act_scales={"x": 1.0})
    rc, _, err = run_cli(["export", ckpt, "-o", tmp_path / "e5", "--act-quant", "none"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--act-quant none" in err, err
    assert not (tmp_path / "e3").exists() and not (tmp_path / "e5").exists()
    # a weight-only checkpoint is unchanged: no Q/DQ on activations without --act-quant
    plain = save_compressed_checkpoint(tmp_path / "plain", "llama")
    assert export(plain, tmp_path / "p", dtype="fp32", act_quant="none", progress=False)["act_quant"] is None
    proto = onnx.load(str(tmp_path / "p" / "model.onnx"))
    assert not [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert np.isfinite(len(proto.graph.node))
