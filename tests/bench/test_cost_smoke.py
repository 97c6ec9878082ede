"""Smoke test of bench/cost.py on a tiny random Gemma 3 (never the real model): both rows run for real as
subprocesses (the demo and the reference compression), and the goals are derived from what they measured. No
timed assertion."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import save_tiny_model

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


cost = _load("bench_cost", REPO / "bench" / "cost.py")


def test_cost_rows_measure_the_demo_and_the_reference(tmp_path):
    model = save_tiny_model(tmp_path / "tiny-gemma", "gemma3")
    argv = ["--model", str(model), "--nsamples", "4", "--seqlen", "32", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "results")]
    assert cost.main(argv + ["--repeats", "0"]) == 2
    assert cost.main(argv) == 0
    data = json.loads((tmp_path / "results" / "cost_tiny-gemma.json").read_text())
    demo, ref = data["rows"]["1-demo"], data["rows"]["2-sparsegpt-gptq"]
    assert demo["status"] == "ok" and ref["status"] == "ok", (demo.get("log_tail"), ref.get("log_tail"))
    assert demo["command"].startswith("slim-trt demo --model") and "WORK/demo" in demo["command"]
    assert "--lowrank none" in ref["command"] and "--act-bits none" in ref["command"]
    (d,), (r,) = demo["runs"], ref["runs"]
    assert d["checks_ok"] == {"verify": True, "lint": True, "sparse": True}  # the main job's own checks passed
    assert 0 < d["compress_s"] < d["demo_s"] <= d["wall_s"] and 0 < r["compress_s"] <= r["wall_s"]
    assert set(d["phases"]) >= {"calibration_forward", "block_output"} and set(r["phases"]) >= {"sweep"}
    # the defaults fit each layer toward the dense model's output; the reference is plain sequential SparseGPT + GPTQ
    assert "asymmetric_target" in d["phases"] and "asymmetric_target" not in r["phases"]
    assert "--dense-target 0" in ref["command"]
    g = data["goals"]
    assert g["ratio_to_reference"] == pytest.approx(d["compress_s"] / r["compress_s"], rel=1e-3)
    assert g["ratio_met"] == (g["ratio_to_reference"] <= 2.0) and g["compress_met"] == (d["compress_s"] <= 300)
    md = (tmp_path / "results" / "cost_tiny-gemma.md").read_text()
    assert "| the defaults' compression <= 300 s |" in md and "4 x 32 tokens" in md
    assert (tmp_path / "results" / "cost_tiny-gemma.png").read_bytes()[:4] == b"\x89PNG"
    # a second run skips what is there
    assert cost.main(argv + ["--rows", "2"]) == 0
    assert json.loads((tmp_path / "results" / "cost_tiny-gemma.json").read_text())["rows"]["2-sparsegpt-gptq"]["runs"] == [r]
