"""Running engines: loading one with its plugins, and `bench` (prefill/decode latency, tokens/s).

bench times Polygraphy's TrtRunner with inputs staged on the GPU beforehand and outputs left there, so the
numbers are enqueue + execution + synchronization, not host copies.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from ..errors import SlimError
from .backend import import_tensorrt, require_gpu
from .plugins import LOWRANK_ADD, load_plugins, required_plugins, resolve_plugins

# ----------------------------------------------------------------------------------------------------------
# engine loading
# ----------------------------------------------------------------------------------------------------------


def engine_plugins(engine_path: Path, explicit, onnx_meta: dict | None = None) -> tuple[list[Path], list]:
    """Plugin libraries for an engine: --plugins, else those recorded in NAME.build.json, else the known ones
    the export needs."""
    from .builder import side_files

    report_path, _ = side_files(engine_path)
    required = required_plugins(onnx_meta) if onnx_meta is not None else []
    if not explicit and report_path.is_file():
        recorded = json.loads(report_path.read_text()).get("options", {}).get("plugins", [])
        existing = [p for p in recorded if Path(p).is_file()]
        if recorded and existing:
            return [Path(p) for p in existing], required or [LOWRANK_ADD]
    return resolve_plugins(list(explicit or []), required), required


def _load_engine(trt, engine_path: Path, plugins: list[Path], required: list):
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes

    if not engine_path.is_file():
        raise SlimError(f"engine {engine_path} does not exist: build it with `slim-trt build`")
    load_plugins(trt, plugins, required)
    engine = EngineFromBytes(BytesFromPath(str(engine_path)))()
    if engine is None:
        raise SlimError(f"TensorRT could not load {engine_path}: it was built with another TensorRT version or GPU, "
                        f"or needs a plugin (--plugins)")
    return engine


# ----------------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------------


def latency_stats(seconds: list[float]) -> dict:
    """Median, mean, min and 90th percentile in milliseconds."""
    if not seconds:
        raise ValueError("no timings")
    ms = sorted(s * 1e3 for s in seconds)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return {"p50_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "min_ms": ms[0], "p90_ms": p90,
            "runs": len(ms)}


def bench_shapes(io: dict[str, tuple], batch: int | None, prompt_len: int | None, context_len: int | None) -> dict:
    """Feed shapes for one prefill (past 0) and one decode step (1 token after `context_len`), checked against
    the engine's profile 0. `io`: {input name: (min shape, opt shape, max shape)}; defaults are the opt shapes."""
    if "input_ids" not in io:
        raise SlimError("the engine has no input_ids input: bench runs causal LMs exported by `slim-trt export`")
    ids_lo, ids_opt, ids_hi = io["input_ids"]
    past_names = [n for n in io if n.startswith("past_key_values.")]
    past = io[past_names[0]] if past_names else None
    b = batch if batch is not None else ids_opt[0]
    s = prompt_len if prompt_len is not None else ids_opt[1]
    ctx = context_len if context_len is not None else (past[1][2] if past else 0)
    if not past and context_len:
        raise SlimError("--context-len needs an engine with a KV cache (this one was exported with --no-cache)")

    def check(what: str, value: int, lo: int, hi: int, flag: str):
        if not lo <= value <= hi:
            raise SlimError(f"{what} {value} is outside the engine's range {lo}..{hi}: pick {flag} in that range "
                            f"or rebuild with wider shapes")

    check("batch", b, ids_lo[0], ids_hi[0], "--batch")
    check("prompt length", s, ids_lo[1], ids_hi[1], "--prompt-len")
    phases = {"prefill": (s, 0)}
    if past:
        check("context length", ctx, past[0][2], past[2][2], "--context-len")
        check("past length 0 of prefill", 0, past[0][2], past[2][2], "a profile with past min 0")
        check("decode length", 1, ids_lo[1], ids_hi[1], "a profile with sequence min 1")
        phases["decode"] = (1, ctx)
    shapes = {}
    for phase, (seq, plen) in phases.items():
        feed = {}
        for name, (_, opt, _) in io.items():
            if name in ("input_ids", "position_ids"):
                feed[name] = (b, seq)
            elif name == "attention_mask":
                feed[name] = (b, seq + plen)
            elif name.startswith("past_key_values."):
                feed[name] = (b, opt[1], plen, opt[3])
            else:
                raise SlimError(f"bench does not know how to feed input {name!r}")
        shapes[phase] = {"batch": b, "tokens": seq, "past": plen, "feed": feed}
    return shapes


