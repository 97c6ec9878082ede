"""Ways to tamper with a saved checkpoint folder, each with what the one-line error must say (issue 11)."""
from __future__ import annotations

import json
import shutil

MANIFEST = "slim_manifest.json"


def edit_json(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d, indent=1))  # what a user's editor does: no checksum is recomputed


def _flip(path, where=-5):
    data = bytearray(path.read_bytes())
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def _manifest_dir(p):
    (p / MANIFEST).unlink()
    (p / MANIFEST).mkdir()


def _files_outside(p):
    """A manifest whose `files` names a file beside the checkpoint, with its digest recomputed (issue 25)."""
    from slim_trt.checkpoint.format import file_sha256, with_digest

    outside = p.parent / "outside.json"
    outside.write_text("{}")
    m = json.loads((p / MANIFEST).read_text())
    m.pop("content_sha256")
    m["files"]["../outside.json"] = file_sha256(outside)
    (p / MANIFEST).write_text(json.dumps(with_digest(m)))


def _first_layer(m):
    return m["layers"][next(iter(m["layers"]))]


# name -> (how the checkpoint folder is tampered with, what the one-line error says)
TAMPER = {
    "config_eps": (lambda p: edit_json(p / "config.json", lambda c: c.update(rms_norm_eps=0.1)),
                   "checksum mismatch for"),
    "config_act": (lambda p: edit_json(p / "config.json", lambda c: c.update(hidden_act="gelu")),
                   "config.json"),
    "generation_config": (lambda p: edit_json(p / "generation_config.json", lambda c: c.update(do_sample=True)),
                          "generation_config.json"),
    "tokenizer": (lambda p: (p / "tokenizer.json").write_text((p / "tokenizer.json").read_text().replace(
        '"<bos>"', '"<BOS>"', 1)), "tokenizer.json"),
    "manifest_tied": (lambda p: edit_json(p / MANIFEST, lambda m: m["tied"].update(
        {"lm_head.weight": "model.embed_tokens.weight"})), "was edited or is corrupt"),
    "manifest_rank": (lambda p: edit_json(p / MANIFEST, lambda m: _first_layer(m).update(rank=1)),
                      "was edited or is corrupt"),
    "manifest_bits": (lambda p: edit_json(p / MANIFEST, lambda m: _first_layer(m).update(bits=8)),
                      "was edited or is corrupt"),
    "manifest_architecture": (lambda p: edit_json(p / MANIFEST, lambda m: m.update(architecture="qwen2")),
                              "was edited or is corrupt"),
    "manifest_not_json": (lambda p: (p / MANIFEST).write_text("{ not json"), "not valid JSON"),
    "flipped_dense": (lambda p: _flip(p / "model.safetensors"), "model.safetensors"),
    "truncated_layers": (lambda p: (p / "slim_layers.safetensors").write_bytes(
        (p / "slim_layers.safetensors").read_bytes()[:1000]), "truncated"),
    "missing_layers": (lambda p: (p / "slim_layers.safetensors").unlink(), "is missing"),
    "extra_tokenizer_file": (lambda p: (p / "special_tokens_map.json").write_text('{"bos_token": "<eos>"}'),
                             "is not part of the checkpoint"),
    "no_manifest": (lambda p: (p / MANIFEST).unlink(), "no slim_manifest.json: the checkpoint is incomplete"),
    "manifest_dir": (_manifest_dir, "slim_manifest.json is not a file"),
    "manifest_files_outside": (_files_outside, "'../outside.json', which is outside the checkpoint folder"),
    "schema_string": (lambda p: edit_json(p / MANIFEST, lambda m: m.update(schema_version="2")),
                      "schema_version '2', which is not a whole number"),
    "older_schema": (lambda p: edit_json(p / MANIFEST, lambda m: (m.update(schema_version=1),
                                                                   m.pop("content_sha256"))),
                     "older slim-trt (checkpoint schema 1)"),
}


def tampered(good, tmp_path, kind):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    TAMPER[kind][0](bad)
    return bad
