"""slim-trt: one-shot SLiM compression of Hugging Face causal LMs for TensorRT sparse tensor cores.

Public API (imported lazily so that `import slim_trt` stays cheap and optional backends stay optional):
    compress(model, config, ...)      compress a model in place (quantize -> prune -> low-rank adapters)
    compress_model(source, out, ...)  the whole job: load, calibrate, compress, save a checkpoint
    save(model, path, ...) / load(path)
    compressed_layers(model)          (name, CompressedLinear) pairs
    export(ckpt, out_dir, ...)        ONNX with Q/DQ and the low-rank path
    verify(onnx_path, reference, ...) ONNX Runtime vs PyTorch
    generate(export_dir, prompt, ...) text from an export in ONNX Runtime (Generator: load once, with timings)
    lint(onnx_path, target=...)       TensorRT parser rules, on the CPU
    build(onnx_path, engine, ...)     TensorRT engine (needs TensorRT and a GPU)
    deploy(export_dir, repo, ...)     Triton model repository
"""
from __future__ import annotations

import importlib

_LAZY = {
    "CompressConfig": "slim_trt.config",
    "CalibConfig": "slim_trt.config",
    "Sparsity": "slim_trt.config",
    "SlimError": "slim_trt.errors",
    "CompressedLinear": "slim_trt.checkpoint.compressed_linear",
    "compressed_layers": "slim_trt.checkpoint.compressed_linear",
    "compress": "slim_trt.compression.compressor",
    "compress_model": "slim_trt.compression.compressor",
    "save": "slim_trt.checkpoint.format",
    "load": "slim_trt.checkpoint.format",
    "export": "slim_trt.exporter",
    "verify": "slim_trt.verification.ort_vs_torch",
    "generate": "slim_trt.runtime.generation",
    "Generator": "slim_trt.runtime.generation",
    "lint": "slim_trt.linter",
    "build": "slim_trt.trt",
    "deploy": "slim_trt.triton",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slim_trt' has no attribute {name!r}")
