"""Access to TensorRT and the GPU: the one place `import tensorrt` happens, and the checks around it.

Everything that needs TensorRT calls `import_tensorrt()`; everything that needs a GPU calls `require_gpu()`.
Both raise MissingDependencyError (exit code 2 in the CLI) with one line saying what is missing and how to
get it, so a CPU-only machine gets a clear answer instead of a traceback.

The GPU is queried through the CUDA driver API (libcuda, shipped with every NVIDIA driver, JetPack included)
with ctypes: no extra Python package, and no CUDA context is kept.
"""
from __future__ import annotations

import ctypes
import sys

from ..errors import MissingDependencyError
from ..targets.profile import GpuInfo, parse_version  # noqa: F401 - slim_trt.trt.GpuInfo

SUPPORTED_MAJORS = (10, 11)
INSTALL_HINT = ("install it with `pip install slim-trt[trt]` on a machine with an NVIDIA GPU "
                "(on Jetson, TensorRT comes with JetPack)")


def check_tensorrt_version(version: str) -> tuple[int, ...]:
    """Refuse TensorRT versions slim-trt was not written for (it needs INT4 blocked Q/DQ, strongly typed
    networks and IPluginV3, all TensorRT 10+; 11.x made strong typing mandatory, which we already use)."""
    v = parse_version(version)
    if v[0] < SUPPORTED_MAJORS[0]:
        raise MissingDependencyError(
            f"TensorRT {version} is too old: slim-trt needs TensorRT 10.x or 11.x (INT4 weights, strongly typed "
            f"networks, IPluginV3); upgrade with `pip install -U 'tensorrt>=10'` or a newer JetPack")
    if v[0] > SUPPORTED_MAJORS[-1]:
        raise MissingDependencyError(
            f"TensorRT {version} is newer than slim-trt supports (10.x and 11.x): install a supported one with "
            f"`pip install 'tensorrt>=10,<12'`")
    return v


class TensorRTNotInstalled(MissingDependencyError):
    """`import tensorrt` failed (as opposed to an unsupported version)."""


def import_tensorrt():
    """The `tensorrt` module, or MissingDependencyError naming what is missing."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazily, so only the TensorRT subcommands need it
    except ImportError as e:  # also raised when libnvinfer cannot be loaded
        raise TensorRTNotInstalled(f"TensorRT is not installed (import tensorrt failed): {INSTALL_HINT}") from e
    check_tensorrt_version(trt.__version__)
    return trt


_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


def _load_driver():
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise MissingDependencyError(
        "no NVIDIA GPU driver found (libcuda could not be loaded): TensorRT engines are built and run on an NVIDIA "
        "GPU; run this on the GPU machine or the Jetson (export and lint work here)")


def query_gpus() -> list[GpuInfo]:
    """The GPUs the NVIDIA driver exposes (respects CUDA_VISIBLE_DEVICES)."""
    cuda = _load_driver()
    rc = cuda.cuInit(0)
    if rc != 0:
        raise MissingDependencyError(
            f"the NVIDIA driver is installed but found no usable GPU (cuInit returned error {rc}): check "
            f"`nvidia-smi` and CUDA_VISIBLE_DEVICES")
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        raise MissingDependencyError("the NVIDIA driver reports no GPU: check `nvidia-smi` and CUDA_VISIBLE_DEVICES")
    gpus = []
    for i in range(count.value):
        dev = ctypes.c_int(0)
        cuda.cuDeviceGet(ctypes.byref(dev), i)
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(name, 256, dev)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
        mem = ctypes.c_size_t(0)
        total = getattr(cuda, "cuDeviceTotalMem_v2", None) or cuda.cuDeviceTotalMem
        total(ctypes.byref(mem), dev)
        gpus.append(GpuInfo(i, name.value.decode(errors="replace"), (major.value, minor.value), mem.value))
    return gpus


def require_gpu(index: int = 0) -> GpuInfo:
    gpus = query_gpus()
    if index >= len(gpus):
        raise MissingDependencyError(f"GPU {index} does not exist: the driver reports {len(gpus)} GPU(s)")
    return gpus[index]


def require_tensorrt_and_gpu():
    """(tensorrt module, GpuInfo of device 0): TensorRT is checked first, as it is the usual missing piece."""
    trt = import_tensorrt()
    return trt, require_gpu()
