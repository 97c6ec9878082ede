"""Lint passes on good exports and fails, naming the problem, on files broken on purpose."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slim_trt.errors import SlimError
from slim_trt.exporter import ExportOptions, export_model
from slim_trt.exporter.graph import int_tensor
from slim_trt.linter import TARGETS, format_report, lint
from slim_trt.linter.tables import load_table
from tests.exporter.conftest import compressed_model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("lint")
    out = {}
    for family, lowrank in (("llama", "decomposed"), ("gemma3", "plugin")):
        d = root / f"{family}-{lowrank}"
        export_model(compressed_model(family, group_size=16), d, options=ExportOptions(lowrank=lowrank))
        out[family] = d / "model.onnx"
    return out


def _errors(report, rule):
    return [f for f in report.errors if f.rule == rule]


@pytest.mark.parametrize("target", TARGETS)
def test_good_exports_pass(exports, target):
    for path in exports.values():
        r = lint(path, target=target)
        assert r.ok, format_report(r)
    r = lint(exports["llama"], target=target)
    compressed = [x for x in r.layers if x.dtype == "int4" and ".lora" not in x.name]
    assert len(compressed) == 14 and all(x.is_2to4 for x in compressed)
    lm_head = [x for x in r.layers if x.name == "lm_head/MatMul"]
    assert len(lm_head) == 1 and not lm_head[0].is_2to4 and (lm_head[0].K, lm_head[0].N) == (64, 256)
    # FLOP fraction from the layer list: 14 layers of 2*K*N per token.
    total = sum(x.flops for x in r.layers)
    eligible = sum(2 * x.K * x.N for x in compressed)
    assert r.summary["flop_fraction_2to4"] == pytest.approx(eligible / total)
    assert r.summary["gemm_layers_2to4"] == 14


def test_opset_21_above_jetson_range_is_a_warning(exports):
    r = lint(exports["llama"], target="jetson-orin-jp6")
    assert r.ok and any(f.rule == "opset" and f.severity == "warning" for f in r.findings)


def _load(path):
    return onnx.load(str(path))


def test_non_2to4_weight(exports):
    m = _load(exports["llama"])
    t = next(t for t in m.graph.initializer if t.name == "model.layers.0.mlp.up_proj.qweight")
    q = numpy_helper.to_array(t).astype(np.int8)
    q[0:4, 5] = [1, 2, 3, 4]  # one group of 4 along K with 4 non-zeros
    t.CopyFrom(int_tensor(t.name, q, 4))
    r = lint(m, sidecar=json.loads((exports["llama"].parent / "slim_export.json").read_text()))
    errs = _errors(r, "sparsity-2to4")
    assert len(errs) == 1 and "model.layers.0.mlp.up_proj/MatMul" == errs[0].node and "1 of" in errs[0].message
    # Without the sidecar the 50%-zeros heuristic still flags it.
    assert _errors(lint(m), "sparsity-2to4")


def test_nonzero_zero_point(exports):
    m = _load(exports["llama"])
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
    m.graph.initializer.append(int_tensor("bad_zp", np.array(3, dtype=np.int8).reshape(()), 8))
    dq.input.append("bad_zp")
    r = lint(m)
    errs = _errors(r, "qdq-zero-point")
    assert len(errs) == 1 and errs[0].node == dq.name and "non-zero" in errs[0].message


def test_opset_17_with_int4(exports):
    m = _load(exports["llama"])
    next(o for o in m.opset_import if o.domain == "").version = 17
    r = lint(m)
    assert any("INT4" in f.message and "opset >= 21" in f.message for f in _errors(r, "opset"))


def test_unknown_custom_op(exports):
    m = _load(exports["gemma3"])
    n = next(n for n in m.graph.node if n.op_type == "LowRankAdd")
    n.op_type, n.domain = "FancyMatMul", "com.example"
    r = lint(m)
    errs = _errors(r, "plugin")
    assert len(errs) == 1 and "com.example::FancyMatMul" in errs[0].message


def test_plugin_version_mismatch(exports):
    m = _load(exports["gemma3"])
    n = next(n for n in m.graph.node if n.op_type == "LowRankAdd")
    next(a for a in n.attribute if a.name == "plugin_version").s = b"2"
    errs = _errors(lint(m), "plugin")
    assert len(errs) == 1 and "plugin_version='2'" in errs[0].message


def test_unsupported_op_and_scale_dtype(exports):
    m = _load(exports["llama"])
    m.graph.node[5].op_type = "StringSplit"
    scale = next(t for t in m.graph.initializer if t.name.endswith(".scale"))
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale).astype(np.float32), scale.name))
    r = lint(m)
    assert any("StringSplit" in f.message for f in _errors(r, "op-support"))
    assert any("float but the model computes in float16" in f.message for f in _errors(r, "qdq-scale"))


def test_int4_on_activation_and_odd_last_dim():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             int_tensor("zp4", np.array(0, np.int8).reshape(()), 4),
             int_tensor("w", np.zeros((6, 5), np.int8), 4)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp4"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp4"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq_w"),
             helper.make_node("MatMul", ["xd", "wd"], ["logits"], name="mm")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)])
    errs = _errors(lint(m), "int4")
    assert any(f.node == "q" and "activation" in f.message for f in errs)
    assert any(f.node == "dq_w" and "odd last dimension 5" in f.message for f in errs)


def test_tables_name_their_source():
    for t in TARGETS:
        table = load_table(t)
        assert table["target"] == t and table["source"] and "MatMul" in table["ops"]
        assert "DequantizeLinear" in table["ops"] and "StringSplit" not in table["ops"]
    from slim_trt.cli.lint import TARGETS as CLI_TARGETS

    assert CLI_TARGETS == TARGETS


def test_bad_inputs(tmp_path, exports):
    with pytest.raises(SlimError, match="unknown target"):
        lint(exports["llama"], target="trt7")
    with pytest.raises(SlimError, match="does not exist"):
        lint(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a protobuf, just text that pretends to be a model")
    with pytest.raises(SlimError, match="not an ONNX"):
        lint(bad)
