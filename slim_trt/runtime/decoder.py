"""Run an exported decoder with ONNX Runtime and generate text with its KV cache.

Every ONNX Runtime session slim-trt opens on an export comes from `make_session` here (verify, `slim-trt generate`,
the Python API, the Triton models, the benchmarks), with the session config the export declares in
slim_export.json (`"onnxruntime": {"session_config": {...}}`): what is served is what was verified. The INT4/INT8
weights stay packed integers at run time (ONNX Runtime's MatMulNBits), never dequantized float copies; exports
whose graph ONNX Runtime cannot run or fuse as it is (the LowRankAdd plugin node, a quantized embedding / tied head)
are rewritten in memory first (ort_rewrite.py).

This module is deliberately standalone (numpy + onnxruntime; onnx for the in-memory rewrite; transformers only to
load a tokenizer): `deploy` copies it beside each python-backend model as `slim_runtime.py`, with ort_rewrite.py as
`slim_ort_rewrite.py`, so a Triton repository keeps working without slim_trt installed in the server's Python. The
same code is the local reference the tests compare the server to.

Request problems (an empty prompt, a prompt too long, a bad shape) raise `RequestError`; the Triton models turn
it into an INVALID_ARG response and keep serving.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

MANIFEST = "slim_export.json"
# Allowed values of the session config entries slim-trt writes; other "session." entries pass through to ORT.
SESSION_CONFIG_VALUES = {"session.disable_quant_qdq": ("0", "1"),
                         "session.qdq_matmulnbits_accuracy_level": ("0", "1", "2", "3", "4")}


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
    session_config: tuple[tuple[str, str], ...] = ()  # ONNX Runtime session config entries, as declared
    head_quantization: str = "none"  # "int8"/"int4": a quantized embedding / head that ort_rewrite maps
    quantized_linears: bool = False  # compressed layers: ort_rewrite fuses the MatMulNBits reading one input

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
            session_config=tuple(parse_session_config(d).items()),
            head_quantization=_head_quantization(d),
            quantized_linears=bool(d.get("compressed_layers")),
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
    def needs_rewrite(self) -> bool:
        """Whether ONNX Runtime needs the in-memory rewrite (ort_rewrite.py) to run this export's kernels (or to
        run them fused)."""
        return bool(self.custom_ops) or self.head_quantization != "none" or self.quantized_linears

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


def parse_session_config(d: dict) -> dict[str, str]:
    """The ONNX Runtime session config an export declares (`"onnxruntime": {"session_config": {...}}`); an export
    written before slim-trt declared one gets ONNX Runtime's defaults. ValueError names a malformed entry."""
    section = d.get("onnxruntime", {})
    if not isinstance(section, dict) or not isinstance(section.get("session_config", {}), dict):
        raise ValueError("slim_export.json field 'onnxruntime' must be {\"session_config\": {KEY: VALUE, ...}}, got "
                         f"{section!r}")
    config = section.get("session_config", {})
    for key, value in config.items():
        if not isinstance(value, str) or not key.startswith("session."):
            raise ValueError(f"slim_export.json onnxruntime.session_config entry {key!r}: {value!r} must map a "
                             "'session.*' key to a string value")
        allowed = SESSION_CONFIG_VALUES.get(key)
        if allowed and value not in allowed:
            raise ValueError(f"slim_export.json onnxruntime.session_config {key!r} is {value!r}, expected one of "
                             f"{', '.join(allowed)}")
    return dict(config)


def _head_quantization(d: dict) -> str:
    head = d.get("head") or {}
    if not isinstance(head, dict) or head.get("quantization", "none") not in ("none", "int8", "int4"):
        raise ValueError(f"slim_export.json field 'head' must be {{\"quantization\": none|int8|int4, ...}}, "
                         f"got {head!r}")
    return head.get("quantization", "none")


def read_manifest(folder: str | os.PathLike) -> tuple[DecoderSpec, dict]:
    raw = json.loads((Path(folder) / MANIFEST).read_text())
    return DecoderSpec.from_manifest(raw), raw


def _ort_rewrite():
    if __name__ == "slim_runtime":  # the copy inside a Triton repository: its rewrite module is copied beside it
        import slim_ort_rewrite

        return slim_ort_rewrite
    from . import ort_rewrite

    return ort_rewrite


