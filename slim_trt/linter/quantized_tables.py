"""Rule `quantized-table`: which forms of a quantized embedding / tied LM head (`slim-trt export --head`) TensorRT
can parse, from the target table's `quantized_tables` entry.

A quantized table sits behind ops other than a GEMM weight input:
  embedding  Gather(DequantizeLinear(E_q), ids)
  tied head  MatMul(h, Transpose(DequantizeLinear(E_q)))
TensorRT dequantizes INT8 per tensor or per channel on any constant, so an INT8 table with one scale per row parses;
INT4 (and blocked scales) exist only as weight-only GEMM weights, so an INT4 table cannot feed a Gather or a
Transpose. ONNX Runtime's own forms of the same (com.microsoft GatherBlockQuantized, MatMulNBits) never belong in
the file: slim-trt keeps the Q/DQ form on disk and ONNX Runtime builds its kernels at load.
"""
from __future__ import annotations

from .model import INT4_TYPES, GraphView, attr
from .rules import Finding

ORT_ONLY = ("GatherBlockQuantized", "MatMulNBits")


def _granularity(v: GraphView, dq) -> str:
    if attr(dq, "block_size", 0):
        return "blocked"
    scale = v.constants.get(dq.input[1])
    return "per_tensor" if scale is None or len(scale.dims) == 0 or list(scale.dims) == [1] else "per_axis"


def _table_readers(v: GraphView, dq) -> list[tuple[str, str]]:
    """(role, node name) for each reader that makes the DQ a quantized table: a Gather's data, or a Transpose
    feeding MatMul/Gemm weights (the tied head)."""
    roles = []
    for n, idx in v.consumers.get(dq.output[0], []):
        if n.op_type == "Gather" and idx == 0:
            roles.append(("embedding", n.name))
        elif n.op_type == "Transpose" and any(c.op_type in ("MatMul", "Gemm") and i == 1
                                              for c, i in v.consumers.get(n.output[0], [])):
            roles.append(("tied head", n.name))
    return roles


def check_quantized_tables(v: GraphView, table: dict):
    allowed = table.get("quantized_tables", {"int8": [], "int4": []})
    for n in v.model.graph.node:
        if n.domain == "com.microsoft" and n.op_type in ORT_ONLY:
            yield Finding("error", "quantized-table", n.name, f"{n.op_type} is an ONNX Runtime contrib op that "
                          f"TensorRT cannot parse: give TensorRT the file `slim-trt export` wrote (Q/DQ form), not a "
                          f"graph optimized for ONNX Runtime")
            continue
        if n.op_type != "DequantizeLinear" or not v.is_constant(n.input[0]):
            continue
        roles = _table_readers(v, n)
        if not roles:
            continue
        kind = "int4" if v.constants[n.input[0]].data_type in INT4_TYPES else "int8"
        granularity = _granularity(v, n)
        what = f"{kind.upper()} {granularity.replace('_', '-')} table {n.input[0]} read as the {roles[0][0]}"
        if granularity in allowed.get(kind, []):
            yield Finding("info", "quantized-table", n.name, f"{what}: {table['title']} dequantizes it as a constant")
        else:
            yield Finding("error", "quantized-table", roles[0][1], f"{what}: {table['title']} has {kind.upper()} "
                          f"{granularity.replace('_', '-')} quantization only for GEMM weights; for TensorRT export "
                          f"with --head int8 (one scale per row) or --head none")
