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
