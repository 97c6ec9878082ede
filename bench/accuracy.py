#!/usr/bin/env python
"""Accuracy benchmark: every compression recipe (ours and two peer libraries) on one model, one data set.

    python bench/accuracy.py [--rows 1,7,8|all] [--windows N|all] [--nsamples 128] --out bench/results/

Perplexity on non-overlapping WikiText-2 test windows (the same windows for every row) and the top-1 next-token
agreement with the dense model. Each row is written to the JSON as soon as it finishes, so an interrupted run
resumes: rows already in the JSON with the same config and settings are skipped unless --redo.

Peer rows (NVIDIA ModelOpt, llm-compressor) run their libraries' own APIs in their own venvs
(bench/.venv-<peer>, made from bench/peers/requirements-<peer>.txt) through bench/peers/run_<peer>.py; the peer
saves a plain HF folder with fake-quantized dense weights, and this harness checks the pattern (2:4 count, 4-bit
levels per group) and evaluates it with the same code as our rows.

The rows are data (bench/accuracy_rows.json, read by accuracy_rows.py); accuracy_run.py computes one row and
accuracy_report.py turns the results JSON into the Markdown and the PNG (with nothing to run, a call re-renders).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/harness.py, when run as a script
import harness
from harness import BENCH, DEFAULT_CALIB, DEFAULT_DATA, model_tag, portable_path, versions

from slim_trt.data.windows import parse_window_count
from slim_trt.errors import SlimError

try:  # the rows file is read (and checked) on import: a row it cannot describe is one line, not a traceback
    from accuracy_report import Results
    from accuracy_rows import ROWS, select_rows
    from accuracy_run import Settings, prepare, run_row
except SlimError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = harness.row_parser("bench/accuracy.py", __doc__, ROWS, name_width=24)
    p.add_argument("--model", default="gemma3-270m", help="MODEL as slim-trt compress takes it [default: gemma3-270m]")
    p.add_argument("--calib", default=str(DEFAULT_CALIB), metavar="FILE", help="calibration text")
    p.add_argument("--data", default=str(DEFAULT_DATA), metavar="FILE", help="evaluation text")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows [default: 128]")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window [default: 512]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", default="32", help="evaluation windows: N (the first N) or 'all' [default: 32]")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward [default: 8]")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--out", default=str(BENCH / "results"), help="output folder [default: bench/results]")
    p.add_argument("--redo", action="store_true", help="recompute rows already in the JSON")
    p.add_argument("--peer-venvs", default=str(BENCH), metavar="DIR",
                   help="folder holding .venv-modelopt and .venv-llmcompressor [default: bench/]")
    p.add_argument("--peer-timeout", type=float, default=3 * 3600, help="seconds per peer run [default: 10800]")
    return p


def main(argv: list[str] | None = None) -> int:
    return harness.cli_main(build_parser(), _main, argv)


def _main(args) -> int:
    rows = select_rows(args.rows)
    harness.check_positive(nsamples=args.nsamples, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size)
    harness.check_text_files(calib=args.calib, data=args.data)
    settings = Settings(model=args.model, calib=portable_path(args.calib), data=portable_path(args.data),
                        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        windows=parse_window_count(args.windows))
    results = Results(Path(args.out), model_tag(args.model), settings.to_dict(), args.redo)
    todo = results.todo(rows, args.redo)
    if not todo:
        results.write()
        return 0
    t_run = time.time()
    results.data["machine"] = harness.machine()
    ctx = prepare(args, settings)
    base_versions = versions()
    results.data.update(versions=base_versions, eval_windows=len(ctx.eval), eval_tokens=int(ctx.eval[:, 1:].numel()),
                        calib_windows=len(ctx.calib))
    # Row 1 is the reference pass itself; record it whenever it is selected.
    for row in todo:
        print(f"[{row.number}] {row.name}: {row.label} ...", flush=True)
        record = run_row(row, ctx, args, base_versions)
        results.put(row.key, record)
        if record["status"] == "ok":
            print(f"[{row.number}] {row.name}: ppl {record['perplexity']:.3f} (x{record['ratio_to_dense']:.3f}), top-1 "
                  f"{record['top1_agreement']:.3f}, {record['bits_per_param']:.3f} bits/param "
                  f"({record['bits_per_param_with_adapters']:.3f} with adapters), {record['wall_seconds']:.0f} s",
                  flush=True)
        else:
            print(f"[{row.number}] {row.name}: FAILED: {record['error']}", flush=True)
    results.data["last_run_seconds"] = round(time.time() - t_run, 1)
    results.data["machine"]["loadavg_after"] = harness.loadavg()
    results.write()
    print(f"wrote {results.json_path}, {results.md_path.name}, {results.png_path.name} "
          f"({time.time() - t_run:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
