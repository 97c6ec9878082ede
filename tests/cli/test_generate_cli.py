"""`slim-trt generate`: text on stdout, speed on stderr, --json timings; every bad input exits 2 with one line."""
from __future__ import annotations

import json
import shutil

import pytest

from slim_trt.exporter import export
from tests.conftest import run_cli as run
from tests.exporter.conftest import save_compressed_checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gencli")
    export(save_compressed_checkpoint(root / "ckpt", "gemma3"), root / "e", dtype="fp32", progress=False)
    return root / "e"


def test_generate_prints_text_and_speed(exported, tmp_path, capsys):
    rc, out, err = run(["generate", exported, "the city of the", "--max-new-tokens", "8",
                        "--json", tmp_path / "t.json"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "t.json").read_text())
    assert out.strip() and out.strip() == report["texts"][0].strip()
    assert len(report["token_ids"][0]) == 8 and report["timing"]["decode_steps"] == 7
    assert "tokens/s" in err and "prefill" in err and "Traceback" not in err
    rc, out, _ = run(["generate", exported, "the city of the", "--max-new-tokens", "8", "--batch", "2"], capsys)
    assert rc == 0 and out.splitlines() == [f"[0] {report['texts'][0]}", f"[1] {report['texts'][0]}"]


def test_generate_bad_inputs(exported, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    meta = json.loads((broken / "slim_export.json").read_text())
    meta["onnxruntime"]["session_config"]["session.qdq_matmulnbits_accuracy_level"] = 7
    (broken / "slim_export.json").write_text(json.dumps(meta))
    cases = [
        ([tmp_path, "hello"], "has no slim_export.json"),
        ([tmp_path / "missing", "hello"], "does not exist"),
        ([exported, ""], "empty prompt"),
        ([exported, " ".join(["the"] * 300)], "over the model's limit"),
        ([exported, "the", "--max-new-tokens", "0"], "bad --max-new-tokens"),
        ([exported, "the", "--temperature", "-2"], "temperature must be >= 0"),
        ([broken, "the"], "session_config"),
    ]
    for args, message in cases:
        rc, _, err = run(["generate", *args], capsys)
        assert rc == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