def _staged_feed(trt, engine, shapes: dict, vocab: int, seed: int) -> tuple[dict, list]:
    from polygraphy import cuda
    from polygraphy.datatype import DataType

    rng = np.random.default_rng(seed)
    feed, buffers = {}, []
    past = shapes["past"]
    for name, shape in shapes["feed"].items():
        dtype = DataType.from_dtype(engine.get_tensor_dtype(name))
        if name == "input_ids":
            host = rng.integers(0, vocab, size=shape, dtype=np.int64)
        elif name == "attention_mask":
            host = np.ones(shape, dtype=np.int64)
        elif name == "position_ids":
            host = np.tile(np.arange(past, past + shape[1], dtype=np.int64), (shape[0], 1))
        else:  # KV cache: zeros of the engine's dtype (bf16 has no numpy type; zero bytes are zeros in any float)
            host = np.zeros(int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        raw = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
        arr = cuda.DeviceArray.raw((max(raw.size, 1),))
        arr.copy_from(raw)
        buffers.append(arr)
        feed[name] = arr.view(shape=tuple(shape), dtype=dtype)
    return feed, buffers


def bench_engine(trt, engine_path: Path, libs: list[Path], required: list, *, batch=None, prompt_len=None,
                 context_len=None, iterations: int = 20, warmup: int = 3, seed: int = 0) -> dict:
    from polygraphy.backend.trt import TrtRunner

    engine = _load_engine(trt, engine_path, libs, required)
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            io[name] = tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
    vocab = int(engine.get_tensor_shape("logits")[-1])
    plan = bench_shapes(io, batch, prompt_len, context_len)
    out = {"engine": str(engine_path), "shapes": {k: {kk: vv for kk, vv in v.items() if kk != "feed"}
                                                  for k, v in plan.items()}}
    with TrtRunner(engine) as runner:
        for phase, shapes in plan.items():
            feed, buffers = _staged_feed(trt, engine, shapes, vocab, seed)
            try:
                times = []
                for i in range(warmup + iterations):
                    runner.infer(feed, copy_outputs_to_host=False)
                    if i >= warmup:
                        times.append(runner.last_inference_time())
            finally:
                for b in buffers:
                    b.free()
            stats = latency_stats(times)
            tokens = shapes["batch"] * shapes["tokens"]
            stats["tokens_per_s"] = tokens / (stats["p50_ms"] / 1e3)
            out[phase] = stats
    return out


def bench(engine_path: str | Path, *, compare: str | Path | None = None, plugins=(), batch: int | None = None,
          prompt_len: int | None = None, context_len: int | None = None, iterations: int = 20, warmup: int = 3,
          seed: int = 0) -> dict:
    """Prefill and decode latency (p50/mean/p90 ms) and tokens/s of one engine, or two side by side."""
    if iterations < 1 or warmup < 0:
        raise SlimError("--iterations must be >= 1 and --warmup >= 0")
    trt = import_tensorrt()
    gpu = require_gpu()
    results = []
    for path in [engine_path] + ([compare] if compare else []):
        p = Path(path)
        if not p.is_file():
            raise SlimError(f"engine {p} does not exist: build it with `slim-trt build`")
        libs, required = engine_plugins(p, plugins)
        results.append(bench_engine(trt, p, libs, required, batch=batch, prompt_len=prompt_len,
                                    context_len=context_len, iterations=iterations, warmup=warmup, seed=seed))
    out = {"tensorrt_version": trt.__version__, "gpu": gpu.to_dict(), "engines": results}
    if len(results) == 2:
        out["speedup"] = {phase: results[1][phase]["p50_ms"] / results[0][phase]["p50_ms"]
                          for phase in ("prefill", "decode") if phase in results[0] and phase in results[1]}
    return out


def format_bench(result: dict) -> str:
    """A table: one column per engine, rows for prefill/decode p50 latency and tokens/s."""
    engines = result["engines"]
    names = [Path(e["engine"]).name for e in engines]
    width = max(24, *(len(n) + 2 for n in names))
    lines = [f"slim-trt bench: TensorRT {result['tensorrt_version']} on {result['gpu']['name']}",
             f"{'':24}" + "".join(f"{n:>{width}}" for n in names)]
    for phase in ("prefill", "decode"):
        if phase not in engines[0]:
            continue
        s = engines[0]["shapes"][phase]
        lines.append(f"{phase} (batch {s['batch']}, {s['tokens']} tok, past {s['past']})")
        lines.append(f"{'  p50 latency (ms)':24}" + "".join(f"{e[phase]['p50_ms']:>{width}.3f}" for e in engines))
        lines.append(f"{'  tokens/s':24}" + "".join(f"{e[phase]['tokens_per_s']:>{width}.1f}" for e in engines))
    for phase, ratio in result.get("speedup", {}).items():
        lines.append(f"{phase}: {names[0]} is {ratio:.2f}x the speed of {names[1]} (p50)")
    return "\n".join(lines)
