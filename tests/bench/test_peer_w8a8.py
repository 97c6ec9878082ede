"""The W8A8 peer's protocol (bench/peers/run_modelopt_w8a8.py, row 71), without the peer's venv: the scoring it
runs in its venv is the harness's own arithmetic, the harness takes the peer's numbers only when the peer's dense
score is ours, and the INT8 per-channel weights with a smoothing factor are checked and counted as stored."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))  # the bench modules import their sibling harness by name
sys.path.insert(0, str(REPO / "bench" / "peers"))
import _common  # noqa: E402
import accuracy_rows  # noqa: E402
import accuracy_run  # noqa: E402
from harness import RowFailed  # noqa: E402


def test_the_peers_score_is_the_harness_arithmetic():
    dense, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    windows = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(0))
    ref_ppl, ref_top1 = accuracy_run.reference_pass(dense, windows, batch_size=2)
    got = _common.score_windows(dense, windows, batch_size=2)
    assert got["tokens"] == 5 * 15 and math.exp(got["nll"] / got["tokens"]) == pytest.approx(ref_ppl, rel=1e-6)
    assert torch.equal(got["top1"], ref_top1)
    mine = accuracy_run.score(other, windows, ref_top1, batch_size=2)
    peer = _common.score_windows(other, windows, batch_size=2)
    assert math.exp(peer["nll"] / peer["tokens"]) == pytest.approx(mine["perplexity"], rel=1e-6)
    assert float((peer["top1"] == ref_top1).float().mean()) == mine["top1_agreement"]


def _report(dense_nll: float, nll: float, tokens: int = 100) -> dict:
    return {"evaluation": {"dense": {"nll": dense_nll, "tokens": tokens}, "quantized": {"nll": nll, "tokens": tokens}}}


def test_the_harness_takes_the_peers_numbers_only_when_its_dense_score_is_ours():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    top1 = torch.tensor([[1, 2, 0, 4], [5, 0, 7, 8]])
    dense_ppl = math.exp(3.0)
    ev = accuracy_run.peer_evaluation(_report(300.0, 350.0), top1, ref, dense_ppl)
    assert ev["perplexity"] == pytest.approx(math.exp(3.5)) and ev["top1_agreement"] == 0.75
    assert ev["dense_perplexity_peer"] == pytest.approx(dense_ppl)
    with pytest.raises(RowFailed, match=r"dense perplexity 20\.2\d+ is not ours \(20\.0855"):
        accuracy_run.peer_evaluation(_report(301.0, 350.0), top1, ref, dense_ppl)  # 1% off: not comparable
    with pytest.raises(RowFailed, match="no usable evaluation"):
        accuracy_run.peer_evaluation({}, top1, ref, dense_ppl)
    with pytest.raises(RowFailed, match=r"shape \(1, 4\), not \(2, 4\)"):
        accuracy_run.peer_evaluation(_report(300.0, 350.0), top1[:1], ref, dense_ppl)


def test_int8_per_channel_weights_with_a_smoothing_factor_are_checked_on_their_grid():
    g = torch.Generator().manual_seed(0)
    N, K = 16, 1024
    q = torch.randint(-127, 128, (N, K), generator=g).float()
    keep = torch.zeros(N, K // 4, 4, dtype=torch.bool)
    keep[..., 1:3] = True
    q = q * keep.reshape(N, K).float()
    W = q * (torch.rand(N, 1, generator=g) + 0.1)  # one scale per output channel
    s = torch.rand(K, generator=g) + 0.5  # SmoothQuant's factor, folded back into the effective weight
    c = accuracy_run.check_weight_pattern(W * s, prescale=s, bits=8, group_size=K)
    assert c["nm_violations"] == 0 and c["groups_over_levels"] == 0 and c["groups"] == N
    assert 200 < c["max_levels_per_group"] <= 256 and c["zero_fraction"] >= 0.5
    assert accuracy_run.check_weight_pattern(W * s, bits=8, group_size=K)["groups_over_levels"] == N
    W[0, 0] = 0.5  # a third non-zero in the first group of 4
    assert accuracy_run.check_weight_pattern(W * s, prescale=s, bits=8, group_size=K)["nm_violations"] == 1


def test_int8_per_channel_peer_bits_use_the_storage_formula():
    b = accuracy_run.peer_storage_bits(640, 2048, is_nm=True, prescale=True, bits=8, group_size=-1)
    assert b["base_bits"] == 640 * 2048 // 2 * (8 + 2) + 640 * 16 + 16 * 2048
    assert b["params"] == 640 * 2048


def test_row_71_is_the_w8a8_peer_in_modelopts_venv(tmp_path):
    row = next(r for r in accuracy_rows.ROWS if r.number == 71)
    assert row.peer == "modelopt-w8a8" and accuracy_run.peer_venv(row.peer) == "modelopt"
    assert accuracy_run.peer_venv("modelopt") == "modelopt"  # a peer without "venv" keeps its own
    peer = accuracy_rows.PEERS[row.peer]
    assert (REPO / "bench" / "peers" / peer["script"]).is_file()
    assert peer["evaluates"] is True and (peer["weight_bits"], peer["group_size"]) == (8, -1)
    assert accuracy_rows.row_config(row)["steps"][-1]["config"] == "INT8_SMOOTHQUANT_CFG"
    with pytest.raises(RowFailed, match=f"no venv for modelopt at {tmp_path / '.venv-modelopt'}"):
        accuracy_run.run_peer(row, None, tmp_path, 10)


def test_best_one_shot_is_judged_against_the_w8a8_peer():
    import accuracy_report

    def ours(ppl):
        return {"status": "ok", "perplexity": ppl, "bits_per_param_with_adapters": 6.4,
                "config": {"method": accuracy_rows.OUR_METHOD, "sparsity": "2:4", "bits": 8, "act_bits": 8}}

    peer = {"status": "ok", "perplexity": 60.0, "bits_per_param_with_adapters": 5.0,
            "config": {"library": "nvidia-modelopt"}}
    best = accuracy_report.best_rows({"67-x": ours(54.0), "71-modelopt-w8a8": peer})
    assert best["best_one_shot"] == "67-x" and best["w8a8_peer"] == ["71-modelopt-w8a8"]
    assert best["best_one_shot_ahead_of_w8a8_peer"] is True
    assert accuracy_report.best_rows({"67-x": ours(61.0), "71-modelopt-w8a8": peer})[
        "best_one_shot_ahead_of_w8a8_peer"] is False
    failed = accuracy_report.best_rows({"67-x": ours(54.0), "71-modelopt-w8a8": {**peer, "status": "failed"}})
    assert failed["w8a8_peer"] == [] and failed["best_one_shot_ahead_of_w8a8_peer"] is None
