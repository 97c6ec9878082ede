"""The W8A8 chain through the CLI on a tiny model: compress --act-bits 8 -> info -> export (no flag) -> verify ->
lint, and the export refusal of a conflicting --act-quant."""
import json

from tests.conftest import run_cli as run

FAST = ["--nsamples", "4", "--seqlen", "16", "-q"]


def test_compress_export_verify_lint(tiny_model_dir, tmp_path, capsys):
    ckpt, exp = tmp_path / "ckpt", tmp_path / "export"
    rc, _, err = run(["compress", tiny_model_dir, "-o", ckpt, *FAST, "--act-bits", "8", "--refit-rounds", "1"], capsys)
    assert rc == 0, err
    manifest = json.loads((ckpt / "slim_manifest.json").read_text())
    assert manifest["method"]["act_bits"] == 8 and manifest["method"]["lowrank"] == "lrc"
    assert manifest["method"]["max_bits"] is None  # INT8 2:4 is 5 bits/param before adapters: no 4.5 budget
    assert all(meta["act_bits"] == 8 and meta["act_scale"] > 0 for meta in manifest["layers"].values())
    rc, text, _ = run(["info", ckpt], capsys)
    assert rc == 0 and "act_bits=8" in text and "act scale" in text
    rc, text, err = run(["export", ckpt, "-o", exp, "--dtype", "fp32"], capsys)
    assert rc == 0 and "act-quant int8" in text, err
    rc, text, err = run(["verify", exp / "model.onnx", "--reference", ckpt, "--seqlen", "20"], capsys)
    assert rc == 0 and "PASSED" in text, text + err
    # the report names the CPU features that decided the session and the W8A8 GEMM form they chose
    from slim_trt.runtime.decoder import cpu_choice

    choice = cpu_choice()
    assert f"CPU: {' '.join(choice.features)}; W8A8 GEMMs: " in text and f"as {choice.w8a8_form} (" in text, text
    rc, out, err = run(["generate", exp, "the city of", "--max-new-tokens", "4", "--json", tmp_path / "g.json"], capsys)
    assert rc == 0 and out.strip(), err
    assert f"ONNX Runtime session: CPU: {' '.join(choice.features)}; 14 W8A8 linears as {choice.w8a8_form}" in err
    session = json.loads((tmp_path / "g.json").read_text())["session"]
    assert session["w8a8_form"] == choice.w8a8_form and session["w8a8_linears"] == 14
    for target in ("trt10", "trt11", "jetson-orin-jp6"):
        rc, text, err = run(["lint", exp / "model.onnx", "--target", target], capsys)
        assert rc == 0, text + err
    rc, _, err = run(["export", ckpt, "-o", tmp_path / "e2", "--act-quant", "none"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--act-bits 8" in err
