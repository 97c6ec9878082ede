"""The IPluginV3 glue compiles against the public TensorRT headers of 10.3 (JetPack 6) and 11.1, with the CUDA
headers of the local toolkit; the library it builds exports exactly the entry points TensorRT looks up; and,
loaded the way TensorRT's loader does, its build-time interface behaves (plugin_glue_check.cpp, no GPU).

The headers come from `shared/third_party/tensorrt/<version>/include` in the nearest folder above the repository
that has one (CI clones the repository beside `shared/`; see shared/third_party/README.md), and additionally from
$TENSORRT_ROOT or a system TensorRT install when there is one.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.trt.conftest import PLUGIN_DIR, REPO

HEADER_VERSIONS = ("10.3", "11.1")
ENTRY_POINTS = {"getCreators", "setLoggerFinder"}  # what IPluginRegistry::loadLibrary / --dynamicPlugins call


def third_party_tensorrt() -> Path | None:
    """shared/third_party/tensorrt in the nearest ancestor of the repository (../shared in CI)."""
    for parent in REPO.parents:
        candidate = parent / "shared" / "third_party" / "tensorrt"
        if candidate.is_dir():
            return candidate
    return None


def installed_tensorrt_include() -> Path | None:
    roots = [Path(os.environ["TENSORRT_ROOT"]) / "include"] if os.environ.get("TENSORRT_ROOT") else []
    roots += [Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include/aarch64-linux-gnu"), Path("/usr/include")]
    return next((r for r in roots if (r / "NvInfer.h").is_file()), None)


def header_version(include: Path) -> str:
    """'10.3' from NvInferVersion.h (10.x: NV_TENSORRT_MAJOR/MINOR; 11.x: TRT_MAJOR/MINOR_ENTERPRISE)."""
    text = (include / "NvInferVersion.h").read_text()
    parts = []
    for field in ("MAJOR", "MINOR"):
        m = re.search(rf"#define (?:NV_TENSORRT_{field}|TRT_{field}_ENTERPRISE) (\d+)", text)
        parts.append(m.group(1) if m else "?")
    return ".".join(parts)


def cuda_include(nvcc: str) -> Path:
    """The toolkit's include folder, as nvcc itself reports it (nvcc may be a wrapper script on PATH)."""
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
        return Path(home) / "include"
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                         text=True, timeout=60)
    for flag in re.findall(r'-I"?([^"\s]+)', out.stdout + out.stderr):
        if (Path(flag) / "cuda_runtime_api.h").is_file():
            return Path(flag).resolve()
    pytest.fail(f"nvcc ({nvcc}) names no include folder with cuda_runtime_api.h; set CUDA_HOME")


@pytest.fixture(scope="module")
def cxx() -> str:
    path = shutil.which("g++") or shutil.which("c++")
    if path is None:
        pytest.skip("no C++ compiler (g++) on this machine")
    return path


def header_sets() -> list:
    root = third_party_tensorrt()
    params = [pytest.param(root / v / "include" if root else None, v, id=f"tensorrt-{v}") for v in HEADER_VERSIONS]
    installed = installed_tensorrt_include()
    params.append(pytest.param(installed, None, id="installed-tensorrt"))
    return params


def _include_or_skip(include: Path | None, version: str | None) -> Path:
    if include is None and version is None:
        pytest.skip("no installed TensorRT headers (set TENSORRT_ROOT); the third-party header sets still run")
    if include is None:
        pytest.skip("shared/third_party/tensorrt not found above the repository (CI clones it beside ../shared)")
    assert (include / "NvInfer.h").is_file(), f"{include} has no NvInfer.h: the third-party header set is incomplete"
    if version is not None:
        assert header_version(include) == version
    return include


def _compile(cxx, include, cuda, registration, *extra):
    return subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations",
                           f"-DLOWRANK_ADD_STATIC_REGISTRATION={registration}", "-isystem", str(include),
                           "-isystem", str(cuda), "-I", str(PLUGIN_DIR), str(PLUGIN_DIR / "lowrank_add_plugin.cpp"),
                           *extra], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("include,version", header_sets())
@pytest.mark.parametrize("registration", [1, 0], ids=["static", "dynamic"])
def test_glue_compiles_against_tensorrt_headers(nvcc, cxx, include, version, registration):
    include = _include_or_skip(include, version)
    proc = _compile(cxx, include, cuda_include(nvcc), registration, "-fsyntax-only")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("include,version", header_sets())
