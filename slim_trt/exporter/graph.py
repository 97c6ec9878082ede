"""A small ONNX graph builder: unique names, cached constants, initializers from torch tensors.

Pure construction, no I/O. Node names carry the PyTorch module path (e.g.
`model.layers.0.self_attn.q_proj/MatMul`) so that lint and profiler reports map back to the model.
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper

from ..runtime.ort_rewrite import int_initializer as int_tensor  # noqa: F401 - the exporter's integer initializers
from ..runtime.ort_rewrite import pack_int4  # noqa: F401
from ..runtime.ort_rewrite import unique_name

ONNX_FLOAT = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
TORCH_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUMPY_NAME = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
              TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.BOOL: "bool"}


def tensor_from_torch(name: str, t: torch.Tensor, dtype: str | None = None) -> TensorProto:
    """An initializer holding `t` (cast to the float `dtype` when given), stored as raw little-endian bytes."""
    t = t.detach().cpu()
    if dtype is not None:
        t = t.to(TORCH_FLOAT[dtype])
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bit pattern
        raw = t.view(torch.int16).numpy().tobytes()
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), raw, raw=True)
    arr = t.numpy()
    elem = helper.np_dtype_to_tensor_dtype(arr.dtype)
    return helper.make_tensor(name, elem, list(arr.shape), arr.tobytes(), raw=True)


def fp8_tensor(name: str, codes: torch.Tensor) -> TensorProto:
    """A FLOAT8E4M3FN initializer holding float8_e4m3fn `codes` (their bytes, as ONNX stores FP8)."""
    raw = codes.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(codes.shape), raw, raw=True)


def uint_tensor(name: str, q: np.ndarray, bits: int) -> TensorProto:
    """A UINT4 (packed two per byte, low nibble first, as ONNX stores 4-bit types) or UINT8 initializer."""
    q = np.asarray(q).astype(np.uint8)
    if bits <= 4:
        flat = q.reshape(-1)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
        return helper.make_tensor(name, TensorProto.UINT4, list(q.shape), raw, raw=True)
    return helper.make_tensor(name, TensorProto.UINT8, list(q.shape), q.tobytes(), raw=True)


class GraphBuilder:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.float_type = ONNX_FLOAT[dtype]
        self.nodes: list = []
        self.initializers: list[TensorProto] = []
        self.inputs: list = []
        self.outputs: list = []
        self.opsets: dict[str, int] = {}
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    # -- names -------------------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        return unique_name(self._names, base)

    # -- nodes -------------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], *, name: str, outputs: int | list[str] = 1, domain: str = "",
           **attrs):
        node_name = self.unique(f"{name}/{op_type}")
        if isinstance(outputs, int):
            outs = [self.unique(f"{node_name}_output_{i}") for i in range(outputs)]
        else:
            outs = list(outputs)
            self._names.update(outs)
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    # -- tensors -----------------------------------------------------------------------------------------
    def add_initializer(self, tensor: TensorProto) -> str:
        if tensor.name in self._names:
            raise ValueError(f"duplicate tensor name {tensor.name}")
        self._names.add(tensor.name)
        self.initializers.append(tensor)
        return tensor.name

    def weight(self, name: str, t: torch.Tensor, dtype: str | None = None) -> str:
        """A float initializer in the compute dtype (or `dtype`)."""
        return self.add_initializer(tensor_from_torch(name, t, dtype or self.dtype))

    def const(self, value, kind: str) -> str:
        """A cached small constant. kind: "i64" (int64 vector/scalar), "f32", or "float" (the compute dtype)."""
        arr = np.asarray(value)
        key = (kind, arr.shape, tuple(arr.reshape(-1).tolist()))
        if key not in self._consts:
            name = self.unique(f"const_{kind}_{len(self._consts)}")
            if kind == "i64":
                t = torch.as_tensor(arr, dtype=torch.int64)
            elif kind == "f32":
                t = torch.as_tensor(arr, dtype=torch.float32)
            else:
                t = torch.as_tensor(arr, dtype=torch.float32).to(TORCH_FLOAT[self.dtype])
            self._names.discard(name)
            self.add_initializer(tensor_from_torch(name, t))
            self._consts[key] = name
        return self._consts[key]

    def cast(self, x: str, to: int, *, name: str) -> str:
        return self.op("Cast", [x], name=name, to=to)

    def to_compute(self, x: str, *, name: str) -> str:
        """Cast an fp32 tensor to the compute dtype (no node when the compute dtype is fp32)."""
        return x if self.float_type == TensorProto.FLOAT else self.cast(x, self.float_type, name=name)

    def to_f32(self, x: str, *, name: str) -> str:
        return x if self.float_type == TensorProto.FLOAT else self.cast(x, TensorProto.FLOAT, name=name)

    # -- graph I/O ---------------------------------------------------------------------------------------
    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def identity_to(self, x: str, out_name: str, *, name: str) -> str:
        """Route `x` to a graph output with a fixed name."""
        return self.op("Identity", [x], name=name, outputs=[out_name])

    def make_model(self, graph_name: str, opset: int, ir_version: int, doc: str = ""):
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, initializer=self.initializers)
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in sorted(self.opsets.items())]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="slim-trt", doc_string=doc)
        model.ir_version = ir_version
        return model
