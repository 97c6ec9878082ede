"""Fixtures for the TensorRT layer tests.

Tests marked `gpu` need TensorRT and an NVIDIA GPU; they skip here with the reason (what is missing).
The kernel tests need `nvcc` (the CUDA toolkit, no GPU) and skip without it.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "plugins" / "lowrank_add"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@functools.lru_cache(maxsize=None)
def gpu_unavailable_reason() -> str | None:
    from slim_trt.errors import MissingDependencyError
    from slim_trt.trt.backend import import_tensorrt, require_gpu

    try:
        import_tensorrt()
        require_gpu()
    except MissingDependencyError as e:
        return str(e)
    return None


def pytest_collection_modifyitems(config, items):
    """Skip this folder's `gpu` tests before any of their (module-scoped) fixtures try to build engines."""
    here = Path(__file__).resolve().parent
    gpu_items = [i for i in items if i.get_closest_marker("gpu") is not None and here in Path(i.path).parents]
    if gpu_items and (reason := gpu_unavailable_reason()):
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"needs TensorRT and an NVIDIA GPU: {reason}"))


@pytest.fixture(scope="session")
def nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc not found: the CUDA toolkit is needed to compile the LowRankAdd kernel")
    return path


@pytest.fixture(scope="session")
def host_check(nvcc, tmp_path_factory) -> Path:
    """plugins/lowrank_add/host_check.cu compiled for the CPU: the kernels' math, run without a GPU."""
    out = tmp_path_factory.mktemp("host_check") / "host_check"
    subprocess.run([nvcc, "-std=c++17", "-O2", str(PLUGIN_DIR / "host_check.cu"), "-o", str(out)], check=True,
                   capture_output=True, text=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    """A tiny compressed LLaMA exported twice (fp16, KV cache): decomposed low-rank path and LowRankAdd plugin."""
    from slim_trt.exporter import ExportOptions, export_model
    from tests.exporter.conftest import compressed_model

    model = compressed_model("llama")
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for lowrank in ("decomposed", "plugin"):
        export_model(model, root / lowrank, options=ExportOptions(dtype="fp16", lowrank=lowrank))
        out[lowrank] = root / lowrank / "model.onnx"
    return out
