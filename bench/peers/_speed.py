"""The measurement every row of bench/speed.py runs, whatever the runtime: one worker process per row and repeat.

Runs inside the row's own Python (slim-trt's venv or a peer's), so it needs only numpy. A worker script wraps its
runtime in an Engine (greedy decoding with that runtime's own generation code) and calls `main(make_engine)`.

Protocol (bench/speed.py is the caller): `python WORKER.py REQUEST.json RESULT.json`
  REQUEST.json  {"mode": "speed" | "perplexity", "model": PATH, "threads": N, "options": {...},
                 "prompt": [512 token ids], "decode_prompts": [[16 ids] x batch], "new_tokens": 128,
                 "windows": PATH.npy (perplexity mode: int64 [n, seqlen])}
  RESULT.json   speed: load_s, prefill (the long prompt at batch 1), decode_b1, decode_batch (each: ttft_s,
                decode_s, tokens_per_s, tokens); perplexity: nll, tokens, perplexity, seconds. Plus versions.
                On failure: {"status": "failed", "error", "traceback"} and exit code 1.
peak_rss_mb is this process's high-water mark (VmHWM), read at the end: the kernel starts it afresh at exec, while
the ru_maxrss a parent gets from wait4 keeps the parent's own size from before the exec (Linux carries the
high-water mark across exec), which would count the harness's memory in every row.
"""
from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np


class Engine:
    """Greedy decoding with one runtime's own generation code. `generate` prefills ids [batch, T], then runs
    `new_tokens` decode steps (never stopping at an end-of-sequence token, so every row does the same work) and
    returns {"tokens": [[first, ...] per sequence], "ttft_s": until the first new token of every sequence is known,
    "decode_s": the decode steps after it}. `window_logits` scores one window from an empty cache: float32 logits
    [T, vocab]."""

    max_batch = 1

    def generate(self, ids: np.ndarray, new_tokens: int) -> dict:
        raise NotImplementedError

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def versions(self) -> dict:
        return {}


def timed_generation(engine: Engine, ids: np.ndarray, new_tokens: int) -> dict:
    ids = np.asarray(ids, dtype=np.int64)
    out = engine.generate(ids, new_tokens)
    batch, prompt = ids.shape
    return {"batch": batch, "prompt_tokens": prompt, "new_tokens": new_tokens, "ttft_s": out["ttft_s"],
            "prefill_tokens_per_s": batch * prompt / out["ttft_s"], "decode_s": out["decode_s"],
            "tokens_per_s": batch * new_tokens / out["decode_s"] if new_tokens else None,
            "tokens": [[int(t) for t in seq] for seq in out["tokens"]]}


class StepTimer:
    """For runtimes whose loop is written here: call `first()` when the first tokens are known, `done()` at the
    end; `result(tokens)` gives generate's dict."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.t1 = self.t2 = None

    def first(self) -> None:
        self.t1 = time.perf_counter()

    def done(self) -> None:
        self.t2 = time.perf_counter()

    def result(self, tokens) -> dict:
        return {"tokens": tokens, "ttft_s": self.t1 - self.t0, "decode_s": self.t2 - self.t1}


def speed(engine: Engine, req: dict) -> dict:
    prompts = np.asarray(req["decode_prompts"], dtype=np.int64)
    timed_generation(engine, prompts[:1], 4)  # warm-up: first-run allocations and kernel choices are not timed
    out = {"prefill": timed_generation(engine, np.asarray([req["prompt"]]), 0),
           "decode_b1": timed_generation(engine, prompts[:1], req["new_tokens"])}
    if len(prompts) > 1:
        if engine.max_batch >= len(prompts):
            out["decode_batch"] = timed_generation(engine, prompts, req["new_tokens"])
        else:
            out["decode_batch"] = {"unsupported": f"this runtime decodes batch <= {engine.max_batch} here"}
    return out


def nll(logits: np.ndarray, ids: np.ndarray, chunk: int = 64) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ids[1:] under logits[:-1] (log-sum-exp per position, in
    chunks of positions so a 262k vocabulary stays a few hundred MB)."""
    total, n = 0.0, len(ids) - 1
    for i in range(0, n, chunk):
        a = logits[i:min(i + chunk, n)].astype(np.float64)
        m = a.max(-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(a - m).sum(-1))
        total += float((lse - a[np.arange(len(a)), ids[i + 1:i + 1 + len(a)]]).sum())
    return total, n


def perplexity(engine: Engine, req: dict) -> dict:
    windows = np.load(req["windows"])
    total, count, t0 = 0.0, 0, time.perf_counter()
    for w in windows:
        s, n = nll(engine.window_logits(w.astype(np.int64)), w)
        total, count = total + s, count + n
    return {"nll": total, "tokens": count, "perplexity": math.exp(total / count),
            "seconds": time.perf_counter() - t0, "windows": int(len(windows))}


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(make_engine) -> None:
    """`make_engine(request) -> Engine`; run the request, write the result, exit 0 (ok) or 1 (failed)."""
    req_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    req = json.loads(req_path.read_text())
    result: dict = {"mode": req["mode"]}
    try:
        t0 = time.perf_counter()
        engine = make_engine(req)
        result["load_s"] = time.perf_counter() - t0
        result.update(speed(engine, req) if req["mode"] == "speed" else perplexity(engine, req))
        result["versions"] = {"python": sys.version.split()[0], **engine.versions()}
        result["peak_rss_mb"] = peak_rss_mb()
        result["status"] = "ok"
        code = 0
    except Exception as e:  # noqa: BLE001 - the exact error of the runtime goes into the results table
        result.update(status="failed", error=f"{type(e).__name__}: {e}".strip()[:2000],
                      traceback=traceback.format_exc()[-6000:])
        code = 1
    out_path.write_text(json.dumps(result))
    sys.exit(code)
