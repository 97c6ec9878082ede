"""Throughput and latency of `slim_generate` under a real tritonserver (loopback), for one export.

    python bench/serve.py --export out/gemma-export --out bench/results/

1. Greedy-decodes every prompt in this process first (the reference texts and the no-server speed).
2. Deploys the export to a temporary repository, starts tritonserver with slim_generate only, warms it up.
3. For each concurrency level C: C client threads (HTTP) send --requests requests each; records every latency
   and the generated token counts, and checks each answer against the in-process text.
4. Writes serve_<tag>.json (every number) and serve_<tag>.md (a table) into --out.

Nothing here is estimated: every number in the outputs is measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

PROMPTS = [
    "The capital of France is",
    "Here is a short story about a robot who learns to paint:",
    "Explain in one paragraph why the sky is blue.",
    "List three uses of a paperclip:",
    "def fibonacci(n):",
    "The most important idea in thermodynamics is",
    "Translate to German: The weather is nice today.",
    "Once upon a time, in a small village by the sea,",
]


def local_reference(export: Path, prompts: list[str], max_new_tokens: int, threads: int) -> dict:
    from slim_trt.triton import read_export, runtime

    info = read_export(export)
    t0 = time.perf_counter()
    decoder = runtime.OnnxDecoder(info.model_path, info.spec, threads)
    tokenizer = runtime.load_tokenizer(info.tokenizer_dir)
    load_s = time.perf_counter() - t0
    texts, times, tokens = {}, [], 0
    for prompt in prompts:
        t0 = time.perf_counter()
        text, gen = runtime.generate_text(decoder, tokenizer, prompt, max_new_tokens)
        times.append(time.perf_counter() - t0)
        texts[prompt] = text
        tokens += len(gen.token_ids)
    return {"load_s": load_s, "texts": texts, "latency_s": times, "generated_tokens": tokens,
            "tokens_per_s": tokens / sum(times)}


def run_level(url: str, prompts: list[str], concurrency: int, requests: int, max_new_tokens: int,
              expected: dict[str, str]) -> dict:
    from slim_trt.triton import client as tc

    latencies, tokens, errors, mismatches = [], [], [], []
    lock = threading.Lock()

    def worker(k: int) -> None:
        c = tc.connect(url, "http", network_timeout=600.0, connection_timeout=600.0)
        try:
            for i in range(requests):
                prompt = prompts[(k * requests + i) % len(prompts)]
                t0 = time.perf_counter()
                try:
                    result = tc.generate(c, prompt, max_new_tokens)
                except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                    with lock:
                        errors.append(repr(e))
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    tokens.append(len(result.token_ids))
                    if result.text != expected[prompt]:
                        mismatches.append(prompt)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1e3
    return {"concurrency": concurrency, "requests": concurrency * requests, "ok": len(latencies),
            "errors": len(errors), "first_errors": errors[:3], "text_mismatches": len(mismatches),
            "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "generated_tokens": int(sum(tokens)), "tokens_per_s": sum(tokens) / wall,
            "latency_ms": {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
                           "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
                           "max": float(ms.max())} if len(ms) else None,
            "ms_per_token": float(ms.sum() / max(1, sum(tokens)))}


def markdown(result: dict) -> str:
    e, s = result["export"], result["settings"]
    lines = [f"# slim_generate under tritonserver: {result['tag']}", "",
             f"Export `{e['folder']}`: {e['architecture']}, {e['dtype']}, low-rank {e['lowrank']}, "
             f"{e['num_layers']} layers, vocabulary {e['vocab_size']}, model files {e['model_mb']:.0f} MB.",
             f"Machine: {result['machine']['cpus']} CPUs ({result['machine']['processor']}), "
             f"load average {result['machine']['loadavg_before']} before the run; tritonserver "
             f"{result['server']['version']} ({result['server']['source']}), onnxruntime "
             f"{result['versions']['onnxruntime']} on the CPU, {s['instances']} instance(s), ORT threads "
             f"{s['intra_op_threads'] or 'default'}.",
             f"Greedy decoding, {s['max_new_tokens']} new tokens per request, {len(result['prompts'])} prompts; "
             f"server start {result['server']['startup_s']:.1f} s.", "",
             "| where | concurrency | requests | errors | text = local | req/s | gen tok/s | p50 ms | p90 ms | "
             "p99 ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    loc = result["local"]
    lat = np.asarray(loc["latency_s"]) * 1e3
    lines.append(f"| in process (no server) | 1 | {len(lat)} | 0 | - | {len(lat) / (lat.sum() / 1e3):.2f} | "
                 f"{loc['tokens_per_s']:.1f} | {np.percentile(lat, 50):.0f} | {np.percentile(lat, 90):.0f} | "
                 f"{np.percentile(lat, 99):.0f} |")
    for r in result["levels"]:
        m = r["latency_ms"] or {}
        lines.append(f"| tritonserver HTTP | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['ok'] - r['text_mismatches']}/{r['ok']} | {r['requests_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {m.get('p50', 0):.0f} | {m.get('p90', 0):.0f} | "
                     f"{m.get('p99', 0):.0f} |")
    lines += ["", "gen tok/s counts generated tokens over the wall time of the level (all clients). The server has "
              "one slim_generate instance per --instances; requests beyond that wait in Triton's queue, which is "
              "what the higher-concurrency latencies show.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", default="out/gemma-export", help="export folder (model.onnx, slim_export.json)")
    parser.add_argument("--out", default="bench/results", help="folder for serve_<tag>.json / .md")
    parser.add_argument("--tag", default="gemma3-270m", help="name in the result files")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--instances", type=int, default=1, help="slim_generate instances in the server")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per instance (0 = default)")
    args = parser.parse_args()

    from slim_trt.triton import TritonServer, deploy, read_export
    from slim_trt.errors import SlimError

    export = Path(args.export)
    try:
        info = read_export(export)
    except SlimError as e:
        print(f"bench/serve.py: {e}", file=sys.stderr)
        return 2
    if info.tokenizer_dir is None:
        print(f"bench/serve.py: {export} has no tokenizer folder; slim_generate needs one", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    import onnxruntime

    result = {"tag": args.tag, "prompts": PROMPTS,
              "settings": {"max_new_tokens": args.max_new_tokens, "requests_per_client": args.requests,
                           "instances": args.instances, "intra_op_threads": args.threads},
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                          "python": platform.python_version()},
              "versions": {"onnxruntime": onnxruntime.__version__},
              "export": {"folder": str(export), "architecture": info.raw.get("architecture"),
                         "dtype": info.dtype, "lowrank": info.lowrank, "num_layers": info.spec.num_layers,
                         "vocab_size": info.spec.vocab_size,
                         "model_mb": sum(p.stat().st_size for p in info.model_files) / 2**20,
                         "checkpoint": info.raw.get("checkpoint")}}
    print(f"in-process reference: {len(PROMPTS)} prompts x {args.max_new_tokens} tokens", flush=True)
    result["local"] = local_reference(export, PROMPTS, args.max_new_tokens, args.threads)
    print(f"  {result['local']['tokens_per_s']:.1f} tokens/s", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="slim-bench-serve-"))
    try:
        repo = deploy(export, workdir / "repo", instances=args.instances, intra_op_threads=args.threads,
                      default_max_new_tokens=args.max_new_tokens).repo
        t0 = time.perf_counter()
        with TritonServer(repo, models=["slim_generate"], log_path=workdir / "tritonserver.log") as server:
            startup = time.perf_counter() - t0
            from slim_trt.triton import client as tc

            c = tc.connect(server.http_url)
            meta = c.get_server_metadata()
            tc.generate(c, PROMPTS[0], 4)  # warm-up: first-run allocations are not part of the numbers
            c.close()
            result["server"] = {"version": meta["version"], "source": server.install.source,
                                "startup_s": startup}
            result["levels"] = []
            for level in levels:
                print(f"concurrency {level}: {level * args.requests} requests", flush=True)
                r = run_level(server.http_url, PROMPTS, level, args.requests, args.max_new_tokens,
                              result["local"]["texts"])
                print(f"  {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, p50 "
                      f"{r['latency_ms']['p50']:.0f} ms, p99 {r['latency_ms']['p99']:.0f} ms, errors {r['errors']}, "
                      f"text mismatches {r['text_mismatches']}", flush=True)
                result["levels"].append(r)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", markdown(result))):
        path = out / f"serve_{args.tag}{suffix}"
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(text)
        tmp.rename(path)
        print(f"wrote {path}")
    return 0 if all(r["errors"] == 0 for r in result["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
