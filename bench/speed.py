#!/usr/bin/env python
"""Speed benchmark: the dense and compressed exports of one model side by side with two peer runtimes, on the CPU.

    python bench/speed.py --checkpoint CKPT [--rows all|1,3,7] [--repeats 3] [--threads N] --out bench/results/

Per row: prefill tokens/s (a 512-token prompt), time to first token, decode tokens/s (128 new tokens at batch 1
and batch 4, greedy), model bytes on disk, peak RSS, and the perplexity on the accuracy benchmark's test windows.
Every measurement runs in its own worker process (the row's runtime in its own Python), so the peak RSS is that
process's own high-water mark (VmHWM). Rows are interleaved across repeats (repeat 1 of every row,
then repeat 2, ...), so a change in the machine's load hits all rows alike; each figure is the median of the
repeats. The JSON is rewritten after every worker, so an interrupted run resumes: rows already complete with the
same recipe are skipped unless --force.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/harness.py, when run as a script
import harness
from harness import BENCH, DEFAULT_DATA, REPO, RowFailed, fmt

from slim_trt.data.windows import parse_window_count
from slim_trt.errors import SlimError


@dataclass(frozen=True)
class Row:
    number: int
    name: str
    label: str
    export: dict | None = None  # slim-trt export: source ("dense" | "checkpoint") + export options
    peer: str | None = None  # "ortgenai" | "llamacpp"

    @property
    def key(self) -> str:
        return f"{self.number}-{self.name}"


# Rows 1-8 pin the head (and rows 3-8 the accuracy level) they were defined with; the export defaults (an int8
# head, int8 activations) are row 11.
SLIM = {"source": "checkpoint", "dtype": "fp32", "lowrank": "decomposed", "head": "none", "ort_accuracy_level": 1}
ROWS: tuple[Row, ...] = (
    Row(1, "dense-fp32", "dense, slim-trt export, fp32", export={"source": "dense", "dtype": "fp32", "head": "none"}),
    Row(2, "dense-fp16", "dense, slim-trt export, fp16", export={"source": "dense", "dtype": "fp16", "head": "none"}),
    Row(3, "slim-dequant", "compressed, fp32, weights dequantized at load (the session before issue 12)",
        export={**SLIM, "fuse": False}),
    Row(4, "slim-decomposed", "compressed, fp32, low-rank decomposed", export=SLIM),
    Row(5, "slim-plugin", "compressed, fp32, low-rank plugin (LowRankAdd)", export={**SLIM, "lowrank": "plugin"}),
    Row(6, "slim-head-int8", "compressed, decomposed, --head int8", export={**SLIM, "head": "int8"}),
    Row(7, "slim-head-int4", "compressed, decomposed, --head int4", export={**SLIM, "head": "int4"}),
    Row(8, "slim-head-int4-acc4", "row 7 with int8 activations (--ort-accuracy-level 4)",
        export={**SLIM, "head": "int4", "ort_accuracy_level": 4}),
    Row(9, "ortgenai-int4", "peer: onnxruntime-genai model builder INT4", peer="ortgenai"),
    Row(10, "llamacpp-q4km", "peer: llama.cpp, gemma-3-270m-q4_k_m.gguf", peer="llamacpp"),
    Row(11, "slim-defaults", "compressed, the export defaults: --head int8, int8 activations (accuracy level 4)",
        export={**SLIM, "head": "int8", "ort_accuracy_level": 4}),
    # `slim-trt export CKPT` with no option at all: whatever the exporter's defaults are (fp16 today, the file
    # TensorRT builds), served as every session the product opens serves it (the in-memory forms included).
    Row(12, "slim-export-plain", "compressed, `slim-trt export CKPT` with no options (its defaults, fp16 file)",
        export={"source": "checkpoint"}),
)
DENSE_KEY, ORTGENAI_KEY, LLAMACPP_KEY = "1-dense-fp32", "9-ortgenai-int4", "10-llamacpp-q4km"
PEERS = {
    "ortgenai": {"package": "onnxruntime-genai",
                 "recipe": "python -m onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p int4 -e cpu "
                           "(its defaults: RTN INT4 block 32 symmetric MatMulNBits with int8 activations "
                           "(accuracy level 4) for every linear and the LM head, the tied embedding read from the "
                           "head's INT4 tensor (GatherBlockQuantized), fused QKV and GroupQueryAttention)"},
    "llamacpp": {"package": "llama-cpp-python",
                 "recipe": "llama-cpp-python (built from the sdist here, CPU backend) on the Q4_K_M GGUF the "
                           "demo's model is converted from, through its low-level batch API"},
}
# The figures of a speed run (median over repeats), read from each worker's result.
FIGURES = {
    "prefill_tokens_per_s": ("prefill", "prefill_tokens_per_s"),
    "ttft_long_ms": ("prefill", "ttft_s"),
    "ttft_short_ms": ("decode_b1", "ttft_s"),
    "decode_b1_tokens_per_s": ("decode_b1", "tokens_per_s"),
    "decode_batch_tokens_per_s": ("decode_batch", "tokens_per_s"),
    "load_s": (None, "load_s"),
}


def select_rows(spec: str) -> list[Row]:
    return harness.select_rows(spec, ROWS)


def export_session_config(row: Row, ctx: Context | None = None) -> dict:
    """The ONNX Runtime session config the row's export declares, its options resolved with the exporter's
    defaults as `slim-trt export` resolves them (a W8A8 checkpoint's export quantizes its activations itself): a row
    that leaves an option to the defaults (row 12) is measured and exported again when they change."""
    from slim_trt.exporter.options import ExportOptions

    opts = {k: v for k, v in row.export.items() if k not in ("source", "fuse")}
    if row.export["source"] == "checkpoint" and ctx is not None and ctx.checkpoint_w8a8:
        opts.setdefault("act_quant", "int8")
    return ExportOptions(**opts).session_config()


def row_config(row: Row, ctx: Context | None = None) -> dict:
    """What a stored row was made with; a stored row with another config is measured again."""
    if row.export is not None:
        out = {"method": "slim_trt.export", **row.export, "session_config": export_session_config(row, ctx)}
        if row.export["source"] == "checkpoint" and ctx is not None:
            out["checkpoint_manifest_sha256"] = ctx.checkpoint_sha
        return out
    return {"method": "peer", "peer": row.peer, "recipe": PEERS[row.peer]["recipe"]}


# ----------------------------------------------------------------------------------------------------------------
# Settings and context


@dataclass
class Context:
    args: argparse.Namespace
    work: Path
    model_folder: Path
    checkpoint: Path | None
    checkpoint_sha: str | None
    checkpoint_w8a8: bool  # its layers carry activation scales (the export adds their INT8 Q/DQ)
    windows_npy: Path
    prompt: list[int]
    decode_prompts: list[list[int]]


def settings_of(args) -> dict:
    """What every row shares. The text is named by its file name and content hash, so a run from another
    checkout (or a worktree) resumes the same results."""
    from slim_trt.checkpoint.format import file_sha256

    return {"model": args.model, "data": Path(args.data).name, "data_sha256": file_sha256(Path(args.data))[:16],
            "seqlen": args.seqlen,
            "windows": "all" if parse_window_count(args.windows) is None else int(args.windows),
            "prompt_tokens": args.prompt_tokens, "decode_prompt_tokens": args.decode_prompt_tokens,
            "new_tokens": args.new_tokens, "batch": args.batch, "threads": args.threads}


def prepare_context(args) -> Context:
    """The evaluation windows (the accuracy benchmark's), the prompts cut from them, and the checkpoint's hash."""
    import numpy as np
    from transformers import AutoTokenizer

    from slim_trt.models.source import model_folder

    folder = Path(model_folder(args.model))
    tok = AutoTokenizer.from_pretrained(str(folder))
    windows = harness.evaluation_windows(tok, args.data, args.seqlen, parse_window_count(args.windows))
    if len(windows) < args.batch:
        raise SlimError(f"{args.data} gives {len(windows)} windows of {args.seqlen} tokens; the decode prompts need "
                        f"{args.batch}: use a longer text or a smaller --seqlen")
    if args.prompt_tokens > args.seqlen or args.decode_prompt_tokens > args.seqlen:
        raise SlimError(f"--prompt-tokens and --decode-prompt-tokens must be <= --seqlen {args.seqlen}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    npy = work / "windows.npy"
    np.save(npy, windows.numpy().astype(np.int64))
    ckpt, sha, w8a8 = None, None, False
    if args.checkpoint:
        from slim_trt.checkpoint.format import DIGEST_KEY, read_manifest

        ckpt = Path(args.checkpoint).resolve()
        if not (ckpt / "slim_manifest.json").is_file():
            raise SlimError(f"--checkpoint {args.checkpoint} is not a slim-trt checkpoint (no slim_manifest.json): "
                            f"run `slim-trt compress {args.model} -o DIR` first")
        manifest = read_manifest(ckpt)  # checked against its own checksum
        sha = manifest[DIGEST_KEY]  # what slim_trt.exporter.manifest_sha256 reads
        w8a8 = any(layer.get("act_scale") is not None for layer in manifest.get("layers", {}).values())
    return Context(args=args, work=work, model_folder=folder, checkpoint=ckpt, checkpoint_sha=sha,
                   checkpoint_w8a8=w8a8, windows_npy=npy,
                   prompt=windows[0, :args.prompt_tokens].tolist(),
                   decode_prompts=[w[:args.decode_prompt_tokens].tolist() for w in windows[:args.batch]])


# ----------------------------------------------------------------------------------------------------------------
# Models under test: built once into --work, rebuilt when their recipe changes


def _stamped(folder: Path, stamp: dict) -> bool:
    f = folder.with_name(folder.name + ".stamp.json")
    return folder.is_dir() and f.is_file() and json.loads(f.read_text()) == stamp


def _stamp(folder: Path, stamp: dict) -> None:
    harness.atomic_write(folder.with_name(folder.name + ".stamp.json"), json.dumps(stamp, indent=1).encode())


def build_export(row: Row, ctx: Context) -> dict:
    """The slim-trt export of a row under --work/exports/ (shared by rows with the same export options; reused
    while its recipe is unchanged)."""
    opts = {k: v for k, v in row.export.items() if k not in ("source", "fuse")}
    out = ctx.work / "exports" / "-".join([row.export["source"], *(f"{v}" for _, v in sorted(opts.items()))])
    dense = row.export["source"] == "dense"
    stamp = {k: v for k, v in row_config(row, ctx).items() if k != "fuse"}
    stamp |= {"model_folder": str(ctx.model_folder)} if dense else {"checkpoint": str(ctx.checkpoint)}
    if _stamped(out, stamp):
        return {"folder": str(out), "built_s": None, **export_facts(out)}
    if not dense and ctx.checkpoint is None:
        raise RowFailed("this row exports the compressed checkpoint: pass --checkpoint CKPT (a folder written by "
                        "`slim-trt compress`)")
    import slim_trt

    t0 = time.time()
    print(f"  exporting {row.name} -> {out} ...", flush=True)
    # The product's export: a MODEL gives the dense baseline, a checkpoint the compressed model.
    slim_trt.export(ctx.args.model if dense else ctx.checkpoint, out, force=True, progress=False, **opts)
    _stamp(out, stamp)
    return {"folder": str(out), "built_s": round(time.time() - t0, 1), **export_facts(out)}


def export_facts(folder: Path) -> dict:
    """What slim_export.json says about how the export runs (recorded next to its figures)."""
    raw = json.loads((folder / "slim_export.json").read_text())
    return {"dtype": raw.get("dtype"), "lowrank": raw.get("lowrank"), "head": raw.get("head"),
            "onnxruntime": raw.get("onnxruntime"), "compressed_layers": len(raw.get("compressed_layers") or [])}


def peer_python(row: Row, ctx: Context) -> Path:
    return harness.peer_python(ctx.args.peer_venvs, row.peer, "bench-peers-speed")


def build_ortgenai(row: Row, ctx: Context) -> dict:
    """onnxruntime-genai's model builder, INT4 for the CPU, on the same HF folder (its own defaults)."""
    py = peer_python(row, ctx)
    out = ctx.work / "ortgenai-int4"
    package = PEERS[row.peer]["package"]
    version = harness.venv_version(py, package)
    stamp = row_config(row) | {"model_folder": str(ctx.model_folder),
                               "venv": f"{package}=={version}" if version else None}
    if _stamped(out, stamp):
        return {"folder": str(out), "built_s": None}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(ctx.model_folder), "-o", str(tmp),
           "-p", "int4", "-e", "cpu", "-c", str(ctx.work / "ortgenai-cache")]
    print(f"  $ {' '.join(cmd)}", flush=True)
    log = ctx.work / "logs" / "ortgenai-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=harness.peer_env(), check=False).returncode
    if rc != 0:
        tail = harness.log_tail(log)
        raise RowFailed(f"the onnxruntime-genai builder failed (exit {rc}): {tail.splitlines()[-1] if tail else ''}",
                        tail)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _stamp(out, stamp)
    return {"folder": str(out), "built_s": round(time.time() - t0, 1), "command": " ".join(cmd[1:])}


def llamacpp_model(row: Row, ctx: Context) -> dict:
    from slim_trt.models.source import EMBEDDED_DEFAULT, _embedded_gguf

    peer_python(row, ctx)
    if ctx.args.model != EMBEDDED_DEFAULT:
        raise RowFailed(f"the llama.cpp row runs the GGUF of the embedded {EMBEDDED_DEFAULT}; --model is "
                        f"{ctx.args.model}")
    return {"file": str(_embedded_gguf(EMBEDDED_DEFAULT)), "built_s": None}


def prepare_row(row: Row, ctx: Context) -> dict:
    """{"folder" or "file", "built_s", ...}: the model the row's worker loads. Raises RowFailed."""
    if row.export is not None:
        return build_export(row, ctx)
    if row.peer == "ortgenai":
        return build_ortgenai(row, ctx)
    return llamacpp_model(row, ctx)


def model_files(row: Row, model: dict) -> list[Path]:
    """The files a row's runtime reads its weights and graph from (what "bytes on disk" counts)."""
    if "file" in model:
        return [Path(model["file"])]
    folder = Path(model["folder"])
    if row.export is not None:
        from slim_trt.triton import read_export

        return read_export(folder).model_files
    return sorted(p for p in folder.iterdir() if ".onnx" in p.name)


# ----------------------------------------------------------------------------------------------------------------
# Workers


def worker_command(row: Row, ctx: Context) -> tuple[list[str], dict]:
    if row.export is not None:
        return [sys.executable, str(BENCH / "speed_slim.py")], {**os.environ, "PYTHONPATH": str(REPO)}
    return [str(peer_python(row, ctx)), str(BENCH / "peers" / f"speed_{row.peer}.py")], harness.peer_env()


def run_worker(row: Row, ctx: Context, model: dict, mode: str, tag: str) -> dict:
    """Run one worker to the end; its result (with its peak RSS), the wall time and the load average before and
    after. Raises RowFailed with the worker's own error."""
    args = ctx.args
    request = {"mode": mode, "model": model.get("folder") or model.get("file"), "threads": args.threads,
               "options": {"fuse": row.export.get("fuse", True)} if row.export is not None else {},
               "prompt": ctx.prompt, "decode_prompts": ctx.decode_prompts, "new_tokens": args.new_tokens,
               "windows": str(ctx.windows_npy)}
    cmd, env = worker_command(row, ctx)
    log = ctx.work / "logs" / f"{row.key}-{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        load_before, t0 = harness.loadavg(), time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd + [str(req), str(res)], stdout=f, stderr=subprocess.STDOUT, env=env)
            try:
                proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        wall = time.time() - t0
        result = json.loads(res.read_text()) if res.exists() else None
    if result is None or result.get("status") != "ok":
        err = (result or {}).get("error") or (f"timed out after {args.timeout:.0f} s" if wall >= args.timeout
                                              else f"exit code {proc.returncode}: {harness.log_tail(log, 1)}")
        raise RowFailed(err, (result or {}).get("traceback") or harness.log_tail(log))
    return {**result, "peak_rss_mb": round(result["peak_rss_mb"], 1), "wall_s": round(wall, 2),
            "loadavg_before": load_before, "loadavg_after": harness.loadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0))}


