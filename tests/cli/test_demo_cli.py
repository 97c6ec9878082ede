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
    # the recipe is the compress defaults, named, described from the config and explained
    recipe = result["recipe"]
    assert recipe["preset"] == "trt-int8-sparse" and recipe["default"] is True
    assert recipe["config"]["act_bits"] == 8 and recipe["config"]["sparsity"] == "2:4"
    assert "SparseGPT 2:4, INT8" in recipe["description"] and "since Ampere" in recipe["why"]
    assert result["verify"]["ok"]
    assert (out / "ckpt" / "slim_manifest.json").exists() and (out / "export" / "model.onnx").exists()
    assert "dense perplexity" in text
    # every compressed GEMM (14) is eligible for sparse INT8 math on the default target
    assert result["sparse"]["ok"] and result["sparse"]["eligible"] == 14


def test_demo_lints_what_it_exported(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--model", str(tiny_model_dir), "--out", str(out), "--nsamples", "4", "--seqlen", "32",
               "--eval-windows", "2", "--target", "jetson-orin-jp6"])
    assert rc == 0
    lint = json.loads((out / "demo.json").read_text())["lint"]
    assert lint["ok"] and lint["target"] == "jetson-orin-jp6" and lint["summary"]["errors"] == 0
    assert lint["summary"]["gemm_layers_2to4"] == 14  # the defaults are 2:4 along K
    assert lint["summary"]["sparse_tensor_cores"]["math"]["int8"] == 14  # ... and INT8 x INT8 on Jetson Orin
    err = capsys.readouterr().err
    assert "jetson-orin-jp6" in err and "sparse math on jetson-orin-jp6 (jetson-orin): 14 of" in err


def _demo_with_lint_report(changed, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Run the tiny demo with the lint report altered by `changed(report)`: (exit code, stderr, demo.json)."""
    import slim_trt.linter as linter

    real = linter.lint

    def altered(path, target="trt10", **kw):
        rep = real(path, target=target, **kw)
        changed(rep)
        return rep

    monkeypatch.setattr(linter, "lint", altered)
    out = tmp_path / "demo"
    rc = main(["demo", "--model", str(tiny_model_dir), "--out", str(out), "--nsamples", "4", "--seqlen", "32",
               "--eval-windows", "2"])
    _, err = capsys.readouterr()
    return rc, err, json.loads((out / "demo.json").read_text())


def test_demo_fails_when_no_gemm_can_run_sparse(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def dense_only(rep):  # what an export without one sparse-eligible GEMM reports
        rep.summary["sparse_tensor_cores"].update(eligible=0, flop_fraction_eligible=0.0)

    rc, err, demo = _demo_with_lint_report(dense_only, tiny_model_dir, tmp_path, capsys, monkeypatch)
    assert rc == 1 and "FAILED: sparse" in err and "none can run on sparse tensor cores" in err
    sparse = demo["sparse"]
    assert (sparse["ok"], sparse["eligible"], sparse["flop_fraction_eligible"]) == (False, 0, 0.0)


def test_demo_fails_loudly_when_lint_fails(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from slim_trt.linter import Finding

    def failing(rep):
        rep.findings.append(Finding("error", "int4", "some/node", "an INT4 rule this export breaks"))

    rc, err, demo = _demo_with_lint_report(failing, tiny_model_dir, tmp_path, capsys, monkeypatch)
    assert rc == 1 and "FAILED: lint" in err
    assert demo["lint"]["ok"] is False
