"""Run an exported decoder with ONNX Runtime and generate text with its KV cache.

This module is deliberately standalone (numpy + onnxruntime; transformers only to load a tokenizer): `deploy`
copies it beside each python-backend model as `slim_runtime.py`, so a Triton repository keeps working without
slim_trt installed in the server's Python (except for `plugin` exports, whose LowRankAdd kernel for ONNX Runtime
comes from slim_trt.exporter). The same code is the local reference the tests compare the server to.

Request problems (an empty prompt, a prompt too long, a bad shape) raise `RequestError`; the Triton models turn
it into an INVALID_ARG response and keep serving.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

MANIFEST = "slim_export.json"


class RequestError(ValueError):
    """A bad request: the message names the problem and what a valid request looks like."""


# numpy dtype names used in slim_export.json -> numpy dtypes this runtime can exchange with ONNX Runtime.
_NUMPY_DTYPES = {name: np.dtype(name) for name in
                 ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")}


def numpy_dtype(name: str) -> np.dtype:
    try:
        return _NUMPY_DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} cannot be exchanged with ONNX Runtime through numpy") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, as in slim_export.json ("bfloat16" for bf16)
    shape: tuple  # ints for fixed axes, strings for named dynamic axes


@dataclass(frozen=True)
class DecoderSpec:
    """What the runtime needs from slim_export.json."""

    model_file: str
    with_cache: bool
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    custom_ops: tuple[dict, ...] = ()
    eos_token_ids: tuple[int, ...] = ()

    @staticmethod
    def from_manifest(d: dict) -> DecoderSpec:
        """Parse the manifest dict; raises ValueError naming the first missing or malformed field."""
        def need(key, kind):
            if key not in d:
                raise ValueError(f"slim_export.json has no {key!r}")
            if not isinstance(d[key], kind) or (kind is int and isinstance(d[key], bool)):
                raise ValueError(f"slim_export.json field {key!r} must be {kind.__name__}, got {d[key]!r}")
            return d[key]

        def tensors(key):
            specs = []
            for t in need(key, list):
                if not isinstance(t, dict) or not {"name", "dtype", "shape"} <= set(t):
                    raise ValueError(f"slim_export.json {key!r} entries need name, dtype and shape, got {t!r}")
                specs.append(TensorSpec(str(t["name"]), str(t["dtype"]), tuple(t["shape"])))
            return tuple(specs)

        eos = d.get("eos_token_id", d.get("eos_token_ids", ()))
        spec = DecoderSpec(
            model_file=need("model_file", str), with_cache=need("with_cache", bool),
            num_layers=need("num_layers", int), num_kv_heads=need("num_kv_heads", int),
            head_dim=need("head_dim", int), vocab_size=need("vocab_size", int),
            max_position_embeddings=need("max_position_embeddings", int),
            inputs=tensors("inputs"), outputs=tensors("outputs"),
            custom_ops=tuple(d.get("custom_ops") or ()),
            eos_token_ids=tuple(int(e) for e in ([eos] if isinstance(eos, int) else (eos or ()))),
        )
        names = spec.input_names
        for required in ("input_ids", "attention_mask"):
            if required not in names:
                raise ValueError(f"slim_export.json inputs have no {required!r} (found {', '.join(names)})")
        if "logits" not in spec.output_names:
            raise ValueError("slim_export.json outputs have no 'logits'")
        if spec.with_cache:
            for i in range(spec.num_layers):
                for kv in ("key", "value"):
                    if f"past_key_values.{i}.{kv}" not in names:
                        raise ValueError(f"with_cache is true but input past_key_values.{i}.{kv} is missing")
                    if f"present.{i}.{kv}" not in spec.output_names:
                        raise ValueError(f"with_cache is true but output present.{i}.{kv} is missing")
        return spec

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def uses_position_ids(self) -> bool:
        return "position_ids" in self.input_names

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")] \
            if self.with_cache else []

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")] \
            if self.with_cache else []


def read_manifest(folder: str | os.PathLike) -> tuple[DecoderSpec, dict]:
    raw = json.loads((Path(folder) / MANIFEST).read_text())
    return DecoderSpec.from_manifest(raw), raw


def make_session(model_path: str | os.PathLike, spec: DecoderSpec, threads: int = 0):
    """An onnxruntime.InferenceSession on the CPU, with the options `slim-trt verify` uses, so that what is served
    is what was verified. Exports with custom ops (the `plugin` low-rank form) need the exporter's session helper,
    which registers the LowRankAdd kernel; it is looked up in slim_trt."""
    import onnxruntime as ort

    if spec.custom_ops:
        try:
            from slim_trt.exporter.ort_runtime import session
        except ImportError:
            ops = ", ".join(f"{o.get('domain', '')}::{o.get('op_type', '?')}" for o in spec.custom_ops)
            raise RuntimeError(f"{model_path} uses custom ops ({ops}) and slim_trt is not importable here: install "
                               "slim-trt in the server's Python or deploy a `--lowrank decomposed` export") from None
        return session(model_path, providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads > 0:
        options.intra_op_num_threads = threads
    # ORT would fuse DequantizeLinear(INT4) -> MatMul into MatMulNBits, which quantizes activations to int8: keep
    # the graph's own arithmetic (dequantize, then a float GEMM), as the exporter's verification does.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class Decoder(Protocol):
    spec: DecoderSpec

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxDecoder:
    """An exported decoder running in this process with ONNX Runtime."""

    def __init__(self, model_path: str | os.PathLike, spec: DecoderSpec, threads: int = 0, session=None):
        self.spec = spec
        self.session = session if session is not None else make_session(model_path, spec, threads)
        self._outputs = spec.output_names

    @staticmethod
    def from_folder(folder: str | os.PathLike, threads: int = 0) -> OnnxDecoder:
        spec, _ = read_manifest(folder)
        return OnnxDecoder(Path(folder) / spec.model_file, spec, threads)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds), strict=True))


def check_feeds(spec: DecoderSpec, feeds: dict[str, np.ndarray]) -> None:
    """Raise RequestError unless `feeds` is one consistent request for the decoder: every input present with its
    dtype and rank, one batch size, attention_mask as long as past + new tokens, token ids inside the vocabulary."""
    missing = [n for n in spec.input_names if n not in feeds]
    if missing:
        raise RequestError(f"missing input(s) {', '.join(missing)}")
    for t in spec.inputs:
        a = feeds[t.name]
        if a.dtype.name != t.dtype:
            raise RequestError(f"input {t.name} has dtype {a.dtype.name}, expected {t.dtype}")
        if a.ndim != len(t.shape):
            raise RequestError(f"input {t.name} has shape {list(a.shape)}, expected rank {len(t.shape)} "
                               f"({', '.join(map(str, t.shape))})")
        for axis, (got, want) in enumerate(zip(a.shape, t.shape, strict=True)):
            if isinstance(want, int) and got != want:
                raise RequestError(f"input {t.name} has size {got} on axis {axis}, expected {want}")
    ids = feeds["input_ids"]
    batch, seq = ids.shape
    if seq < 1:
        raise RequestError("input_ids has no tokens: send at least one")
    past = feeds[spec.past_names[0]].shape[2] if spec.past_names else 0
    for name in spec.input_names:
        if feeds[name].shape[0] != batch:
            raise RequestError(f"input {name} has batch {feeds[name].shape[0]}, input_ids has batch {batch}")
    for name in spec.past_names:
        if feeds[name].shape[2] != past:
            raise RequestError(f"input {name} has past length {feeds[name].shape[2]}, "
                               f"{spec.past_names[0]} has {past}")
    if feeds["attention_mask"].shape[1] != past + seq:
        raise RequestError(f"attention_mask has length {feeds['attention_mask'].shape[1]}, expected past + new "
                           f"tokens = {past} + {seq} = {past + seq}")
    if spec.uses_position_ids and feeds["position_ids"].shape != ids.shape:
        raise RequestError(f"position_ids has shape {list(feeds['position_ids'].shape)}, expected the shape of "
                           f"input_ids {list(ids.shape)}")
    if past + seq > spec.max_position_embeddings:
        raise RequestError(f"past + new tokens = {past + seq} is over the model's limit of "
                           f"{spec.max_position_embeddings} positions")
    if ids.size and (ids.min() < 0 or ids.max() >= spec.vocab_size):
        raise RequestError(f"input_ids must be in [0, {spec.vocab_size}), got values in "
                           f"[{int(ids.min())}, {int(ids.max())}]")


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy decoding; otherwise sample from softmax(logits / temperature) restricted to the
    top_k tokens (0 = all) and to the smallest set whose probability reaches top_p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RequestError(f"seed must be in [0, 2^63), got {self.seed}")


# The inputs of the generate model: name -> (Python kind, Triton type, whether a request must send it). deploy's
# Triton config (slim_trt.triton.configs) declares these.
GENERATE_INPUTS = {"prompt": (str, "TYPE_STRING", True), "max_new_tokens": (int, "TYPE_INT32", False),
                   "temperature": (float, "TYPE_FP32", False), "top_k": (int, "TYPE_INT32", False),
                   "top_p": (float, "TYPE_FP32", False), "seed": (int, "TYPE_INT64", False)}


def _request_value(values: Mapping[str, np.ndarray | None], name: str):
    """The one value of input `name` converted to its kind, or None when the request did not send it."""
    kind, triton_type, required = GENERATE_INPUTS[name]
    array = values.get(name)
    if array is None:
        if required:
            raise RequestError(f"{name} is missing: send an input named {name!r} of type "
                               f"{triton_type.removeprefix('TYPE_').replace('STRING', 'BYTES')} with one value")
        return None
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold one value, got {flat.size}")
    value = flat[0]
    if kind is str:
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"{name} is not valid UTF-8 text") from None
        return str(value)
    if kind is int and not np.issubdtype(np.asarray(value).dtype, np.integer):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {value!r}") from None


@dataclass(frozen=True)
class GenerateRequest:
    """One request of the generate model, every field checked here (and by Sampling): a bad field is a
    RequestError naming it, never an exception from deep inside the decode loop."""

    prompt: str
    max_new_tokens: int
    sampling: Sampling

    @staticmethod
    def parse(values: Mapping[str, np.ndarray | None], default_max_new_tokens: int) -> GenerateRequest:
        """`values`: input name -> the array the request sent (absent or None when it sent none)."""
        get = {name: _request_value(values, name) for name in GENERATE_INPUTS}
        if get["prompt"] == "":
            raise RequestError("empty prompt: send a non-empty string")
        max_new = get["max_new_tokens"]
        max_new = default_max_new_tokens if max_new is None else max_new
        if max_new < 0:
            raise RequestError(f"max_new_tokens must be >= 0, got {max_new}")
        sampling = Sampling(temperature=0.0 if get["temperature"] is None else get["temperature"],
                            top_k=0 if get["top_k"] is None else get["top_k"],
                            top_p=1.0 if get["top_p"] is None else get["top_p"], seed=get["seed"])
        return GenerateRequest(get["prompt"], max_new, sampling)


def pick_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from one row of logits [vocab]."""
    logits = logits.astype(np.float64)
    if sampling.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < z.size:
        kth = np.partition(z, -sampling.top_k)[-sampling.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < sampling.top_p  # the smallest prefix reaching top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    stopped_on_eos: bool = False


def _position_feed(spec: DecoderSpec, start: int, length: int, feeds: dict) -> None:
    if spec.uses_position_ids:
        feeds["position_ids"] = np.arange(start, start + length, dtype=np.int64)[None, :]


def generate_ids(decoder: Decoder, prompt_ids: Sequence[int], max_new_tokens: int,
                 eos_token_ids: Sequence[int] = (), sampling: Sampling | None = None) -> Generation:
    """Decode up to `max_new_tokens` tokens after `prompt_ids` (batch 1), reusing the KV cache when the export has
    one (a with_cache=False export recomputes the whole sequence at every step)."""
    spec = decoder.spec
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise RequestError("empty prompt: send at least one token of text")
    if max_new_tokens < 0:
        raise RequestError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = spec.max_position_embeddings
    if len(prompt) + max_new_tokens > limit:
        raise RequestError(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} is over the model's "
                           f"limit of {limit} positions: shorten the prompt or ask for fewer tokens")
    bad = [t for t in prompt if not 0 <= t < spec.vocab_size]
    if bad:
        raise RequestError(f"prompt token ids must be in [0, {spec.vocab_size}), got {bad[:5]}")
    out = Generation(prompt_ids=prompt)
    if max_new_tokens == 0:
        return out
    sampling = sampling or Sampling()
    rng = np.random.default_rng(sampling.seed)
    eos = {int(e) for e in eos_token_ids}
    kv_dtypes = {n: numpy_dtype(spec.input(n).dtype) for n in spec.past_names}
    past = {n: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=kv_dtypes[n]) for n in spec.past_names}
    seq = list(prompt)
    new = list(prompt)  # tokens the next step feeds
    while True:
        start = len(seq) - len(new)
        feeds = {"input_ids": np.asarray([new], dtype=np.int64),
                 "attention_mask": np.ones((1, len(seq)), dtype=np.int64)}
        _position_feed(spec, start, len(new), feeds)
        feeds.update(past)
        result = decoder.run(feeds)
        token = pick_token(result["logits"][0, -1], sampling, rng)
        out.token_ids.append(token)
        if token in eos:
            out.stopped_on_eos = True
            return out
        if len(out.token_ids) >= max_new_tokens:
            return out
        seq.append(token)
        if spec.with_cache:
            past = {p: result[q] for p, q in zip(spec.past_names, spec.present_names, strict=True)}
            new = [token]
        else:
            new = list(seq)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def eos_ids(tokenizer, spec: DecoderSpec) -> tuple[int, ...]:
    """End-of-sequence ids: the manifest's if it names them, else the tokenizer's."""
    if spec.eos_token_ids:
        return spec.eos_token_ids
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    if not isinstance(prompt, str) or prompt == "":
        raise RequestError("empty prompt: send a non-empty string")
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise RequestError("the prompt encodes to no tokens: send some text")
    return list(ids)


def generate_text(decoder: Decoder, tokenizer, prompt: str, max_new_tokens: int,
                  sampling: Sampling | None = None) -> tuple[str, Generation]:
    """Encode `prompt`, decode up to `max_new_tokens` tokens, and return the new text and the token ids."""
    gen = generate_ids(decoder, encode_prompt(tokenizer, prompt), max_new_tokens,
                       eos_ids(tokenizer, decoder.spec), sampling)
    return tokenizer.decode(gen.token_ids, skip_special_tokens=True), gen
