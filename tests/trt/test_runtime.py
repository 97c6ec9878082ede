"""The GPU-free parts of bench and verify: shapes from an engine profile, statistics, checks, the table."""
from __future__ import annotations

import pytest

from slim_trt.errors import SlimError
from slim_trt.trt.runtime import bench_shapes, format_bench, latency_stats
from slim_trt.verification.engine import engine_checks
from slim_trt.verification.compare import Thresholds

IO = {  # {input: (min, opt, max)} as an engine built with --batch 1,1,4 --seq 1,128,512 --past 0,256,1024 has
    "input_ids": ((1, 1), (1, 128), (4, 512)),
    "attention_mask": ((1, 1), (1, 384), (4, 1536)),
    "position_ids": ((1, 1), (1, 128), (4, 512)),
    "past_key_values.0.key": ((1, 2, 0, 16), (1, 2, 256, 16), (4, 2, 1024, 16)),
}


def test_bench_shapes_default_to_the_opt_profile():
    shapes = bench_shapes(IO, None, None, None)
    pre, dec = shapes["prefill"], shapes["decode"]
    assert (pre["batch"], pre["tokens"], pre["past"]) == (1, 128, 0)
    assert pre["feed"] == {"input_ids": (1, 128), "attention_mask": (1, 128), "position_ids": (1, 128),
                           "past_key_values.0.key": (1, 2, 0, 16)}
    assert (dec["tokens"], dec["past"]) == (1, 256)
    assert dec["feed"]["attention_mask"] == (1, 257) and dec["feed"]["past_key_values.0.key"] == (1, 2, 256, 16)
    custom = bench_shapes(IO, 4, 512, 1024)
    assert custom["decode"]["feed"]["attention_mask"] == (4, 1025)


def test_bench_shapes_outside_the_profile():
    with pytest.raises(SlimError, match=r"prompt length 1024 is outside the engine's range 1..512: pick --prompt-len"):
        bench_shapes(IO, None, 1024, None)
    with pytest.raises(SlimError, match=r"context length 2048 is outside the engine's range 0..1024"):
        bench_shapes(IO, None, None, 2048)
    no_cache = {k: v for k, v in IO.items() if not k.startswith("past")}
    assert set(bench_shapes(no_cache, None, None, None)) == {"prefill"}
    with pytest.raises(SlimError, match="--context-len needs an engine with a KV cache"):
        bench_shapes(no_cache, None, None, 8)


def test_latency_stats_and_table():
    stats = latency_stats([0.004, 0.002, 0.003, 0.010, 0.001])
    assert stats["p50_ms"] == pytest.approx(3.0) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["p90_ms"] == pytest.approx(10.0) and stats["mean_ms"] == pytest.approx(4.0) and stats["runs"] == 5
    shapes = {"prefill": {"batch": 1, "tokens": 128, "past": 0}, "decode": {"batch": 1, "tokens": 1, "past": 256}}
    result = {"tensorrt_version": "10.13.3", "gpu": {"name": "NVIDIA H100"}, "speedup": {"prefill": 1.25},
              "engines": [{"engine": "engines/sparse.plan", "shapes": shapes,
                           "prefill": {"p50_ms": 8.0, "tokens_per_s": 16000.0},
                           "decode": {"p50_ms": 2.0, "tokens_per_s": 500.0}},
                          {"engine": "engines/dense.plan", "shapes": shapes,
                           "prefill": {"p50_ms": 10.0, "tokens_per_s": 12800.0},
                           "decode": {"p50_ms": 2.0, "tokens_per_s": 500.0}}]}
    table = format_bench(result)
    assert "prefill (batch 1, 128 tok, past 0)" in table and "16000.0" in table and "12800.0" in table
    assert "prefill: sparse.plan is 1.25x the speed of dense.plan (p50)" in table


def test_engine_checks_use_the_onnxruntime_thresholds():
    th = Thresholds.for_dtype("fp16")
    good = {"max_abs": th.max_abs / 2, "mean_abs": th.mean_abs / 2, "cosine_min": 1.0, "top1": 1.0, "ppl_rel": 0.0}
    assert all(engine_checks(good, th).values())
    bad = good | {"top1": th.top1_min - 0.01}
    assert engine_checks(bad, th) == {"max_abs": True, "mean_abs": True, "cosine_min": True, "top1": False,
                                      "ppl_rel": True}
