"""W8A8 verification (slim_trt/verification/w8a8.py): the activation Q/DQ pairs are checked against the checkpoint's
scales exactly, the graph without them against the checkpoint with float activations under the usual limits, and
the whole model under limits from the reference's own sensitivity; a wrong or missing scale fails."""
from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from slim_trt.exporter import export
from slim_trt.verification.ort_vs_torch import Thresholds, format_report, verify
from slim_trt.verification.w8a8 import FloorLimits, act_scales, check_structure, float_activations, strip_act_qdq
from tests.exporter.conftest import save_compressed_checkpoint, w8a8_model


@pytest.fixture(scope="module")
def w8a8_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("w8a8")
    ckpt = save_compressed_checkpoint(d / "ckpt", "llama", w8a8=True)
    export(ckpt, d / "e", dtype="fp32", progress=False)
    return ckpt, d / "e" / "model.onnx"


def test_a_faithful_export_passes_all_three_parts(w8a8_export):
    ckpt, onnx_path = w8a8_export
    report = verify(onnx_path, ckpt, windows=2, seqlen=24)
    w = report.w8a8
    assert report.ok and w["ok"] and w["structure"]["ok"] and w["structure"]["layers"] == 14
    # fp32 with the pairs out: the same arithmetic as PyTorch up to summation order
    assert w["float_activations"]["metrics"]["max_abs"] < 1e-3 and w["float_activations"]["ok"]
    assert w["floor"]["draws"] == 3 and w["floor"]["eps"] == 1e-6
    text = format_report(report)
    assert "W8A8 structure: 14 activation Q/DQ pairs" in text and "sensitivity floor" in text
    # the session's W8A8 GEMMs and the CPU features that chose their form
    cpu = report.settings["cpu"]
    assert cpu["w8a8_form"] in ("u8u8", "u8s8") and cpu["cpu_features"][0] and report.settings["kernels"][
        "matmul_integer_to_float"] == 8
    assert f"W8A8 GEMMs: 8 MatMulIntegerToFloat as {cpu['w8a8_form']}" in text


def test_the_safe_form_forced_gives_the_cpus_own_numbers(w8a8_export, tmp_path):
    """u8u8 forced (what an AVX2-only CPU gets) against this CPU's own choice (u8s8 with VNNI/AMX): both exact
    integer GEMMs, so the same metrics up to float summation order. (u8s8 is never forced in a session here: on a
    CPU without VNNI it saturates, which is the bug this form exists for.) Exported at accuracy level 1, so that
    the adapters' MatMulNBits round no activation either: the session is then the checkpoint's arithmetic."""
    ckpt, _ = w8a8_export
    export(ckpt, tmp_path / "e1", dtype="fp32", ort_accuracy_level=1, progress=False)
    onnx_path = tmp_path / "e1" / "model.onnx"
    safe = verify(onnx_path, ckpt, windows=2, seqlen=24, w8a8_form="u8u8")
    own = verify(onnx_path, ckpt, windows=2, seqlen=24)
    assert safe.ok and safe.settings["cpu"]["w8a8_form"] == "u8u8" and safe.settings["cpu"]["reason"] == "forced"
    assert safe.metrics["mean_abs"] < 2e-4, safe.metrics
    for k in ("max_abs", "mean_abs", "ppl_onnx"):
        assert abs(safe.metrics[k] - own.metrics[k]) < 1e-3, (k, safe.metrics, own.metrics)


def _edit_scale(onnx_path, out_dir, factor):
    """A copy of the export with one layer's activation scale multiplied by `factor`; returns that layer."""
    import shutil

    shutil.copytree(onnx_path.parent, out_dir)
    proto = onnx.load(str(out_dir / onnx_path.name))
    q = next(n for n in proto.graph.node if n.name.endswith("/act/QuantizeLinear"))
    init = next(t for t in proto.graph.initializer if t.name == q.input[1])
    value = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((value * factor).astype(value.dtype), init.name))
    onnx.save(proto, str(out_dir / onnx_path.name))
    return q.name.split("/act/")[0]


