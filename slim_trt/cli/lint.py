"""slim-trt lint model.onnx [--target trt10|trt11|jetson-orin-jp6|GPU-PROFILE] [--gpu GPU-PROFILE]"""
from __future__ import annotations

from ..targets.profile import DEFAULT_LINT_TARGET, LINT_TABLES as TARGETS  # data only: no linter import for --help
from .common import add_parser
from .recipes import fill


def register(sub) -> None:
    p = add_parser(sub, "lint", "check an ONNX file against TensorRT's parser rules (CPU only)",
                   fill("Check op support for the target TensorRT, the Q/DQ rules (zero points, INT4 on MatMul weights, "
                   "opset, blocked axis, scale dtype), registered plugins, and report per GEMM whether the weight "
                   "is 2:4 along K and whether TensorRT can run it on 2:4 sparse tensor cores (INT8 x INT8, FP16, "
                   "FP8 where the GPU has it) or why not (INT4 weight-only, not 2:4, precision, shape), with the "
                   "share of GEMM FLOPs of each class; and per eligible INT8 GEMM its form: int8-in/int8-out "
                   "(sparse INT8 tactics available) or int8-in/float-out (allowed, but TensorRT is reported to "
                   "pick sparse INT8 kernels only with an INT8 output: expect dense; docs/tensorrt-sparsity.md). "
                   "Exit 1 on errors."),
                   "  slim-trt lint export/gemma-slim/model.onnx\n"
                   "  slim-trt lint export/gemma-slim/model.onnx --target jetson-orin --json lint.json\n"
                   "  slim-trt lint export/gemma-slim/model.onnx --target trt11 --gpu hopper")
    p.add_argument("onnx", metavar="MODEL.onnx")
    p.add_argument("--target", default=DEFAULT_LINT_TARGET,
                   help=f"a TensorRT table ({', '.join(TARGETS)}) or a GPU profile (ampere, ada, hopper, jetson-orin, "
                        f"jetson-thor, yours, or a .json path: its TensorRT table and its GPU)")
    p.add_argument("--gpu", default=None, metavar="PROFILE",
                   help="GPU profile for the sparse tensor-core prediction [default: the --target profile; "
                        "jetson-orin for jetson-orin-jp6; else any GPU since Ampere, without FP8]")
    p.add_argument("--quiet", action="store_true", help="do not list every GEMM layer")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON ('-' = stdout)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..linter import format_report, lint
    from ..outputs import check_outputs
    from .common import onnx_inputs, print_json

    check_outputs(files={"--json": args.json}, inputs=onnx_inputs(args.onnx))
    report = lint(args.onnx, target=args.target, gpu=args.gpu)
    if args.json != "-":
        print(format_report(report, show_layers=not args.quiet))
    if args.json:
        print_json(report.to_dict(), args.json)
    return 0 if report.ok else 1
