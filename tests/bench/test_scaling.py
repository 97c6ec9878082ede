"""The pure parts of bench/scaling.py: the MLP widths, the power-law fit, the projection arithmetic, the derived
fields and row selection. Nothing here is timed and no block is compressed."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from slim_trt.errors import SlimError

REPO = Path(__file__).resolve().parents[2]


def _load_bench():
    sys.path.insert(0, str(REPO / "bench"))  # the script imports its sibling harness
    spec = importlib.util.spec_from_file_location("bench_scaling", REPO / "bench" / "scaling.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


def test_intermediate_sizes_follow_llama():
    assert [bench.intermediate_size(h) for h in (512, 1024, 2048, 4096)] == [1408, 2816, 5504, 11008]


def test_fit_recovers_an_exact_power_law():
    xs = [512, 1024, 2048]
    fit = bench.fit_power_law(xs, [3e-6 * x ** 2.5 for x in xs])
    assert fit["exponent"] == pytest.approx(2.5, abs=1e-9)
    assert fit["coefficient"] == pytest.approx(3e-6, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert bench.power_law(fit, 4096) == pytest.approx(3e-6 * 4096 ** 2.5, rel=1e-9)


def test_fit_is_least_squares_in_log_log():
    # log2 points (0, 0), (1, 2), (2, 3): slope 1.5, intercept 1/6, residuals -1/6, 1/3, -1/6
    fit = bench.fit_power_law([1, 2, 4], [1, 4, 8])
    assert fit["exponent"] == pytest.approx(1.5)
    assert fit["coefficient"] == pytest.approx(2 ** (1 / 6))
    assert fit["r2"] == pytest.approx(1 - (1 / 36 + 1 / 9 + 1 / 36) / (25 / 9 + 1 / 9 + 16 / 9))


def test_fit_needs_two_sizes():
    with pytest.raises(SlimError, match="two or more"):
        bench.fit_power_law([512, 512], [1.0, 2.0])


def test_projection_arithmetic():
    p = bench.project(100.0, 32, cpu_gflops=100.0, gpu_tflops={"fp32": 67.0, "tf32_tensor": 495.0})
    assert p["cpu_seconds"] == 3200.0
    assert p["gpu_seconds"]["fp32"] == pytest.approx(3200 * 100 / 67000)
    assert p["gpu_seconds"]["tf32_tensor"] == pytest.approx(3200 * 100 / 495000)


def test_block_gemm_flops_of_llama2_7b():
    shapes = bench.block_gemms(4096, 11008, 1)
    assert len(shapes) == 7
    assert sum(2 * m * k * n for m, k, n in shapes) == 2 * (4 * 4096 ** 2 + 3 * 4096 * 11008)


def _row(hidden, recipe, seconds):
    return {"hidden": hidden, "recipe": recipe, "seconds": seconds}


def test_derive_ratios_fit_and_projection_from_the_fit():
    rows = {}
    for h in (512, 1024):
        rows[f"{h}-sparsegpt-gptq"] = _row(h, "sparsegpt-gptq", 3e-7 * h ** 2)
        rows[f"{h}-slim-2to4"] = _row(h, "slim-2to4", 6e-7 * h ** 2)
    data = {"rows": rows, "gemm": {"gflops": 67.0}}
    bench.derive(data)
    assert rows["1024-slim-2to4"]["ratio_to_sparsegpt_gptq"] == 2.0
    assert data["fit"]["slim-2to4"]["exponent"] == pytest.approx(2.0)
    assert data["fit"]["slim-2to4"]["coefficient"] == pytest.approx(6e-7)  # stored with its significant digits
    p = data["projection_llama2_7b"]["slim-2to4"]
    block = 6e-7 * 4096 ** 2  # 10.07 s
    assert p["block_seconds"] == pytest.approx(block, abs=0.01)
    assert p["block_seconds_from"] == "fit over hidden [512, 1024]"
    assert p["cpu_hours"] == pytest.approx(block * 32 / 3600, abs=0.01)
    # this CPU at 67 GFLOP/s vs the H100's 67 TFLOPS FP32: 1000x faster
    assert p["h100_minutes"]["fp32"] == pytest.approx(block * 32 / 1000 / 60, abs=0.01)


def test_derive_uses_the_measured_4096_block_and_no_ratio_without_its_baseline():
    rows = {"512-slim-2to4": _row(512, "slim-2to4", 10.0), "4096-slim-2to4": _row(4096, "slim-2to4", 900.0)}
    data = {"rows": rows, "gemm": {"gflops": 100.0}}
    bench.derive(data)
    assert rows["512-slim-2to4"]["ratio_to_sparsegpt_gptq"] is None
    assert data["fit"]["slim-2to4"]["exponent"] == pytest.approx(math.log(90) / math.log(8))
    p = data["projection_llama2_7b"]["slim-2to4"]
    assert (p["block_seconds"], p["block_seconds_from"], p["cpu_hours"]) == (900.0, "measured", 8.0)
    assert "sparsegpt-gptq" not in data["fit"]


def test_row_selection():
    assert [r.key for r in bench.select_rows("2,512-sparsegpt-gptq")] == ["512-slim-2to4", "512-sparsegpt-gptq"]
    assert [r.key for r in bench.select_rows("11,3")] == ["4096-slim-2to4", "512-int4-dense"]
    assert len(bench.select_rows("all")) == 12
    with pytest.raises(SlimError, match="unknown row"):
        bench.select_rows("13")


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert bench.main(["--nsamples", "0", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: bad --nsamples 0: it must be >= 1"
