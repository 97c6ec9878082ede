"""Issue 25's bad input, through the real command line: a config that does not match its weights, outputs onto
their inputs, output paths checked before any work, tampered exports, unbounded --nsamples, Ctrl-C. Each is one
line naming the problem and the fix, exit code 2 (130 for Ctrl-C), and the inputs are left as they were."""
from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch

from tests.cli.test_integrity_cli import FAST, one_error_line
from tests.conftest import run_cli as run
from tests.triton.toy_export import build_toy_export


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the source gate (models.check_source_weights)
def _config(**change):
    def apply(folder):
        c = json.loads((folder / "config.json").read_text())
        c.update(change)
        (folder / "config.json").write_text(json.dumps(c))
    return apply


def _extra_tensor(folder):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    sd["model.evil"] = torch.zeros(3)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _nan_weight(folder):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


MISMATCHED = {
    # The stored head differs from the embedding: the streamed path tied it, --no-stream kept it (two models).
    "tied_head": (_config(tie_word_embeddings=True), "ties lm_head.weight to model.embed_tokens.weight"),
    # One layer by the config, two in the weights: the second was dropped without a word.
    "fewer_layers": (_config(num_hidden_layers=1), "9 tensor(s) that the model config.json describes does not use"),
    "extra_tensor": (_extra_tensor, "1 tensor(s) that the model config.json describes does not use (e.g. model.evil)"),
    "nan_eps": (_config(rms_norm_eps=float("nan")), "config.json has rms_norm_eps = nan"),
    "nan_weight": (_nan_weight, "NaN or Inf in model.layers.0.mlp.up_proj.weight of the source model"),
}


