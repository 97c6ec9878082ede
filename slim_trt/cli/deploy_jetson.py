"""`slim-trt deploy jetson EXPORT_DIR -o BUNDLE`: a folder to copy to a Jetson, build and time the engine there."""
from __future__ import annotations

import argparse

from .common import add_shape_args


def register(targets) -> None:
    p = targets.add_parser(
        "jetson", help="a bundle to copy to a Jetson: export, plugin sources, build/run scripts, README",
        description="Write BUNDLE, a self-contained folder for a Jetson: the export (ONNX + external data, "
                    "slim_export.json, tokenizer), the LowRankAdd plugin sources with their CMake build (plugin "
                    "exports only), build.sh (the board's trtexec, or `slim-trt build`, with the target profile and "
                    "2:4 sparsity on), run.sh (prefill/decode timing), a README naming the JetPack / TensorRT "
                    "versions with the memory budget check for the chosen shapes, and lint.json. The export must "
                    "pass `slim-trt lint` for the target and fit the board's memory, or nothing is written (exit 2).",
        epilog="examples:\n"
               "  slim-trt deploy jetson export/gemma -o bundles/gemma-orin\n"
               "  slim-trt deploy jetson export/gemma -o bundles/gemma-thor --target jetson-thor --seq 1,256,2048\n"
               "  slim-trt deploy jetson export/gemma -o b/ --target jetson-orin --memory-gb 64   # AGX Orin 64 GB",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by `slim-trt export`")
    p.add_argument("-o", "--output", metavar="BUNDLE", required=True, help="bundle folder to create")
    p.add_argument("--target", default="jetson-orin", metavar="jetson-orin|jetson-thor|FILE.json",
                   help="Jetson target profile (default: jetson-orin)")
    add_shape_args(p)
    p.add_argument("--memory-gb", type=float, default=None, metavar="GB",
                   help="the board's memory for the budget check (default: the target's smallest module, "
                        "e.g. 8 for Orin Nano 8 GB)")
    p.add_argument("--force", action="store_true", help="replace BUNDLE if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex
    import sys

    from ..jetson import JetsonConfig, LintRefused, bundle_jetson
    from ..outputs import check_outputs

    check_outputs(folders={"-o": args.output}, inputs=[args.export_dir], force=args.force)
    config = JetsonConfig(target=args.target, batch=args.batch, seq=args.seq, past=args.past,
                          workspace_gb=args.workspace_gb, memory_gb=args.memory_gb, overwrite=args.force)
    try:
        bundle = bundle_jetson(args.export_dir, args.output, config)
    except LintRefused as e:
        for f in e.report.errors:
            print(f"ERROR  {f.rule}  {f.node + ': ' if f.node else ''}{f.message}", file=sys.stderr)
        raise
    print(f"wrote Jetson bundle {bundle.path} for {bundle.target.name} "
          f"({'with' if bundle.plugin else 'no'} LowRankAdd plugin sources)")
    print(f"memory: {bundle.memory.line()}")
    print(bundle.lint_line)
    for w in bundle.warnings:
        print(f"warning: {w}")
    print(f"on the board: cd {shlex.quote(bundle.path.name)} && ./build.sh && ./run.sh   (--dry-run prints the "
          "commands)")
    return 0
