"""The NumPy model of the LowRankAdd kernel: INT4 packing as ONNX does it, exact fp32 FMA, error bounds."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from slim_trt.trt import lowrank_ref as ref


@pytest.mark.parametrize("shape", [(3, 5), (4, 8), (1, 1), (7, 33)])
def test_int4_packing_matches_onnx(shape):
    q = np.random.default_rng(sum(shape)).integers(-8, 8, shape).astype(np.int8)
    onnx_bytes = bytes(helper.make_tensor("w", TensorProto.INT4, shape, q.reshape(-1).tolist()).int32_data)
    assert ref.pack_int4(q).tobytes() == onnx_bytes  # low nibble first, flattened, no row padding
    assert np.array_equal(ref.unpack_int4(np.frombuffer(onnx_bytes, np.uint8), q.size).reshape(shape), q)
    assert np.array_equal(numpy_helper.to_array(numpy_helper.from_array(
        ref.unpack_int4(ref.pack_int4(q), q.size).reshape(shape).astype(onnx.helper.tensor_dtype_to_np_dtype(
            TensorProto.INT4)))).astype(np.int8), q)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        ref.pack_int4(np.array([8]))


def test_group_dequantization_matches_onnx_blocked_dequantize_linear():
    rows, cols, group = 3, 10, 4
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (rows, cols)).astype(np.int8)
    s = (rng.random((rows, -(-cols // group))) + 0.1).astype(np.float16)
    node = helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=1, block_size=group)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [rows, cols])],
                              initializer=[helper.make_tensor("q", TensorProto.INT4, q.shape, q.reshape(-1).tolist()),
                                           numpy_helper.from_array(s, "s")])
    expected = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])).run(None, {})[0]
    mine = ref.dequantize_int4(ref.pack_int4(q), s, rows, cols, group)
    # The kernel keeps q * scale in fp32; DequantizeLinear rounds it to fp16. Same value after that rounding:
    assert np.array_equal(mine.astype(np.float16), expected)


def test_fma32_is_correctly_rounded():
    rng = np.random.default_rng(3)
    n = 4000
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    c = (rng.standard_normal(n) * rng.choice([1e-9, 1.0, 1e9], n)).astype(np.float32)
    # exact midpoints: (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 lies halfway between two float32 values
    a[:3] = b[:3] = np.float32(1 + 2**-12)
    c[:3] = np.array([2.0**-70, -(2.0**-70), 0.0], np.float32)
    got = ref.fma32(a, b, c)
    for i in range(n):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        lo = np.float32(float(exact))
        cands = [lo, np.nextafter(lo, np.float32(np.inf)), np.nextafter(lo, np.float32(-np.inf))]
        best = min(cands, key=lambda z: (abs(Fraction(float(z)) - exact), int(np.float32(z).view(np.uint32)) & 1))
        assert got[i] == best, i
    assert got[0] > got[1] == got[2]  # the sign of the tiny addend decides the tie


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 100
    expected = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(ref.round_to_bf16(x), expected)
    assert np.array_equal(ref.from_bytes(ref.to_bytes(expected, "bf16"), "bf16"), expected)


@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_kernel_order_is_within_the_error_bound(dtype):
    rng = np.random.default_rng(7)
    m, n, k, r = 6, 40, 96, 8
    y, x = (ref.round_to(rng.standard_normal(s), dtype) for s in ((m, n), (m, k)))
    rr, ll = (ref.round_to(rng.standard_normal(s) * 0.1, dtype) for s in ((r, k), (n, r)))
    out = ref.lowrank_add_kernel_order(y, x, rr, ll, dtype)
    err = np.abs(out - ref.lowrank_add_float64(y, x, rr, ll))
    assert (err <= ref.error_bound(y, x, rr, ll, dtype)).all()
    # and it is not trivially exact: the final rounding to `dtype` is visible
    assert err.max() > 0