@pytest.mark.parametrize("kind", sorted(MISMATCHED))
def test_every_reader_of_a_source_model_refuses_a_config_that_does_not_match_its_weights(source, tmp_path, capsys,
                                                                                         kind):
    model = tmp_path / "model"
    shutil.copytree(source, model)
    damage, message = MISMATCHED[kind]
    damage(model)
    for command, extra in (("compress", ["-o", tmp_path / "out", *FAST]),
                           ("compress", ["-o", tmp_path / "out", "--no-stream", *FAST]),
                           ("eval", ["--seqlen", "16", "--windows", "1"]),
                           ("export", ["-o", tmp_path / "export", "--dtype", "fp32"])):
        rc, out, err = run([command, model, *extra], capsys)
        assert rc == 2, (command, extra, err)
        assert message in one_error_line(err, command), (command, extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written, no OUT.partial left


def test_a_stored_head_equal_to_the_embedding_is_accepted(source, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(source, model)
    _config(tie_word_embeddings=True)(model)
    sd = load_file(str(model / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # some writers store a tied head twice
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})
    rc, out, err = run(["eval", model, "--seqlen", "16", "--windows", "1"], capsys)
    assert rc == 0 and float(out) > 1.0, err


# ---------------------------------------------------------------- outputs against inputs (outputs.check_outputs)
def test_an_output_that_is_or_contains_its_input_is_refused_even_with_force(source, good, tmp_path, capsys):
    parent = tmp_path / "parent"
    shutil.copytree(source, parent / "model")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good, ckpt)
    before = {p: _snapshot(p) for p in (parent, ckpt)}
    cases = [
        ("compress", [parent / "model", "-o", parent / "model", "--force", *FAST], "is the input"),
        ("compress", [parent / "model", "-o", parent, "--force", *FAST], "contains the input"),
        ("compress", [parent / "model", "-o", parent / "model" / "sub", *FAST], "lies inside the input"),
        ("export", [ckpt, "-o", ckpt, "--force"], "is the input"),
        ("finetune", [ckpt, "-o", ckpt, "--force", "--steps", "1"], "is the input"),
        ("info", [ckpt, "--json", ckpt / "info.json"], "lies inside the input"),
        ("eval", [ckpt, "--json", ckpt / "config.json"], "lies inside the input"),
    ]
    for command, args, message in cases:
        rc, _, err = run([command, *args], capsys)
        assert rc == 2 and message in one_error_line(err, command), (command, args, err)
    assert {p: _snapshot(p) for p in (parent, ckpt)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "parent"]


@pytest.mark.parametrize("out", ["", ".", ".."])
def test_an_output_without_a_name_of_its_own_is_one_line(source, good, tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    for command, args in (("compress", [source, "-o", out, *FAST]), ("export", [good, "-o", out]),
                          ("info", [good, "--json", out])):
        rc, _, err = run([command, *args], capsys)
        assert rc == 2 and "names no file or folder of its own" in one_error_line(err, command), (command, err)
    assert list(tmp_path.iterdir()) == []


def _output_file_cases(tmp_path, source, good, export):
    onnx = export / "model.onnx"
    return [
        ("compress", [source, "-o", tmp_path / "out", *FAST], "--json"),
        ("export", [good, "-o", tmp_path / "out", "--dtype", "fp32"], "--json"),
        ("verify", [onnx, "--reference", good], "--json"),
        ("verify", [onnx, "--reference", good], "--save-inputs"),
        ("verify", [onnx, "--reference", good], "--save-outputs"),
        ("lint", [onnx], "--json"),
        ("info", [good], "--json"),
        ("eval", [good, "--seqlen", "16", "--windows", "1"], "--json"),
        ("generate", [export, "hello", "--max-new-tokens", "1"], "--json"),
    ]


@pytest.mark.parametrize("bad", ["missing_parent", "directory"])
def test_output_files_are_checked_before_any_work(source, good, tmp_path, capsys, monkeypatch, bad):
    import slim_trt.checkpoint.format
    import slim_trt.models.source

    export = build_toy_export(tmp_path / "export")
    monkeypatch.setattr(slim_trt.models.source, "load_model", lambda *a, **k: pytest.fail("loaded a model first"))
    monkeypatch.setattr(slim_trt.checkpoint.format, "verify_checkpoint", lambda *a, **k: pytest.fail("read a checkpoint"))
    target = tmp_path / "no" / "such" / "r.json" if bad == "missing_parent" else tmp_path / "adir"
    (tmp_path / "adir").mkdir()
    for command, args, flag in _output_file_cases(tmp_path, source, good, export):
        rc, out, err = run([command, *args, flag, target], capsys)
        line = one_error_line(err, command)
        assert rc == 2 and line.startswith(f"slim-trt {command}: error: {flag} {target}"), (command, flag, err)
        assert ("does not exist" if bad == "missing_parent" else "is a folder") in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------- tampered exports (triton.export_info gate)
def _truncated_onnx(folder):
    f = folder / "model.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


EXPORT_TAMPER = {
    "truncated_onnx": (_truncated_onnx, "model.onnx is not an ONNX file"),
    "empty_onnx": (lambda f: (f / "model.onnx").write_bytes(b""), "model.onnx is not an ONNX model (empty graph)"),
    "tokenizer_json": (lambda f: (f / "tokenizer" / "tokenizer.json").write_text("{ not json"),
                       "tokenizer.json is not valid JSON"),
    "sidecar_json": (lambda f: (f / "slim_export.json").write_text("{ not json"), "slim_export.json is not valid JSON"),
    "sidecar_dir": (lambda f: ((f / "slim_export.json").unlink(), (f / "slim_export.json").mkdir()),
                    "slim_export.json is not a file"),
}


@pytest.mark.parametrize("kind", sorted(EXPORT_TAMPER))
def test_every_reader_of_an_export_refuses_a_tampered_one(good, tmp_path, capsys, kind):
    export = build_toy_export(tmp_path / "export")
    damage, message = EXPORT_TAMPER[kind]
    damage(export)
    for command, args in (("generate", [export, "hello", "--max-new-tokens", "1"]),
                          ("lint", [export / "model.onnx"]),
                          ("verify", [export / "model.onnx", "--reference", good]),
                          ("deploy", ["triton", export, "-o", tmp_path / "repo"]),
                          ("deploy", ["jetson", export, "-o", tmp_path / "bundle"])):
        rc, _, err = run([command, *args], capsys)
        assert rc == 2 and message in one_error_line(err, command), (command, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_lint_of_a_folder_names_the_model_inside(tmp_path, capsys):
    export = build_toy_export(tmp_path / "export")
    rc, _, err = run(["lint", export], capsys)
    assert rc == 2 and f"is a folder: give the model.onnx inside it ({export / 'model.onnx'})" in err


def test_generate_refuses_negative_threads(tmp_path, capsys):
    rc, _, err = run(["generate", build_toy_export(tmp_path / "e"), "hi", "--threads", "-2"], capsys)
    assert rc == 2 and "bad --threads -2" in one_error_line(err, "generate")


# ---------------------------------------------------------------- --nsamples bounded up front
def test_nsamples_beyond_the_text_or_the_memory_is_refused_before_the_run(source, tmp_path, capsys, monkeypatch):
    import slim_trt.compression.compressor as C
    import slim_trt.resources

    monkeypatch.setattr(C, "compress", lambda *a, **k: pytest.fail("compression started"))
    args = ["compress", source, "-o", tmp_path / "out", "--seqlen", "16", "-q"]
    rc, _, err = run([*args, "--nsamples", "100000000"], capsys)
    assert rc == 2 and "--nsamples 100000000 is more windows than the calibration text has" in \
        one_error_line(err, "compress")
    # 64 hidden units x 20 bytes x 16 tokens = 20 KiB per window (the defaults carry the dense model's hidden states
    # beside the compressed ones: 12 bytes without the dense target): 1000 windows need 19.5 MiB, more than 10 MiB
    monkeypatch.setattr(slim_trt.resources, "available_memory_bytes", lambda: 10 << 20)
    rc, _, err = run([*args, "--nsamples", "1000"], capsys)
    line = one_error_line(err, "compress")
    assert rc == 2 and "--nsamples 1000 x --seqlen 16 needs 0.0 GiB" in line and "use --nsamples <= 512" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- Ctrl-C
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_inside_a_finalizer_is_not_swallowed(monkeypatch, capsys):
    """Python prints a KeyboardInterrupt raised in a __del__ as "Exception ignored" and goes on: the command
    then ends as a success although the user asked it to stop."""
    import slim_trt.cli.info as info

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    def run_info(args):
        Finalized()  # collected at once: the interrupt is raised (and lost) inside its __del__
        return 0

    monkeypatch.setattr(info, "run", run_info)
    # A job started in the background by a non-interactive shell (nohup, `&`, some CI runners) inherits SIGINT
    # ignored, and then the signal never arrives: give the test Python's own handler, as an interactive run has.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc, out, err = run(["info", "x"], capsys)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 130 and err.splitlines()[-1] == "slim-trt info: interrupted"


def test_ctrl_c_while_the_parser_imports_is_one_line(monkeypatch, capsys):
    import slim_trt.cli as cli

    def interrupted_import():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted_import)
    rc, out, err = run(["compress", "x"], capsys)
    assert rc == 130 and err == "slim-trt compress: interrupted\n"


def test_a_source_without_a_tokenizer_is_one_whole_line(source, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(source, model)
    for f in model.glob("tokenizer*"):
        f.unlink()
    (model / "special_tokens_map.json").unlink(missing_ok=True)
    for extra in ([], ["--no-stream"]):
        rc, _, err = run(["compress", model, "-o", tmp_path / "out", *FAST, *extra], capsys)
        assert rc == 2 and one_error_line(err, "compress").endswith(
            "has no usable tokenizer (ValueError): copy the model's tokenizer files (tokenizer.json, "
            "tokenizer_config.json, ...) into the folder"), err


def test_build_refuses_to_write_the_engine_over_its_model(tmp_path, capsys):
    export = build_toy_export(tmp_path / "export")
    before = (export / "model.onnx").read_bytes()
    rc, _, err = run(["build", export / "model.onnx", "-o", export / "model.onnx", "--force"], capsys)
    assert rc == 2 and "is the input" in one_error_line(err, "build")
    assert (export / "model.onnx").read_bytes() == before
