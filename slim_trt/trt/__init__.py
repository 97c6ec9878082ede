"""TensorRT layer: build engines, load and benchmark them (slim_trt.verification.engine compares them with ONNX
Runtime). It imports `tensorrt` only inside the functions that need it, so `import slim_trt.trt` works anywhere.
May import: linter (the pre-flight lint), targets and the root helpers.

    build(onnx_path, engine_path, *, target=None, sparsity=True, profiles=None, workspace_gb=None,
          timing_cache=None, plugins=(), verbose=False) -> BuildReport
    plan_build(...)                     the GPU-free half of build: shapes, target, plugins, lint pre-flight
    bench(engine_path, *, compare=None, ...) -> dict
    load_target(name) / list_targets()  target profiles (slim_trt.targets: shipped in targets/profiles/, yours in engines/profiles/)
"""
from __future__ import annotations

import importlib

_LAZY = {
    "build": "builder", "plan_build": "builder", "BuildPlan": "builder",
    "BuildReport": "report", "make_report": "report", "parse_layer_information": "report",
    "parse_sparsity_log": "report",
    "bench": "runtime", "format_bench": "runtime",
    "load_target": "slim_trt.targets.profile", "list_targets": "slim_trt.targets.profile",
    "TargetProfile": "slim_trt.targets.profile",
    "Range": "shapes", "ShapeRanges": "shapes",
    "import_tensorrt": "backend", "query_gpus": "backend", "GpuInfo": "backend",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module = _LAZY[name]
        return getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
