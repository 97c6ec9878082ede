"""ONNX export of compressed causal LMs: Q/DQ weights, the low-rank path (decomposed or LowRankAdd), KV cache.

    export_model(model, out_dir, options=ExportOptions(...))   an in-memory model
    export(ckpt_path, out_dir, dtype=..., lowrank=..., ...)    a checkpoint folder written by `slim-trt compress`

May import: models, checkpoint, runtime (the ONNX tensor helpers, DecoderSpec), data, algorithms and the root
helpers. Reading an export back is slim_trt.runtime.export_folder.
"""
from __future__ import annotations

import importlib

from .options import DTYPES, IR_VERSION, LOWRANK_MODES, OPSET, ExportOptions

# torch and onnx load with the first of these names, not with the package: the CLI's help reads ExportOptions'
# defaults from .options, and `slim-trt --help` should not wait seconds for torch.
_LAZY = {"MODEL_FILE": "api", "SIDECAR": "api", "build_onnx": "api", "export": "api", "export_model": "api",
         "manifest_sha256": "api", "LOWRANK_PLUGIN": "linear"}

__all__ = ["DTYPES", "IR_VERSION", "LOWRANK_MODES", "LOWRANK_PLUGIN", "MODEL_FILE", "OPSET", "SIDECAR",
           "ExportOptions", "build_onnx", "export", "export_model", "manifest_sha256"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
