import time

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
