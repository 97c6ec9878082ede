"""Lint's sparse tensor-core prediction: per GEMM eligible (INT8 / FP16 / FP8 math) or not and why, per GPU."""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from slim_trt.checkpoint.compressed_linear import compressed_layers
from slim_trt.errors import SlimError
from slim_trt.exporter import ExportOptions, export_model
from slim_trt.exporter.graph import int_tensor
from slim_trt.linter import format_report, lint
from slim_trt.linter.sparse import sparse_rules
from tests.conftest import run_cli
from tests.exporter.conftest import compressed_model

FLOAT = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16, "fp32": TensorProto.FLOAT}
NP_FLOAT = {"fp16": np.float16, "fp32": np.float32}


def weight_2to4(k: int, n: int, seed: int = 0, dense: bool = False) -> np.ndarray:
    """[K, N] integers in [-7, 7] without zeros, 2 of every 4 consecutive rows (along K) zeroed per column."""
    rng = np.random.default_rng(seed)
    w = rng.integers(1, 8, (k, n)) * rng.choice([-1, 1], (k, n))
    if not dense:
        for g in range(k // 4):
            for j in range(n):
                w[4 * g + rng.choice(4, 2, replace=False), j] = 0
    return w


def gemm_model(k: int, n: int, *, weight: str, act: str = "float", compute: str = "fp16", dense: bool = False,
               second_input: bool = False, out: str = "float", bias: bool = False, float_use: bool = False):
    """One MatMul(x, W): weight "int4"/"int8" (behind DequantizeLinear), "fp8" (float8 behind DQ), or "float"
    (an initializer in the compute dtype); act "float" or an "int8"/"fp8" Q/DQ pair on the input."""
    ft = FLOAT[compute]
    x = helper.make_tensor_value_info("x", ft, ["batch", k])
    out_info = helper.make_tensor_value_info("logits", ft, ["batch", n])
    scale = helper.make_tensor("s", ft, [], [0.05])
    inits, nodes = [scale], []
    w = weight_2to4(k, n, dense=dense)
    if second_input:
        inputs = [x, helper.make_tensor_value_info("w", ft, [k, n])]
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm"))
        return helper.make_model(helper.make_graph(nodes, "g", inputs, [out_info], inits),
                                 opset_imports=[helper.make_opsetid("", 21)])
    if weight in ("int4", "int8"):
        inits.append(int_tensor("w", w.astype(np.int8), int(weight[3:])))
        nodes.append(helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq_w"))
        wname = "wd"
    elif weight == "fp8":
        inits.append(helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [k, n], w.astype(np.float32).ravel()))
        nodes.append(helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq_w"))
        wname = "wd"
    else:
        vals = w.astype(np.float32).ravel()
        inits.append(helper.make_tensor("w", ft, [k, n], vals if compute != "fp16" else vals.astype(np.float16)
                                        .view(np.uint16)))
        wname = "w"
    xname = "x"
    if act in ("int8", "fp8"):
        zt = TensorProto.INT8 if act == "int8" else TensorProto.FLOAT8E4M3FN
        inits.append(helper.make_tensor("zp", zt, [], [0]))
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq_x")]
        xname = "xd"
    # out "int8": the result (after an optional constant bias Add) goes through an INT8 Q/DQ pair (an output
    # quantizer); float_use adds a second, float consumer of the GEMM's result beside it.
    y = "y" if out == "int8" or bias else "logits"
    nodes.append(helper.make_node("MatMul", [xname, wname], [y], name="mm"))
    outputs = [out_info]
    if bias:
        inits.append(helper.make_tensor("b", ft, [n], np.zeros(n).astype(np.float32) if compute != "fp16"
                                        else np.zeros(n, np.float16).view(np.uint16)))
        nodes.append(helper.make_node("Add", [y, "b"], ["yb" if out == "int8" else "logits"], name="bias"))
        y = "yb"
    if out == "int8":
        inits.append(helper.make_tensor("zo", TensorProto.INT8, [], [0]))
        nodes += [helper.make_node("QuantizeLinear", [y, "s", "zo"], ["yq"], name="q_y"),
                  helper.make_node("DequantizeLinear", ["yq", "s", "zo"], ["logits"], name="dq_y")]
    if float_use:
        nodes.append(helper.make_node("Relu", [y], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", ft, ["batch", n]))
    return helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits),
                             opset_imports=[helper.make_opsetid("", 21)])


def only_layer(report):
    assert len(report.layers) == 1
    return report.layers[0]


@pytest.mark.parametrize("kw,target,cls,math,reason", [
    (dict(weight="int4"), "jetson-orin", "int4-weight-only", None, "weight-only"),
    (dict(weight="int8", act="int8"), "jetson-orin", "eligible", "int8", "INT8 x INT8"),
    (dict(weight="int8", act="int8"), "trt10", "eligible", "int8", "INT8 x INT8"),
    (dict(weight="int8"), "jetson-orin", "precision", None, "--act-quant int8"),
    (dict(weight="float"), "ampere", "eligible", "fp16", "FP16 x FP16"),
    (dict(weight="float", dense=True), "ampere", "not-2to4", None, "groups of 4 along K keep more than 2"),
    (dict(weight="fp8", act="fp8"), "hopper", "eligible", "fp8", "FP8 x FP8"),
    (dict(weight="fp8", act="fp8"), "ada", "eligible", "fp8", "FP8 x FP8"),
    (dict(weight="fp8", act="fp8"), "jetson-orin", "gpu", "fp8", "jetson-orin lacks fp8"),
    (dict(weight="fp8", act="fp8"), "trt11", "gpu", "fp8", "any NVIDIA GPU since Ampere lacks fp8"),
    (dict(weight="float", compute="bf16"), "hopper", "precision", None, "not for BF16"),
    (dict(weight="float", compute="fp32"), "hopper", "precision", None, "an fp32 GEMM"),
])
def test_one_gemm_per_rule(kw, target, cls, math, reason):
    layer = only_layer(lint(gemm_model(256, 512, **kw), target=target))
    assert (layer.sparse_class, layer.sparse_math, layer.sparse_eligible) == (cls, math, cls == "eligible")
    assert reason in layer.sparse_reason
    assert "narrower" not in layer.sparse_reason  # 256 x 512 is not below the size hint


@pytest.mark.parametrize("kw,form,expect", [
    (dict(), "int8-in/float-out", "allowed-but-unlikely"),  # dequantized to float: the dense-favourable epilogue
    (dict(out="int8"), "int8-in/int8-out", "sparse-tactics-available"),  # an INT8 output quantizer
    (dict(out="int8", bias=True), "int8-in/int8-out", "sparse-tactics-available"),  # the bias fuses first
    (dict(bias=True), "int8-in/float-out", "allowed-but-unlikely"),
    (dict(out="int8", float_use=True), "int8-in/float-out", "allowed-but-unlikely"),  # a float reader too
])
def test_an_int8_gemm_has_a_form_and_an_expectation(kw, form, expect):
    r = lint(gemm_model(256, 512, weight="int8", act="int8", **kw), target="jetson-orin")
    layer = only_layer(r)
    assert (layer.sparse_class, layer.sparse_form, layer.sparse_expect) == ("eligible", form, expect)
    assert layer.output == ("int8" if expect == "sparse-tactics-available" else "float16")
    assert form in layer.sparse_reason
    s = r.summary["sparse_tensor_cores"]
    assert s["forms"] == {form: 1}
    assert (s["sparse_tactics_available"], s["allowed_but_unlikely"]) == \
        ((1, 0) if expect == "sparse-tactics-available" else (0, 1))
    assert ("expect dense" in s["line"]) == (expect == "allowed-but-unlikely")
    assert f"INT8 {form}" in format_report(r)


def test_shape_rules_and_the_size_hint():
    # K = N = 48: a multiple of 16 (FP16 tile) but not of 32 (INT8 tile).
    int8 = only_layer(lint(gemm_model(48, 48, weight="int8", act="int8"), target="ampere"))
    assert int8.sparse_class == "shape" and "multiples of 32" in int8.sparse_reason
    fp16 = only_layer(lint(gemm_model(48, 48, weight="float"), target="ampere"))
    assert fp16.sparse_class == "eligible" and "narrower than 256" in fp16.sparse_reason
    odd_k = only_layer(lint(gemm_model(6, 32, weight="float", dense=True), target="ampere"))
    assert odd_k.sparse_class == "not-2to4" and "K = 6 is not a multiple of 4" in odd_k.sparse_reason


def test_dynamic_weight_is_counted_without_flops():
    r = lint(gemm_model(64, 64, weight="float", second_input=True), target="ampere")
    s = r.summary["sparse_tensor_cores"]
    assert r.layers == [] and s["dynamic_gemms"] == 1
    assert s["classes"]["dynamic-weight"] == {"gemms": 1, "gemms_2to4": 0, "flops_per_token": None,
                                              "flop_fraction": None}
    assert "no GEMM is 2:4 along K (0 of 0 constant-weight GEMMs)" in s["line"]


def test_the_gpu_comes_from_the_target():
    model = gemm_model(256, 256, weight="int8", act="int8")
    orin = lint(model, target="jetson-orin")
    assert (orin.target, orin.gpu) == ("jetson-orin-jp6", "jetson-orin")
    assert lint(model, target="jetson-orin-jp6").gpu == "jetson-orin"  # the JetPack 6 table implies Orin
    assert lint(model, target="trt10").gpu == sparse_rules()["generic_gpu"]["name"]
    hopper = lint(model, target="trt11", gpu="hopper")
    assert (hopper.target, hopper.gpu) == ("trt11", "hopper")
    with pytest.raises(SlimError, match=r"unknown target 'volta': choose a TensorRT table \(trt10, trt11, "
                                        r"jetson-orin-jp6\) or a GPU profile \(ada, ampere"):
        lint(model, target="volta")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny LLaMA exported W4A16 (the default recipe's form) and W8A8 (INT8 2:4 weights + INT8 Q/DQ)."""
    root = tmp_path_factory.mktemp("sparse")
    export_model(compressed_model("llama", group_size=16), root / "w4a16", options=ExportOptions(head="none"))
    w8 = compressed_model("llama", bits=8, group_size=-1)
    export_model(w8, root / "w8a8", options=ExportOptions(act_quant="int8", head="none"),
                 act_scales={name: 0.05 for name, _ in compressed_layers(w8)})
    return {"w4a16": root / "w4a16" / "model.onnx", "w8a8": root / "w8a8" / "model.onnx"}


def test_w4a16_export_runs_no_gemm_sparse(exports):
    r = lint(exports["w4a16"], target="jetson-orin")
    s = r.summary["sparse_tensor_cores"]
    assert s["line"] == ("sparse tensor cores (jetson-orin): 0 of 14 2:4 GEMMs eligible (14 are INT4 weight-only); "
                         "0.0% of constant-weight GEMM FLOPs can run sparse")
    assert (s["gemms"], s["gemms_2to4"], s["eligible"]) == (43, 14, 0)
    classes = s["classes"]
    assert classes["int4-weight-only"]["gemms_2to4"] == 14
    assert classes["not-2to4"]["gemms"] == 29  # 28 adapter factors + lm_head
    assert s["dynamic_gemms"] == 4  # q.k and p.v in each of the 2 layers
    total = sum(x.flops for x in r.layers)
    assert classes["int4-weight-only"]["flop_fraction"] == pytest.approx(
        sum(x.flops for x in r.layers if x.dtype == "int4") / total)
    assert sum(c["flop_fraction"] for c in classes.values() if c["flop_fraction"] is not None) == pytest.approx(1)


def test_w8a8_export_is_eligible_for_sparse_int8(exports):
    r = lint(exports["w8a8"], target="jetson-orin")
    s = r.summary["sparse_tensor_cores"]
    base = [x for x in r.layers if x.dtype == "int8"]
    assert len(base) == 14 and all(x.activation == "int8" and x.sparse_math == "int8" for x in base)
    assert (s["eligible"], s["math"]["int8"], s["eligible_narrow"]) == (14, 14, 14)  # tiny model: all < 256
    assert s["flop_fraction_eligible"] == pytest.approx(sum(x.flops for x in base) / sum(x.flops for x in r.layers))
    # the export quantizes GEMM inputs only: every base GEMM's result is read in float (adapter add, residual, SiLU)
    assert all(x.output == "float16" and x.sparse_form == "int8-in/float-out" for x in base)
    assert (s["forms"], s["sparse_tactics_available"], s["allowed_but_unlikely"]) == \
        ({"int8-in/float-out": 14}, 0, 14)
    assert s["line"].startswith("sparse tensor cores (jetson-orin): 14 of 14 2:4 GEMMs eligible; 14 of the eligible "
                                "are narrower than 256 and likely to run dense; 14 of the eligible are "
                                "int8-in/float-out (allowed, but TensorRT picks sparse INT8 tactics for INT8-out "
                                "GEMMs: expect dense); 75.0%")
    text = format_report(r)
    assert s["line"] in text and "model.layers.0.mlp.up_proj/MatMul" in text
    row = next(line for line in text.splitlines() if line.startswith("model.layers.0.mlp.up_proj/MatMul "))
    assert row.split()[-2:] == ["INT8", "int8-in/float-out"] and row.split()[3:5] == ["int8", "int8"]


def test_lint_json_carries_the_prediction(exports, tmp_path, capsys):
    out = tmp_path / "lint.json"
    rc, text, _ = run_cli(["lint", str(exports["w8a8"]), "--target", "hopper", "--json", str(out)], capsys)
    data = json.loads(out.read_text())
    assert rc == 0 and data["gpu"] == "hopper" and data["target"] == "trt10"
    assert data["summary"]["sparse_tensor_cores"]["line"] in text
    assert data["summary"]["sparse_tensor_cores"]["eligible"] == 14
    row = next(x for x in data["layers"] if x["name"] == "model.layers.0.self_attn.q_proj/MatMul")
    assert (row["sparse_eligible"], row["sparse_class"], row["sparse_math"]) == (True, "eligible", "int8")
    assert (row["output"], row["sparse_form"], row["sparse_expect"]) == \
        ("float16", "int8-in/float-out", "allowed-but-unlikely")


def test_ort_only_contrib_op_is_named():
    x = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["b", "s", 8])
    inits = [int_tensor("emb", np.zeros((16, 8), np.int8), 4),
             numpy_helper.from_array(np.ones((16, 1), np.float16), "emb_scale")]
    node = helper.make_node("GatherBlockQuantized", ["emb", "ids", "emb_scale"], ["logits"], name="embed",
                            domain="com.microsoft", block_size=8)
    m = helper.make_model(helper.make_graph([node], "g", [x], [y], inits),
                          opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    errs = [f for f in lint(m).errors if f.rule == "ort-only"]
    assert len(errs) == 1 and errs[0].node == "embed" and "ONNX Runtime only" in errs[0].message
    assert not [f for f in lint(m).errors if f.rule == "plugin"]


@pytest.mark.parametrize("target,ok", [("hopper", True), ("ada", True), ("jetson-thor", True), ("ampere", False),
                                       ("jetson-orin", False), ("trt10", False), ("trt11", False)])
def test_fp8_lints_only_where_the_gpu_has_fp8(target, ok):
    """Issue 24: FP8 Q/DQ builds only on Hopper, Ada and Thor; elsewhere one error names the INT8 recipe."""
    r = lint(gemm_model(256, 512, weight="fp8", act="fp8"), target=target)
    fp8 = [f for f in r.findings if f.rule == "fp8" and f.severity == "error"]
    assert r.ok == ok and len(fp8) == (0 if ok else 1)
    line = r.summary["sparse_tensor_cores"]["line"]
    if ok:
        assert "1 of 1 2:4 GEMMs eligible (1 FP8 x FP8)" in line
        assert "sparse FP8 tactics for FP8-out GEMMs, assumed from INT8 for FP8, not measured" in line
    else:
        assert "--preset trt-int8-sparse" in fp8[0].message and "no FP8" in fp8[0].message
        assert ("--target hopper, ada or jetson-thor" in fp8[0].message) == target.startswith("trt")


def test_int8_summary_keeps_its_wording():
    line = lint(gemm_model(256, 512, weight="int8", act="int8"), target="ampere").summary["sparse_tensor_cores"]["line"]
    assert "1 of 1 2:4 GEMMs eligible;" in line and "FP8" not in line
    assert "TensorRT picks sparse INT8 tactics for INT8-out GEMMs: expect dense" in line


def test_fp8_weight_zero_point_is_not_subtracted():
    """A weight DQ with an FP8 zero point: the codes are read as they are. An integer subtraction would truncate
    codes below 1 to 0 and call this dense weight (every |code| in [0.125, 0.875]) 2:4."""
    m = gemm_model(256, 512, weight="fp8", act="fp8", dense=True)
    m.graph.initializer.append(helper.make_tensor("wzp", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    next(n for n in m.graph.node if n.name == "dq_w").input.append("wzp")
    w = np.asarray(weight_2to4(256, 512, dense=True), np.float32) * 0.125  # exact in E4M3, never 0
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "w"))
    m.graph.initializer.append(helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [256, 512], w.ravel()))
    layer = only_layer(lint(m, target="hopper"))
    assert not layer.is_2to4 and layer.groups_violating == 64 * 512 and layer.sparse_class == "not-2to4"