# CPU features (Linux /proc/cpuinfo flag names) that decide how ONNX Runtime's int8 kernels compute.
_X86_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
_ARM_FEATURES = ("asimddp", "i8mm")  # dot product (SDOT/UDOT), int8 matrix multiply (SMMLA/UMMLA)
# With one of these, MLAS's u8 x s8 GEMM sums into int32 (VPDPBUSD, AMX TDPBUSD): exact. Without, it uses
# VPMADDUBSW and its saturating int16 pair sums.
_EXACT_U8S8 = ("avx512_vnni", "avx_vnni", "amx_int8")
W8A8_FORM_ENV = "SLIM_TRT_ORT_W8A8"  # forces the W8A8 session form (u8u8 | u8s8) where no caller passes one


def cpu_features(cpuinfo: str | None = None, machine: str | None = None) -> tuple[str, ...]:
    """The CPU's architecture and the features above it has, e.g. ("x86_64", "avx2", "avx512f", "avx512_vnni",
    "amx_int8") or ("arm64", "asimddp"). Flags come from /proc/cpuinfo (Linux; `cpuinfo` passes its text); elsewhere
    only the architecture is known (then no feature is assumed)."""
    import platform

    arch = (machine or platform.machine()).lower()
    arch = {"amd64": "x86_64", "aarch64": "arm64"}.get(arch, arch)
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    wanted = _X86_FEATURES if arch == "x86_64" else _ARM_FEATURES if arch == "arm64" else ()
    return (arch,) + tuple(f for f in wanted if f in flags)


@dataclass(frozen=True)
class CpuChoice:
    """How a session runs W8A8 linears on this CPU, and why (the verify report and `generate` print it)."""

    features: tuple[str, ...]
    w8a8_form: str  # ort_rewrite.W8A8_FORMS
    reason: str

    def to_dict(self) -> dict:
        return {"cpu_features": list(self.features), "w8a8_form": self.w8a8_form, "reason": self.reason}

    def describe(self) -> str:
        return f"CPU {' '.join(self.features)}: W8A8 GEMMs {self.w8a8_form} ({self.reason})"


def cpu_choice(w8a8_form: str | None = None, features: Sequence[str] | None = None) -> CpuChoice:
    """The W8A8 session form: `w8a8_form` when given, else $SLIM_TRT_ORT_W8A8, else from the CPU: u8s8 (ONNX
    Runtime's own operand types) on x86 with VNNI or AMX, where it is exact and the fastest; u8u8 (exact on every
    CPU) everywhere else, unknown CPUs included."""
    feats = tuple(features) if features is not None else cpu_features()
    forced = w8a8_form or os.environ.get(W8A8_FORM_ENV) or None
    if forced is not None:
        if forced not in ("u8u8", "u8s8"):
            raise ValueError(f"W8A8 form {forced!r} is not one of u8u8, u8s8 (from "
                             f"{'the caller' if w8a8_form else '$' + W8A8_FORM_ENV})")
        return CpuChoice(feats, forced, "forced" if w8a8_form else f"${W8A8_FORM_ENV}")
    exact = [f for f in _EXACT_U8S8 if f in feats]
    if feats[:1] == ("x86_64",) and exact:
        return CpuChoice(feats, "u8s8", f"{exact[-1]}: u8 x s8 sums into int32, exact")
    return CpuChoice(feats, "u8u8", "no VNNI/AMX: u8 x s8 would saturate int16 pair sums (VPMADDUBSW); u8 x u8 "
                                    "widens to int16 first, exact" if feats[:1] == ("x86_64",) else
                     "u8 x u8 is exact on every CPU")


