"""Read-only views of an ONNX graph for the lint rules: constants, producers, consumers, value types."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

INT4_TYPES = (TensorProto.INT4, TensorProto.UINT4)
TYPE_NAME = {v: k.lower() for k, v in TensorProto.DataType.items()}


class GraphView:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.initializers = {t.name: t for t in g.initializer}
        self.constants: dict[str, TensorProto] = dict(self.initializers)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in g.node:
            for o in n.output:
                self.producer[o] = n
            for i, x in enumerate(n.input):
                if x:
                    self.consumers.setdefault(x, []).append((n, i))
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.constants[n.output[0]] = a.t
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.compute_type = self._compute_type()

    def _compute_type(self) -> int:
        outs = {o.name: o for o in self.model.graph.output}
        o = outs.get("logits") or next(iter(outs.values()), None)
        return o.type.tensor_type.elem_type if o is not None else TensorProto.FLOAT

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def array(self, name: str) -> np.ndarray:
        a = numpy_helper.to_array(self.constants[name])
        if self.constants[name].data_type in INT4_TYPES:
            a = a.astype(np.int8)
        return a

    def elem_type(self, name: str) -> int | None:
        """The element type of a constant or of a Q/DQ-produced tensor (enough for the quantization rules)."""
        if name in self.constants:
            return self.constants[name].data_type
        n = self.producer.get(name)
        if n is not None and n.op_type == "QuantizeLinear":
            return quantize_output_type(self, n)
        return None


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def quantize_output_type(view: GraphView, node: onnx.NodeProto) -> int:
    """QuantizeLinear's output type: its zero point's type, else output_dtype, else uint8 (the ONNX default)."""
    if len(node.input) > 2 and node.input[2] and node.input[2] in view.constants:
        return view.constants[node.input[2]].data_type
    return attr(node, "output_dtype", 0) or TensorProto.UINT8
