"""`slim-trt demo` wiring, end to end on a tiny model (the real run uses Gemma 3 270M: `make demo`)."""
import json

from slim_trt.cli import main


def test_demo_runs_compress_export_verify(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--model", str(tiny_model_dir), "--out", str(out), "--nsamples", "4", "--seqlen", "32",
               "--eval-windows", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    result = json.loads((out / "demo.json").read_text())
    assert result["perplexity_compressed"] > 1 and result["perplexity_dense"] > 1
    assert result["verify"]["ok"] and result["verify"]["metrics"]["max_abs"] < 1e-3
    assert (out / "ckpt" / "slim_manifest.json").exists() and (out / "export" / "model.onnx").exists()
    assert "dense perplexity" in text