def compact_run(result: dict) -> dict:
    """A speed run as stored: every figure, the generated tokens of the batch-1 run (for the greedy check)."""
    run = {name: _figure(result, *where) for name, where in FIGURES.items()}
    run.update({k: result[k] for k in ("peak_rss_mb", "wall_s", "loadavg_before", "loadavg_after", "started")})
    run["b1_tokens"] = result["decode_b1"]["tokens"][0]
    batch = result.get("decode_batch") or {}
    if "tokens" in batch:  # sequence 0 of the batch decodes the batch-1 prompt: does it give the same tokens?
        run["batch_seq0_matches_b1"] = batch["tokens"][0] == result["decode_b1"]["tokens"][0]
    elif "unsupported" in batch:
        run["decode_batch_note"] = batch["unsupported"]
    return run


def _figure(result: dict, section: str | None, field: str):
    v = result.get(field) if section is None else (result.get(section) or {}).get(field)
    if v is None:
        return None
    return round(v * 1e3, 2) if field == "ttft_s" else round(v, 3)


def summarize(record: dict) -> None:
    """Medians (and ranges) over the stored runs."""
    runs = record.get("runs") or []
    record["repeats"] = len(runs)
    for name in (*FIGURES, "peak_rss_mb"):
        vals = [r[name] for r in runs if r.get(name) is not None]
        record[name] = round(statistics.median(vals), 3) if vals else None
        record.setdefault("range", {})[name] = [min(vals), max(vals)] if vals else None
    loads = [r["loadavg_before"][0] for r in runs] + [r["loadavg_after"][0] for r in runs]
    record["loadavg_1min"] = {"min": min(loads), "median": round(statistics.median(loads), 2),
                              "max": max(loads)} if loads else None


