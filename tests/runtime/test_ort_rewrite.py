"""The in-memory rewrite for ONNX Runtime: a quantized table read by GatherBlockQuantized and (tied) MatMulNBits
from ONE packed tensor, exactly the graph's plain arithmetic."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from slim_trt.exporter.graph import GraphBuilder
from slim_trt.exporter.linear import dequantized
from slim_trt.runtime.ort_rewrite import for_onnxruntime, needs_rewrite
from tests.exporter.conftest import absmax_quantize

V, H = 96, 80  # H = 80: blocks of 16 fit exactly, blocks of 128 (per-row / per-tensor scales) are padded


def _table_graph(bits: int, group_size: int, dtype: str = "fp32"):
    """ids -> Gather(DQ(E)) and x -> MatMul(x, Transpose(DQ(E))): the embedding and the tied head."""
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    qt = absmax_quantize(w, bits, group_size)
    b = GraphBuilder(dtype)
    ids = b.add_input("ids", TensorProto.INT64, ["b", "s"])
    x = b.add_input("x", b.float_type, ["b", "s", H])
    table = dequantized(b, qt, "E", transpose=False)
    b.identity_to(b.op("Gather", [table, ids], name="embed"), "emb", name="out_emb")
    head = b.op("MatMul", [x, b.op("Transpose", [table], name="head", perm=[1, 0])], name="head")
    b.identity_to(head, "logits", name="out_logits")
    b.add_output("emb", b.float_type, ["b", "s", H])
    b.add_output("logits", b.float_type, ["b", "s", V])
    return b.make_model("table", 21, 10), qt


def _run(model, feeds, *, fuse):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "0" if fuse else "1")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(["emb", "logits"], feeds)


@pytest.mark.parametrize("bits,group_size", [(4, 16), (4, 0), (8, -1), (8, 32)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_quantized_table_is_read_packed_and_exact(bits, group_size, dtype):
    model, qt = _table_graph(bits, group_size, dtype)
    assert needs_rewrite(model)
    fused, counts = for_onnxruntime(model, accuracy_level=1)
    assert counts == {"lowrank_expanded": 0, "gather_block_quantized": 1, "matmul_nbits_head": 1,
                      "matmul_nbits_linear": 0, "linears_fused": 0, "rms_norms": 0,
                      "w8a8_gemms": 0, "w8a8_linears": 0, "fp16_widened": 0, "output_identities": 2}
    ops = [n.op_type for n in fused.graph.node]
    assert "DequantizeLinear" not in ops and "Transpose" not in ops
    gbq = next(n for n in fused.graph.node if n.op_type == "GatherBlockQuantized")
    nbits = next(n for n in fused.graph.node if n.op_type == "MatMulNBits")
    assert gbq.input[0] == nbits.input[1]  # one packed table, read by both
    # fp32 activations as asked, except for 8-bit weights, which ONNX Runtime's CPU kernel only runs well as int8
    assert helper.get_attribute_value(next(a for a in nbits.attribute if a.name == "accuracy_level")) == \
        (4 if bits == 8 else 1)
    packed = [t for t in fused.graph.initializer if t.name == gbq.input[0]]
    assert packed and packed[0].data_type == TensorProto.UINT8
    assert not any(t.data_type in (TensorProto.INT4, TensorProto.INT8) for t in fused.graph.initializer)
    g = np.random.default_rng(0)
    fdt = np.float32 if dtype == "fp32" else np.float16
    feeds = {"ids": np.array([[0, 5, V - 1]], np.int64), "x": g.standard_normal((1, 3, H)).astype(fdt)}
    emb, logits = _run(fused, feeds, fuse=True)
    emb_plain, logits_plain = _run(model, feeds, fuse=False)
    table = qt.dequantize().numpy()
    np.testing.assert_allclose(emb[0], table[[0, 5, V - 1]].astype(fdt), rtol=1e-3 if dtype == "fp16" else 0)
    np.testing.assert_array_equal(emb, emb_plain)
    tol = (1e-5 if bits == 4 else 2e-2) if dtype == "fp32" else 2e-2
    np.testing.assert_allclose(logits.astype(np.float32), logits_plain.astype(np.float32), atol=tol * 10, rtol=tol)


def test_a_table_with_another_reader_is_left_alone():
    model, _ = _table_graph(4, 16)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    model.graph.node.append(helper.make_node("ReduceSum", [dq.output[0]], ["total"]))
    model.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, None))
    _, counts = for_onnxruntime(model)
    assert counts["gather_block_quantized"] == 0 and counts["matmul_nbits_head"] == 0


def test_plain_mode_keeps_the_graph_arithmetic():
    model, _ = _table_graph(4, 16)
    plain, counts = for_onnxruntime(model, fuse=False)
    assert counts["gather_block_quantized"] == 0
    assert [n.op_type for n in plain.graph.node] == [n.op_type for n in model.graph.node]


# ---------------------------------------------------------------------------------------------------------------
# compressed linears: one MatMulNBits per shared input
# ---------------------------------------------------------------------------------------------------------------

def _export(tmp_path, dtype="fp32", bits=4, group_size=32):
    from slim_trt.exporter import ExportOptions, export_model
    from tests.conftest import tiny_model
    from tests.exporter.conftest import compress_tiny

    # rank 5: odd, padded to 6 for the INT4 adapters; hidden 64 (q/k/v/gate/up K), intermediate 128 (down K)
    model = compress_tiny(tiny_model("gemma3"), bits=bits, group_size=group_size, quantize_adapters=True, rank=5)
    export_model(model, tmp_path, options=ExportOptions(dtype=dtype, head="none"))
    return model, tmp_path / "model.onnx"


def _logits(path, level: int, **kw):
    import functools

    from slim_trt.runtime import ort_rewrite
    from slim_trt.runtime.decoder import make_session, read_manifest
    from slim_trt.verification.compare import run_onnx

    spec, _ = read_manifest(path.parent)
    config = {**dict(spec.session_config), "session.qdq_matmulnbits_accuracy_level": str(level)}
    spec = type(spec)(**{**spec.__dict__, "session_config": tuple(config.items())})
    original = ort_rewrite.for_onnxruntime
    if "share_inputs" in kw:
        ort_rewrite.for_onnxruntime = functools.partial(original, share_inputs=kw.pop("share_inputs"))
    try:
        sess = make_session(path, spec, **kw)
    finally:
        ort_rewrite.for_onnxruntime = original
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    return run_onnx(sess, ids, decode_steps=3)[0], ids


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_linears_reading_one_input_share_one_matmulnbits(tmp_path):
    import onnx

    _, path = _export(tmp_path)
    fused, counts = for_onnxruntime(onnx.load(str(path)), accuracy_level=1)
    # per layer: q/k/v + their R (one node), o + R, gate/up + their R, down + R, and the 7 L factors alone
    assert counts["linears_fused"] == 2 * 7 * 3 and counts["matmul_nbits_linear"] == 2 * 11
    nodes = [n for n in fused.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 22 and not any(n.op_type == "DequantizeLinear" for n in fused.graph.node)
    widths = sorted((_attrs(n)["K"], _attrs(n)["N"]) for n in nodes)
    # q 64 + k 16 + v 16 + three R^T of rank 6 = 114 columns over K = 64; gate + up + 2 x 6 = 268; down 64 + 6 = 70
    assert widths.count((64, 114)) == 2 and widths.count((64, 268)) == 2 and widths.count((128, 70)) == 2
    # the L^T [6, N] of q/o/down (N = 64), k/v (16), gate/up (128): one block of 16 each, not 128
    assert widths.count((6, 64)) == 6 and widths.count((6, 16)) == 4 and widths.count((6, 128)) == 4
    assert {_attrs(n)["block_size"] for n in nodes if _attrs(n)["K"] == 6} == {16}
    split = next(n for n in fused.graph.node if n.op_type == "Split")
    assert len(split.output) == 6


@pytest.mark.parametrize("group_size", [32, -1, 0])
def test_fused_linears_compute_what_the_graph_says(tmp_path, group_size):
    from slim_trt.verification.ort_vs_torch import Thresholds, VerifyReport, compare_logits

    model, path = _export(tmp_path, group_size=group_size)
    fused, ids = _logits(path, 1)
    own, _ = _logits(path, 1, rewrite=False)  # ONNX Runtime's own Q/DQ fusion, one MatMulNBits per MatMul
    plain, _ = _logits(path, 1, fuse=False)  # dequantized weights, float MatMul
    assert float((fused - own).abs().max()) < 1e-5 and float((fused - plain).abs().max()) < 1e-5
    with torch.no_grad():
        ref = torch.cat([model(input_ids=ids[i:i + 1], use_cache=False).logits.float() for i in range(2)])
    report = VerifyReport(metrics=compare_logits(fused, ref, ids), thresholds=Thresholds.for_dtype("fp32"))
    assert report.ok, report.checks
    # int8 activations: sharing a node changes nothing (each column sees the same quantized blocks of x)
    shared, _ = _logits(path, 4)
    alone, _ = _logits(path, 4, share_inputs=False)
    assert float((shared - alone).abs().max()) < 1e-5
    assert 1e-4 < float((shared - plain).abs().max()) < 0.3  # the int8 activations' own rounding, not a mistake


def test_fp16_graphs_and_8bit_weights_at_fp32_activations_keep_onnxruntimes_fusion(tmp_path):
    import onnx

    _, path16 = _export(tmp_path / "fp16", dtype="fp16")
    assert for_onnxruntime(onnx.load(str(path16)))[1]["linears_fused"] == 0
    _, path8 = _export(tmp_path / "int8", bits=8, group_size=-1)
    _, at1 = for_onnxruntime(onnx.load(str(path8)), accuracy_level=1)
    _, at4 = for_onnxruntime(onnx.load(str(path8)), accuracy_level=4)
    # 8-bit base weights stay with ONNX Runtime at level 1; the INT4 adapter factors are fused either way
    assert at1["linears_fused"] == 2 * 7 * 2 and at4["linears_fused"] == 2 * 7 * 3


def test_a_linear_weight_with_another_reader_is_left_alone(tmp_path):
    import onnx

    _, path = _export(tmp_path)
    model = onnx.load(str(path))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "q_proj" in n.name)
    model.graph.node.append(helper.make_node("ReduceSum", [dq.output[0]], ["total"]))
    model.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, None))
    fused, counts = for_onnxruntime(model, accuracy_level=1)
    assert counts["linears_fused"] == 2 * 7 * 3 - 1
    assert sum(n.op_type == "DequantizeLinear" for n in fused.graph.node) == 1


def test_rms_norms_run_as_onnxruntimes_fused_kernels(tmp_path):
    import onnx

    _, path = _export(tmp_path)
    fused, counts = for_onnxruntime(onnx.load(str(path)), accuracy_level=1)
    # 2 layers x (input, q, k, post-attention, pre-feedforward, post-feedforward) + the final norm
    assert counts["rms_norms"] == 13
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 13
    assert "Sqrt" not in ops and "Reciprocal" not in ops and "ReduceMean" not in ops


# ---------------------------------------------------------------------------------------------------------------
# W8A8 linears: one integer GEMM per quantized input, exact on every CPU
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def w8a8_export(tmp_path_factory):
    from slim_trt.exporter import ExportOptions, export_model
    from tests.exporter.conftest import EXACT, w8a8_model

    d = tmp_path_factory.mktemp("w8a8_rewrite")
    for dtype in ("fp32", "fp16"):
        export_model(w8a8_model("llama"), d / dtype, options=ExportOptions(**{**EXACT, "dtype": dtype}))
    return d


def _gemm_operands(model) -> list[tuple]:
    """(A node input, B uint8/int8 array, A zero point, B zero point) of every MatMulIntegerToFloat."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(n.input[0], inits[n.input[1]], int(inits[n.input[4]]), int(inits[n.input[5]]))
            for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]


