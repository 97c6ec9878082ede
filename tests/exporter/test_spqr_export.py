"""SpQR exports (issue 14): UINT4 codes with zero points behind DequantizeLinear, and the fp16 outliers in each
form (columns, scatter, dense) computing exactly W_q + O; ONNX Runtime matches load(); lint says what TensorRT does
(zero points: refused; scatter with reduction: a plugin) and reads the 2:4 pattern through the zero points."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from slim_trt.algorithms.spqr import spqr_quantize
from slim_trt.compression.compressor import compress
from slim_trt.config import PRESETS, CompressConfig
from slim_trt.exporter import ExportOptions, export_model
from slim_trt.exporter.graph import GraphBuilder
from slim_trt.exporter.linear import dequantized, emit_outliers
from slim_trt.exporter.options import IR_VERSION, OPSET, OUTLIER_FORMS
from slim_trt.linter import lint
from slim_trt.verification.ort_vs_torch import verify_model
from tests.algorithms.test_spqr import planted_layer
from tests.conftest import calib_windows, tiny_model
from tests.exporter.conftest import EXACT


def layer_session(qt, form: str, dtype: str = "fp32"):
    N, K = qt.shape
    b = GraphBuilder(dtype)
    x = b.add_input("x", b.float_type, ["T", K])
    y = emit_outliers(b, x, b.op("MatMul", [x, dequantized(b, qt, "l", transpose=True)], name="l"), qt.outliers, "l",
                      form)
    b.identity_to(y, "y", name="out")
    b.add_output("y", b.float_type, ["T", N])
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")  # the graph's own arithmetic
    return ort.InferenceSession(b.make_model("l", OPSET, IR_VERSION).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("form", OUTLIER_FORMS)
def test_every_outlier_form_computes_base_plus_outliers(form):
    W, H = planted_layer(64, 128, seed=2)
    qt = spqr_quantize(W, H, 3, outlier_share=0.01)
    assert qt.outlier_count > 0
    x = np.random.default_rng(0).standard_normal((5, 128)).astype(np.float32)
    y = layer_session(qt, form).run(None, {"x": x})[0]
    ref = x @ qt.dequantize().numpy().T
    without = x @ qt.base_dequantize().numpy().T
    assert np.abs(y - ref).max() < 1e-4 < np.abs(without - ref).max()
    y16 = layer_session(qt, form, "fp16").run(None, {"x": x.astype(np.float16)})[0]  # fp16 graphs run too
    assert np.abs(y16.astype(np.float32) - ref).max() < 2e-2 * np.abs(ref).max()


@pytest.fixture(scope="module")
def spqr_24_model():
    model = tiny_model("llama")
    cfg = CompressConfig(**{**PRESETS["int4-dense"], **dict(quantizer="spqr", bits=4, group_size=16, sparsity="2:4",
                                                           lowrank="hessian", rank_ratio=0.1, refit_rounds=0,
                                                           max_bits=None)})
    compress(model, cfg, calib_windows(n=4, seqlen=32), progress=False)
    return model


@pytest.mark.parametrize("form", ["columns", "scatter"])
def test_onnx_runtime_matches_the_checkpoint_and_lint_says_what_tensorrt_does(spqr_24_model, form, tmp_path):
    meta = export_model(spqr_24_model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32", outliers=form))
    assert meta["options"]["outliers"] == form
    report = verify_model(tmp_path / "e" / "model.onnx", spqr_24_model, calib_windows(n=2, seqlen=24, seed=5))
    assert report.ok, report.metrics
    assert report.metrics["max_abs"] < 1e-2  # fp32, the graph's own arithmetic: the same model
    found = lint(tmp_path / "e" / "model.onnx", target="trt10")
    errors = {f.rule for f in found.findings if f.severity == "error"}
    assert errors == {"qdq-zero-point"}  # no false sparsity-2to4 error: lint reads the codes against the zeros
    compressed = [layer for layer in found.layers if layer.dtype == "uint4"]
    assert len(compressed) == 14 and all(layer.is_2to4 for layer in compressed)
    warnings = [f for f in found.findings if f.rule == "scatter-reduction"]
    assert (len(warnings) == 14 and "plugin" in warnings[0].message) if form == "scatter" else not warnings


def test_folded_zero_points_run_in_onnx_runtime_and_pass_tensorrt_lint(spqr_24_model, tmp_path):
    """--zero-points fold: signed INT4 codes (zero point 0) + the offsets through the group sums of x."""
    meta = export_model(spqr_24_model, tmp_path / "e",
                        options=ExportOptions(**EXACT, dtype="fp32", zero_points="fold"))
    assert {r["sparsity"] for r in meta["compressed_layers"]} == {"none"}  # the folded codes are dense in the file
    report = verify_model(tmp_path / "e" / "model.onnx", spqr_24_model, calib_windows(n=2, seqlen=24, seed=5))
    assert report.ok and report.metrics["max_abs"] < 1e-2, report.metrics
    for target in ("trt10", "trt11"):
        found = lint(tmp_path / "e" / "model.onnx", target=target)
        assert found.ok, [f.to_dict() for f in found.findings if f.severity == "error"]
        assert sum(layer.dtype == "int4" for layer in found.layers) == 14 * 3  # bases and both 4-bit adapters
    export_model(spqr_24_model, tmp_path / "f16", options=ExportOptions(dtype="fp16", zero_points="fold"))
    assert lint(tmp_path / "f16" / "model.onnx", target="trt10").ok
