"""slim-trt lint model.onnx [--target trt10|trt11|jetson-orin-jp6]"""
from __future__ import annotations

from .common import add_parser

TARGETS = ("trt10", "trt11", "jetson-orin-jp6")  # kept in step with slim_trt.linter.tables.TARGETS (tested)


def register(sub) -> None:
    p = add_parser(sub, "lint", "check an ONNX file against TensorRT's parser rules (CPU only)",
                   "Check op support for the target TensorRT, the Q/DQ rules (zero points, INT4 on MatMul weights, "
                   "opset, blocked axis, scale dtype), registered plugins, and report per layer whether the weight "
                   "is 2:4 along K with the fraction of GEMM FLOPs that are 2:4-eligible. Exit 1 on errors.",
                   "  slim-trt lint export/gemma-slim/model.onnx\n"
                   "  slim-trt lint export/gemma-slim/model.onnx --target jetson-orin-jp6 --json lint.json")
    p.add_argument("onnx", metavar="MODEL.onnx")
    p.add_argument("--target", default="trt10", help=f"one of {', '.join(TARGETS)}")
    p.add_argument("--quiet", action="store_true", help="do not list every GEMM layer")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON ('-' = stdout)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..linter import format_report, lint
    from .common import print_json

    report = lint(args.onnx, target=args.target)
    if args.json != "-":
        print(format_report(report, show_layers=not args.quiet))
    if args.json:
        print_json(report.to_dict(), args.json)
    return 0 if report.ok else 1
