"""Smoke test of bench/speed.py and the shared harness on a tiny random Gemma 3 (never the real model).

Rows 1 (dense fp32), 3 (compressed, weights dequantized at load), 4 (compressed, decomposed) and 6 (--head int8)
run for real through their worker processes, twice each; the onnxruntime-genai row runs against an empty venv folder to check that a peer that cannot run is
recorded as a failed row with its error. No timed assertion: speeds are only checked to be measured and summarised.
"""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import save_tiny_model
from tests.exporter.conftest import save_compressed_checkpoint

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "slim_trt" / "data"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


speed = _load("bench_speed", REPO / "bench" / "speed.py")
harness = sys.modules["harness"]
protocol = _load("bench_speed_protocol", REPO / "bench" / "peers" / "_speed.py")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed")
    model = save_tiny_model(tmp / "tiny-gemma", "gemma3")
    ckpt = save_compressed_checkpoint(tmp / "ckpt", "gemma3")
    argv = ["--model", str(model), "--checkpoint", str(ckpt), "--data", str(DATA / "eval_sample.txt"),
            "--seqlen", "32", "--windows", "3", "--prompt-tokens", "24", "--decode-prompt-tokens", "6",
            "--new-tokens", "5", "--batch", "2", "--repeats", "2", "--threads", "1", "--work", str(tmp / "work"),
            "--out", str(tmp / "results"), "--peer-venvs", str(tmp / "no-venvs")]
    assert speed.main(argv + ["--rows", "1,3,4,slim-head-int8,9"]) == 0
    return argv, tmp / "results" / "speed_tiny-gemma.json"


def test_rows_have_medians_of_their_runs(smoke_run):
    data = json.loads(smoke_run[1].read_text())
    assert list(data["rows"]) == ["1-dense-fp32", "3-slim-dequant", "4-slim-decomposed", "6-slim-head-int8",
                                  "9-ortgenai-int4"]
    assert {"cpu", "logical_cpus", "loadavg", "loadavg_after"} <= set(data["machine"])
    for key in ("1-dense-fp32", "3-slim-dequant", "4-slim-decomposed", "6-slim-head-int8"):
        r = data["rows"][key]
        assert r["status"] == "ok", (key, r.get("error"))
        assert r["repeats"] == 2 and len(r["runs"]) == 2
        for name in ("prefill_tokens_per_s", "ttft_long_ms", "ttft_short_ms", "decode_b1_tokens_per_s",
                     "decode_batch_tokens_per_s", "peak_rss_mb"):
            vals = [run[name] for run in r["runs"]]
            assert all(v > 0 for v in vals), (key, name)
            assert r[name] == pytest.approx(statistics.median(vals), rel=1e-3)
        for run in r["runs"]:
            assert len(run["b1_tokens"]) == 6  # the first token + 5 decode steps: EOS never stops a row
            assert run["loadavg_before"] and run["loadavg_after"]
        files = [Path(r["model"]["folder"]) / f for f in r["model"]["files"]]
        assert r["model_bytes"] == sum(f.stat().st_size for f in files) > 0
        assert r["versions"]["intra_op_threads"] == 1 and "onnxruntime" in r["versions"]
        if key != "3-slim-dequant":  # the session config the export declares is the one the row ran
            assert r["model"]["onnxruntime"]["session_config"] == r["versions"]["session_config"]
    assert data["rows"]["6-slim-head-int8"]["model"]["head"]["quantization"] == "int8"
    # rows 3 and 4 run the same export folder, row 3 with ONNX Runtime's Q/DQ fusion off
    assert data["rows"]["3-slim-dequant"]["model"]["folder"] == data["rows"]["4-slim-decomposed"]["model"]["folder"]
    assert data["rows"]["3-slim-dequant"]["versions"]["session_config"]["session.disable_quant_qdq"] == "1"
    assert data["rows"]["1-dense-fp32"]["x_dense_fp32_b1"] == 1.0
    md = smoke_run[1].with_suffix(".md").read_text()
    assert md.count("\n| ") >= 1 + 5 + 1 + 3  # header + 5 rows, goals header + 3 compressed rows
    assert smoke_run[1].with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perplexity_matches_pytorch(smoke_run):
    data = json.loads(smoke_run[1].read_text())
    ref, rows = data["reference"], data["rows"]
    assert math.isfinite(ref["dense_pytorch"]) and math.isfinite(ref["checkpoint_pytorch"])
    # fp32 exports: ONNX Runtime reproduces PyTorch on the same windows (the compressed export within the
    # INT4 kernels' rounding)
    assert rows["1-dense-fp32"]["perplexity"] == pytest.approx(ref["dense_pytorch"], rel=1e-3)
    assert rows["4-slim-decomposed"]["ppl_vs_checkpoint"] == pytest.approx(1.0, abs=0.01)
    assert rows["4-slim-decomposed"]["perplexity_tokens"] == 3 * 31
    goals = data["goals"]["rows"]
    assert set(goals) == {"3-slim-dequant", "4-slim-decomposed", "6-slim-head-int8"}
    assert goals["4-slim-decomposed"]["x_ortgenai_b1"] is None  # the peer did not run