def test_dynamic_library_exports_the_loader_entry_points(nvcc, cxx, include, version, tmp_path):
    """Built as CMakeLists.txt builds it (hidden visibility): the dynamic variant must export getCreators and
    setLoggerFinder, or trtexec --dynamicPlugins cannot load it; the static variant exports neither."""
    include = _include_or_skip(include, version)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not found")
    exported = {}
    for registration in (0, 1):
        obj, lib = tmp_path / f"glue{registration}.o", tmp_path / f"libglue{registration}.so"
        proc = _compile(cxx, include, cuda_include(nvcc), registration, "-fPIC", "-fvisibility=hidden",
                        "-fvisibility-inlines-hidden", "-c", "-o", str(obj))
        assert proc.returncode == 0, proc.stderr
        # The kernel and libnvinfer symbols stay undefined: a shared library may leave them to the loader.
        subprocess.run([cxx, "-shared", "-o", str(lib), str(obj)], check=True, capture_output=True, timeout=120)
        out = subprocess.run([nm, "-D", "--defined-only", str(lib)], check=True, capture_output=True, text=True)
        exported[registration] = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert ENTRY_POINTS <= exported[0], sorted(exported[0])
    assert not ENTRY_POINTS & exported[1]


@pytest.fixture(scope="module")
def kernel_object(nvcc, tmp_path_factory) -> Path:
    obj = tmp_path_factory.mktemp("glue_kernel") / "lowrank_add_kernel.o"
    subprocess.run([nvcc, "-std=c++17", "-O2", "-arch=sm_87", "-Xcompiler", "-fPIC", "-c",
                    str(PLUGIN_DIR / "lowrank_add_kernel.cu"), "-o", str(obj)], check=True, capture_output=True,
                   timeout=600)
    return obj


# What plugin_glue_check.cpp must print: the plugin's build-time behaviour, as TensorRT would call it.
EXPECTED_GLUE = {
    "has_getCreators": "1", "has_setLoggerFinder": "1", "creators": "1", "creator_kind": "PLUGIN CREATOR_V3ONE",
    "identity": "LowRankAdd/1/slim_trt", "field_names": "1 group_size", "create_group0_null": "1",
    "core_identity": "LowRankAdd/1/slim_trt", "outputs": "1", "output_type_status": "0", "output_type_half": "1",
    "output_type_3_inputs": "-1", "dense_formats_ok": "5", "dense_mixed_type": "0", "dense_non_linear": "0",
    "configure_dense": "0", "configure_wrong_k": "-1",
    "workspace_dense": str(256 * 8 * 4),  # fp32 X R^T for 256 tokens at rank 8, already 256-byte aligned
    "int4_formats_ok": "7", "configure_int4": "0", "configure_int4_short_bytes": "-1",
    "serialized_group_size": "64", "clone_group_size": "64",
}


@pytest.mark.parametrize("include,version", header_sets())
def test_glue_runs_its_build_time_interface_on_the_cpu(nvcc, cxx, kernel_object, include, version, tmp_path):
    """The dynamic library, loaded by dlopen + getCreators as TensorRT's loader does, creates a plugin whose
    types, formats, shape checks, workspace and serialized fields are right (no TensorRT library, no GPU)."""
    include = _include_or_skip(include, version)
    cuda = cuda_include(nvcc)
    glue, lib, driver = tmp_path / "glue.o", tmp_path / "liblowrank_add_plugin_dynamic.so", tmp_path / "check"
    proc = _compile(cxx, include, cuda, 0, "-fPIC", "-fvisibility=hidden", "-c", "-o", str(glue))
    assert proc.returncode == 0, proc.stderr
    # nvcc links the CUDA runtime statically; nothing here calls into CUDA, so no GPU is needed.
    subprocess.run([nvcc, "-shared", str(glue), str(kernel_object), "-o", str(lib)], check=True, capture_output=True,
                   timeout=300)
    proc = subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-isystem", str(include), "-isystem",
                           str(cuda), str(Path(__file__).with_name("plugin_glue_check.cpp")), "-ldl", "-o",
                           str(driver)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(driver), str(lib)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    printed = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert printed == EXPECTED_GLUE
    assert "group_size must be positive" in run.stderr  # errors reach the log (stderr without a logger finder)
