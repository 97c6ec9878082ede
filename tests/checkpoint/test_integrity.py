"""Every byte that decides a loaded checkpoint is covered by a checksum that load() verifies, and a folder that
is not a complete checkpoint is never loaded as something else (issue 11)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from slim_trt.checkpoint.format import MANIFEST, load, read_manifest, verify_checkpoint
from slim_trt.errors import SlimError
from tests.exporter.conftest import save_compressed_checkpoint
from tests.tampering import TAMPER, edit_json, tampered


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_compressed_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", "llama")


@pytest.mark.parametrize("kind", sorted(TAMPER))
def test_every_tampering_is_refused_by_load(good, tmp_path, kind):
    bad = tampered(good, tmp_path, kind)
    with pytest.raises(SlimError) as e:
        load(bad)
    assert TAMPER[kind][1] in str(e.value) and "\n" not in str(e.value)


def test_a_good_checkpoint_loads_and_notes_or_a_reindented_manifest_do_not_matter(good, tmp_path):
    ok = tmp_path / "ok"
    shutil.copytree(good, ok)
    (ok / "README.md").write_text("my notes")  # nothing transformers reads
    (ok / ".DS_Store").write_bytes(b"\0\1")
    edit_json(ok / MANIFEST, lambda m: None)  # same content, other layout
    m = verify_checkpoint(ok)
    assert m == read_manifest(good)
    x = torch.randint(0, 256, (1, 9))
    assert torch.equal(load(ok)(x).logits, load(good)(x).logits)


def test_manifest_checksum_covers_fields_added_later(good, tmp_path):
    """A field the manifest gains later (e.g. activation scales) is covered without naming it anywhere."""
    from slim_trt.checkpoint.format import content_sha256

    m = read_manifest(good)
    m2 = dict(m, activation_scales={"model.layers.0.mlp.up_proj": 0.5})
    m2["content_sha256"] = content_sha256(m2)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / MANIFEST).write_text(json.dumps(m2))
    assert verify_checkpoint(bad)["activation_scales"] == {"model.layers.0.mlp.up_proj": 0.5}
    edit_json(bad / MANIFEST, lambda d: d["activation_scales"].update({"model.layers.0.mlp.up_proj": 5.0}))
    with pytest.raises(SlimError, match="was edited or is corrupt"):
        read_manifest(bad)


def test_a_checkpoint_is_never_loaded_as_a_plain_model(good, tmp_path):
    """With or without its manifest, a checkpoint folder given where a Hugging Face model is expected is refused:
    transformers would load it with every compressed layer randomly initialised."""
    from slim_trt.models.source import load_model

    with pytest.raises(SlimError, match="is a slim-trt checkpoint, not a Hugging Face model"):
        load_model(str(good))
    bad = tampered(good, tmp_path, "no_manifest")
    with pytest.raises(SlimError, match="incomplete or damaged checkpoint"):
        load_model(str(bad))
