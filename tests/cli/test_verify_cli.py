"""`slim-trt verify`: table and JSON on a tiny export; exit 1 on a broken threshold; exit 2 on bad inputs."""
from __future__ import annotations

import json

import pytest

from slim_trt.exporter import export
from tests.exporter.conftest import save_compressed_checkpoint
from tests.conftest import run_cli as run




@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    ckpt = save_compressed_checkpoint(root / "ckpt", "llama")
    export(ckpt, root / "e", dtype="fp32", progress=False)
    return ckpt, root / "e" / "model.onnx"


def test_verify_table_json_and_threshold(exported, tmp_path, capsys):
    ckpt, onnx_path = exported
    args = ["verify", onnx_path, "--reference", ckpt, "--seqlen", "20", "--decode-steps", "3"]
    rc, text, err = run(args + ["--json", tmp_path / "r.json", "--save-inputs", tmp_path / "in.json"], capsys)
    assert rc == 0, err
    assert "top-1 agreement" in text and "PASSED" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["settings"]["decode_steps"] == 3 and (tmp_path / "in.json").is_file()
    rc, text, _ = run(args + ["--max-abs", "0"], capsys)  # fp32 noise is > 0: the threshold breaks
    assert rc == 1 and "FAILED" in text


def test_verify_bad_inputs(exported, tmp_path, capsys):
    ckpt, onnx_path = exported
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 8)
    cases = [
        (["verify", tmp_path / "none.onnx", "--reference", ckpt], "does not exist"),
        (["verify", junk, "--reference", ckpt], "not an ONNX file"),
        (["verify", onnx_path, "--reference", tmp_path / "nock"], "does not exist"),
        (["verify", onnx_path, "--reference", tmp_path], "not a slim-trt checkpoint"),
        (["verify", onnx_path, "--reference", ckpt, "--windows", "0"], "--windows"),
        (["verify", onnx_path, "--reference", ckpt, "--seqlen", "20", "--engine", tmp_path / "x.plan"], "TensorRT"),
    ]
    for args, message in cases:
        rc, _, err = run(args, capsys)
        assert rc == 2 and message in err, (args, err)
