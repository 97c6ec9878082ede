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
    # the export defaults (an int8 head, int8 activations in MatMulNBits), verified with the limits for that rounding
    assert result["verify"]["ok"] and result["verify"]["settings"]["int8_activations"]
    assert result["verify"]["metrics"]["top1"] > 0.9
    assert (out / "ckpt" / "slim_manifest.json").exists() and (out / "export" / "model.onnx").exists()
    assert "dense perplexity" in text


def test_demo_lints_what_it_exported(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--model", str(tiny_model_dir), "--out", str(out), "--nsamples", "4", "--seqlen", "32",
               "--eval-windows", "2", "--target", "jetson-orin-jp6"])
    assert rc == 0
    lint = json.loads((out / "demo.json").read_text())["lint"]
    assert lint["ok"] and lint["target"] == "jetson-orin-jp6" and lint["summary"]["errors"] == 0
    assert lint["summary"]["gemm_layers_2to4"] == 0 and lint["summary"]["gemm_layers"] >= 14  # the defaults are dense
    assert "jetson-orin-jp6" in capsys.readouterr().err


def test_demo_fails_loudly_when_lint_fails(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import slim_trt.linter as linter
    from slim_trt.linter import Finding

    real = linter.lint

    def failing(path, target="trt10", **kw):
        rep = real(path, target=target, **kw)
        rep.findings.append(Finding("error", "int4", "some/node", "an INT4 rule this export breaks"))
        return rep

    monkeypatch.setattr(linter, "lint", failing)
    out = tmp_path / "demo"
    rc = main(["demo", "--model", str(tiny_model_dir), "--out", str(out), "--nsamples", "4", "--seqlen", "32",
               "--eval-windows", "2"])
    _, err = capsys.readouterr()
    assert rc == 1 and "FAILED: lint" in err
    assert json.loads((out / "demo.json").read_text())["lint"]["ok"] is False
