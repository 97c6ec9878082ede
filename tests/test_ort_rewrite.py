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
from slim_trt.ort_rewrite import for_onnxruntime, needs_rewrite
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
    assert counts == {"lowrank_expanded": 0, "gather_block_quantized": 1, "matmul_nbits_head": 1}
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
