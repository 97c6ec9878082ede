"""The lint rules. Each takes the GraphView and the target table and yields findings (or layers).

Rule ids:
  opset            the default-domain opset against the target's documented range; INT4/blocked Q/DQ need >= 21
  op-support       every standard op is in the target parser's support list
  constant-input   inputs the parser needs at build time (axes, CumSum axis) are constants
  plugin           custom-domain nodes name a plugin the project ships, with its version and namespace
  ort-only         ONNX Runtime contrib ops (com.microsoft, tables/ort_only_ops.json) that TensorRT cannot parse
  qdq-scale        Q/DQ scales are constants in the compute dtype
  qdq-zero-point   zero points are constant zeros of a signed type
  int4             INT4 only on constant weights feeding MatMul/Gemm, signed, even last dimension, target >= TRT 10
  qdq-block        blocked quantization along exactly one axis with a consistent scale shape
  sparsity-2to4    layers that claim 2:4 (sidecar, or >= 50% zeros) really are 2:4 along K (codes with a zero
                   point are zero where they equal it)
  scatter-reduction  (linter/scatter.py) ScatterElements with a reduction is a TensorRT plugin, ScatterND refuses one
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..exporter.linear import LOWRANK_PLUGIN
from .model import INT4_TYPES, TYPE_NAME, GraphView, attr, quantize_output_type
from .tables import ort_only_ops

KNOWN_PLUGINS = (LOWRANK_PLUGIN,)
# Zero-point weights TensorRT can run: those whose q - zero fits signed INT4, which the exporter folds (issue 14).
ZERO_POINT_FIX = ("for TensorRT, re-export with --zero-points fold (4-bit SpQR: signed codes + a per-group offset), "
                  "or re-compress with --bits 2 or 3 (uniform or --bit-allocation slim-llm: their zero points fold "
                  "into signed INT4) or symmetric 4-bit weights (--no-zero-point)")
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "info"
    rule: str
    node: str
    message: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LayerInfo:
    """One MatMul/Gemm whose weight is a constant (behind DequantizeLinear or not)."""

    name: str
    weight: str
    K: int
    N: int
    dtype: str  # the weight's precision as the GEMM sees it: the quantized type behind DequantizeLinear
    is_2to4: bool
    groups_violating: int
    flops: int  # multiply-adds x 2 per token
    activation: str = ""  # the input's precision: the quantized type behind an activation Q/DQ pair, else float
    # The precision the result leaves in: the quantized type when every consumer of the GEMM's output (after an
    # optional constant bias Add, which TensorRT fuses into the epilogue) is a QuantizeLinear to it, else float.
    output: str = ""
    # Filled by slim_trt.linter.sparse: can TensorRT run this GEMM on 2:4 sparse tensor cores, and if not, why;
    # for an eligible one its form ("int8-in/int8-out", ...) and what TensorRT is expected to do with it.
    sparse_eligible: bool = False
    sparse_class: str = ""
    sparse_math: str | None = None
    sparse_reason: str = ""
    sparse_form: str | None = None
    sparse_expect: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_opset(v: GraphView, table: dict):
    if v.opset < table["opset_min"]:
        yield Finding("error", "opset", "", f"opset {v.opset} is below {table['title']}'s minimum {table['opset_min']}")
    elif v.opset > table["opset_max"]:
        yield Finding("warning", "opset", "", f"opset {v.opset} is above the {table['opset_max']} documented for "
                      f"{table['title']}: the parser warns and may reject newer op versions")


def check_ops(v: GraphView, table: dict):
    missing: dict[str, list[str]] = {}
    for n in v.model.graph.node:
        if n.domain in STANDARD_DOMAINS and n.op_type not in table["ops"]:
            missing.setdefault(n.op_type, []).append(n.name)
        for idx in table["constant_inputs"].get(n.op_type, []) if n.domain in STANDARD_DOMAINS else []:
            if idx < len(n.input) and n.input[idx] and not v.is_constant(n.input[idx]):
                yield Finding("error", "constant-input", n.name, f"{n.op_type} input {idx} ({n.input[idx]}) must be a "
                              f"constant for TensorRT's parser")
    for op, names in sorted(missing.items()):
        yield Finding("error", "op-support", names[0], f"{op} ({len(names)} node(s)) is not supported by "
                      f"{table['title']}'s ONNX parser")


def check_plugins(v: GraphView, table: dict):
    for n in v.model.graph.node:
        if n.domain in STANDARD_DOMAINS:
            continue
        known = [p for p in KNOWN_PLUGINS if p["op_type"] == n.op_type]
        ort = ort_only_ops()
        if n.domain == "com.microsoft" and n.op_type in ort["ops"]:
            yield Finding("error", "ort-only", n.name, f"com.microsoft::{n.op_type} is ONNX Runtime only "
                          f"({ort['ops'][n.op_type]}): {ort['fix']}")
            continue
        if not known:
            provided = ", ".join(f"{p['op_type']} v{p['plugin_version']} (namespace {p['plugin_namespace']})"
                                 for p in KNOWN_PLUGINS)
            yield Finding("error", "plugin", n.name, f"unknown custom op {n.domain}::{n.op_type}: TensorRT needs a "
                          f"plugin for it and slim-trt provides only {provided}")
            continue
        p = known[0]
        version, namespace = attr(n, "plugin_version"), attr(n, "plugin_namespace")
        version = version.decode() if isinstance(version, bytes) else version
        namespace = namespace.decode() if isinstance(namespace, bytes) else namespace
        if version != p["plugin_version"] or namespace != p["plugin_namespace"]:
            yield Finding("error", "plugin", n.name, f"{n.op_type} asks for plugin_version={version!r}, "
                          f"plugin_namespace={namespace!r}; the project provides version {p['plugin_version']!r} in "
                          f"namespace {p['plugin_namespace']!r}: re-export with this slim-trt")


def _blocked_shape_ok(x_shape: list[int], s_shape: list[int], axis: int, block: int) -> bool:
    if len(s_shape) != len(x_shape):
        return False
    axis = axis % len(x_shape)
    return all(s == (-(-d // block) if i == axis else d) for i, (d, s) in enumerate(zip(x_shape, s_shape)))


def check_qdq(v: GraphView, table: dict):
    ct = v.compute_type
    for n in v.model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.domain not in STANDARD_DOMAINS:
            continue
        scale = n.input[1]
        if not v.is_constant(scale):
            yield Finding("error", "qdq-scale", n.name, f"{n.op_type} scale {scale} is not a constant: TensorRT "
                          f"needs build-time scales")
        elif v.constants[scale].data_type != ct:
            yield Finding("error", "qdq-scale", n.name, f"{n.op_type} scale is {TYPE_NAME[v.constants[scale].data_type]}"
                          f" but the model computes in {TYPE_NAME[ct]}: re-export with matching --dtype")
        zp = n.input[2] if len(n.input) > 2 else ""
        if zp:
            if not v.is_constant(zp):
                yield Finding("error", "qdq-zero-point", n.name, f"{n.op_type} zero point {zp} is not a constant")
            elif np.any(v.array(zp) != 0):
                yield Finding("error", "qdq-zero-point", n.name, f"{n.op_type} zero point {zp} is non-zero: TensorRT "
                              f"supports symmetric quantization only (zero point 0; NvInfer.h IDequantizeLayer, "
                              f"TensorRT 10.3 and 11.1); {ZERO_POINT_FIX}")
        qtype = quantize_output_type(v, n) if n.op_type == "QuantizeLinear" else v.elem_type(n.input[0])
        if qtype in (TensorProto.UINT8, TensorProto.UINT4):
            yield Finding("error", "qdq-zero-point", n.name, f"{n.op_type} uses unsigned {TYPE_NAME[qtype]}: "
                          f"TensorRT quantizes to signed INT8/INT4 only")

        if qtype in INT4_TYPES:
            yield from _check_int4(v, table, n)
        block = attr(n, "block_size", 0)
        if block and qtype in (TensorProto.INT8, TensorProto.UINT8):
            yield Finding("error", "qdq-block", n.name, f"blocked {n.op_type} of {TYPE_NAME[qtype]}: TensorRT blocks "
                          f"only INT4 / FP8 / FP4 (NvInfer.h IDequantizeLayer); {ZERO_POINT_FIX}")
        if block:
            if v.opset < 21:
                yield Finding("error", "opset", n.name, f"blocked {n.op_type} (block_size) needs opset >= 21, "
                              f"the model has {v.opset}")
            if not table["blocked_quantization"]:
                yield Finding("error", "qdq-block", n.name, f"{table['title']} has no blocked quantization")
            if v.is_constant(n.input[0]) and v.is_constant(scale):
                xs, ss = list(v.constants[n.input[0]].dims), list(v.constants[scale].dims)
                if not _blocked_shape_ok(xs, ss, attr(n, "axis", 1), block):
                    yield Finding("error", "qdq-block", n.name, f"scale shape {ss} does not block {xs} along exactly "
                                  f"one axis ({attr(n, 'axis', 1)}) with block_size {block}")


FP8_TYPES = (TensorProto.FLOAT8E4M3FN,)
INT8_RECIPE = "--preset trt-int8-sparse"


def check_fp8(v: GraphView, gpu_name: str, has_fp8: bool, generic: bool):
    """FP8 Q/DQ against a GPU without FP8 tensor cores: TensorRT refuses to build it ("Networks with FP8 precision
    require hardware with FP8 support"). One finding for the whole model, naming the first FP8 node."""
    first = None
    per_channel = False
    for n in v.model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.domain not in STANDARD_DOMAINS:
            continue
        qtype = quantize_output_type(v, n) if n.op_type == "QuantizeLinear" else v.elem_type(n.input[0])
        if qtype not in FP8_TYPES:
            continue
        first = first or n
        scale = n.input[1]
        per_channel |= (n.op_type == "DequantizeLinear" and v.is_constant(scale)
                        and int(np.prod(v.constants[scale].dims)) > 1)
    if first is None:
        return
    if not has_fp8:
        where = ("a lint table names a TensorRT version, not a GPU, and FP8 is not assumed: lint with --target "
                 "hopper, ada or jetson-thor if the model is for one of them" if generic else
                 f"{gpu_name} has no FP8 tensor cores (TensorRT: 'Networks with FP8 precision require hardware "
                 f"with FP8 support')")
        yield Finding("error", "fp8", first.name, f"FP8 Q/DQ: {where}; Ampere and Jetson Orin GPUs have no FP8, "
                      f"compress with the INT8 recipe ({INT8_RECIPE}) for them")
    elif per_channel:
        yield Finding("info", "fp8", first.name, "per-output-channel FP8 weight scales: TensorRT's parser accepts "
                      "them; whether its FP8 GEMM fusion keeps them in the FP8 kernel is not verified here "
                      "(check `slim-trt build`'s layer report on the GPU)")


def _check_int4(v: GraphView, table: dict, n):
    if v.opset < 21:
        yield Finding("error", "opset", n.name, f"INT4 {n.op_type} needs opset >= 21, the model has {v.opset}: "
                      f"re-export with opset 21")
    if not table["int4_weights"]:
        yield Finding("error", "int4", n.name, f"{table['title']} has no INT4 (TensorRT >= 10 needed)")
    if n.op_type == "QuantizeLinear":
        yield Finding("error", "int4", n.name, "INT4 QuantizeLinear on an activation: TensorRT supports INT4 only on "
                      "constant weights (weight-only quantization)")
        return
    x = n.input[0]
    if not v.is_constant(x):
        yield Finding("error", "int4", n.name, "INT4 DequantizeLinear of a non-constant tensor: INT4 is weight-only")
        return
    dims = list(v.constants[x].dims)
    if dims and dims[-1] % 2:
        yield Finding("error", "int4", n.name, f"INT4 weight {x} has an odd last dimension {dims[-1]}: TensorRT packs "
                      f"INT4 in pairs along the last dimension")
    for consumer, idx in v.consumers.get(n.output[0], []):
        if consumer.op_type in table["int4_consumers"] and idx == 1:
            continue
        if consumer.domain not in STANDARD_DOMAINS and any(p["op_type"] == consumer.op_type for p in KNOWN_PLUGINS):
            yield Finding("warning", "int4", n.name, f"INT4 weight {x} feeds plugin {consumer.op_type}: TensorRT must "
                          f"fold the DequantizeLinear into a constant plugin input (check the build log)")
            continue
        yield Finding("error", "int4", n.name, f"INT4 weight {x} feeds {consumer.op_type} ({consumer.name}) input "
                      f"{idx}: TensorRT runs INT4 only as the weight of MatMul/Gemm")


def _trace_weight(v: GraphView, name: str):
    """Follow a MatMul weight back through Transpose/Cast/Identity/DequantizeLinear to a constant.

    Returns (array in [K, N] orientation, constant name, precision name) or None for a runtime tensor. The
    precision is the quantized type when a DequantizeLinear is on the path (the GEMM reads the INT4/INT8/FP8
    weight), else the type of the Cast nearest the GEMM, else the constant's own type.
    """
    transposed, cast_to, dequantized, dq = False, None, False, None
    while name not in v.constants:
        n = v.producer.get(name)
        if n is None:
            return None
        if n.op_type == "Transpose" and list(attr(n, "perm", [1, 0])) == [1, 0]:
            transposed = not transposed
        elif n.op_type == "Cast":
            cast_to = cast_to if cast_to is not None else attr(n, "to")
        elif n.op_type == "DequantizeLinear":
            dequantized, dq = True, n
        elif n.op_type != "Identity":
            return None
        name = n.input[0]
    a = v.array(name)
    if a.ndim != 2:
        return None
    fp8 = v.constants[name].data_type in FP8_TYPES  # FP8 codes carry no zero point to subtract (a zero is 0x00/0x80)
    if dq is not None and len(dq.input) > 2 and dq.input[2] and v.is_constant(dq.input[2]) and not fp8:
        # Codes with a zero point (SpQR): the weight is zero where the code equals its zero point.
        a = a.astype(np.int32) - _expand_zero_point(v.array(dq.input[2]).astype(np.int32), a.shape,
                                                       attr(dq, "axis", 1), attr(dq, "block_size", 0))
    dtype = v.constants[name].data_type if dequantized or cast_to is None else cast_to
    return (a.T if transposed else a), name, TYPE_NAME[dtype]


def _expand_zero_point(zp: np.ndarray, shape: tuple, axis: int, block: int) -> np.ndarray:
    """A DequantizeLinear zero point broadcast to its input's 2-D shape (per tensor, per axis or blocked)."""
    if zp.ndim == 0 or zp.size == 1:
        return np.full(shape, zp.reshape(-1)[0])
    axis %= 2
    if block:
        return np.repeat(zp, block, axis=axis)[:shape[0], :shape[1]]
    return zp.reshape(-1, 1) if axis == 0 else zp.reshape(1, -1)


def output_precision(v: GraphView, name: str) -> str:
    """The precision a GEMM's result leaves in: the common quantized type of the QuantizeLinear nodes that consume
    it (directly, or after an Add of a constant bias: the epilogue TensorRT fuses), else the compute type."""
    uses = v.consumers.get(name, [])
    if len(uses) == 1 and uses[0][0].op_type == "Add" and uses[0][0].domain in STANDARD_DOMAINS \
            and any(v.is_constant(x) for x in uses[0][0].input):
        uses = v.consumers.get(uses[0][0].output[0], [])
    types = {quantize_output_type(v, n) if n.op_type == "QuantizeLinear" and n.domain in STANDARD_DOMAINS else None
             for n, _ in uses}
    if len(types) == 1 and None not in types:
        return TYPE_NAME[types.pop()]
    return TYPE_NAME[v.compute_type]


def activation_precision(v: GraphView, name: str) -> str:
    """The precision a GEMM reads its activation in: the Q type behind a DequantizeLinear, a Cast's target type,
    or the model's compute type."""
    n = v.producer.get(name)
    if n is not None and n.op_type == "DequantizeLinear" and n.domain in STANDARD_DOMAINS:
        t = v.elem_type(n.input[0])
        if t is not None:
            return TYPE_NAME[t]
    if n is not None and n.op_type == "Cast":
        return TYPE_NAME[attr(n, "to")]
    return TYPE_NAME[v.compute_type]


def layers_and_sparsity(v: GraphView, expected_2to4: set[str] | None):
    """LayerInfo per constant-weight MatMul/Gemm, and sparsity findings."""
    layers, findings = [], []
    for n in v.model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or n.domain not in STANDARD_DOMAINS or len(n.input) < 2:
            continue
        traced = _trace_weight(v, n.input[1])
        if traced is None:
            continue
        w, const_name, dtype = traced
        if n.op_type == "Gemm" and attr(n, "transB", 0):
            w = w.T
        K, N = w.shape
        nz = w != 0
        if K % 4 == 0:
            per_group = nz.reshape(K // 4, 4, N).sum(axis=1)
            violating = int((per_group > 2).sum())
        else:
            violating = int(np.ceil(K / 4)) * N
        info = LayerInfo(n.name, const_name, int(K), int(N), dtype, violating == 0, violating, 2 * int(K) * int(N),
                         activation=activation_precision(v, n.input[0]), output=output_precision(v, n.output[0]))
        layers.append(info)
        claims = (const_name in expected_2to4) if expected_2to4 is not None else (1.0 - nz.mean()) >= 0.5
        if claims and not info.is_2to4:
            total = int(np.ceil(K / 4)) * N
            findings.append(Finding("error", "sparsity-2to4", n.name, f"weight {const_name} [{K}x{N}] is meant to be "
                                    f"2:4 but {violating} of {total} groups of 4 along K keep more than 2 values"))
    return layers, findings