# ----------------------------------------------------------------------------------------------------------------
# Reference perplexities (PyTorch), for "within 2% of the checkpoint's"


def reference_perplexities(ctx: Context) -> dict:
    import numpy as np
    import torch

    from slim_trt.verification.perplexity import perplexity
    from slim_trt.models.source import load_model

    windows = torch.from_numpy(np.load(ctx.windows_npy))
    out = {}
    t0 = time.time()
    dense, _ = load_model(ctx.args.model)
    out["dense_pytorch"] = perplexity(dense, windows, batch_size=1)
    del dense
    if ctx.checkpoint is not None:
        import slim_trt

        model = slim_trt.load(ctx.checkpoint)
        out["checkpoint_pytorch"] = perplexity(model, windows, batch_size=1)
        out["checkpoint"] = str(ctx.checkpoint)
        out["checkpoint_manifest_sha256"] = ctx.checkpoint_sha
    out["seconds"] = round(time.time() - t0, 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Results


class Results(harness.ResultsFile):
    def __init__(self, out_dir: Path, tag: str, settings: dict, force: bool):
        super().__init__(out_dir, "speed", tag, settings, force)

    def order(self) -> list[str]:
        return [row.key for row in ROWS]

    def done(self, row: Row, ctx: Context, repeats: int) -> bool:
        r = self.rows.get(row.key)
        return (bool(r) and r.get("status") == "ok" and r.get("config") == row_config(row, ctx)
                and len(r.get("runs", [])) >= repeats and r.get("perplexity") is not None)

    def derive(self) -> None:
        rows, ref = self.rows, self.data.get("reference") or {}
        base, og, lc = (rows.get(k) or {} for k in (DENSE_KEY, ORTGENAI_KEY, LLAMACPP_KEY))
        for r in rows.values():
            r["x_dense_fp32_b1"] = _ratio(r.get("decode_b1_tokens_per_s"), base.get("decode_b1_tokens_per_s"))
            r["x_dense_fp32_batch"] = _ratio(r.get("decode_batch_tokens_per_s"), base.get("decode_batch_tokens_per_s"))
            r["x_ortgenai_b1"] = _ratio(r.get("decode_b1_tokens_per_s"), og.get("decode_b1_tokens_per_s"))
            r["x_llamacpp_b1"] = _ratio(r.get("decode_b1_tokens_per_s"), lc.get("decode_b1_tokens_per_s"))
            r["ppl_vs_checkpoint"] = _ratio(r.get("perplexity"), ref.get("checkpoint_pytorch"))
            r["ppl_vs_dense"] = _ratio(r.get("perplexity"), ref.get("dense_pytorch"))
            mine, theirs = r.get("runs") and r["runs"][0].get("b1_tokens"), base.get("runs") and base["runs"][0].get(
                "b1_tokens")
            if mine and theirs:  # greedy tokens identical to the dense fp32 export's before the first difference
                r["greedy_prefix_vs_dense_fp32"] = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b),
                                                        min(len(mine), len(theirs)))
        self.data["goals"] = goals(rows, ref)

    def markdown(self) -> str:
        return markdown(self.data)

    def plot(self) -> bytes | None:
        return plot_png(self.data)


