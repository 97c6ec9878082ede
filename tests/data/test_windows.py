import pytest
import torch

from slim_trt.data.windows import calibration_windows, eval_windows, load_text
from slim_trt.errors import SlimError
from tests.conftest import tiny_tokenizer


def test_shipped_text_and_windows():
    tok = tiny_tokenizer()
    text = load_text(None)
    w = calibration_windows(tok, text, nsamples=6, seqlen=40, seed=3)
    assert w.shape == (6, 40)
    assert (w[:, 0] == tok.bos_token_id).all()
    assert torch.equal(w, calibration_windows(tok, text, 6, 40, seed=3))  # deterministic
    assert not torch.equal(w, calibration_windows(tok, text, 6, 40, seed=4))


def test_eval_windows_are_consecutive():
    tok = tiny_tokenizer()
    text = load_text(None, default="eval_sample.txt")
    w = eval_windows(tok, text, 16, limit=3)
    assert w.shape == (3, 16)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert w[1, 1:].tolist() == ids[16:31]


def test_bad_text_sources(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SlimError, match="empty"):
        load_text(str(empty))
    with pytest.raises(SlimError, match="no such text file"):
        load_text(str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    with pytest.raises(SlimError, match="fewer than --seqlen"):
        calibration_windows(tiny_tokenizer(), load_text(str(short)), 2, 64)


@pytest.mark.parametrize("content, message", [
    (b"text\x00more text", "a NUL byte at offset 4"),
    ("caf\u00e9 au lait".encode("latin-1"), "byte 0xe9 at offset 3"),
    ("some text".encode("utf-16"), "UTF-16"),
])
def test_binary_or_non_utf8_files_are_refused(tmp_path, content, message):
    """Issue 11: a binary file was decoded with replacement characters and calibrated on without a word."""
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    with pytest.raises(SlimError, match=message):
        load_text(str(f))


def test_utf8_with_a_byte_order_mark_is_text(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_bytes("\ufeffcaf\u00e9 au lait".encode("utf-8"))
    assert load_text(str(f)) == "caf\u00e9 au lait"