@pytest.mark.parametrize("form", ["u8u8", "u8s8"])
def test_w8a8_linears_become_shared_integer_gemms(w8a8_export, form):
    import onnx

    model = onnx.load(str(w8a8_export / "fp16" / "model.onnx"))
    fused, counts = for_onnxruntime(model, accuracy_level=1, w8a8_form=form)
    # per layer: q/k/v (one GEMM), o, gate/up (one GEMM), down; 2 layers
    assert counts["w8a8_gemms"] == 8 and counts["w8a8_linears"] == 14
    ops = [n.op_type for n in fused.graph.node]
    assert "DequantizeLinear" not in ops and ops.count("QuantizeLinear") == 8
    for _, b, a_zp, b_zp in _gemm_operands(fused):
        assert a_zp == 128 and b.dtype == (np.uint8 if form == "u8u8" else np.int8) and b_zp == (128 if form == "u8u8"
                                                                                                  else 0)
    # the fp16 graph is computed in fp32: no Cast around the GEMMs, fp32 scales, the norms fused as in an fp32
    # graph
    assert counts["fp16_widened"] > 0 and counts["rms_norms"] > 0
    assert not any(t.data_type == TensorProto.FLOAT16 for t in fused.graph.initializer)
    with pytest.raises(ValueError, match="u8u8, u8s8"):
        for_onnxruntime(model, w8a8_form="s8s8")