W8A8_DECODE_GOAL = 2.5  # issue 23


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def goals(rows: dict, ref: dict) -> dict:
    """The issues' goals, per compressed row: decode >= 3x dense fp32 at batch 1 with perplexity within 2% of the
    checkpoint's (issue 12, the dense INT4 checkpoint); decode >= 1.0x onnxruntime-genai's INT4 at equal or
    better perplexity; the ratio to llama.cpp; decode >= 2.5x dense fp32 at batch 1 (issue 23, the W8A8 2:4
    default, whatever the export's dtype)."""
    og = rows.get(ORTGENAI_KEY) or {}
    out = {"rule_1": "decode_b1 >= 3.0 x dense fp32 export and perplexity <= 1.02 x the checkpoint's (PyTorch)",
           "rule_2": "decode_b1 >= 1.0 x onnxruntime-genai INT4 and perplexity <= onnxruntime-genai's",
           "rule_3": f"decode_b1 >= {W8A8_DECODE_GOAL} x dense fp32 export (the W8A8 2:4 default, any export dtype)",
           "rows": {}}
    for row in ROWS:
        r = rows.get(row.key)
        if not r or row.export is None or row.export["source"] != "checkpoint" or r.get("status") != "ok":
            continue
        g1 = (None if r.get("x_dense_fp32_b1") is None or r.get("ppl_vs_checkpoint") is None
              else r["x_dense_fp32_b1"] >= 3.0 and r["ppl_vs_checkpoint"] <= 1.02)
        g2 = (None if r.get("x_ortgenai_b1") is None or og.get("perplexity") is None or r.get("perplexity") is None
              else r["x_ortgenai_b1"] >= 1.0 and r["perplexity"] <= og["perplexity"])
        out["rows"][row.key] = {"x_dense_fp32_b1": r.get("x_dense_fp32_b1"),
                                "ppl_vs_checkpoint": r.get("ppl_vs_checkpoint"), "goal_1_met": g1,
                                "x_ortgenai_b1": r.get("x_ortgenai_b1"), "perplexity": r.get("perplexity"),
                                "ortgenai_perplexity": og.get("perplexity"), "goal_2_met": g2,
                                "x_llamacpp_b1": r.get("x_llamacpp_b1"),
                                "goal_3_met": (None if r.get("x_dense_fp32_b1") is None
                                               else r["x_dense_fp32_b1"] >= W8A8_DECODE_GOAL)}
    return out


