"""TensorRT layer: build engines, check them against ONNX Runtime, benchmark them. The only package that
imports `tensorrt`, and only inside the functions that need it, so `import slim_trt.trt` works anywhere.

    build(onnx_path, engine_path, *, target=None, sparsity=True, profiles=None, workspace_gb=None,
          timing_cache=None, plugins=(), verbose=False) -> BuildReport
    plan_build(...)                     the GPU-free half of build: shapes, target, plugins, lint pre-flight
    verify_engine(onnx_path, engine_path, *, plugins=(), ...) -> dict
    bench(engine_path, *, compare=None, ...) -> dict
    load_target(name) / list_targets()  target profiles (shipped in trt/profiles/, yours in engines/profiles/)
"""
from __future__ import annotations

import importlib

_LAZY = {
    "build": "builder", "plan_build": "builder", "BuildPlan": "builder",
    "BuildReport": "report", "make_report": "report", "parse_layer_information": "report",
    "parse_sparsity_log": "report",
    "verify_engine": "runtime", "bench": "runtime", "format_bench": "runtime",
    "load_target": "targets", "list_targets": "targets", "TargetProfile": "targets",
    "Range": "shapes", "ShapeRanges": "shapes",
    "import_tensorrt": "backend", "query_gpus": "backend", "GpuInfo": "backend",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
