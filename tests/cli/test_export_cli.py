"""`slim-trt export`: end to end on a tiny checkpoint, and every bad input exits 2 with one clear line."""
from __future__ import annotations

import json

import pytest

from tests.exporter.conftest import save_compressed_checkpoint
from tests.conftest import run_cli as run




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_compressed_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", "gemma3")


def test_export_writes_model_sidecar_and_tokenizer(ckpt, tmp_path, capsys):
    out = tmp_path / "export" / "tiny"
    rc, text, err = run(["export", ckpt, "-o", out, "--dtype", "fp32", "--lowrank", "plugin"], capsys)
    assert rc == 0, err
    assert "opset 21, IR 10, dtype fp32, lowrank plugin" in text and "14 linear layers" in text
    meta = json.loads((out / "slim_export.json").read_text())
    assert meta["architecture"] == "gemma3_text" and meta["tokenizer"] == "tokenizer"
    assert len(meta["checkpoint"]["manifest_sha256"]) == 64
    assert (out / "model.onnx").stat().st_size > 0 and (out / "tokenizer" / "tokenizer_config.json").is_file()
    rc, _, err = run(["export", ckpt, "-o", out], capsys)
    assert rc == 2 and "already exists" in err and "--force" in err
    rc, text, err = run(["export", ckpt, "-o", out, "--force", "--no-cache", "--json", "-"], capsys)
    assert rc == 0, err
    assert json.loads(text[text.index("{"):])["with_cache"] is False


def test_export_bad_inputs(ckpt, tmp_path, capsys):
    cases = [
        (["export", tmp_path / "missing", "-o", tmp_path / "o"], "does not exist"),
        (["export", tmp_path, "-o", tmp_path / "o"], "not a slim-trt checkpoint"),
        (["export", ckpt, "-o", tmp_path / "o", "--dtype", "int3"], "bad --dtype"),
        (["export", ckpt, "-o", tmp_path / "o", "--lowrank", "fused"], "bad --lowrank"),
        (["export", ckpt, "-o", tmp_path / "o", "--act-quant", "int4"], "bad --act-quant"),
    ]
    for args, message in cases:
        rc, _, err = run(args, capsys)
        assert rc == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_export_defaults_to_the_export_folder(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(["export", ckpt, "--dtype", "fp32", "--no-cache"], capsys)
    assert rc == 0, err
    assert (tmp_path / "export" / ckpt.name / "model.onnx").exists()