def markdown(data: dict) -> str:
    s, m, ref = data["settings"], data.get("machine") or {}, data.get("reference") or {}
    lines = [f"# Speed: {data['model']}", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('logical_cpus', '?')} logical CPUs "
             f"({m.get('physical_cores', '?')} cores), {m.get('memory_gb', '?')} GB; {s['threads']} threads per row; "
             f"load average (1 min) {m.get('loadavg', '?')} before the run, {m.get('loadavg_after', '?')} after. "
             f"onnxruntime {(data.get('versions') or {}).get('onnxruntime', '?')} for slim-trt's rows.", "",
             *([f"Compressed rows: the checkpoint of `--preset {rc['preset'] or '(custom)'}`"
                f"{' (the defaults)' if rc.get('default') else ''}: {rc['description']}.", ""]
               if (rc := data.get("checkpoint_recipe")) else []),
             f"Each figure is the median of the repeats (runs), each run a fresh worker process; rows interleaved "
             f"across repeats. Prefill: one {s['prompt_tokens']}-token prompt at batch 1 (TTFT {s['prompt_tokens']} = its "
             f"time to the first token). Decode: {s['new_tokens']} greedy tokens after the first, from a "
             f"{s['decode_prompt_tokens']}-token prompt (TTFT {s['decode_prompt_tokens']}), at batch 1 and {s['batch']} "
             f"(tokens/s over all "
             f"sequences); end-of-sequence never stops a row. Peak RSS: the worker process's high-water mark (VmHWM). "
             f"Perplexity: {s['data']}, {s['windows']} windows x {s['seqlen']} tokens (the accuracy "
             f"benchmark's), every token predicted from an empty cache.", "",
             f"| # | row | prefill tok/s | TTFT {s['prompt_tokens']} ms | TTFT {s['decode_prompt_tokens']} ms | decode "
             f"tok/s b1 | decode tok/s b{s['batch']} | x dense fp32 (b1) | MB on disk | peak RSS MB | PPL | PPL / ckpt "
             f"| runs | load (1 min) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        r = data["rows"].get(row.key)
        if r is None:
            continue
        load = r.get("loadavg_1min") or {}
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('error') or '')[:140]}"
        lines.append(
            f"| {row.number} | {row.label} | {fmt(r.get('prefill_tokens_per_s'), 1)} | {fmt(r.get('ttft_long_ms'), 0)} "
            f"| {fmt(r.get('ttft_short_ms'), 0)} | {fmt(r.get('decode_b1_tokens_per_s'), 1)} "
            f"| {fmt(r.get('decode_batch_tokens_per_s'), 1)} | {fmt(r.get('x_dense_fp32_b1'), 2)} "
            f"| {fmt(r['model_bytes'] / 2**20 if r.get('model_bytes') else None, 0)} "
            f"| {fmt(r.get('peak_rss_mb'), 0)} | {fmt(r.get('perplexity'), 2)} | {fmt(r.get('ppl_vs_checkpoint'), 3)} "
            f"| {r.get('repeats', 0)} | {fmt(load.get('min'), 2)}-{fmt(load.get('max'), 2)} "
            f"| {status.replace('|', '/')} |")
    if ref:
        lines += ["", f"Reference perplexities (PyTorch, same windows): dense {fmt(ref.get('dense_pytorch'), 2)}, "
                      f"checkpoint {fmt(ref.get('checkpoint_pytorch'), 2)}."]
    g = data.get("goals") or {}
    if g.get("rows"):
        lines += ["", "| compressed row | x dense fp32 (b1) | PPL / ckpt | goal 1 | x onnxruntime-genai (b1) | PPL vs "
                      "its PPL | goal 2 | x llama.cpp (b1) | goal 3 |", "|---|---|---|---|---|---|---|---|---|"]
        for key, v in g["rows"].items():
            yes = {True: "met", False: "missed", None: "-"}
            lines.append(f"| {key} | {fmt(v['x_dense_fp32_b1'], 2)} | {fmt(v['ppl_vs_checkpoint'], 3)} "
                         f"| {yes[v['goal_1_met']]} | {fmt(v['x_ortgenai_b1'], 2)} | {fmt(v['perplexity'], 2)} vs "
                         f"{fmt(v['ortgenai_perplexity'], 2)} | {yes[v['goal_2_met']]} | {fmt(v['x_llamacpp_b1'], 2)} "
                         f"| {yes[v.get('goal_3_met')]} |")
        rules = f"Goal 1: {g['rule_1']}. Goal 2: {g['rule_2']}."
        lines += ["", rules + (f" Goal 3: {g['rule_3']}." if "rule_3" in g else "")]
    lines += ["", "Row recipes and versions are in the JSON (`config`, `versions`, `model`).", ""]
    return "\n".join(lines)


