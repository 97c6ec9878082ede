"""Throughput and latency of `slim_generate` under a real tritonserver (loopback), for one export.

    python bench/serve.py --export out/gemma-export --out bench/results/

1. Greedy-decodes every prompt in this process first with slim_trt.Generator (the same runtime and session config
   as the served model): the reference texts and the no-server speed.
2. Deploys the export to a temporary repository, starts tritonserver with slim_generate only, warms it up.
3. For each concurrency level C: C client threads (HTTP) send --requests requests each; records every latency
   and the generated token counts, and checks each answer against the in-process text.
4. Writes serve_<tag>.json (every number, the machine and its load) and serve_<tag>.md (a table, with each
   level's tokens/s as a ratio to in-process) into --out.

Nothing here is estimated: every number in the outputs is measured in this run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/harness.py (it puts the checkout on the path)
import harness

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
    from slim_trt.runtime.generation import Generator

    t0 = time.perf_counter()
    gen = Generator(export, threads=threads)
    load_s = time.perf_counter() - t0
    gen.generate(prompts[0], 4)  # warm-up, as the server gets one
    texts, times, tokens, decode = {}, [], 0, []
    for prompt in prompts:
        t0 = time.perf_counter()
        result = gen.generate(prompt, max_new_tokens)
        times.append(time.perf_counter() - t0)
        texts[prompt] = result.texts[0]
        tokens += len(result.token_ids[0])
        decode.append(result.timing.decode_tokens_per_second)
    return {"load_s": load_s, "texts": texts, "latency_s": times, "generated_tokens": tokens,
            "tokens_per_s": tokens / sum(times), "decode_tokens_per_s_median": float(np.median(decode)),
            "session_config": dict(gen.spec.session_config)}


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
             f"Machine: {result['machine']['logical_cpus']} CPUs ({result['machine']['cpu']}), "
             f"load average {result['machine']['loadavg']} before the run, {result['machine'].get('loadavg_after')} "
             f"after; tritonserver "
             f"{result['server']['version']} ({result['server']['source']}), onnxruntime "
             f"{result['versions']['onnxruntime']} on the CPU, {s['instances']} instance(s), ORT threads "
             f"{s['intra_op_threads'] or 'default'}; session config "
             f"{json.dumps(result['local'].get('session_config', {}))}.",
             f"Greedy decoding, {s['max_new_tokens']} new tokens per request, {len(result['prompts'])} prompts; "
             f"server start {result['server']['startup_s']:.1f} s.", "",
             "| where | concurrency | requests | errors | text = local | req/s | gen tok/s | x in-process | p50 ms | "
             "p90 ms | p99 ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    loc = result["local"]
    lat = np.asarray(loc["latency_s"]) * 1e3
    lines.append(f"| in process (no server) | 1 | {len(lat)} | 0 | - | {len(lat) / (lat.sum() / 1e3):.2f} | "
                 f"{loc['tokens_per_s']:.1f} | 1.00 | {np.percentile(lat, 50):.0f} | {np.percentile(lat, 90):.0f} | "
                 f"{np.percentile(lat, 99):.0f} |")
    for r in result["levels"]:
        m = r["latency_ms"] or {}
        lines.append(f"| tritonserver HTTP | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['ok'] - r['text_mismatches']}/{r['ok']} | {r['requests_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / loc['tokens_per_s']:.2f} | {m.get('p50', 0):.0f} | {m.get('p90', 0):.0f} | "
                     f"{m.get('p99', 0):.0f} |")
    lines += ["", "gen tok/s counts generated tokens over the wall time of the level (all clients). The server has "
              "one slim_generate instance per --instances; requests beyond that wait in Triton's queue, which is "
              "what the higher-concurrency latencies show. x in-process: the level's gen tok/s over the in-process "
              "tokens/s (the same greedy requests, one at a time, no server); the goal at concurrency 1 is >= 0.85.",
              ""]
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
    result = {"benchmark": "serve", "tag": args.tag, "prompts": PROMPTS,
              "settings": {"max_new_tokens": args.max_new_tokens, "requests_per_client": args.requests,
                           "instances": args.instances, "intra_op_threads": args.threads},
              "machine": harness.machine(),
              "versions": harness.versions("onnxruntime", "tritonclient"),
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

    result["machine"]["loadavg_after"] = harness.loadavg()
    one = next((r for r in result["levels"] if r["concurrency"] == 1), None)
    result["served_over_in_process_c1"] = (round(one["tokens_per_s"] / result["local"]["tokens_per_s"], 4)
                                           if one else None)
    out = Path(args.out)
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", markdown(result))):
        path = out / f"serve_{args.tag}{suffix}"
        harness.atomic_write(path, text.encode())
        print(f"wrote {path}")
    return 0 if all(r["errors"] == 0 for r in result["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
