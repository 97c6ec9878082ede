"""slim-trt build MODEL.onnx -o engines/NAME.plan"""
from __future__ import annotations

from .common import add_parser, add_shape_args, print_json


def register(sub) -> None:
    p = add_parser(
        sub, "build", "build a TensorRT engine from an export (needs TensorRT and an NVIDIA GPU)",
        "Build NAME.plan with TensorRT (10.x strongly typed, or 11.x): 2:4 sparse weights on by default, "
        "optimization profiles from slim_export.json and --batch/--seq/--past, after a `slim-trt lint` pre-flight "
        "for the target. Writes NAME.build.json beside the engine (TensorRT version, GPU, options, build time, "
        "size, and per layer whether it was eligible for sparse math and whether a sparse tactic was picked) and "
        "NAME.build.log (the builder log).",
        "  slim-trt build export/gemma/model.onnx -o engines/gemma.plan\n"
        "  slim-trt build export/gemma/model.onnx -o engines/gemma-dense.plan --no-sparsity\n"
        "  slim-trt build export/gemma-plugin/model.onnx -o engines/gemma-plugin.plan --target jetson-orin \\\n"
        "      --batch 1 --seq 1,128,1024 --past 0,512,2048 --plugins plugins/build/lowrank_add/liblowrank_add_plugin.so\n"
        "  slim-trt build --list-targets")
    p.add_argument("model", nargs="?", metavar="MODEL.onnx", help="model.onnx written by `slim-trt export`")
    p.add_argument("-o", "--output", metavar="NAME.plan",
                   help="engine file to write [default: engines/NAME.plan, NAME = the ONNX file's folder name]")
    p.add_argument("--target", metavar="NAME|FILE.json", default=None,
                   help="target profile by name (shipped, or yours in $SLIM_TRT_PROFILES_DIR or "
                        "./engines/profiles/; see --list-targets) or a profile file; "
                        "default: the profile matching this GPU")
    p.add_argument("--no-sparsity", dest="sparsity", action="store_false",
                   help="build without SPARSE_WEIGHTS (dense kernels), e.g. to compare with the sparse engine")
    add_shape_args(p)
    p.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="tactic timing cache to read (if present) and update; speeds up rebuilds")
    p.add_argument("--plugins", nargs="+", default=[], metavar="LIB",
                   help="plugin libraries to load; default: the built liblowrank_add_plugin.so when the model has "
                        "LowRankAdd nodes ($SLIM_TRT_PLUGIN_PATH, then plugins/build/lowrank_add/)")
    p.add_argument("--skip-lint", action="store_true", help="do not run the `slim-trt lint` pre-flight (not advised)")
    p.add_argument("--force", action="store_true", help="overwrite an existing engine")
    p.add_argument("--verbose", action="store_true", help="show TensorRT's INFO log and keep its VERBOSE log")
    p.add_argument("--json", default=None, metavar="FILE", help="also print/write the build report ('-' = stdout)")
    p.add_argument("--list-targets", action="store_true", help="list the target profiles and exit")
    p.set_defaults(func=run)


def _list_targets() -> int:
    from pathlib import Path

    from ..targets.profile import SHIPPED_DIR, list_targets, load_target

    print(f"{'TARGET':<13} {'COMPUTE':<8} {'INT4':>5} {'FP8':>4} {'FP4':>4} {'2:4':>4} {'MEM GB':>7}  "
          f"{'LINT':<15}  FILE")
    for name in list_targets():
        t = load_target(name)
        s = t.supports
        yes = {True: "yes", False: "-"}
        where = "shipped" if Path(t.source).parent == SHIPPED_DIR else t.source
        print(f"{t.name:<13} {','.join(t.compute_capabilities):<8} {yes[s['int4_weights']]:>5} {yes[s['fp8']]:>4} "
              f"{yes[s['fp4']]:>4} {yes[s['sparsity_2_4']]:>4} {t.memory_budget_gb:>7g}  {t.lint_target:<15}  {where}")
    return 0


def run(args) -> int:
    from pathlib import Path

    from ..errors import SlimError

    if args.list_targets:
        return _list_targets()
    if not args.model:
        raise SlimError("give the model to build: slim-trt build MODEL.onnx [-o engines/NAME.plan]")
    if not args.output:
        args.output = str(Path("engines") / f"{Path(args.model).resolve().parent.name}.plan")
    from ..outputs import check_outputs
    from .common import onnx_inputs

    # -o's folder is created by the build, so only its overlap with the inputs is checked here
    check_outputs(files={"--json": args.json}, inputs=onnx_inputs(args.model))
    if Path(args.output).resolve() in {p.resolve() for p in onnx_inputs(args.model)}:
        raise SlimError(f"-o {args.output} is the input {args.model}: write the engine to another file, e.g. "
                        f"engines/NAME.plan")
    from ..trt.builder import build

    report = build(args.model, args.output, target=args.target, sparsity=args.sparsity, batch=args.batch,
                   seq=args.seq, past=args.past, workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
                   plugins=args.plugins, verbose=args.verbose, skip_lint=args.skip_lint, force=args.force)
    print(report.format())
    print(f"wrote {report.files['engine']}, {report.files['report']}, {report.files['log']}")
    if args.json:
        print_json(report.to_dict(), args.json)
    return 0