def plot_png(data: dict) -> bytes | None:
    plt = harness.pyplot()
    pts = [(row, data["rows"][row.key]) for row in ROWS if row.key in data["rows"]
           and data["rows"][row.key].get("decode_b1_tokens_per_s") is not None]
    if not pts:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    ys = range(len(pts))
    colors = ["tab:red" if row.peer else ("tab:gray" if row.export["source"] == "dense" else "tab:blue")
              for row, _ in pts]
    b1 = [r["decode_b1_tokens_per_s"] for _, r in pts]
    b4 = [r.get("decode_batch_tokens_per_s") or 0 for _, r in pts]
    ax.barh([y + 0.2 for y in ys], b1, height=0.4, color=colors, label="batch 1")
    ax.barh([y - 0.2 for y in ys], b4, height=0.4, color=colors, alpha=0.45, label=f"batch {data['settings']['batch']}")
    for y, v in zip(ys, b1):
        ax.annotate(f"{v:.1f}", (v, y + 0.2), xytext=(3, -3), textcoords="offset points", fontsize=7)
    ax.set_yticks(list(ys), [f"{row.number} {row.label}" for row, _ in pts], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"decode tokens/s (median; light: batch {data['settings']['batch']}, all sequences)")
    ax.grid(True, axis="x", alpha=0.3)
    for (row, r), c in zip(pts, colors):
        if r.get("perplexity") is not None:
            bx.scatter([r["decode_b1_tokens_per_s"]], [r["perplexity"]], color=c, zorder=3)
            bx.annotate(str(row.number), (r["decode_b1_tokens_per_s"], r["perplexity"]), xytext=(4, 3),
                        textcoords="offset points", fontsize=8)
    bx.set_xlabel("decode tokens/s, batch 1")
    bx.set_ylabel(f"perplexity ({data['settings']['data']})")
    bx.grid(True, alpha=0.3)
    m = data.get("machine") or {}
    fig.suptitle(f"{data['model']} on {m.get('cpu', '?')}, {data['settings']['threads']} threads "
                 f"(grey: dense, blue: slim-trt compressed, red: peers)", fontsize=9)
    return harness.figure_png(fig)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _tag(text: str) -> str:
    if text and not all(c.isalnum() or c in "-." for c in text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '-' and '.' only (it names a file)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = harness.row_parser("bench/speed.py", __doc__, ROWS, name_width=16)
    p.add_argument("--model", default="gemma3-270m", help="MODEL as slim-trt compress takes it [default: gemma3-270m]")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="the compressed checkpoint of MODEL (`slim-trt compress MODEL -o CKPT`); needed by rows 3-6")
    p.add_argument("--tag", default="", type=_tag,
                   help="results go to speed_<model>_<TAG>.json/.md/.png: one file per checkpoint recipe (e.g. "
                        "trt-int8-sparse) [default: none, speed_<model>.json]")
    p.add_argument("--data", default=str(DEFAULT_DATA), metavar="FILE", help="evaluation text (and the prompts)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window [default: 512]")
    p.add_argument("--windows", default="32", help="evaluation windows: N (the first N) or 'all' [default: 32]")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length [default: 512]")
    p.add_argument("--decode-prompt-tokens", type=int, default=16, help="prompt length before decoding [default: 16]")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps after the first token [default: 128]")
    p.add_argument("--batch", type=int, default=4, help="the batched decode's batch size [default: 4]")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; figures are medians [default: 3]")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of every runtime [default: the CPU count]")
    p.add_argument("--work", default=str(BENCH / "work" / "speed"), metavar="DIR",
                   help="exports, peer models and logs [default: bench/work/speed]")
    p.add_argument("--out", default=str(BENCH / "results"), help="output folder [default: bench/results]")
    p.add_argument("--force", action="store_true", help="measure the selected rows again (and accept new settings)")
    p.add_argument("--peer-venvs", default=str(BENCH), metavar="DIR",
                   help="folder holding .venv-ortgenai and .venv-llamacpp [default: bench/]")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker run [default: 3600]")
    return p


