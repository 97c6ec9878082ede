"""The build-report parser on the documented TensorRT formats (fixtures/README.md says where they come from)."""
from __future__ import annotations

import json

import pytest

from slim_trt.trt.report import make_report, parse_layer_information, parse_sparsity_log, sparsity_summary
from tests.trt.conftest import FIXTURES

Q_PROJ = "/model/layers.0/self_attn/q_proj/MatMul"
O_PROJ = "/model/layers.0/self_attn/o_proj/MatMul"
GATE = "/model/layers.0/mlp/gate_proj/MatMul + /model/layers.0/mlp/act_fn/Sigmoid + /model/layers.0/mlp/Mul"
DOWN1 = "/model/layers.1/mlp/down_proj/MatMul"


def read(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_sparsity_lines_from_trtexec_log():
    eligible, picked = parse_sparsity_log(read("trtexec_sparse_build.log"))
    assert len(eligible) == 6 and len(picked) == 4
    assert eligible[0] == Q_PROJ and GATE in eligible and GATE in picked  # fused " + " names stay whole
    assert O_PROJ not in picked and DOWN1 not in picked


def test_sparsity_lines_empty_and_absent():
    eligible, picked = parse_sparsity_log(read("captured_dense_build.log"))
    assert eligible == ["/model/layers.0/mlp/up_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul"]
    assert picked == []
    assert parse_sparsity_log("[I] Engine built in 3.1 sec.\n") == (None, None)
    two_builds = read("captured_dense_build.log") + read("trtexec_sparse_build.log")
    assert len(parse_sparsity_log(two_builds)[1]) == 4  # the last build wins


def test_layer_information_trt10():
    layers, io = parse_layer_information(read("layer_info_trt10.json"))
    assert len(layers) == 8 and len(io) == 12 and io[0] == "input_ids"
    by_name = {layer.name: layer for layer in layers}
    q = by_name[Q_PROJ]
    assert q.layer_type == "CaskGemmConvolution" and q.has_sparse_weights is True
    assert q.sparse_tactic_name and q.output_types == ["Row major linear FP16 format"]
    assert not by_name[O_PROJ].sparse_tactic_name
    myelin = next(layer for layer in layers if layer.layer_type == "Myelin")
    assert myelin.tactic is None and myelin.has_sparse_weights is None  # empty TacticName, no conv fields
    assert by_name["/model/embed_tokens/Gather"].tactic == "0x0000000000000000"


def test_layer_information_trt11_and_names_only():
    layers, io = parse_layer_information(read("layer_info_trt11.json"))
    assert len(layers) == 6 and io == ["input_ids", "logits"]
    assert layers[1].output_types == ["Half"]
    names, io = parse_layer_information(read("layer_info_names_only.json"))
    assert len(names) == 8 and names[1].name == Q_PROJ and names[1].layer_type == "unknown"
    with pytest.raises(ValueError, match="no 'Layers'"):
        parse_layer_information({"Bindings": []})


def test_report_counts_picked_of_eligible(tmp_path):
    report = make_report(engine="engines/tiny.plan", onnx="export/tiny/model.onnx", tensorrt_version="10.13.3",
                         gpu={"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, target=None,
                         options={"sparsity": True}, build_seconds=31.4, engine_bytes=123456,
                         layer_information=read("layer_info_trt10.json"),
                         build_log=read("trtexec_sparse_build.log"), sparsity_enabled=True)
    assert report.summary == "sparse tactics picked for 4 of 6 eligible layers"
    assert any("2 eligible layers run dense kernels" in w for w in report.warnings)
    rows = {r["name"]: r for r in report.sparsity["layers"]}
    assert rows[Q_PROJ]["sparse_eligible"] and rows[Q_PROJ]["sparse_picked"]
    assert rows[O_PROJ]["sparse_eligible"] and not rows[O_PROJ]["sparse_picked"]
    assert not rows["/model/embed_tokens/Gather"]["sparse_eligible"]
    assert sum(r["sparse_picked"] for r in rows.values()) == 4
    assert report.sparsity["eligible_not_in_engine"] == [DOWN1]  # inside the Myelin node
    assert report.layer_types == {"Gather": 1, "CaskGemmConvolution": 5, "Myelin": 1, "Reformat": 1}
    path = report.save(tmp_path / "tiny.build.json")
    assert json.loads(path.read_text()) == report.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.build.json"]  # no .partial left behind


def test_summary_warns_when_everything_runs_dense():
    layers, _ = parse_layer_information(read("layer_info_trt10.json"))
    info, summary, warnings = sparsity_summary(layers, *parse_sparsity_log(read("captured_dense_build.log")), True)
    assert summary == "sparse tactics picked for 0 of 2 eligible layers"
    assert "picked dense kernels for all of them" in warnings[0]
    _, summary, warnings = sparsity_summary(layers, [], [], True)
    assert summary == "sparse tactics picked for 0 of 0 eligible layers" and "no layer eligible" in warnings[0]
    _, summary, warnings = sparsity_summary(layers, None, None, True)
    assert summary.startswith("sparsity unknown") and "no '(Sparsity)' lines" in warnings[0]
    _, summary, warnings = sparsity_summary(layers, None, None, False)
    assert summary == "sparsity disabled (--no-sparsity): dense build" and warnings == []


def lint_gemm(name: str, eligible: bool, cls: str = "eligible") -> dict:
    return {"name": name, "sparse_eligible": eligible, "sparse_class": cls if eligible else "shape",
            "sparse_math": "int8" if eligible else None}


UP0, DOWN0 = "/model/layers.0/mlp/up_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul"
GATE_MATMUL = "/model/layers.0/mlp/gate_proj/MatMul"
LM_HEAD, Q1 = "/model/lm_head/MatMul", "/model/layers.1/self_attn/q_proj/MatMul"


def test_build_report_sets_lint_prediction_beside_tensorrt():
    gemms = [lint_gemm(Q_PROJ, True), lint_gemm(O_PROJ, True), lint_gemm(GATE_MATMUL, False), lint_gemm(UP0, True),
             lint_gemm(DOWN0, True), lint_gemm(DOWN1, True), lint_gemm("/lm_head/MatMul", False), lint_gemm(Q1, True)]
    report = make_report(engine="e.plan", onnx="m.onnx", tensorrt_version="10.3.0", gpu={}, target=None,
                         options={}, build_seconds=1.0, engine_bytes=1, layer_information=read("layer_info_trt10.json"),
                         build_log=read("trtexec_sparse_build.log"), sparsity_enabled=True,
                         lint={"target": "jetson-orin-jp6", "gemms": gemms})
    c = report.sparsity["lint_comparison"]
    rows = {r["name"]: r for r in c["layers"]}
    assert rows[Q_PROJ]["verdict"] == "agree" and rows[Q_PROJ]["tensorrt_picked"]
    assert rows[O_PROJ]["verdict"] == "agree" and rows[O_PROJ]["tensorrt_picked"] is False
    assert rows[GATE_MATMUL]["verdict"] == "tensorrt-only"  # found inside the fused "gate + Sigmoid + Mul" layer
    assert rows[DOWN1]["verdict"] == "agree" and rows[DOWN1]["tensorrt_picked"] is False  # named by the log only
    # lm_head sits inside the Myelin ForeignNode and Q1 is named nowhere: TensorRT said nothing about either.
    assert rows["/lm_head/MatMul"]["verdict"] == rows[Q1]["verdict"] == "not-visible"
    assert rows[Q1]["tensorrt_eligible"] is None
    assert (c["predicted"], c["listed"], c["agree"], c["lint_only"], c["tensorrt_only"], c["not_visible"]) == \
        (6, 6, 5, 0, 1, 2)
    assert (c["picked"], c["picked_of_predicted"]) == (4, 3)
    assert c["summary"] == ("lint predicted 6 of 8 GEMMs eligible for sparse math, TensorRT listed 6: 5 agree, "
                            "0 predicted but not listed, 1 listed but not predicted, 2 not visible; sparse kernels "
                            "picked for 3 of the 6 predicted")
    assert any("1 GEMMs TensorRT listed eligible were predicted not eligible by lint (first: "
               f"{GATE_MATMUL})" in w for w in report.warnings)
    assert f"vs lint     {c['summary']}" in report.format()


def test_lint_predicted_but_tensorrt_did_not_list():
    gemms = [lint_gemm(Q_PROJ, True), lint_gemm(UP0, True), lint_gemm(DOWN0, False)]
    report = make_report(engine="e.plan", onnx="m.onnx", tensorrt_version="10.3.0", gpu={}, target=None,
                         options={}, build_seconds=1.0, engine_bytes=1, layer_information=read("layer_info_trt10.json"),
                         build_log=read("captured_dense_build.log"), sparsity_enabled=True, lint={"gemms": gemms})
    c = report.sparsity["lint_comparison"]
    assert [r["verdict"] for r in c["layers"]] == ["lint-only", "agree", "tensorrt-only"]
    assert c["picked"] == 0
    assert any(w.startswith(f"1 GEMMs lint predicted eligible were not listed eligible by TensorRT (first: {Q_PROJ})")
               for w in report.warnings)
    # Without the (Sparsity) lines nothing can be compared; a dense build has nothing to compare.
    blind = make_report(engine="e.plan", onnx="m.onnx", tensorrt_version="10.3.0", gpu={}, target=None, options={},
                        build_seconds=1.0, engine_bytes=1, layer_information=read("layer_info_trt10.json"),
                        build_log="", sparsity_enabled=True, lint={"gemms": gemms})
    assert blind.sparsity["lint_comparison"]["not_visible"] == 3
    dense = make_report(engine="e.plan", onnx="m.onnx", tensorrt_version="10.3.0", gpu={}, target=None, options={},
                        build_seconds=1.0, engine_bytes=1, layer_information=read("layer_info_trt10.json"),
                        build_log="", sparsity_enabled=False, lint={"gemms": gemms})
    assert "lint_comparison" not in dense.sparsity
