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
    (tmp_path / "empty").mkdir()  # (an -o inside the input folder is refused first: issue 25)
    cases = [
        (["export", tmp_path / "missing", "-o", tmp_path / "o"], "does not exist"),
        (["export", tmp_path / "empty", "-o", tmp_path / "o"], "not a slim-trt checkpoint"),
        (["export", ckpt, "-o", tmp_path / "o", "--dtype", "int3"], "bad --dtype"),
        (["export", ckpt, "-o", tmp_path / "o", "--lowrank", "fused"], "bad --lowrank"),
        (["export", ckpt, "-o", tmp_path / "o", "--act-quant", "int4"], "bad --act-quant"),
        (["export", ckpt, "-o", tmp_path / "o", "--head", "int2"], "bad --head"),
        (["export", ckpt, "-o", tmp_path / "o", "--ort-accuracy-level", "2"], "bad --ort-accuracy-level"),
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


def test_export_a_dense_model_and_verify_it_against_the_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "dense"
    rc, text, err = run(["export", tiny_model_dir, "-o", out, "--dtype", "fp32", "--head", "int8"], capsys)
    assert rc == 0, err
    assert "0 linear layers" in text and "embedding/head   int8" in text
    meta = json.loads((out / "slim_export.json").read_text())
    assert meta["source_model"] == str(tiny_model_dir) and meta["checkpoint"]["manifest_sha256"] is None
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    rc, text, err = run(["verify", out / "model.onnx", "--reference", tiny_model_dir, "--seqlen", "24"], capsys)
    assert rc == 0, text + err
    assert "PASSED" in text and "--head int8" in text
