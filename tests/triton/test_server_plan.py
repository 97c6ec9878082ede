"""What `serve` decides before starting anything: which models load, and where tritonserver comes from."""
from __future__ import annotations

import os

import pytest

from slim_trt.triton import server as srv
from slim_trt.errors import MissingDependencyError, SlimError

REPO = {"models": {
    "slim_onnx": {"backend": "python", "device": "cpu", "depends_on": []},
    "slim_generate": {"backend": "python", "device": "cpu", "depends_on": ["slim_trt"]},
    "slim_ort": {"backend": "onnxruntime", "device": "gpu", "depends_on": []},
    "slim_trt": {"backend": "tensorrt", "device": "gpu", "depends_on": []},
}}


def test_python_only_build_on_a_cpu_host():
    load, skipped = srv.plan_models(REPO, ("python",), gpu=False)
    assert load == ["slim_onnx"]
    assert skipped == {"slim_ort": "this tritonserver has no onnxruntime backend",
                       "slim_trt": "this tritonserver has no tensorrt backend",
                       "slim_generate": "calls slim_trt, which is not loaded"}


def test_full_build_needs_a_gpu_for_gpu_models():
    all_backends = ("onnxruntime", "python", "tensorrt")
    assert srv.plan_models(REPO, all_backends, gpu=True) == (list(REPO["models"]), {})
    load, skipped = srv.plan_models(REPO, all_backends, gpu=False)
    assert load == ["slim_onnx"] and skipped["slim_trt"] == "needs a GPU"


def test_asked_for_models():
    load, skipped = srv.plan_models(REPO, ("python",), gpu=False, wanted=["slim_onnx"])
    assert load == ["slim_onnx"] and skipped["slim_ort"] == "not asked for (--models)"
    with pytest.raises(SlimError, match="no model nope in the repository"):
        srv.plan_models(REPO, ("python",), gpu=False, wanted=["nope"])
    with pytest.raises(SlimError, match="cannot load slim_generate here: calls slim_trt, which is not loaded"):
        srv.plan_models(REPO, ("python",), gpu=False, wanted=["slim_generate"])


def test_processes_in_group_sees_this_process():
    assert os.getpid() in srv.processes_in_group(os.getpgid(0))


def test_free_port_is_a_loopback_port():
    port = srv.free_port()
    assert 1024 <= port < 65536


def test_explicit_binary_that_does_not_exist():
    with pytest.raises(MissingDependencyError, match="tritonserver /no/such/tritonserver does not exist"):
        srv.find_tritonserver("/no/such/tritonserver")


def test_server_refuses_a_missing_repository(tmp_path):
    with pytest.raises(SlimError, match="does not exist: create it with `slim-trt deploy triton`"):
        srv.TritonServer(tmp_path / "nowhere")
