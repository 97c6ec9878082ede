"""The decode loop and request checks that the Triton models run (slim_trt/runtime/decoder.py), in this process."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from slim_trt.runtime import decoder as rt
from tests.triton.toy_export import (
    EOS_ID,
    MAX_POS,
    build_toy_export,
    prompt_of,
    toy_model,
)


@pytest.fixture(scope="module")
def toy_export(tmp_path_factory):
    return build_toy_export(tmp_path_factory.mktemp("export") / "toy")


@pytest.fixture(scope="module")
def decoder(toy_export):
    return rt.OnnxDecoder.from_folder(toy_export)


@pytest.fixture(scope="module")
def tokenizer(toy_export):
    return rt.load_tokenizer(toy_export / "tokenizer")


def naive_greedy(model_bytes: bytes, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence at every step (an independent reference)."""
    session = ort.InferenceSession(model_bytes)
    seq, out = list(prompt), []
    for _ in range(steps):
        n = len(seq)
        logits = session.run(["logits"], {"input_ids": np.array([seq], dtype=np.int64),
                                          "attention_mask": np.ones((1, n), dtype=np.int64),
                                          "position_ids": np.arange(n, dtype=np.int64)[None]})[0]
        token = int(np.argmax(logits[0, -1]))
        out.append(token)
        seq.append(token)
    return out


def test_cached_decoding_equals_full_recompute(decoder):
    prompt = [2, 10, 20, 30, 11]
    gen = rt.generate_ids(decoder, prompt, 20)
    reference = naive_greedy(toy_model(with_cache=False).SerializeToString(), prompt, 20)
    assert gen.token_ids == reference
    assert len(set(reference)) >= 3  # the toy model does not collapse onto one token


class _NumpyOnly:
    """The same session behind the plain Decoder protocol (run() only): the cache goes through numpy."""

    def __init__(self, decoder):
        self.spec, self.run = decoder.spec, decoder.run


@pytest.mark.parametrize("batch", [1, 3])
def test_the_loop_keeps_the_cache_in_onnxruntime_values_with_the_same_numbers(decoder, batch, monkeypatch):
    seen = []
    original = rt.OnnxDecoder.run_keeping_cache

    def spy(self, feeds):
        seen.append({k: type(v).__name__ for k, v in feeds.items() if k.startswith("past_key_values")})
        return original(self, feeds)

    monkeypatch.setattr(rt.OnnxDecoder, "run_keeping_cache", spy)
    prompts = [[2, 10, 20, 30, 11], [2, 7], [2, 5, 6]][:batch]
    kept = rt.generate_batch(decoder, prompts, 12)
    plain = rt.generate_batch(_NumpyOnly(decoder), prompts, 12)
    assert [g.token_ids for g in kept] == [g.token_ids for g in plain]
    # the first step feeds the empty numpy cache; every later one the OrtValues the previous step wrote
    assert len(seen) == 12 and set(seen[0].values()) == {"ndarray"}
    assert all(set(s.values()) == {"OrtValue"} for s in seen[1:])
    # one step's outputs: the logits numpy, bit-identical to run()'s; the cache the same numbers
    spec = decoder.spec
    feeds = {"input_ids": np.array([prompts[0]], np.int64), "attention_mask": np.ones((1, len(prompts[0])), np.int64),
             "position_ids": np.arange(len(prompts[0]), dtype=np.int64)[None]}
    feeds.update({n: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32) for n in spec.past_names})
    a, b = original(decoder, feeds), decoder.run(feeds)
    assert isinstance(a["logits"], np.ndarray) and np.array_equal(a["logits"], b["logits"])
    assert all(np.array_equal(a[n].numpy(), b[n]) for n in spec.present_names)


def test_no_cache_export_decodes_the_same(decoder, tmp_path):
    no_cache = rt.OnnxDecoder.from_folder(build_toy_export(tmp_path / "nc", with_cache=False, tokenizer=False))
    assert not no_cache.spec.past_names
    prompt = [2, 5, 6, 7]
    assert rt.generate_ids(no_cache, prompt, 12).token_ids == rt.generate_ids(decoder, prompt, 12).token_ids


