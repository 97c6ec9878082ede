import threading

import pytest
import torch

from slim_trt.compression import compressor
from slim_trt.compression.compressor import compress
from slim_trt.compression.layer_pool import layer_workers, map_layers
from slim_trt.config import CompressConfig
from slim_trt.timing import PhaseTimer
from tests.conftest import calib_windows, tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layers_side_by_side_give_the_same_bits_as_one_after_another(family, monkeypatch):
    """Each layer is compressed single-threaded either way, so two workers change nothing but the time."""
    states, reports = [], []
    for workers in (1, 2):
        monkeypatch.setattr(compressor, "layer_workers", lambda device, layers, w=workers: min(w, layers))
        model = tiny_model(family)
        reports.append(compress(model, CompressConfig(refit_rounds=1), calib_windows(n=4, seqlen=16),
                                progress=False, device="cpu"))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert reports[0].layers == reports[1].layers
    assert list(reports[0].layers) == list(reports[1].layers)  # the report keeps the block's layer order
    # the phases still add up to the elapsed time, the layers' work charged where a sequential run charges it
    for rep in reports:
        assert abs(sum(rep.phases.values()) - rep.seconds) < 0.05 * rep.seconds + 0.05
        assert rep.phases["lrc_fit"] > 0 and rep.phases["sweep"] > 0


def test_map_layers_runs_jobs_on_threads_in_order_and_restores_the_thread_count():
    before = torch.get_num_threads()
    seen = {}

    def job(name):
        def run(t):
            seen[name] = (threading.current_thread().name, torch.get_num_threads())
            with t.phase("sweep"):
                return name.upper()
        return run

    timer = PhaseTimer()
    with timer.phase("compress"):
        out = map_layers({n: job(n) for n in "abc"}, 2, timer)
    assert list(out.items()) == [("a", "A"), ("b", "B"), ("c", "C")]
    assert all(name.startswith("slim-layer") and threads == 1 for name, threads in seen.values())
    assert torch.get_num_threads() == before
    assert set(timer.seconds) == {"compress", "compress/sweep"}


def test_a_failing_layer_fails_the_block_and_restores_the_thread_count():
    before = torch.get_num_threads()

    def boom(t):
        raise ValueError("H is not positive semi-definite even after damping")

    with pytest.raises(ValueError, match="semi-definite"):
        map_layers({"a": lambda t: 1, "b": boom}, 2, None)
    assert torch.get_num_threads() == before


def test_one_worker_on_a_gpu_or_a_single_core():
    assert layer_workers(torch.device("cuda"), 7) == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert layer_workers(torch.device("cpu"), 7) == 1
        torch.set_num_threads(2)
        assert layer_workers(torch.device("cpu"), 7) == 2 and layer_workers(torch.device("cpu"), 1) == 1
        torch.set_num_threads(8)  # two at a time at most: the memory bound was checked with two
        assert layer_workers(torch.device("cpu"), 7) == 2
    finally:
        torch.set_num_threads(before)
