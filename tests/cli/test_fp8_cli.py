"""The FP8 chain through the CLI on a tiny model (issue 24): compress --preset trt-fp8-sparse -> export -> verify ->
lint (Hopper yes, Ampere no) -> deploy triton / jetson-thor, and the one-line refusals."""
import json

from tests.conftest import run_cli as run

FAST = ["--nsamples", "4", "--seqlen", "16", "-q", "--refit-rounds", "1"]


def test_fp8_compress_export_verify_lint_deploy(tiny_model_dir, tmp_path, capsys):
    ckpt, exp = tmp_path / "ckpt", tmp_path / "export"
    rc, _, err = run(["compress", tiny_model_dir, "-o", ckpt, "--preset", "trt-fp8-sparse", *FAST], capsys)
    assert rc == 0, err
    method = json.loads((ckpt / "slim_manifest.json").read_text())["method"]
    assert (method["weight_format"], method["act_format"], method["sparsity"]) == ("fp8", "fp8", "2:4")
    rc, text, err = run(["info", ckpt], capsys)
    assert rc == 0 and "weight_format=fp8, act_format=fp8" in text and "FP8 E4M3 weights" in text, text + err
    rc, text, err = run(["export", ckpt, "-o", exp], capsys)  # the export defaults: fp16
    assert rc == 0 and "dtype fp16" in text and "act-quant fp8" in text, err
    assert json.loads((exp / "slim_export.json").read_text())["act_format"] == "fp8"
    import onnx

    m = onnx.load(str(exp / "model.onnx"), load_external_data=False)
    fp8 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len([t for t in fp8 if t.name.endswith(".qweight")]) == 14  # every compressed weight in FP8
    assert len([t for t in fp8 if t.name.endswith(".act_zero_point")]) == 14  # every activation Q to FP8
    assert (m.opset_import[0].version, m.ir_version) == (21, 10)
    rc, text, err = run(["verify", exp / "model.onnx", "--reference", ckpt, "--seqlen", "20"], capsys)
    assert rc == 0 and "PASSED" in text, text + err
    rc, text, err = run(["lint", exp / "model.onnx", "--target", "hopper"], capsys)
    assert rc == 0 and "14 FP8 x FP8" in text, text + err
    rc, text, err = run(["lint", exp / "model.onnx", "--target", "ampere"], capsys)
    assert rc != 0 and "--preset trt-int8-sparse" in text + err
    rc, text, err = run(["deploy", "triton", exp, "-o", tmp_path / "repo"], capsys)
    assert rc == 0 and (tmp_path / "repo").is_dir(), err
    rc, text, err = run(["deploy", "jetson", exp, "-o", tmp_path / "thor", "--target", "jetson-thor"], capsys)
    assert rc == 0 and json.loads((tmp_path / "thor" / "lint.json").read_text())["ok"], err
    rc, _, err = run(["deploy", "jetson", exp, "-o", tmp_path / "orin", "--target", "jetson-orin"], capsys)
    assert rc == 2 and "no FP8" in err and not (tmp_path / "orin").exists()
    rc, _, err = run(["export", ckpt, "-o", tmp_path / "bf16", "--dtype", "bf16"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--dtype fp16" in err
    assert not (tmp_path / "bf16").exists()


def test_fp8_weights_alone_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    rc, _, err = run(["compress", tiny_model_dir, "-o", tmp_path / "c", "--weight-format", "fp8", *FAST], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--preset trt-fp8-sparse" in err
    assert not (tmp_path / "c").exists()
