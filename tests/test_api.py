"""The public API names resolve to functions, also after every submodule has been imported."""
import importlib

import slim_trt

API = ["compress", "compress_model", "load", "save", "compressed_layers", "export", "verify", "lint", "build", "deploy"]


def test_public_api_names_are_callables():
    for mod in ("slim_trt.compression.compressor", "slim_trt.checkpoint.format", "slim_trt.exporter", "slim_trt.verification.ort_vs_torch",
                "slim_trt.linter", "slim_trt.trt", "slim_trt.triton"):
        importlib.import_module(mod)
    for name in API:
        obj = getattr(slim_trt, name)
        assert callable(obj) and not isinstance(obj, type(slim_trt)), name
