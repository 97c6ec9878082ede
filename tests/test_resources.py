import os

import pytest
import torch

from slim_trt.errors import SlimError
from slim_trt.resources import all_cores, available_cores, resolve_device


def test_device_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "tpu", "cuda:-1", ""])
def test_an_unknown_device_names_the_choices(text):
    with pytest.raises(SlimError, match="bad --device .*auto, cpu, cuda or cuda:N"):
        resolve_device(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("text", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_says_so_and_suggests_cpu(text):
    with pytest.raises(SlimError, match=r"no usable CUDA GPU here .*use --device cpu"):
        resolve_device(text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_a_gpu_index_past_the_last_gpu_is_refused():
    with pytest.raises(SlimError, match="CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_all_cores_raises_torch_threads_to_the_affinity_and_restores_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with all_cores() as n:
            assert n == torch.get_num_threads() == max(1, available_cores())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert available_cores() == len(os.sched_getaffinity(0))


def test_an_explicit_omp_num_threads_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with all_cores() as n:
            assert n == 1
    finally:
        torch.set_num_threads(before)


def test_block_bytes_counts_weights_activations_and_one_hessian_per_input_size():
    from slim_trt.resources import block_bytes, check_fits

    block = torch.nn.Linear(8, 4)
    need = block_bytes(block, [torch.zeros(2, 3, 8), torch.zeros(1, 3, 8)], [8, 8, 16])
    assert need == {"weights": (32 + 4) * 4, "activations": 3 * 72 * 4, "hessians": 16 * (8 * 8 + 16 * 16)}
    # a W8A8 block keeps every layer's input over the 9 tokens (runner.KeptInputs), counted per layer
    kept = block_bytes(block, [torch.zeros(2, 3, 8), torch.zeros(1, 3, 8)], [8, 8, 16], kept_inputs=True)
    assert kept == {**need, "inputs": 4 * 9 * (8 + 8 + 16)}
    check_fits({"weights": 2**60}, torch.device("cpu"), "a block")  # host memory is not checked here


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_a_block_larger_than_the_free_gpu_memory_is_refused_with_the_bytes():
    from slim_trt.resources import check_fits

    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(SlimError, match=r"needs about .* GB on cuda.* GB are free: .*--device cpu"):
        check_fits({"weights": 2 * free}, torch.device("cuda"), "compressing block 0")


def test_a_block_that_does_not_fit_is_refused_with_the_bytes_needed_and_free():
    """The device check as a pure function of the byte counts (the CUDA path itself cannot run here)."""
    from slim_trt.resources import refuse_unfit

    need = {"weights": 3 << 30, "activations": 24 << 30, "hessians": 13 << 30}
    refuse_unfit(need, 40 << 30, "cuda:0", "compressing block model.layers.0")  # exactly fits: no error
    with pytest.raises(SlimError) as e:
        refuse_unfit(need, (40 << 30) - 1, "cuda:1", "compressing block model.layers.3")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("compressing block model.layers.3 needs about 40.00 GB on cuda:1 (weights 3.00, "
                          "activations 24.00, hessians 13.00 GB) but 40.00 GB are free")
    assert "--nsamples" in msg and "--device cpu" in msg and "does not split blocks" in msg


@pytest.mark.parametrize("text", ["cuda:0,1", "cuda:0,cuda:1", "cuda,cuda"])
def test_several_gpus_are_refused_with_the_reason(text):
    with pytest.raises(SlimError, match=r"compresses on one device, one decoder block at a time.*does not split "
                                        r"blocks or spread them across GPUs: choose one of them, e\.g\. --device cuda:0"):
        resolve_device(text)
