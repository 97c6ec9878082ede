import time

import pytest

from slim_trt.timing import PhaseTimer, phase


def test_nested_phases_are_charged_once_and_add_up():
    t = PhaseTimer()
    t0 = time.perf_counter()
    with t.phase("compress"):
        time.sleep(0.02)
        with t.phase("sweep"):
            time.sleep(0.05)
        with t.phase("refit_round_1"):
            with t.phase("sweep"):
                time.sleep(0.03)
    wall = time.perf_counter() - t0
    s = t.seconds
    assert set(s) == {"compress", "compress/sweep", "compress/refit_round_1", "compress/refit_round_1/sweep"}
    # sleep() may overshoot on a busy machine, never undershoot
    assert 0.05 <= s["compress/sweep"] < 0.5 and 0.03 <= s["compress/refit_round_1/sweep"] < 0.5
    assert 0.02 <= s["compress"] < 0.5 and s["compress/refit_round_1"] < 0.2
    assert abs(sum(s.values()) - wall) < 0.01


def test_no_timer_is_a_no_op():
    with phase(None, "sweep"):
        pass


def test_absorb_splits_a_parallel_stretch_by_the_workers_phases():
    """Two workers spent 3 s and 1 s in their phases during 2 s of wall time: the 2 s are split 3:1, and the phase
    running in this thread is not charged for them."""
    import time as _time

    main = PhaseTimer()
    a, b = PhaseTimer(), PhaseTimer()
    a.seconds.update({"compress": 1.0, "compress/sweep": 2.0})
    b.seconds.update({"compress/sweep": 1.0})
    with main.phase("compress"):
        _time.sleep(0.01)
        main._stack[-1][1] -= 2.0  # as if 2 s of wall time had passed in the stretch
        main.absorb([a, b], 2.0)
    assert main.seconds["compress/sweep"] == pytest.approx(1.5)
    assert main.seconds["compress"] == pytest.approx(0.5 + 0.01, abs=0.01)