def test_a_wrong_activation_scale_fails_with_the_layer_named(w8a8_export, tmp_path):
    ckpt, onnx_path = w8a8_export
    layer = _edit_scale(onnx_path, tmp_path / "bad", 2.0)
    report = verify(tmp_path / "bad" / onnx_path.name, ckpt, windows=2, seqlen=24, ignore_manifest=True)
    problems = report.w8a8["structure"]["problems"]
    assert not report.ok and len(problems) == 1 and problems[0].startswith(f"{layer}: activation scale")


def test_structure_names_missing_and_extra_pairs(w8a8_export):
    _, onnx_path = w8a8_export
    pairs = strip_act_qdq(onnx.load(str(onnx_path)))
    scales = {k: v[0] for k, v in pairs.items()}
    assert check_structure(pairs, scales)["ok"]
    first = next(iter(pairs))
    missing = check_structure({k: v for k, v in pairs.items() if k != first}, scales)
    assert not missing["ok"] and missing["problems"] == [f"{first}: no activation QuantizeLinear/DequantizeLinear "
                                                         f"in the graph"]
    extra = check_structure(pairs, {k: v for k, v in scales.items() if k != first})
    assert not extra["ok"] and "the checkpoint quantizes no input there" in extra["problems"][0]
    uint8 = check_structure({**pairs, first: (pairs[first][0], 128, "uint8")}, scales)
    assert "TensorRT needs int8 zero point 0" in uint8["problems"][0]


def test_stripping_leaves_no_activation_pair_and_a_valid_graph(w8a8_export):
    _, onnx_path = w8a8_export
    proto = onnx.load(str(onnx_path))
    n_q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    pairs = strip_act_qdq(proto)
    assert len(pairs) == 14 and sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == n_q - 14
    onnx.checker.check_model(proto)


def test_float_activations_turns_the_scales_off_and_restores_them():
    model = w8a8_model("llama")
    scales = act_scales(model)
    assert len(scales) == 14 and all(s > 0 for s in scales.values())
    with float_activations(model):
        assert act_scales(model) == {}
    assert act_scales(model) == scales


def test_floor_limits_never_tighten_and_stay_in_range():
    base = Thresholds.for_dtype("fp16")
    quiet = {"max_abs": 0.01, "mean_abs": 0.001, "cosine_min": 0.99999, "top1": 1.0, "ppl_rel": 1e-5}
    assert FloorLimits().apply(base, quiet) == base
    loud = {"max_abs": 26.7, "mean_abs": 1.69, "cosine_min": -0.23, "top1": 0.578, "ppl_rel": 0.18}
    t = FloorLimits().apply(base, loud)
    assert t.max_abs == pytest.approx(53.4) and t.mean_abs == pytest.approx(3.38) and t.cosine_min == -1.0
    assert t.top1_min == pytest.approx(0.156) and t.ppl_rel_max == pytest.approx(0.36)


def test_fp8_activations_need_an_fp8_zero_point():
    """Issue 24: the zero point's type decides INT8 or FP8 in both runtimes, so the structure check holds each
    layer to its checkpoint's format."""
    pairs = {"a": (0.5, 0, "float8_e4m3fn"), "b": (0.25, 0, "int8")}
    scales = {"a": 0.5, "b": 0.25}
    assert check_structure(pairs, scales, {"a": "fp8", "b": "int"})["ok"]
    wrong = check_structure(pairs, scales, {"a": "int", "b": "fp8"})
    assert wrong["problems"] == ["a: zero point 0 (float8_e4m3fn); TensorRT needs int8 zero point 0",
                                 "b: zero point 0 (int8); TensorRT needs float8_e4m3fn zero point 0 for the "
                                 "checkpoint's FP8 activations"]
