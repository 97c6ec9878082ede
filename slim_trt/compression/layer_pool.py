"""Compress a block's layers side by side, one core each.

Every layer of a block is compressed from its own statistics, independently of the others, and each on one thread
(algorithms/obs.one_thread: its sweeps are thousands of small ops that a second thread only slows down). So on a
CPU with two or more cores the layers themselves are spread over the cores: each worker runs one layer at a time
single-threaded, exactly the operations a sequential run does, so the results are the same bits. Largest layer
first, so the last one to finish is a small one. Measured on Gemma 3 270M's first 3 blocks with the W8A8 defaults
(2 cores, idle): 54.7 s -> 41.8 s for the whole compression, the layers' part 1.6x faster.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..timing import PhaseTimer


# Each layer at work holds its factorisations and sweep copies (K x K float64, N x K float32): two at once is
# what the streaming memory bound was checked with (tests/compression/test_streaming.py, slow); more cores would
# multiply that on a large model's MLP layers for little gain (a block has 7 layers, the largest sets the pace).
MAX_WORKERS = 2


def layer_workers(device: torch.device, layers: int) -> int:
    """How many layers to compress at once: one per CPU thread torch was given (all_cores), at most MAX_WORKERS;
    one on a GPU (whose kernels are queued asynchronously anyway)."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), layers, MAX_WORKERS))


def map_layers(jobs: dict[str, Callable[[PhaseTimer | None], Any]], workers: int,
               timer: PhaseTimer | None) -> dict[str, Any]:
    """{name: job(timer)} for every job, in the order given; with workers > 1, `workers` jobs at a time on threads,
    torch single-threaded meanwhile. Each job gets a timer of its own with its work under "compress" (as a
    sequential run has it), and `timer` absorbs them: the stretch's wall time split by their phases."""
    if workers <= 1:
        return {name: job(timer) for name, job in jobs.items()}
    before = torch.get_num_threads()
    timers: list[PhaseTimer] = []

    def run(job):
        t = PhaseTimer(sync=timer.sync) if timer is not None else None
        if t is None:
            return job(None)
        timers.append(t)
        with t.phase("compress"):
            return job(t)

    start = time.perf_counter()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="slim-layer") as pool:
            futures = {name: pool.submit(run, job) for name, job in jobs.items()}
            results = {name: f.result() for name, f in futures.items()}
    finally:
        torch.set_num_threads(before)
    if timer is not None:
        timer.absorb(timers, time.perf_counter() - start)
    return results