def test_fp16_cache_export_runs(tmp_path):
    fp16 = rt.OnnxDecoder.from_folder(build_toy_export(tmp_path / "fp16", dtype="float16", tokenizer=False))
    assert fp16.spec.input("past_key_values.0.key").dtype == "float16"
    gen = rt.generate_ids(fp16, [2, 5, 6, 7], 8)
    assert len(gen.token_ids) == 8 and all(0 <= t < fp16.spec.vocab_size for t in gen.token_ids)


def test_generate_text_encodes_with_bos_and_decodes(decoder, tokenizer):
    text, gen = rt.generate_text(decoder, tokenizer, prompt_of(4), 6)
    assert gen.prompt_ids[0] == tokenizer.bos_token_id and len(gen.prompt_ids) == 5
    assert len(gen.token_ids) == 6
    assert text == tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    assert len(text.split()) == 6  # six generated words, no special token in the text


def test_sampling_is_reproducible_and_top_k_1_is_greedy(decoder):
    prompt = [2, 10, 11, 12]
    greedy = rt.generate_ids(decoder, prompt, 10).token_ids
    top1 = rt.generate_ids(decoder, prompt, 10, sampling=rt.Sampling(temperature=1.0, top_k=1, seed=3)).token_ids
    assert top1 == greedy
    hot = rt.Sampling(temperature=5.0, seed=7)
    a = rt.generate_ids(decoder, prompt, 10, sampling=hot).token_ids
    b = rt.generate_ids(decoder, prompt, 10, sampling=hot).token_ids
    c = rt.generate_ids(decoder, prompt, 10, sampling=rt.Sampling(temperature=5.0, seed=8)).token_ids
    assert a == b and a != c


def test_greedy_pick_on_fp16_logits_is_the_fp16_argmax_ties_included():
    g = np.random.default_rng(0)
    for _ in range(20):
        logits = g.standard_normal(4099).astype(np.float16)
        logits[g.integers(0, 4099, 3)] = logits.max()  # ties: the first index wins, as on the fp16 values
        assert rt.pick_token(logits, rt.Sampling(), g) == int(np.argmax(logits))
    assert rt.pick_token(np.array([-np.inf, np.float16(65504), 1.0], np.float16), rt.Sampling(), g) == 1