def test_peer_without_venv_is_a_failed_row(smoke_run):
    r = json.loads(smoke_run[1].read_text())["rows"]["9-ortgenai-int4"]
    assert r["status"] == "failed" and "no venv for ortgenai" in r["error"] and r["runs"] == []


def test_rerun_skips_complete_rows_and_refuses_other_settings(smoke_run, capsys):
    argv, path = smoke_run
    before = json.loads(path.read_text())["rows"]["4-slim-decomposed"]["runs"]
    assert speed.main(argv + ["--rows", "4"]) == 0
    assert "[4] slim-decomposed: already in" in capsys.readouterr().out
    assert json.loads(path.read_text())["rows"]["4-slim-decomposed"]["runs"] == before
    changed = [a if a != "5" else "7" for a in argv]  # --new-tokens 7
    assert speed.main(changed + ["--rows", "4"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert speed.main(argv + ["--rows", "4,nope"]) == 2
    assert speed.main(argv + ["--rows", "4", "--repeats", "0"]) == 2


def test_nll_matches_torch_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 50, generator=g) * 3
    ids = torch.randint(0, 50, (9,), generator=g)
    want = float(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum"))
    got, n = protocol.nll(logits.numpy(), ids.numpy(), chunk=3)
    assert n == 8 and got == pytest.approx(want, rel=1e-9)


def test_results_file_refuses_other_settings(tmp_path):
    class R(harness.ResultsFile):
        def markdown(self):
            return "x\n"

    r = R(tmp_path, "demo", "m", {"a": 1}, redo=False)
    r.put("1-x", {"v": 1})
    assert json.loads((tmp_path / "demo_m.json").read_text())["rows"] == {"1-x": {"v": 1}}
    with pytest.raises(harness.SlimError, match="other settings"):
        R(tmp_path, "demo", "m", {"a": 2}, redo=False)
    assert R(tmp_path, "demo", "m", {"a": 2}, redo=True).rows == {}
    assert np.isfinite(harness.machine()["loadavg"]).all()


def test_w8a8_checkpoint_gets_its_own_file_and_the_decode_goal(tmp_path):
    """--tag puts a recipe's rows in their own file; row 12 is `slim-trt export CKPT` with no option (fp16); the
    file says which recipe its compressed rows are, and goal 3 (>= 2.5x dense fp32 at batch 1) is judged on the
    measured ratio."""
    from slim_trt.checkpoint.format import save
    from slim_trt.config import CompressConfig
    from tests.conftest import tiny_tokenizer
    from tests.exporter.conftest import w8a8_model

    model = save_tiny_model(tmp_path / "tiny-llama", "llama")
    ckpt, m = tmp_path / "ckpt", w8a8_model("llama")
    # the manifest names the recipe as `compress` writes it (the default config: W8A8 2:4 + LRC)
    save(m, ckpt, tokenizer=tiny_tokenizer(m.config.vocab_size), manifest_extra={"method": CompressConfig().to_dict()})
    argv = ["--model", str(model), "--checkpoint", str(ckpt), "--data", str(DATA / "eval_sample.txt"),
            "--seqlen", "32", "--windows", "2", "--prompt-tokens", "24", "--decode-prompt-tokens", "6",
            "--new-tokens", "3", "--batch", "2", "--repeats", "1", "--threads", "1", "--work", str(tmp_path / "w"),
            "--out", str(tmp_path / "results"), "--rows", "1,12"]
    with pytest.raises(SystemExit) as bad:  # argparse's one line, exit 2
        speed.main(argv + ["--tag", "bad/tag"])
    assert bad.value.code == 2
    assert speed.main(argv + ["--tag", "w8a8"]) == 0
    path = tmp_path / "results" / "speed_tiny-llama_w8a8.json"
    data = json.loads(path.read_text())
    row = data["rows"]["12-slim-export-plain"]
    assert row["status"] == "ok", row.get("error")
    # the exporter's defaults resolved into the row's config as `slim-trt export` resolves them for this W8A8
    # checkpoint (its own INT8 activations: accuracy level 1), so a change of them measures (and exports) it again;
    # the export it measured declares the same
    from slim_trt.exporter.options import ExportOptions

    w8a8_config = ExportOptions(act_quant="int8").session_config()
    assert w8a8_config["session.qdq_matmulnbits_accuracy_level"] == "1"
    assert row["config"] == {"method": "slim_trt.export", "source": "checkpoint", "session_config": w8a8_config,
                             "checkpoint_manifest_sha256": row["config"]["checkpoint_manifest_sha256"]}
    assert row["model"]["onnxruntime"]["session_config"] == w8a8_config
    assert row["model"]["dtype"] == "fp16"  # the exporter's default, whatever the row asked for
    assert data["checkpoint_recipe"]["preset"] == "trt-int8-sparse" and data["checkpoint_recipe"]["default"]
    assert "`--preset trt-int8-sparse` (the defaults)" in path.with_suffix(".md").read_text()
    g = data["goals"]["rows"]["12-slim-export-plain"]
    assert g["goal_3_met"] == (row["x_dense_fp32_b1"] >= speed.W8A8_DECODE_GOAL)
    assert "Goal 3: decode_b1 >= 2.5" in path.with_suffix(".md").read_text()
    assert not (tmp_path / "results" / "speed_tiny-llama.json").exists()
