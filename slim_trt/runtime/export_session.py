"""ONNX Runtime sessions for exported model files, and the reference arithmetic of the LowRankAdd plugin node.

`session(model.onnx)` is slim_trt.runtime.decoder.make_session with the session config of the export's slim_export.json
(the one every consumer uses). ONNX Runtime has no kernel for the `slim_trt::LowRankAdd` node that TensorRT runs as
a plugin; the session runs the arithmetic the node stands for (slim_trt.runtime.ort_rewrite expands it in memory; the file
on disk keeps the TensorRT contract: domain slim_trt, plugin_version "1", plugin_namespace "slim_trt").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SlimError


def low_rank_add(y: np.ndarray, x: np.ndarray, r: np.ndarray, l_: np.ndarray) -> np.ndarray:
    """LowRankAdd's contract: y + (x @ r.T) @ l.T, accumulated in fp32, in y's dtype (the plugin's reference)."""
    t = x.astype(np.float32) @ r.astype(np.float32).T
    return (y.astype(np.float32) + t @ l_.astype(np.float32).T).astype(y.dtype)


def default_providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def export_spec(onnx_path: Path):
    """The DecoderSpec of the export `onnx_path` belongs to, or None when no slim_export.json describes it."""
    from .decoder import DecoderSpec
    from .export_folder import read_sidecar

    meta = read_sidecar(Path(onnx_path))
    if meta is None:
        return None
    try:
        return DecoderSpec.from_manifest(meta)
    except ValueError as e:
        raise SlimError(f"{Path(onnx_path).parent / 'slim_export.json'}: {e}: re-run `slim-trt export`") from None


def session(onnx_path: str | Path, providers: list[str] | None = None, *, fuse: bool = True, threads: int = 0,
            optimized_model_path: str | Path | None = None, w8a8_form: str | None = None):
    """An onnxruntime.InferenceSession for an exported model, with the session config its export declares.

    fuse=False: the graph's plain arithmetic (ONNX Runtime's Q/DQ fusion off). A model without a slim_export.json
    beside it gets ONNX Runtime's defaults (and the in-memory rewrite when its graph needs one). w8a8_form: see
    runtime.make_session."""
    import onnx

    from .ort_rewrite import needs_rewrite
    from .decoder import make_session

    path = Path(onnx_path)
    spec = export_spec(path)
    rewrite = None if spec is not None else needs_rewrite(onnx.load(str(path), load_external_data=False))
    return make_session(path, spec, threads, providers or default_providers(), fuse, rewrite, optimized_model_path,
                        w8a8_form)
