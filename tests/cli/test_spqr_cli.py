"""`slim-trt compress --quantizer spqr` (issue 14): bad input is one line and exit 2 with nothing written; a tiny
model goes compress -> export -> verify (ONNX Runtime passes) -> lint (TensorRT's verdict on zero points)."""
from __future__ import annotations

import json

import pytest

from slim_trt.config import PRESETS, CompressConfig
from slim_trt.errors import SlimError
from tests.conftest import run_cli as run

FAST = ["--nsamples", "4", "--seqlen", "16", "-q"]


@pytest.mark.parametrize("flags,needle", [
    (["--bits", "8"], "bad --bits 8 for --quantizer spqr"),
    (["--bits", "16"], "bad --bits 16 for --quantizer spqr"),
    (["--outlier-share", "0.5"], "bad --outlier-share 0.5"),
    (["--outlier-share", "-0.01"], "bad --outlier-share -0.01"),
    (["--group-size", "24"], "bad --group-size 24 for --quantizer spqr"),
    (["--bits", "8", "--group-size", "-1", "--act-bits", "8"], "bad --bits 8 for --quantizer spqr"),
    (["--bits", "4", "--act-bits", "8"], "--quantizer spqr is weight-only"),
])
def test_bad_spqr_input_exits_2_with_one_line(flags, needle, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(["compress", tiny_model_dir, "-o", out, "--quantizer", "spqr", *FAST, *flags], capsys)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("slim-trt compress: error: ") and needle in lines[0], err
    assert "Traceback" not in err and not out.exists() and not (tmp_path / "out.partial").exists()


INT4 = PRESETS["int4-dense"]  # the weight-only recipe these configs change (the defaults of issues 14-22)


def test_bits_3_needs_a_sweep_that_rounds_zero_points():
    # 3-bit codes need zero points, which only the GPTQ / SparseGPT sweeps (and SpQR's own) round.
    with pytest.raises(SlimError, match="does not run"):
        CompressConfig(**{**INT4, **dict(bits=3, quantizer="absmax", sparsity="none", lowrank="none")})
    assert CompressConfig(**{**INT4, **dict(bits=3, quantizer="spqr", group_size=16)}).zero_points is False  # own
    with pytest.raises(SlimError, match="own zero points"):
        CompressConfig(**{**INT4, **dict(bits=3, quantizer="spqr", group_size=16, bit_allocation="slim-llm")})


def test_spqr_defaults_to_groups_of_16_on_the_cli(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    rc, _, err = run(["compress", tiny_model_dir, "-o", out, "--quantizer", "spqr", "--bits", "3", "--sparsity",
                      "none", "--lowrank", "none", "--json", tmp_path / "s.json", *FAST], capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["config"]["effective_group_size"] == 16 and s["config"]["outlier_share"] == 0.01
    # 3 + 6/16 + 64/256 per weight + 32 per outlier (<= 1%): between 3.625 and 3.945 on every layer
    assert 3.625 < s["bits_per_param"] <= 3.945
    from slim_trt.checkpoint.format import read_manifest

    stats = read_manifest(out)["layer_stats"]
    assert len(stats) == 14
    for layer in stats.values():
        assert 0 < layer["outliers"] <= 0.01 * layer["params"] and 0 < layer["outlier_columns"] <= layer["outliers"]


def test_compress_export_verify_lint(tiny_model_dir, tmp_path, capsys):
    ck, onnx_dir = tmp_path / "ck", tmp_path / "onnx"
    rc, _, err = run(["compress", tiny_model_dir, "-o", ck, "--quantizer", "spqr", "--bits", "4", "--sparsity", "none",
                      "--lowrank", "none", *FAST], capsys)
    assert rc == 0, err
    assert run(["export", ck, "-o", onnx_dir], capsys)[0] == 0
    rc, out, err = run(["verify", onnx_dir / "model.onnx", "--reference", ck, "--json", tmp_path / "v.json"], capsys)
    assert rc == 0 and "PASSED" in out + err, out + err
    rc, out, err = run(["lint", onnx_dir / "model.onnx", "--json", tmp_path / "l.json"], capsys)
    report = json.loads((tmp_path / "l.json").read_text())
    rules = {f["rule"] for f in report["findings"] if f["severity"] == "error"}
    assert rc != 0 and rules == {"qdq-zero-point"}  # TensorRT: symmetric INT4 only
