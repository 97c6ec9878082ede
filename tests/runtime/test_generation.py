"""slim_trt.Generator: the Triton model's runtime in this process, batched, with timings."""
from __future__ import annotations

import pytest

from slim_trt.errors import SlimError
from slim_trt.exporter import export
from slim_trt.runtime.generation import Generator, generate
from tests.exporter.conftest import save_compressed_checkpoint

PROMPTS = ["the city of the", "in the early years of the first", "he was"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    ckpt = save_compressed_checkpoint(root / "ckpt", "llama")
    export(ckpt, root / "e", dtype="fp32", head="int4", progress=False)
    return root / "e"


@pytest.fixture(scope="module")
def generator(exported):
    return Generator(exported)


def test_batched_greedy_equals_one_at_a_time(generator):
    alone = [generator.generate(p, 12) for p in PROMPTS]
    batch = generator.generate(PROMPTS, 12)  # different lengths: left-padded and masked
    assert batch.token_ids == [r.token_ids[0] for r in alone]
    assert batch.texts == [r.texts[0] for r in alone]
    assert len(set(batch.token_ids[0])) >= 3  # the tiny model does not collapse onto one token
    t = batch.timing
    assert t.batch == 3 and t.prompt_tokens == max(batch.prompt_tokens) and t.decode_steps == 11
    assert t.prefill_seconds > 0 and t.decode_tokens_per_second > 0
    assert t.to_dict()["decode_tokens_per_second"] == pytest.approx(3 * 11 / t.decode_seconds)


def test_sampling_is_seeded(generator):
    a = generator.generate(PROMPTS[0], 10, temperature=1.0, top_k=20, seed=3)
    b = generator.generate(PROMPTS[0], 10, temperature=1.0, top_k=20, seed=3)
    greedy = generator.generate(PROMPTS[0], 10)
    assert a.token_ids == b.token_ids != greedy.token_ids


def test_plain_arithmetic_generates_the_same_text(exported, generator):
    assert Generator(exported, fuse=False).generate(PROMPTS[1], 10).texts == generator.generate(PROMPTS[1], 10).texts


def test_bad_requests_are_user_errors(generator, exported, tmp_path):
    with pytest.raises(SlimError, match="empty prompt"):
        generator.generate("", 4)
    with pytest.raises(SlimError, match="over the model's limit of 256 positions"):
        generator.generate(" ".join(["the"] * 250), 10)
    with pytest.raises(SlimError, match="temperature must be >= 0"):
        generator.generate("the", 4, temperature=-1)
    with pytest.raises(SlimError, match="has no slim_export.json"):
        generate(tmp_path, "the")
