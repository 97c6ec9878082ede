"""The IPluginV3 glue compiles against TensorRT headers when they are on this machine (TENSORRT_ROOT, or the
system include folders of a TensorRT/JetPack install); CI without TensorRT skips it."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.trt.conftest import PLUGIN_DIR


def tensorrt_include() -> Path | None:
    roots = [Path(os.environ["TENSORRT_ROOT"]) / "include"] if os.environ.get("TENSORRT_ROOT") else []
    roots += [Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include/aarch64-linux-gnu"), Path("/usr/include")]
    return next((r for r in roots if (r / "NvInfer.h").is_file()), None)


@pytest.mark.parametrize("static_registration", [1, 0])
def test_plugin_glue_compiles_against_tensorrt_headers(nvcc, static_registration, tmp_path):
    include = tensorrt_include()
    if include is None:
        pytest.skip("TensorRT headers not found (set TENSORRT_ROOT): the IPluginV3 glue needs NvInfer.h")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    homes = [os.environ.get("CUDA_HOME"), str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h")
                         .is_file()), None)
    if cuda_include is None:
        pytest.skip("cuda_runtime_api.h not found (set CUDA_HOME)")
    proc = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                           "-Wno-deprecated-declarations", f"-DLOWRANK_ADD_STATIC_REGISTRATION={static_registration}",
                           "-isystem", str(include), "-isystem", str(cuda_include),
                           str(PLUGIN_DIR / "lowrank_add_plugin.cpp")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
