"""`slim-trt lint`: a table and JSON on a good export; exit 1 on errors; exit 2 on bad inputs."""
from __future__ import annotations

import json

import onnx

from slim_trt.exporter import ExportOptions, export_model
from tests.exporter.conftest import compressed_model
from tests.conftest import run_cli as run




def test_lint_cli(tmp_path, capsys):
    export_model(compressed_model("llama"), tmp_path / "e", options=ExportOptions(lowrank="plugin"))
    path = tmp_path / "e" / "model.onnx"
    rc, text, err = run(["lint", path], capsys)
    assert rc == 0, err
    assert "model.layers.1.mlp.down_proj/MatMul" in text and "2:4-eligible" in text and "OK" in text
    rc, text, _ = run(["lint", path, "--target", "trt11", "--json", "-"], capsys)
    assert rc == 0 and json.loads(text)["summary"]["gemm_layers_2to4"] == 14
    m = onnx.load(str(path))
    next(n for n in m.graph.node if n.op_type == "LowRankAdd").op_type = "MysteryOp"
    onnx.save(m, str(tmp_path / "e" / "broken.onnx"))
    rc, text, _ = run(["lint", tmp_path / "e" / "broken.onnx", "--quiet"], capsys)
    assert rc == 1 and "unknown custom op slim_trt::MysteryOp" in text and "FAILED" in text


def test_lint_bad_inputs(tmp_path, capsys):
    (tmp_path / "notes.onnx").write_text("hello")
    for args, message in [(["lint", tmp_path / "none.onnx"], "does not exist"),
                          (["lint", tmp_path / "notes.onnx"], "not an ONNX"),
                          (["lint", tmp_path / "notes.onnx", "--target", "trt8"], "unknown target")]:
        rc, _, err = run(args, capsys)
        assert rc == 2 and message in err, (args, err)