def main(argv: list[str] | None = None) -> int:
    return harness.cli_main(build_parser(), _main, argv)


def _main(args) -> int:
    rows = select_rows(args.rows)
    harness.check_positive(repeats=args.repeats, threads=args.threads, batch=args.batch, new_tokens=args.new_tokens,
                           prompt_tokens=args.prompt_tokens, decode_prompt_tokens=args.decode_prompt_tokens)
    harness.check_text_files(data=args.data)
    settings = settings_of(args)
    tag = harness.model_tag(args.model) + (f"_{args.tag}" if args.tag else "")
    results = Results(Path(args.out), tag, settings, args.force)
    ctx = prepare_context(args)
    todo = [r for r in rows if args.force or not results.done(r, ctx, args.repeats)]
    for r in rows:
        if r not in todo:
            print(f"[{r.number}] {r.name}: already in {results.json_path}, skipped (--force to measure again)")
    t_run = time.time()
    results.data["machine"] = harness.machine()
    results.data["versions"] = harness.versions("onnxruntime", "numpy")
    results.data["peers"] = PEERS
    if ctx.checkpoint is not None:  # which recipe the compressed rows are (a file per recipe: --tag)
        from slim_trt.checkpoint.format import read_manifest
        from slim_trt.cli.info import recipe_of

        recipe = recipe_of(read_manifest(ctx.checkpoint).get("method", {}))
        results.data["checkpoint_recipe"] = {k: recipe[k] for k in ("preset", "default", "description")}

    models: dict[str, dict] = {}
    for row in todo:  # a row whose config changed (or --force) starts again
        old = results.rows.get(row.key)
        if args.force or not old or old.get("config") != row_config(row, ctx) or old.get("status") != "ok":
            results.rows[row.key] = {"number": row.number, "name": row.name, "label": row.label,
                                     "config": row_config(row, ctx), "status": "ok", "runs": []}
        rec = results.rows[row.key]
        print(f"[{row.number}] {row.name}: preparing ...", flush=True)
        try:
            models[row.key] = prepare_row(row, ctx)
            files = model_files(row, models[row.key])
            rec["model"] = {**models[row.key], "files": [p.name for p in files]}
            rec["model_bytes"] = sum(p.stat().st_size for p in files)
        except RowFailed as e:
            _fail(rec, e)
        results.put(row.key, rec)

    for rep in range(args.repeats):
        live = [r for r in todo if results.rows[r.key]["status"] == "ok"]
        for row in live[rep % len(live):] + live[:rep % len(live)] if live else []:  # rotate the order per repeat
            rec = results.rows[row.key]
            if len(rec["runs"]) > rep:
                continue
            try:
                res = run_worker(row, ctx, models[row.key], "speed", f"speed{rep + 1}")
            except RowFailed as e:
                _fail(rec, e)
                results.put(row.key, rec)
                continue
            rec["runs"].append(compact_run(res))
            rec["versions"] = res.get("versions")
            summarize(rec)
            results.put(row.key, rec)
            print(f"[{row.number}] {row.name} run {rep + 1}/{args.repeats}: prefill "
                  f"{fmt(rec['runs'][-1]['prefill_tokens_per_s'], 1)} tok/s, decode b1 "
                  f"{fmt(rec['runs'][-1]['decode_b1_tokens_per_s'], 1)} / b{args.batch} "
                  f"{fmt(rec['runs'][-1]['decode_batch_tokens_per_s'], 1)} tok/s, peak RSS "
                  f"{rec['runs'][-1]['peak_rss_mb']:.0f} MB (load {harness.loadavg()[0]})", flush=True)

    for row in todo:
        rec = results.rows[row.key]
        if rec["status"] != "ok" or rec.get("perplexity") is not None:
            continue
        print(f"[{row.number}] {row.name}: perplexity on {settings['windows']} windows ...", flush=True)
        try:
            res = run_worker(row, ctx, models[row.key], "perplexity", "perplexity")
        except RowFailed as e:
            _fail(rec, e)
            results.put(row.key, rec)
            continue
        rec.update(perplexity=round(res["perplexity"], 4), perplexity_tokens=res["tokens"],
                   perplexity_seconds=round(res["seconds"], 1), perplexity_peak_rss_mb=res["peak_rss_mb"])
        results.put(row.key, rec)
        print(f"[{row.number}] {row.name}: perplexity {res['perplexity']:.3f} ({res['seconds']:.0f} s)", flush=True)

    ref = results.data.get("reference") or {}
    if (todo and (args.force or "dense_pytorch" not in ref
                  or (ctx.checkpoint is not None and ref.get("checkpoint_manifest_sha256") != ctx.checkpoint_sha))):
        print("reference perplexities (PyTorch: dense and checkpoint) ...", flush=True)
        results.data["reference"] = reference_perplexities(ctx)
    results.data["machine"]["loadavg_after"] = harness.loadavg()
    results.data["last_run_seconds"] = round(time.time() - t_run, 1)
    results.write()
    print(f"wrote {results.json_path}, {results.md_path.name}, {results.png_path.name} ({time.time() - t_run:.0f} s)")
    return 0


def _fail(rec: dict, e: RowFailed) -> None:
    rec.update(status="failed", error=e.error, log_tail=e.log_tail)
    print(f"[{rec['number']}] {rec['name']}: FAILED: {e.error}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
