"""MODEL resolution: folders, .gguf files, hub ids (unreachable here), the embedded default."""
import pytest

from slim_trt.errors import SlimError
from slim_trt.models import EMBEDDED_DEFAULT, load_model, resolve


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
