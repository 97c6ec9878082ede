"""INT4 packing and the DequantizeLinear layouts, checked exactly against QuantizedTensor.dequantize()."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from slim_trt.exporter.graph import GraphBuilder, int_tensor
from slim_trt.exporter.linear import dequantized
from tests.exporter.conftest import absmax_quantize


@pytest.mark.parametrize("shape", [(3, 5), (4, 8), (1, 1)])
def test_int4_pack_roundtrip(shape):
    q = np.random.default_rng(0).integers(-8, 8, size=shape).astype(np.int8)
    t = int_tensor("w", q, 4)
    assert t.data_type == TensorProto.INT4 and len(t.raw_data) == (q.size + 1) // 2
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), q)


def _run_dq(qt, transpose: bool) -> np.ndarray:
    b = GraphBuilder("fp32")
    y = dequantized(b, qt, "w", transpose=transpose)
    b.identity_to(y, "y", name="out")
    rows, cols = qt.shape
    b.add_output("y", TensorProto.FLOAT, [cols, rows] if transpose else [rows, cols])
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    s = ort.InferenceSession(b.make_model("dq", 21, 10).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [0, -1, 16, 128])
@pytest.mark.parametrize("transpose", [True, False])
def test_dequantize_layouts_exact(bits, group_size, transpose):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    qt = absmax_quantize(w, bits, group_size)
    got = _run_dq(qt, transpose)
    want = qt.dequantize().numpy()
    np.testing.assert_array_equal(got, want.T if transpose else want)
