"""Smoke test of bench/accuracy.py on a tiny random llama and 2 evaluation windows (never the real model).

Every non-peer row (1-10) runs for real. The peer rows need their own venvs (bench/.venv-<peer>), which CI does
not have: row 11 is run against an empty venv folder to check that a peer that cannot run is recorded as a
failed row with its error, not dropped; row 12 is excluded.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import save_tiny_model, tiny_model

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "slim_trt" / "data"
ROW_FIELDS = ("status", "config", "perplexity", "ratio_to_dense", "top1_agreement", "bits_per_param",
              "bits_per_param_with_adapters", "compress_seconds", "peak_rss_gb", "versions")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "bench" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accuracy")
    model_dir = save_tiny_model(tmp / "tiny-llama", "llama")
    out = tmp / "results"
    argv = ["--model", str(model_dir), "--calib", str(DATA / "calib_sample.txt"), "--data",
            str(DATA / "eval_sample.txt"), "--nsamples", "4", "--seqlen", "32", "--windows", "2",
            "--batch-size", "4", "--out", str(out), "--peer-venvs", str(tmp / "no-venvs")]
    rc = bench.main(argv + ["--rows", "1-dense,2,3,4,5,6,7,8,9,10,11"])
    assert rc == 0
    return argv, out / "accuracy_tiny-llama.json"


def test_every_row_runs_and_has_every_field(smoke_run):
    _, path = smoke_run
    data = json.loads(path.read_text())
    assert [k for k in data["rows"]] == [r.key for r in bench.ROWS[:11]]
    for key, row in data["rows"].items():
        missing = [f for f in ROW_FIELDS if f not in row]
        assert not missing, f"{key} lacks {missing}"
        assert {"torch", "transformers", "slim_trt"} <= set(row["versions"])
    for key in list(data["rows"])[:10]:
        r = data["rows"][key]
        assert r["status"] == "ok", (key, r.get("error"))
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert 0.0 <= r["top1_agreement"] <= 1.0
        assert r["ratio_to_dense"] == pytest.approx(r["perplexity"] / data["rows"]["1-dense"]["perplexity"], rel=1e-3)
    assert data["rows"]["1-dense"]["ratio_to_dense"] == 1.0 and data["rows"]["1-dense"]["top1_agreement"] == 1.0
    assert data["settings"]["nsamples"] == 4 and data["eval_windows"] == 2 and data["eval_tokens"] == 2 * 31
    assert path.with_suffix(".md").read_text().count("\n| ") == 12  # header + 11 rows
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bits_per_param_follow_the_storage_formula(smoke_run):
    rows = json.loads(smoke_run[1].read_text())["rows"]
    # tiny llama: q,k,v,o,gate,up have K = 64 (one 128-group per row, as K < 128), down has K = 128.
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    params = sum(n * k for n, k in shapes)
    g128 = sum(n * k // 2 * 4 + n * k // 2 * 2 + n * math.ceil(k / 128) * 16 for n, k in shapes) / params
    assert rows["2-magnitude-absmax"]["bits_per_param"] == pytest.approx(g128, abs=1e-4)
    assert rows["4-sparsegpt-gptq"]["bits_per_param"] == pytest.approx(g128, abs=1e-4)
    per_tensor = (params // 2 * 6 + 16 * len(shapes)) / params  # SLiM-Quant: one 16-bit scale per tensor
    assert rows["7-slim-lora"]["bits_per_param"] == pytest.approx(per_tensor, abs=1e-4)
    ranks = [math.ceil(0.1 * min(n, k)) for n, k in shapes]
    adapters = sum((n + k) * r * 16 for (n, k), r in zip(shapes, ranks)) / params
    assert rows["7-slim-lora"]["bits_per_param_with_adapters"] == pytest.approx(per_tensor + adapters, abs=1e-4)
    assert rows["8-slim-lora-q4-adapters"]["bits_per_param_with_adapters"] < rows["7-slim-lora"]["bits_per_param_with_adapters"]
    assert rows["7-slim-lora"]["mean_rel_error"] < rows["7-slim-lora"]["mean_rel_error_base"]
    assert len(rows["7-slim-lora"]["layers"]) == 14


def test_gap_closed_and_peer_failure_are_recorded(smoke_run):
    data = json.loads(smoke_run[1].read_text())
    rows, gap = data["rows"], data["gap_closed"]
    p = {k: rows[k]["perplexity"] for k in ("1-dense", "4-sparsegpt-gptq", "7-slim-lora")}
    expect = (p["4-sparsegpt-gptq"] - p["7-slim-lora"]) / (p["4-sparsegpt-gptq"] - p["1-dense"])
    assert gap["7-slim-lora"] == pytest.approx(expect, abs=1e-4)
    peer = rows["11-modelopt"]
    assert peer["status"] == "failed" and "no venv for modelopt" in peer["error"]
    assert peer["perplexity"] is None and "nvidia-modelopt" in peer["versions"]


def test_rerun_skips_finished_rows_and_refuses_other_settings(smoke_run, capsys):
    argv, path = smoke_run
    before = json.loads(path.read_text())["rows"]["7-slim-lora"]["finished"]
    assert bench.main(argv + ["--rows", "slim-lora"]) == 0
    assert "[7] slim-lora: already in" in capsys.readouterr().out
    assert json.loads(path.read_text())["rows"]["7-slim-lora"]["finished"] == before
    changed = [a if a != "4" else "5" for a in argv]  # --nsamples 5
    assert bench.main(changed + ["--rows", "7"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert bench.main(argv + ["--rows", "7,nope"]) == 2


def test_score_matches_slim_trt_compare():
    from slim_trt.evaluate import compare

    dense, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    ref = compare(other, dense, windows, batch_size=2)
    dense_ppl, top1 = bench.reference_pass(dense, windows, batch_size=2)
    got = bench.score(other, windows, top1, batch_size=2)
    assert dense_ppl == pytest.approx(ref["reference_perplexity"], rel=1e-6)
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert got["top1_agreement"] == ref["top1_agreement"] and got["tokens"] == ref["tokens"]


def test_weight_pattern_check_counts_violations_and_levels():
    g = torch.Generator().manual_seed(0)
    N, K = 8, 256
    q = torch.randint(-8, 8, (N, K), generator=g).float()
    keep = torch.zeros(N, K // 4, 4, dtype=torch.bool)
    keep[..., :2] = True  # 2 of every 4 kept
    q = q * keep.reshape(N, K).float()
    scale = torch.rand(N, K // 128, generator=g).repeat_interleave(128, dim=1) + 0.1
    W = q * scale
    c = bench.check_weight_pattern(W)
    assert c["nm_violations"] == 0 and c["groups_over_levels"] == 0 and c["max_levels_per_group"] <= 16
    prescale = torch.rand(K, generator=g) + 0.5  # an AWQ-style per-channel scale folded into the weight
    c = bench.check_weight_pattern(W * prescale, prescale=prescale)
    assert c["groups_over_levels"] == 0
    assert bench.check_weight_pattern(W * prescale)["groups_over_levels"] > 0
    W2 = W.clone()
    W2[0, 2], W2[3, 7] = 0.123, 0.456  # two groups of 4 with 3 non-zeros, and off-grid values
    c = bench.check_weight_pattern(W2)
    assert c["nm_violations"] == 2 and c["max_levels_per_group"] >= 17


def test_peer_bits_use_the_storage_formula():
    b = bench.peer_storage_bits(640, 2048, is_nm=True, prescale=False)
    assert b["base_bits"] == 640 * 2048 // 2 * (4 + 2) + 640 * 16 * 16
    dense = bench.peer_storage_bits(640, 2048, is_nm=False, prescale=True)
    assert dense["base_bits"] == 640 * 2048 * 4 + 640 * 16 * 16 + 16 * 2048


def test_row_selection():
    assert [r.number for r in bench.select_rows("7,dense,slim-lora")] == [7, 1]
    assert len(bench.select_rows("all")) == 12
    with pytest.raises(bench.SlimError):
        bench.select_rows("13")


def test_stored_config_matches_when_new_fields_keep_their_defaults():
    row = next(r for r in bench.ROWS if r.name == "slim-lora")
    stored = bench.row_config(row)
    older = {k: v for k, v in stored.items() if k != "rank_ratio"}  # written before a field existed
    assert bench.same_config(stored, row) and bench.same_config(older, row)
    assert not bench.same_config({**stored, "bits": 8}, row)
    assert not bench.same_config(stored, next(r for r in bench.ROWS if r.name == "slim-lora-q4-adapters"))