@pytest.mark.parametrize("form", ["u8u8", None])
def test_w8a8_session_matches_the_plain_arithmetic(w8a8_export, form):
    """The safe form forced (what an AVX2-only CPU gets), and this CPU's own choice: the graph's plain fp32
    arithmetic (Q/DQ fusion off) up to summation order. (u8s8 is not forced here: without VNNI it saturates.)"""
    path = w8a8_export / "fp32" / "model.onnx"
    fused, ids = _logits(path, 1, w8a8_form=form)
    plain, _ = _logits(path, 1, fuse=False)
    assert float((fused - plain).abs().max()) < 1e-4, float((fused - plain).abs().max())
    assert float(plain.abs().max()) > 1.0  # logits of a real size, not zeros


def _casts(model) -> list[tuple[str, str]]:
    """(input, output) of every Cast node."""
    return [(n.input[0], n.output[0]) for n in model.graph.node if n.op_type == "Cast"]


def test_an_fp16_w8a8_session_is_computed_in_fp32_with_casts_only_at_the_interface(w8a8_export):
    """ONNX Runtime's CPU kernels are fp32: an fp16 W8A8 graph runs widened (fp16 numbers are exact in fp32), not
    as Casts around each kernel. The session's inputs and outputs keep the export's fp16 (the manifest's
    contract); the only Casts left are one per fp16 graph input and output."""
    import onnx

    model = onnx.load(str(w8a8_export / "fp16" / "model.onnx"))
    before, _ = for_onnxruntime(model, accuracy_level=1, upcast_fp16=False)
    fused, counts = for_onnxruntime(model, accuracy_level=1)
    fp16_in = {v.name for v in model.graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    fp16_out = {v.name for v in model.graph.output if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    assert fp16_in and "logits" in fp16_out
    casts = _casts(fused)
    assert sorted(c[0] for c in casts if c[0] in fp16_in) == sorted(fp16_in)  # one each
    assert sorted(c[1] for c in casts if c[1] in fp16_out) == sorted(fp16_out)
    # every other Cast turns an integer graph input (positions, the attention mask) into floats: none is left
    # between float ops, where the fp16 form had them around each GEMM and norm
    ints = {v.name for v in model.graph.input if v.type.tensor_type.elem_type == TensorProto.INT64}
    inner = [c for c in casts if c[0] not in fp16_in and c[1] not in fp16_out]
    assert {c[0] for c in inner} <= ints and len(inner) <= 2, inner
    assert len(_casts(before)) > 30, len(_casts(before))
    assert [v.type.tensor_type.elem_type for v in fused.graph.input] == \
        [v.type.tensor_type.elem_type for v in model.graph.input]
    assert [v.type.tensor_type.elem_type for v in fused.graph.output] == \
        [v.type.tensor_type.elem_type for v in model.graph.output]
    assert ints and counts["w8a8_gemms"] == 8 and counts["fp16_widened"] == \
        sum(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer) + len(fp16_in) + len(fp16_out) + \
        sum(a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16
            for n in model.graph.node for a in n.attribute)
    # weight-only fp16 graphs keep ONNX Runtime's own fp16 fusion unless asked
    assert for_onnxruntime(model, fuse=False)[1]["fp16_widened"] == 0


def test_a_widened_fp16_session_matches_its_plain_arithmetic_in_fp32(w8a8_export, tmp_path):
    """The widened session against the fp16 export's own numbers computed plainly in fp32 (Q/DQ fusion off). With
    the activation Q/DQ pairs in, any summation-order difference flips INT8 roundings (verify_w8a8.py: fused and
    plain differ by up to 0.05 here, as the two GEMM forms would on any CPU), so the arithmetic is compared on the
    graph with those pairs taken out (what verify's float-activation check runs), widening forced: within one fp16
    rounding of the logits. With the pairs in: the integer forms give identical logits, and the plain fp16
    arithmetic is near."""
    import shutil

    import onnx

    from slim_trt.runtime.ort_rewrite import _upcast_fp16
    from slim_trt.verification.w8a8 import strip_act_qdq

    src = w8a8_export / "fp16"
    float_act = onnx.load(str(src / "model.onnx"))
    assert len(strip_act_qdq(float_act)) == 14
    wide = onnx.ModelProto()
    wide.CopyFrom(float_act)
    assert _upcast_fp16(wide) > 0
    for name, m in (("float_act", float_act), ("wide", wide)):
        (tmp_path / name).mkdir()
        onnx.save(m, str(tmp_path / name / "model.onnx"))
        shutil.copy(src / "slim_export.json", tmp_path / name / "slim_export.json")
    import functools

    from slim_trt.runtime import ort_rewrite

    original = ort_rewrite.for_onnxruntime
    ort_rewrite.for_onnxruntime = functools.partial(original, upcast_fp16=True)
    try:
        fused, _ = _logits(tmp_path / "float_act" / "model.onnx", 1)
    finally:
        ort_rewrite.for_onnxruntime = original
    plain32, _ = _logits(tmp_path / "wide" / "model.onnx", 1, fuse=False)
    assert float(plain32.abs().max()) > 1.0
    ulp = 2.0 ** -10 * plain32.abs() + 1e-4  # the logits leave both sessions as fp16
    assert bool(((fused - plain32).abs() <= ulp).all()), float(((fused - plain32).abs() / ulp).max())
    # the W8A8 graph itself: the safe form and this CPU's choice the same integers, the plain fp16 arithmetic near
    # (u8s8 is not forced: without VNNI it saturates)
    u8u8, _ = _logits(src / "model.onnx", 1, w8a8_form="u8u8")
    chosen, _ = _logits(src / "model.onnx", 1)
    plain16, _ = _logits(src / "model.onnx", 1, fuse=False)
    assert torch.equal(u8u8, chosen)
    assert float((u8u8 - plain16).abs().max()) < 0.25 * float(plain16.abs().max())


def _vpmaddubsw_gemm(a_u8: np.ndarray, b_s8: np.ndarray) -> tuple[np.ndarray, int]:
    """a_u8 [M, K] @ b_s8 [K, N] as MLAS's AVX2 U8S8 kernel sums it without VNNI: VPMADDUBSW adds the products of
    adjacent k pairs into int16 with saturation, VPMADDWD/VPADDD sum those into int32. Returns (result, how many
    pair sums saturated)."""
    k = a_u8.shape[1] + a_u8.shape[1] % 2
    a = np.zeros((a_u8.shape[0], k), np.int64)
    a[:, :a_u8.shape[1]] = a_u8
    b = np.zeros((k, b_s8.shape[1]), np.int64)
    b[:b_s8.shape[0]] = b_s8
    pairs = a[:, 0::2, None] * b[None, 0::2] + a[:, 1::2, None] * b[None, 1::2]  # [M, K/2, N]
    saturated = np.clip(pairs, -32768, 32767)
    return saturated.sum(axis=1), int((saturated != pairs).sum())


def test_the_form_an_avx2_cpu_gets_cannot_saturate_and_the_old_one_does(w8a8_export):
    """On the product's own integer operands: the activations (uint8) every W8A8 GEMM reads on real tokens, and the
    weights. ONNX Runtime's own fusion (uint8 activations x int8 weights) saturates VPMADDUBSW's int16 pair sums on
    these very values; the u8u8 form, which a CPU without VNNI/AMX gets, widens both operands to int16 and sums pairs
    into int32 (VPMADDWD), which no uint8 pair can overflow."""
    import onnx

    from slim_trt.runtime.decoder import cpu_choice
    from slim_trt.verification.compare import _feed

    form = cpu_choice(features=("x86_64", "avx2")).w8a8_form
    assert form == "u8u8"
    fused, _ = for_onnxruntime(onnx.load(str(w8a8_export / "fp32" / "model.onnx")), accuracy_level=1, w8a8_form=form)
    gemms = _gemm_operands(fused)
    names = sorted({a for a, _, _, _ in gemms})
    probe = onnx.ModelProto()
    probe.CopyFrom(fused)
    probe.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in names])
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    feeds = _feed({x.name: x for x in sess.get_inputs()}, ids, past=None, start=0)
    acts = dict(zip(names, sess.run(names, feeds), strict=True))
    old_saturated = 0
    for a_name, b_u8, a_zp, b_zp in gemms:
        a = acts[a_name].reshape(-1, acts[a_name].shape[-1]).astype(np.int64)
        b = b_u8.astype(np.int64)
        assert a.dtype == b.dtype and acts[a_name].dtype == np.uint8 and b_u8.dtype == np.uint8
        exact = (a - a_zp) @ (b - b_zp)
        # u8u8: |pair| <= 2 * 255 * 255 = 130050, far inside int32; the kernel's integer sum is the exact one
        pairs = a[:, 0::2, None] * b[None, 0::2] if a.shape[1] % 2 == 0 else None
        assert pairs is not None and np.abs(pairs).max() <= 255 * 255
        widened = a @ b - a_zp * b.sum(0)[None] - b_zp * a.sum(1)[:, None] + a.shape[1] * a_zp * b_zp
        assert np.array_equal(widened, exact)
        # the old form: the same activations against the int8 weights ONNX Runtime's own fusion keeps
        b_s8 = b - b_zp
        old, sat = _vpmaddubsw_gemm(a, b_s8)
        old_saturated += sat
        if sat:
            assert not np.array_equal(old - a_zp * b_s8.sum(0)[None], exact)
    assert old_saturated > 0, old_saturated  # these values do saturate the old form: the test can tell the two apart


