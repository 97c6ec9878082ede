"""TensorRT version policy and the GPU query's failure path."""
from __future__ import annotations

import ctypes.util

import pytest

from slim_trt.errors import MissingDependencyError, SlimError
from slim_trt.trt.backend import check_tensorrt_version, parse_version, query_gpus


def test_supported_tensorrt_versions():
    assert check_tensorrt_version("10.3.0.30") == (10, 3, 0, 30)
    assert check_tensorrt_version("11.1.0") == (11, 1, 0)
    with pytest.raises(MissingDependencyError, match="TensorRT 8.6.1 is too old: slim-trt needs TensorRT 10.x or 11.x"):
        check_tensorrt_version("8.6.1")
    with pytest.raises(MissingDependencyError, match="TensorRT 12.0.0 is newer than slim-trt supports"):
        check_tensorrt_version("12.0.0")
    assert issubclass(MissingDependencyError, SlimError)  # exit code 2 in the CLI
    assert parse_version("TensorRT 10.13") == (10, 13)


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="an NVIDIA driver is installed")
def test_no_driver_is_a_clear_error():
    with pytest.raises(MissingDependencyError, match=r"no NVIDIA GPU driver found \(libcuda could not be loaded\)"):
        query_gpus()
