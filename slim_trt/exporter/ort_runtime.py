"""ONNX Runtime sessions for slim-trt exports, including the LowRankAdd kernel for the `plugin` variant.

ONNX Runtime has no kernel for the `slim_trt::LowRankAdd` node that TensorRT runs as a plugin. The kernel here is
an onnxruntime-extensions Python custom op; those live only in the "ai.onnx.contrib" domain, so the session is
built from an in-memory copy of the model whose LowRankAdd nodes are moved to that domain (the file on disk keeps
the TensorRT contract: domain slim_trt, plugin_version "1", plugin_namespace "slim_trt").

Kernel: out = Y + (X R^T) L^T with X [..., K], R [r, K], L [N, r], Y [..., N], computed in fp32. The Python
custom-op API has no fp16 tensors, so in fp16 graphs the copy wraps the node in Casts (fp16 -> fp32 -> fp16): the
same arithmetic as a plugin that accumulates in fp32 and rounds its output to fp16.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import MissingDependencyError, SlimError
from .linear import LOWRANK_PLUGIN

ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"
_KERNEL_OP = "SlimLowRankAdd"
_registered = False


def low_rank_add(y: np.ndarray, x: np.ndarray, r: np.ndarray, l_: np.ndarray) -> np.ndarray:
    """The reference kernel: y + (x @ r.T) @ l.T, accumulated in fp32, in y's dtype."""
    t = x.astype(np.float32) @ r.astype(np.float32).T
    return (y.astype(np.float32) + t @ l_.astype(np.float32).T).astype(y.dtype)


def _register_kernels() -> None:
    global _registered
    if _registered:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as e:
        raise MissingDependencyError("running the LowRankAdd (plugin) variant in ONNX Runtime needs "
                                     "onnxruntime-extensions: pip install onnxruntime-extensions") from e
    dt = PyCustomOpDef.dt_float
    onnx_op(op_type=_KERNEL_OP, inputs=[dt] * 4, outputs=[dt])(low_rank_add)
    _registered = True


def compute_elem_type(model: onnx.ModelProto) -> int:
    for o in model.graph.output:
        if o.name == "logits":
            return o.type.tensor_type.elem_type
    return model.graph.output[0].type.tensor_type.elem_type


def for_onnxruntime(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` whose LowRankAdd nodes run on the onnxruntime-extensions kernel; and how many there were."""
    plugin_nodes = [n for n in model.graph.node
                    if n.domain == LOWRANK_PLUGIN["domain"] and n.op_type == LOWRANK_PLUGIN["op_type"]]
    if not plugin_nodes:
        return model, 0
    elem = compute_elem_type(model)
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise SlimError("ONNX Runtime's LowRankAdd kernel runs fp32 and fp16 graphs only: export with --dtype fp32 "
                        "or fp16 to verify on the CPU")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for n in m.graph.node:
        if not (n.domain == LOWRANK_PLUGIN["domain"] and n.op_type == LOWRANK_PLUGIN["op_type"]):
            nodes.append(n)
            continue
        ins, out = list(n.input), n.output[0]
        if elem == TensorProto.FLOAT16:
            for i, x in enumerate(ins):
                ins[i] = f"{n.name}/ort_f32_in{i}"
                nodes.append(helper.make_node("Cast", [x], [ins[i]], name=ins[i], to=TensorProto.FLOAT))
            out = f"{n.name}/ort_f32_out"
        nodes.append(helper.make_node(_KERNEL_OP, ins, [out], name=n.name, domain=ORT_CONTRIB_DOMAIN))
        if elem == TensorProto.FLOAT16:
            nodes.append(helper.make_node("Cast", [out], [n.output[0]], name=f"{n.name}/ort_f16_out",
                                          to=TensorProto.FLOAT16))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    keep = [o for o in m.opset_import if o.domain != LOWRANK_PLUGIN["domain"]]
    del m.opset_import[:]
    m.opset_import.extend(keep + [helper.make_opsetid(ORT_CONTRIB_DOMAIN, 1)])
    return m, len(plugin_nodes)


def default_providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def session(onnx_path: str | Path, providers: list[str] | None = None):
    """An onnxruntime.InferenceSession for an exported model (plugin variant included)."""
    import onnxruntime as ort

    path = Path(onnx_path)
    providers = providers or default_providers()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # ORT's QDQ fusions rewrite DequantizeLinear(INT4) -> MatMul into MatMulNBits, which by default quantizes the
    # activations to int8 (accuracy level 4): ~3% logit error on the test models. Verification checks the graph's
    # own semantics (dequantize, then a float GEMM, as TensorRT's weight-only path does), so keep them apart.
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    model = onnx.load(str(path), load_external_data=False)
    if not any(n.domain == LOWRANK_PLUGIN["domain"] for n in model.graph.node):
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    _register_kernels()
    from onnxruntime_extensions import get_library_path

    opts.register_custom_ops_library(get_library_path())
    onnx.load_external_data_for_model(model, str(path.parent))
    rewritten, _ = for_onnxruntime(model)
    if rewritten.ByteSize() < 2**31 - 2**26:
        return ort.InferenceSession(rewritten.SerializeToString(), sess_options=opts, providers=providers)
    with tempfile.TemporaryDirectory(prefix="slim_trt_ort_") as d:  # > 2 GB: protobuf needs external data
        onnx.save_model(rewritten, f"{d}/model.onnx", save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(f"{d}/model.onnx", sess_options=opts, providers=providers)
