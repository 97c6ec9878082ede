"""slim-trt bench NAME.plan [--compare OTHER.plan]"""
from __future__ import annotations

from .common import add_parser, print_json


def register(sub) -> None:
    p = add_parser(
        sub, "bench", "prefill/decode latency and tokens/s of TensorRT engines (needs TensorRT and a GPU)",
        "Time one prefill (prompt, empty cache) and one decode step (1 token after the context) of an engine "
        "with Polygraphy's TrtRunner, inputs staged on the GPU; with --compare, a second engine side by side "
        "(e.g. sparse vs dense). Shapes default to the engine's optimization-profile opt shapes.",
        "  slim-trt bench engines/gemma.plan --compare engines/gemma-dense.plan\n"
        "  slim-trt bench engines/gemma.plan --batch 4 --prompt-len 512 --context-len 2048 --json bench.json")
    p.add_argument("engine", metavar="NAME.plan")
    p.add_argument("--compare", default=None, metavar="OTHER.plan", help="a second engine to time side by side")
    p.add_argument("--plugins", nargs="+", default=[], metavar="LIB",
                   help="plugin libraries; default: those recorded in NAME.build.json")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the profile's opt)")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill tokens (default: the profile's opt)")
    p.add_argument("--context-len", type=int, default=None,
                   help="cache length before the decode step (default: the profile's opt past length)")
    p.add_argument("--iterations", type=int, default=20, help="timed runs per phase")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON ('-' = stdout)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..outputs import check_outputs
    from ..trt.runtime import bench, format_bench

    check_outputs(files={"--json": args.json}, inputs=[args.engine, args.compare])
    result = bench(args.engine, compare=args.compare, plugins=args.plugins, batch=args.batch,
                   prompt_len=args.prompt_len, context_len=args.context_len, iterations=args.iterations,
                   warmup=args.warmup)
    print(format_bench(result))
    if args.json:
        print_json(result, args.json)
    return 0
