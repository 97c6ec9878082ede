"""Issue 11's bad input and tampering, through the real command line: each case is one line naming the problem
and the fix, exit code 2, nothing written, and no tampered or incomplete model is ever loaded."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli as run, save_tiny_model, tiny_model, tiny_tokenizer
from tests.tampering import TAMPER, tampered

FAST = ["--nsamples", "2", "--seqlen", "16", "-q", "--refit-rounds", "0"]
ROOT = Path(__file__).resolve().parents[2]


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"slim-trt {command}: error: "), err
    return lines[0]


# ---------------------------------------------------------------- tampered checkpoints: info, eval, export
@pytest.mark.parametrize("kind", sorted(TAMPER))
def test_info_eval_export_refuse_a_tampered_checkpoint(good, tmp_path, capsys, kind):
    bad = tampered(good, tmp_path, kind)
    for command, extra in (("info", []), ("eval", ["--seqlen", "16", "--windows", "1"]),
                           ("export", ["-o", tmp_path / "export", "--dtype", "fp32"])):
        rc, out, err = run([command, bad, *extra], capsys)
        assert rc == 2, (command, out, err)
        assert TAMPER[kind][1] in one_error_line(err, command), (command, err)
        assert out == ""  # info printed nothing it would not load
    assert not (tmp_path / "export").exists()


def test_info_shows_what_it_verified(good, capsys):
    rc, out, _ = run(["info", good], capsys)
    assert rc == 0 and "6 files and the manifest match their sha256" in out.splitlines()[0]


# ---------------------------------------------------------------- broken source models
def _truncate(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_header(folder):
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"xxxxxxxxxx"
    f.write_bytes(bytes(data))


def _empty(folder):
    (folder / "model.safetensors").write_bytes(b"")


def _sizes(folder):
    import json

    c = json.loads((folder / "config.json").read_text())
    c["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(c))


def _missing_tensor(folder):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _pickle_only(folder):
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _slim_files_without_manifest(folder):
    (folder / "slim_layers.safetensors").write_bytes((folder / "model.safetensors").read_bytes())


BROKEN_SOURCES = {
    "truncated": (_truncate, "is not a readable safetensors file"),
    "corrupt_header": (_corrupt_header, "is not a readable safetensors file"),
    "empty": (_empty, "header too small"),
    "config_sizes": (_sizes, "config.json does not match the weights"),
    "missing_tensor": (_missing_tensor, "lack 1 tensor(s) the config needs (e.g. model.norm.weight)"),
    "pickle_only": (_pickle_only, "only pickle weights (pytorch_model.bin), which slim-trt never loads"),
    "slim_files": (_slim_files_without_manifest, "but no slim_manifest.json"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_SOURCES))
def test_compress_and_eval_refuse_a_broken_source_model(source, tmp_path, capsys, kind, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(source, model)
    damage, message = BROKEN_SOURCES[kind]
    damage(model)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled a file"))
    rc, _, err = run(["compress", model, "-o", tmp_path / "out", *FAST], capsys)
    assert rc == 2 and message in one_error_line(err, "compress")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    rc, _, err = run(["eval", model, "--seqlen", "16", "--windows", "1"], capsys)
    assert rc == 2 and message in one_error_line(err, "eval")


@pytest.mark.parametrize("tensor", ["model.norm.weight", "model.embed_tokens.weight",
                                    "model.layers.1.input_layernorm.weight", "lm_head.weight"])
def test_compress_refuses_nan_or_inf_in_any_weight(tmp_path, capsys, tensor, monkeypatch):
    import slim_trt.compression.compressor as C

    m = tiny_model("llama")
    with torch.no_grad():
        dict(m.named_parameters())[tensor].view(-1)[3] = float("inf") if "norm" in tensor else float("nan")
    m.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(C, "compress", lambda *a, **k: pytest.fail("compression started"))
    capsys.readouterr()  # transformers' own progress bars while saving the test model
    rc, _, err = run(["compress", tmp_path / "m", "-o", tmp_path / "out", *FAST], capsys)
    assert rc == 2 and f"NaN or Inf in {tensor} of the source model (1 of" in one_error_line(err, "compress")
    assert not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------- outputs checked up front
def test_compress_to_an_existing_file_fails_before_anything_runs(source, tmp_path, capsys, monkeypatch):
    import slim_trt.models.source

    target = tmp_path / "model.bin"
    target.write_text("not a folder")
    monkeypatch.setattr(slim_trt.models.source, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    rc, _, err = run(["compress", source, "-o", target, "--force", *FAST], capsys)
    assert rc == 2 and "exists and is not a folder" in one_error_line(err, "compress")
    assert target.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def _unprivileged() -> list[str]:
    """A command prefix under which a folder's missing write permission is enforced (root ignores it)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only folder cannot be made here")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def cli(args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([*kw.pop("prefix", []), sys.executable, "-m", "slim_trt", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def test_compress_and_export_into_a_read_only_folder(source, good, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for command, args in (("compress", [source, "-o", ro / "out", *FAST]), ("export", [good, "-o", ro / "e"])):
            r = cli([command, *args], prefix=_unprivileged())
            assert r.returncode == 2, r.stderr
            line = one_error_line(r.stderr, command)
            assert f"{ro} is not writable (Permission denied)" in line
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------- sequence length and text
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_seqlen_beyond_the_model_positions_is_refused(tmp_path, capsys, family):
    model = save_tiny_model(tmp_path / family, family)
    capsys.readouterr()  # transformers' own progress bars while saving the test model
    rc, _, err = run(["compress", model, "-o", tmp_path / "out", "--nsamples", "2", "--seqlen", "300", "-q"], capsys)
    assert rc == 2 and "--seqlen = 300 tokens is beyond the model's 256 positions" in one_error_line(err, "compress")
    assert not (tmp_path / "out.partial").exists()
    rc, _, err = run(["eval", model, "--seqlen", "257", "--windows", "1"], capsys)
    assert rc == 2 and "use --seqlen <= 256" in one_error_line(err, "eval")


@pytest.mark.parametrize("content", [b"\x00\x01\x02binary" * 500, "caf\u00e9 ".encode("latin-1") * 500,
                                     "some text ".encode("utf-16") * 500])
def test_binary_or_non_utf8_text_is_refused(source, tmp_path, capsys, content):
    data = tmp_path / "calib.dat"
    data.write_bytes(content)
    rc, _, err = run(["compress", source, "-o", tmp_path / "out", *FAST, "--calib", data], capsys)
    assert rc == 2 and f"{data} is not" in one_error_line(err, "compress")
    rc, _, err = run(["eval", source, "--data", data, "--seqlen", "16", "--windows", "1"], capsys)
    assert rc == 2 and "UTF-8" in one_error_line(err, "eval")


# ---------------------------------------------------------------- a reader that goes away
def test_a_closed_pipe_ends_quietly(good):
    """`slim-trt info CKPT | head -1`: the reader is gone before the command writes."""
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    # argparse itself swallows a failed write of --help (exit 0); a command's own output ends with 141
    for env, args, codes in ((buffered, ["info", good], {141}), (dict(buffered, PYTHONUNBUFFERED="1"), ["info", good],
                                                                 {141}), (buffered, ["lint", "--help"], {0, 141})):
        env = dict(env, PYTHONPATH=str(ROOT))
        p = subprocess.Popen([sys.executable, "-m", "slim_trt", *map(str, args)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        p.stdout.close()  # before the interpreter has even imported slim_trt
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) in codes and err == "", (args, err)