def make_session(model_path: str | os.PathLike, spec: DecoderSpec | None = None, threads: int = 0,
                 providers: Sequence[str] | None = None, fuse: bool = True, rewrite: bool | None = None,
                 optimized_model_path: str | os.PathLike | None = None, w8a8_form: str | None = None):
    """An onnxruntime.InferenceSession for an exported model with the session config `spec` declares.

    fuse=False runs the graph's plain arithmetic instead (ONNX Runtime's Q/DQ fusion off: weights dequantized to
    float at load, float GEMMs), for comparison. rewrite: apply ort_rewrite (default: when the export needs it).
    optimized_model_path: also write the graph ONNX Runtime runs there (to count its fused kernels).
    w8a8_form: force the integer GEMM form of W8A8 linears (u8u8 | u8s8; default: cpu_choice, from the CPU).
    """
    import onnxruntime as ort

    config = dict(spec.session_config) if spec is not None else {}
    if not fuse:
        config["session.disable_quant_qdq"] = "1"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads > 0:
        options.intra_op_num_threads = threads
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    providers = list(providers or ["CPUExecutionProvider"])
    if rewrite is None:
        rewrite = spec is not None and spec.needs_rewrite
    if not rewrite:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    import onnx

    # ONNX Runtime's own default accuracy level is 4 when the config does not name one.
    level = int(config.get("session.qdq_matmulnbits_accuracy_level", "4"))
    # A config that turns ONNX Runtime's Q/DQ fusion off asks for the plain arithmetic: no MatMulNBits built here.
    packed = config.get("session.disable_quant_qdq", "0") != "1"
    model, _ = _ort_rewrite().for_onnxruntime(onnx.load(str(model_path)), fuse=packed, accuracy_level=level,
                                              w8a8_form=cpu_choice(w8a8_form).w8a8_form)
    if model.ByteSize() < 2**31 - 2**26:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="slim_trt_ort_") as d:  # > 2 GB: protobuf needs external data
        onnx.save_model(model, f"{d}/model.onnx", save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(f"{d}/model.onnx", options, providers=providers)


def kernel_counts(optimized_model_path: str | os.PathLike) -> dict:
    """What ONNX Runtime runs, from the optimized graph a session wrote: node counts by op type, the float type its
    constants have (compute_dtype), and the DequantizeLinear nodes left unfused (each with the ops it feeds)."""
    import onnx

    model = onnx.load(str(optimized_model_path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n.op_type)
    unfused = {n.name: sorted(set(readers.get(n.output[0], []))) for n in model.graph.node
               if n.op_type == "DequantizeLinear"}
    from onnx import TensorProto

    # fp16 when the session keeps fp16 numbers; an fp16 W8A8 export is widened to fp32 in memory (ort_rewrite)
    compute = "fp16" if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer) else "fp32"
    return {"ops": dict(sorted(counts.items())), "compute_dtype": compute, "matmul_nbits": counts.get("MatMulNBits", 0),
            "gather_block_quantized": counts.get("GatherBlockQuantized", 0),
            "matmul_integer_to_float": counts.get("MatMulIntegerToFloat", 0), "unfused_dequantize": unfused}


def open_session(path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0,
                 fuse: bool = True, w8a8_form: str | None = None):
    """The session for an export folder (or the model.onnx inside one), with the export's declared config."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    spec, _ = read_manifest(folder)
    model = folder / spec.model_file if path.is_dir() else path
    return make_session(model, spec, threads, providers, fuse, w8a8_form=w8a8_form)


class Decoder(Protocol):
    spec: DecoderSpec

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxDecoder:
    """An exported decoder running in this process with ONNX Runtime."""

    def __init__(self, model_path: str | os.PathLike, spec: DecoderSpec, threads: int = 0, session=None,
                 fuse: bool = True, w8a8_form: str | None = None):
        self.spec = spec
        self.session = session if session is not None else make_session(model_path, spec, threads, fuse=fuse,
                                                                        w8a8_form=w8a8_form)
        self._outputs = spec.output_names

    @staticmethod
    def from_folder(folder: str | os.PathLike, threads: int = 0, fuse: bool = True,
                    w8a8_form: str | None = None) -> OnnxDecoder:
        spec, _ = read_manifest(folder)
        return OnnxDecoder(Path(folder) / spec.model_file, spec, threads, fuse=fuse, w8a8_form=w8a8_form)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds), strict=True))

    def run_keeping_cache(self, feeds: dict) -> dict:
        """run() for the decode loop: the logits as numpy, every other output (the present.* KV cache) as the
        onnxruntime.OrtValue the session wrote, which the next step feeds back as its past as it is (`feeds` may
        hold OrtValues). run() copies the whole cache into numpy at every step, a cost that grows with the
        sequence; the numbers are the same."""
        from onnxruntime import OrtValue

        values = {k: v if isinstance(v, OrtValue) else OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                  for k, v in feeds.items()}
        out = dict(zip(self._outputs, self.session.run_with_ort_values(self._outputs, values), strict=True))
        out["logits"] = out["logits"].numpy()
        return out


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
    pos = feeds.get("position_ids") if spec.uses_position_ids else None
    if pos is not None and pos.size and (pos.min() < 0 or pos.max() >= spec.max_position_embeddings):
        # Out of range positions index past the rotary / learned tables: other logits, no error from the graph
        raise RequestError(f"position_ids must be in [0, {spec.max_position_embeddings}), got values in "
                           f"[{int(pos.min())}, {int(pos.max())}]")


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
    if sampling.temperature == 0.0:
        # numpy's argmax has no vectorised fp16 loop: 1.7 ms over 262144 fp16 logits, 0.34 ms widened first (exact,
        # so the same index, ties included)
        return int(np.argmax(logits.astype(np.float32, copy=False)))
    z = logits.astype(np.float64) / sampling.temperature
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
class Timing:
    """Where the time of one generate call went (wall clock, perf_counter)."""

    batch: int
    prompt_tokens: int  # tokens in the prefill (the longest prompt; shorter ones are left-padded)
    prefill_seconds: float = 0.0  # the first run over the whole prompt, up to the first token picked
    decode_seconds: float = 0.0  # every later run (one new token per sequence each)
    decode_steps: int = 0

    @property
    def first_token_seconds(self) -> float:
        return self.prefill_seconds

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens per second after the first, over the whole batch."""
        return self.batch * self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        return {"batch": self.batch, "prompt_tokens": self.prompt_tokens, "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds, "decode_steps": self.decode_steps,
                "first_token_seconds": self.first_token_seconds,
                "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    stopped_on_eos: bool = False
    timing: Timing | None = None  # shared by the sequences of one batch


def _check_prompt(spec: DecoderSpec, prompt: list[int], max_new_tokens: int) -> None:
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


def generate_batch(decoder: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   eos_token_ids: Sequence[int] = (), sampling: Sampling | None = None,
                   on_step: Callable[[list[Generation]], None] | None = None) -> list[Generation]:
    """Decode up to `max_new_tokens` tokens after each prompt, all prompts in one batch (shorter ones left-padded
    and masked), reusing the KV cache when the export has one (a with_cache=False export recomputes the whole
    sequence at every step). A sequence stops at an end-of-sequence token; the batch runs until all have.
    `on_step` sees the generations after every step (for live progress). Each Generation carries the batch's
    Timing."""
    spec = decoder.spec
    rows = [[int(t) for t in p] for p in prompts]
    if not rows:
        raise RequestError("no prompts: send at least one")
    for prompt in rows:
        _check_prompt(spec, prompt, max_new_tokens)
    width = max(len(p) for p in rows)
    timing = Timing(batch=len(rows), prompt_tokens=width)
    gens = [Generation(prompt_ids=p, timing=timing) for p in rows]
    if max_new_tokens == 0:
        return gens
    sampling = sampling or Sampling()
    rng = np.random.default_rng(sampling.seed)
    eos = {int(e) for e in eos_token_ids}
    batch = len(rows)
    # Left padding: every sequence ends at the same cache position, so one new token per row per step.
    mask = np.zeros((batch, width), dtype=np.int64)
    ids = np.zeros((batch, width), dtype=np.int64)
    for i, p in enumerate(rows):
        mask[i, width - len(p):] = 1
        ids[i, width - len(p):] = p
    kv_dtypes = {n: numpy_dtype(spec.input(n).dtype) for n in spec.past_names}
    past = {n: np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=kv_dtypes[n]) for n in spec.past_names}
    new = ids  # what the next run feeds
    done = [False] * batch
    # A decoder that can keep the KV cache in its runtime's own tensors between steps (OnnxDecoder) does so.
    run = getattr(decoder, "run_keeping_cache", None) if spec.with_cache else None
    run = run or decoder.run
    t0 = time.perf_counter()
    while True:
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        feeds = {"input_ids": new, "attention_mask": mask}
        if spec.uses_position_ids:
            feeds["position_ids"] = positions[:, -new.shape[1]:]
        feeds.update(past)
        result = run(feeds)
        logits = result["logits"][:, -1]
        tokens = []
        for i, gen in enumerate(gens):
            token = pick_token(logits[i], sampling, rng) if not done[i] else gen.token_ids[-1]
            if not done[i]:
                gen.token_ids.append(token)
                if token in eos:
                    gen.stopped_on_eos = done[i] = True
                elif len(gen.token_ids) >= max_new_tokens:
                    done[i] = True
            tokens.append(token)
        now = time.perf_counter()
        if timing.prefill_seconds == 0.0:
            timing.prefill_seconds = now - t0
        else:
            timing.decode_seconds += now - t0
            timing.decode_steps += 1
        t0 = now
        if on_step is not None:
            on_step(gens)
        if all(done):
            return gens
        step = np.asarray(tokens, dtype=np.int64)[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        if spec.with_cache:
            past = {p: result[q] for p, q in zip(spec.past_names, spec.present_names, strict=True)}
            new = step
        else:
            ids = np.concatenate([ids, step], axis=1)
            new = ids


def generate_ids(decoder: Decoder, prompt_ids: Sequence[int], max_new_tokens: int,
                 eos_token_ids: Sequence[int] = (), sampling: Sampling | None = None) -> Generation:
    """Decode up to `max_new_tokens` tokens after `prompt_ids` (batch 1); see generate_batch."""
    return generate_batch(decoder, [prompt_ids], max_new_tokens, eos_token_ids, sampling)[0]


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
