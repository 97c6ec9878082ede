"""Where a compression's time goes: a phase timer kept outside the algorithms.

The compressor and the runner open phases around the pure functions they call (`with timer.phase("sweep"):`);
the algorithms themselves never see a clock. A phase opened inside another is charged to its own path
("refit_round_1/sweep") and paused time is not charged twice, so the phases add up to the measured time.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext


class PhaseTimer:
    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        # sync: waits for queued device work (torch.cuda.synchronize) so a phase is charged its own kernels.
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)  # exclusive seconds per phase path
        self._stack: list[list] = []  # [path, start of the running slice]

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = self._now()
        if self._stack:
            parent = self._stack[-1]
            self.seconds[parent[0]] += now - parent[1]
            path = f"{parent[0]}/{name}"
        else:
            path = name
        self._stack.append([path, now])
        try:
            yield
        finally:
            now = self._now()
            self.seconds[path] += now - self._stack.pop()[1]
            if self._stack:
                self._stack[-1][1] = now


    def absorb(self, timers: list["PhaseTimer"], wall: float) -> None:
        """Charge `wall` seconds, just spent by `timers` working side by side in other threads, to their phases
        (their paths as they are), each in proportion to its share of the workers' summed time; the running phase
        of this thread is not charged for them. So the phases still add up to the elapsed time."""
        total = sum(sum(t.seconds.values()) for t in timers)
        for t in timers:
            for path, sec in t.seconds.items():
                self.seconds[path] += wall * sec / total if total > 0 else 0.0
        if self._stack:
            self._stack[-1][1] += wall


def phase(timer: PhaseTimer | None, name: str):
    """timer.phase(name), or a no-op without a timer (what the pure functions' callers pass by default)."""
    return nullcontext() if timer is None else timer.phase(name)