# ---------------------------------------------------------------------------------------------------------------
# graph outputs written by their producers, not copied by an Identity
# ---------------------------------------------------------------------------------------------------------------

def test_the_kv_cache_outputs_are_written_by_their_concat_without_a_copy(tmp_path, monkeypatch):
    import onnx

    from slim_trt.runtime import ort_rewrite

    _, path = _export(tmp_path)
    model = onnx.load(str(path))
    outputs = [o.name for o in model.graph.output]
    copies = [n for n in model.graph.node if n.op_type == "Identity" and n.output[0] in outputs]
    assert len(copies) == 2 * 2 + 1  # present.{0,1}.{key,value} and logits, as exported
    fused, counts = for_onnxruntime(model, accuracy_level=4)
    assert counts["output_identities"] == 5
    assert not any(n.op_type == "Identity" for n in fused.graph.node)
    producers = {o: n for n in fused.graph.node for o in n.output}
    assert all(producers[f"present.{i}.{kv}"].op_type == "Concat" for i in range(2) for kv in ("key", "value"))
    # the attention reads the cache under its output name: one tensor, not two
    readers = [n for n in fused.graph.node if "present.0.key" in n.input]
    assert readers and not any(n.op_type == "Identity" for n in readers)
    monkeypatch.setattr(ort_rewrite, "_output_identities", lambda g: 0)
    kept, kept_counts = for_onnxruntime(model, accuracy_level=4)
    assert kept_counts["output_identities"] == 0 and sum(n.op_type == "Identity" for n in kept.graph.node) == 5
    feeds = {"input_ids": np.array([[3, 9, 27, 81]], np.int64), "attention_mask": np.ones((1, 6), np.int64),
             "position_ids": np.arange(2, 6, dtype=np.int64)[None]}
    rng = np.random.default_rng(0)
    for i in range(2):
        for kv in ("key", "value"):
            past = next(v for v in model.graph.input if v.name == f"past_key_values.{i}.{kv}")
            dims = [d.dim_value for d in past.type.tensor_type.shape.dim]
            feeds[past.name] = rng.normal(size=(1, dims[1], 2, dims[3])).astype(np.float32)
    a = ort.InferenceSession(fused.SerializeToString()).run(outputs, feeds)
    b = ort.InferenceSession(kept.SerializeToString()).run(outputs, feeds)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert np.array_equal(a[outputs.index("present.1.value")][:, :, :2], feeds["past_key_values.1.value"])
