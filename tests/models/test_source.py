"""MODEL resolution: folders, .gguf files, hub ids (unreachable here), the embedded default."""
from pathlib import Path

import pytest

from slim_trt.errors import SlimError
from slim_trt.models.source import EMBEDDED_DEFAULT, load_model, resolve


def test_resolve_kinds(tiny_model_dir, tmp_path):
    assert resolve(str(tiny_model_dir)).kind == "folder"
    assert resolve(EMBEDDED_DEFAULT).kind == "embedded"
    assert resolve("some-org/some-model").kind == "hub"
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert resolve(str(g)).kind == "gguf"


@pytest.mark.parametrize("ref,needle", [("./nope", "no such model folder"), ("/x/y/z", "no such model folder"),
                                        ("missing.gguf", "no such .gguf file")])
def test_resolve_errors(ref, needle):
    with pytest.raises(SlimError, match=needle):
        resolve(ref)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(SlimError, match="no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(SlimError, match="is a file"):
        resolve(str(tmp_path / "f.txt"))


def test_hub_is_unreachable_says_so():
    with pytest.raises(SlimError, match="hub"):
        load_model("slim-trt-test/definitely-not-cached")


def test_bad_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIM_TRT_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "broken.gguf"
    g.write_bytes(b"not a gguf file at all")
    with pytest.raises(SlimError, match="GGUF"):
        load_model(str(g))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "opt", "mistral"])
def test_seqlen_beyond_the_positions_is_refused_for_every_family(family):
    """Issue 11: OPT's learned positions failed with an IndexError, rotary families ran silently past the range."""
    import transformers as tf

    from slim_trt.models.source import check_seqlen
    from tests.conftest import tiny_config

    config = tf.MistralConfig(max_position_embeddings=256) if family == "mistral" else tiny_config(family)
    check_seqlen(config, 256)
    with pytest.raises(SlimError, match=r"--seqlen = 257 tokens is beyond the model's 256 positions .*"
                                        r"use --seqlen <= 256"):
        check_seqlen(config, 257)


def test_a_multimodal_config_uses_its_text_positions():
    import transformers as tf

    from slim_trt.models.source import max_positions

    text = tf.Gemma3TextConfig(max_position_embeddings=512)
    assert max_positions(tf.Gemma3Config(text_config=text.to_dict())) == 512


def test_two_conversions_at_once_convert_once_and_share_the_folder(tmp_path, monkeypatch):
    """Two commands started together on a fresh machine: the second waits for the first's folder instead of
    converting again and failing to rename onto it."""
    import threading
    import time

    import transformers

    from slim_trt.models.source import gguf_to_folder
    from tests.conftest import tiny_model

    monkeypatch.setenv("SLIM_TRT_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF stand-in")
    loads = []

    class Tok:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    def slow_model(*_a, **_k):
        loads.append(1)
        time.sleep(0.5)  # the window in which the other command arrives
        return tiny_model("llama")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", slow_model)
    results, errors = [], []

    def convert():
        try:
            results.append(gguf_to_folder(g, progress=False))
        except Exception as e:  # noqa: BLE001 - the test reports whatever either thread raised
            errors.append(e)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(loads) == 1
    assert results[0] == results[1] and (results[0] / "config.json").exists()
    assert [p.name for p in results[0].parent.iterdir() if ".tmp-" in p.name] == []
