"""Rule `scatter-reduction`: what TensorRT's ONNX parser does with a scatter that accumulates (SpQR's outliers,
`ScatterElements(y, rows, x[cols] * values, reduction="add")`, slim_trt.exporter.linear.emit_outliers).

From onnx-tensorrt's importer (onnxOpImporters.cpp, TensorRT 10): ScatterElements without reduction is TensorRT's
own scatter layer; with a reduction (add, mul, max, min) the parser builds the "ScatterElements" plugin (version 1)
from the plugin registry, so the engine needs TensorRT's plugin library (libnvinfer_plugin, loaded by trtexec and
by `trt.init_libnvinfer_plugins`); TensorRT 8.6's plugin fails when the updates outnumber the outputs along the
axis (onnx-tensorrt issue 953), which SpQR's outliers always do. ScatterND takes no reduction at all.
"""
from __future__ import annotations

from .model import GraphView, attr
from .rules import STANDARD_DOMAINS, Finding


def _reduction(n) -> str:
    r = attr(n, "reduction", "none")
    return r.decode() if isinstance(r, bytes) else r


def check_scatter_reduction(v: GraphView, table: dict):
    for n in v.model.graph.node:
        if n.domain not in STANDARD_DOMAINS or n.op_type not in ("ScatterElements", "ScatterND"):
            continue
        reduction = _reduction(n)
        if reduction == "none":
            continue
        if n.op_type == "ScatterND":
            yield Finding("error", "scatter-reduction", n.name, f"ScatterND with reduction {reduction!r}: "
                          f"{table['title']}'s parser supports no reduction on ScatterND")
            continue
        old = " TensorRT 8.6's plugin fails when the updates outnumber the outputs (onnx-tensorrt issue 953)." \
            if str(table.get("target", "")).startswith("jetson") else ""
        yield Finding("warning", "scatter-reduction", n.name, f"ScatterElements with reduction {reduction!r} is not "
                      f"a TensorRT layer: the parser imports it as the ScatterElements plugin (v1) of TensorRT's "
                      f"plugin library (load libnvinfer_plugin when building; a scatter kernel, not a GEMM).{old}")
