"""Shared fixtures: tiny random models built from transformers configs (never the hub)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

FAMILIES = ("llama", "qwen2", "gemma3", "opt")


def tiny_config(family: str):
    """A 2-layer model of each supported family, small enough for a unit test (K multiple of 4 and of 16)."""
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "mistral":  # not in FAMILIES: LLaMA's layout, for the tests that name every supported family
        return tf.MistralConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "qwen2":
        return tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(intermediate_size=128, num_key_value_heads=1, head_dim=16,
                                   sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                   query_pre_attn_scalar=16, **common)
    if family == "opt":
        return tf.OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64,
                            tie_word_embeddings=False)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family))
    # Random init is tiny (std 0.02); scale weights up a little so activations are not all ~0.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(5.0)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def calib_windows(vocab: int = 256, n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def tiny_tokenizer(vocab_size: int = 256):
    """An offline word-level tokenizer over the shipped calibration text (most frequent words), with BOS/EOS."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from slim_trt.data.windows import SHIPPED_CALIB, shipped_text

    specials = ["<unk>", "<bos>", "<eos>", "<pad>"]
    words = Counter(shipped_text(SHIPPED_CALIB).split()).most_common(vocab_size - len(specials))
    vocab = {w: i for i, w in enumerate(specials + [w for w, _ in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def save_tiny_model(path, family: str = "llama", seed: int = 0):
    """A tiny random model + tokenizer saved as a Hugging Face folder (what a user passes as MODEL)."""
    model = tiny_model(family, seed)
    model.save_pretrained(path)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_model(tmp_path / "tiny-llama", "llama")


def run_cli(args, capsys):
    """Run `slim-trt ARGS` in process; return (exit code, stdout, stderr)."""
    from slim_trt.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def slim_2to4(**changes):
    """The best 2:4 recipe (`--preset slim-2to4`, bench row 24; the defaults until issue 14), with changes: what
    the tests of 2:4 sweeps, refit rounds and adapters were written against. The MLP channel permutation and the
    asymmetric calibration the preset gained with bench rows 65 and 79 stay off here (those tests compare layers
    with their own weights), and so do the 6 refit rounds of row 94 (3, as those tests were written and timed
    with); the preset as it is runs in tests/test_default_chain.py and the permutation tests."""
    from slim_trt.config import PRESETS, CompressConfig

    return CompressConfig(**{**PRESETS["slim-2to4"], "channel_permutation": "none", "dense_target": 0.0,
                             "refit_rounds": 3, **changes})
