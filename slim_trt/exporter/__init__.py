"""ONNX export of compressed causal LMs: Q/DQ weights, the low-rank path (decomposed or LowRankAdd), KV cache.

    export_model(model, out_dir, options=ExportOptions(...))   an in-memory model
    export(ckpt_path, out_dir, dtype=..., lowrank=..., ...)    a checkpoint folder written by `slim-trt compress`

May import: models, checkpoint, runtime (the ONNX tensor helpers, DecoderSpec), data, algorithms and the root
helpers. Reading an export back is slim_trt.runtime.export_folder.
"""
from __future__ import annotations

from .api import MODEL_FILE, SIDECAR, build_onnx, export, export_model, manifest_sha256
from .linear import LOWRANK_PLUGIN
from .options import DTYPES, IR_VERSION, LOWRANK_MODES, OPSET, ExportOptions

__all__ = ["DTYPES", "IR_VERSION", "LOWRANK_MODES", "LOWRANK_PLUGIN", "MODEL_FILE", "OPSET", "SIDECAR",
           "ExportOptions", "build_onnx", "export", "export_model", "manifest_sha256"]