def test_pick_token_top_p_keeps_the_smallest_prefix():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    picks = {rt.pick_token(logits, rt.Sampling(temperature=1.0, top_p=0.7), rng) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


def test_stops_on_eos(decoder):
    spec = decoder.spec

    class EosAfterTwo:
        def __init__(self):
            self.spec, self.calls = spec, 0

        def run(self, feeds):
            self.calls += 1
            logits = np.zeros((1, feeds["input_ids"].shape[1], spec.vocab_size), dtype=np.float32)
            logits[0, -1, EOS_ID if self.calls == 3 else 10 + self.calls] = 1.0
            present = {q: np.zeros((1, spec.num_kv_heads, feeds["attention_mask"].shape[1], spec.head_dim),
                                   np.float32) for q in spec.present_names}
            return {"logits": logits, **present}

    gen = rt.generate_ids(EosAfterTwo(), [2, 4], 10, eos_token_ids=[EOS_ID])
    assert gen.token_ids == [11, 12, EOS_ID] and gen.stopped_on_eos


@pytest.mark.parametrize("prompt, steps, message", [
    ([], 4, "empty prompt"),
    ([2] * (MAX_POS - 3), 4, f"limit of {MAX_POS} positions"),
    ([2, 999], 4, "token ids must be in [0, 64)"),
    ([2, 3], -1, "max_new_tokens must be >= 0"),
])
def test_bad_generation_requests(decoder, prompt, steps, message):
    with pytest.raises(rt.RequestError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        rt.generate_ids(decoder, prompt, steps)


def test_empty_prompt_text_is_rejected(tokenizer):
    with pytest.raises(rt.RequestError, match="empty prompt"):
        rt.encode_prompt(tokenizer, "")


def feeds_for(spec, batch=1, seq=3, past=2):
    feeds = {"input_ids": np.full((batch, seq), 5, dtype=np.int64),
             "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
             "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))}
    for name in spec.past_names:
        feeds[name] = np.zeros((batch, spec.num_kv_heads, past, spec.head_dim), dtype=np.float32)
    return feeds


def test_check_feeds_accepts_a_consistent_request(decoder):
    rt.check_feeds(decoder.spec, feeds_for(decoder.spec, batch=2))


@pytest.mark.parametrize("change, message", [
    (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "input_ids has dtype int32, expected int64"),
    (lambda f: f.update(attention_mask=np.ones((1, 4), np.int64)), "attention_mask has length 4, expected"),
    (lambda f: f.update(input_ids=np.full((1, 3), 64, np.int64)), r"input_ids must be in \[0, 64\)"),
    (lambda f: f.pop("position_ids"), "missing input"),
    (lambda f: f.update({"past_key_values.0.key": np.zeros((1, 3, 2, 4), np.float32)}),
     "past_key_values.0.key has size 3 on axis 1, expected 2"),
    (lambda f: f.update({"past_key_values.1.value": np.zeros((1, 2, 1, 4), np.float32)}), "past length 1"),
    (lambda f: f.update(position_ids=np.zeros((1, 2), np.int64)), "position_ids has shape"),
    # issue 25: out-of-range positions changed the logits without an error (Triton answered 200)
    (lambda f: f.update(position_ids=np.full(f["position_ids"].shape, 100000, np.int64)),
     r"position_ids must be in \[0, "),
    (lambda f: f.update(position_ids=np.full(f["position_ids"].shape, -3, np.int64)), r"position_ids must be in"),
])
def test_check_feeds_names_the_problem(decoder, change, message):
    feeds = feeds_for(decoder.spec)
    change(feeds)
    with pytest.raises(rt.RequestError, match=message):
        rt.check_feeds(decoder.spec, feeds)


def test_manifest_errors_name_the_field(toy_export):
    import json

    raw = json.loads((toy_export / "slim_export.json").read_text())
    for key, message in (("num_layers", "no 'num_layers'"), ("inputs", "no 'inputs'")):
        broken = {k: v for k, v in raw.items() if k != key}
        with pytest.raises(ValueError, match=message):
            rt.DecoderSpec.from_manifest(broken)
    broken = dict(raw, inputs=[t for t in raw["inputs"] if t["name"] != "past_key_values.1.value"])
    with pytest.raises(ValueError, match="past_key_values.1.value is missing"):
        rt.DecoderSpec.from_manifest(broken)


def _request(**fields):
    arrays = {"prompt": np.array([b"the"], dtype=np.object_), "max_new_tokens": np.array([4], np.int32)}
    arrays.update({k: v if v is None else np.asarray(v) for k, v in fields.items()})
    return arrays


def test_generate_request_fields_and_defaults():
    req = rt.GenerateRequest.parse(_request(max_new_tokens=None, seed=np.array([7], np.int64)), 9)
    assert (req.prompt, req.max_new_tokens, req.sampling) == ("the", 9, rt.Sampling(seed=7))
    req = rt.GenerateRequest.parse(_request(temperature=np.array([0.5], np.float32), top_k=np.array([3], np.int32),
                                            top_p=np.array([0.75], np.float32)), 9)
    assert req.sampling == rt.Sampling(temperature=0.5, top_k=3, top_p=0.75)


@pytest.mark.parametrize("fields, message", [
    (dict(prompt=None), "prompt is missing: send an input named 'prompt' of type BYTES"),
    (dict(prompt=np.array([b""], dtype=np.object_)), "empty prompt"),
    (dict(prompt=np.array([b"a", b"b"], dtype=np.object_)), "prompt must hold one value, got 2"),
    (dict(prompt=np.array([b"\xff\xfe"], dtype=np.object_)), "prompt is not valid UTF-8"),
    (dict(seed=np.array([-1], np.int64)), r"seed must be in \[0, 2\^63\), got -1"),
    (dict(max_new_tokens=np.array([-2], np.int32)), "max_new_tokens must be >= 0, got -2"),
    (dict(max_new_tokens=np.array([1.5], np.float32)), "max_new_tokens must be an integer"),
    (dict(top_k=np.array([-1], np.int32)), "top_k must be >= 0"),
    (dict(top_p=np.array([np.nan], np.float32)), r"top_p must be in \(0, 1\]"),
    (dict(temperature=np.array([np.inf], np.float32)), "temperature must be >= 0"),
    (dict(temperature=np.array([1.0, 2.0], np.float32)), "temperature must hold one value, got 2"),
])
def test_generate_request_errors_name_the_field(fields, message):
    with pytest.raises(rt.RequestError, match=message):
        rt.GenerateRequest.parse(_request(**fields), 9)


def test_the_triton_config_declares_the_request_fields():
    from slim_trt.triton import configs

    assert [(n, optional) for n, _, optional in configs.GENERATE_INPUTS] == [
        ("prompt", False), ("max_new_tokens", True), ("temperature", True), ("top_k", True), ("top_p", True),
        ("seed", True)]


# ---------------------------------------------------------------------------------------------------------------
# the CPU features that decide a W8A8 session
# ---------------------------------------------------------------------------------------------------------------

EPYC_ROME = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 ssse3 fma avx avx2 bmi2 sha_ni\n"
SAPPHIRE_RAPIDS = ("processor\t: 0\nflags\t\t: sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 "
                   "amx_tile amx_int8\n")
ORIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp\n"


@pytest.mark.parametrize("cpuinfo,machine,features,form", [
    (EPYC_ROME, "x86_64", ("x86_64", "avx2"), "u8u8"),
    (SAPPHIRE_RAPIDS, "x86_64", ("x86_64", "avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"), "u8s8"),
    ("flags : avx2 avx_vnni\n", "AMD64", ("x86_64", "avx2", "avx_vnni"), "u8s8"),  # Alder Lake: AVX-VNNI only
    (ORIN, "aarch64", ("arm64", "asimddp"), "u8u8"),
    ("", "x86_64", ("x86_64",), "u8u8"),  # no /proc/cpuinfo (macOS, Windows): nothing assumed, the safe form
    ("flags : avx512_vnni\n", "riscv64", ("riscv64",), "u8u8"),
])
def test_cpu_features_decide_the_w8a8_form(cpuinfo, machine, features, form, monkeypatch):
    monkeypatch.delenv(rt.W8A8_FORM_ENV, raising=False)
    assert rt.cpu_features(cpuinfo, machine) == features
    choice = rt.cpu_choice(features=features)
    assert choice.w8a8_form == form and choice.to_dict()["cpu_features"] == list(features)
    assert choice.describe().startswith(f"CPU {' '.join(features)}: W8A8 GEMMs {form}")


def test_the_w8a8_form_can_be_forced(monkeypatch):
    monkeypatch.delenv(rt.W8A8_FORM_ENV, raising=False)
    assert rt.cpu_choice("u8s8", features=("x86_64", "avx2")).w8a8_form == "u8s8"
    monkeypatch.setenv(rt.W8A8_FORM_ENV, "u8u8")
    choice = rt.cpu_choice(features=("x86_64", "amx_int8"))
    assert choice.w8a8_form == "u8u8" and rt.W8A8_FORM_ENV in choice.reason
    assert rt.cpu_choice("u8s8", features=("x86_64",)).w8a8_form == "u8s8"  # the caller's over the environment
    monkeypatch.setenv(rt.W8A8_FORM_ENV, "int8")
    with pytest.raises(ValueError, match="u8u8, u8s8"):
        rt.cpu_choice()


def test_this_machine_reports_its_architecture():
    import platform

    arch = rt.cpu_features()[0]
    assert arch == {"amd64": "x86_64", "aarch64": "arm64"}.get(platform.machine().lower(), platform.machine().lower())
