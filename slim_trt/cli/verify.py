"""slim-trt verify model.onnx --reference CKPT"""
from __future__ import annotations

from .common import add_parser


def register(sub) -> None:
    p = add_parser(sub, "verify", "compare an ONNX export (ONNX Runtime) with its PyTorch checkpoint",
                   "Run the ONNX model in ONNX Runtime with the session config its slim_export.json declares (prefill, "
                   "then decode steps through the KV cache) and the "
                   "checkpoint in PyTorch on the same real text; report logit error, cosine similarity, top-1 "
                   "agreement and perplexity; exit 1 when a threshold is broken.",
                   "  slim-trt verify export/gemma-slim/model.onnx --reference out/gemma-slim\n"
                   "  slim-trt verify export/gemma-slim/model.onnx --reference out/gemma-slim --json report.json \\\n"
                   "      --save-inputs inputs.json --save-outputs ort_outputs.json\n"
                   "  # later, on a GPU machine:\n"
                   "  polygraphy run export/gemma-slim/model.onnx --trt --load-inputs inputs.json "
                   "--load-outputs ort_outputs.json")
    p.add_argument("onnx", metavar="MODEL.onnx")
    p.add_argument("--reference", required=True, metavar="CKPT",
                   help="the checkpoint the export was made from (for a dense export: the MODEL)")
    p.add_argument("--text", default=None, metavar="FILE", help="text file (default: shipped WikiText-2 test excerpt)")
    p.add_argument("--windows", type=int, default=2, help="number of text windows")
    p.add_argument("--seqlen", type=int, default=64, help="tokens per window")
    p.add_argument("--decode-steps", type=int, default=4, help="single-token steps through the KV cache")
    p.add_argument("--max-abs", type=float, default=None, help="max |logit error| (default by dtype; looser when the session runs int8 activations)")
    p.add_argument("--mean-abs", type=float, default=None, help="mean |logit error| (default by dtype; looser when the session runs int8 activations)")
    p.add_argument("--min-cosine", type=float, default=None, help="lowest per-position cosine (default by dtype; looser when the session runs int8 activations)")
    p.add_argument("--min-top1", type=float, default=None, help="top-1 agreement fraction (default by dtype; looser when the session runs int8 activations)")
    p.add_argument("--max-ppl-rel", type=float, default=None, help="relative perplexity difference (default by dtype; looser when the session runs int8 activations)")
    p.add_argument("--providers", default=None, help="comma-separated ONNX Runtime providers (default: CUDA if present, CPU)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON ('-' = stdout)")
    p.add_argument("--save-inputs", default=None, metavar="FILE", help="Polygraphy JSON of every feed (--load-inputs)")
    p.add_argument("--save-outputs", default=None, metavar="FILE",
                   help="Polygraphy RunResults of the ORT outputs (--load-outputs)")
    p.add_argument("--engine", default=None, metavar="NAME.plan", help="also verify a TensorRT engine (GPU only)")
    p.add_argument("--plugin", action="append", default=None, metavar="LIB.so", help="TensorRT plugin library (--engine)")
    p.add_argument("--plain", action="store_true",
                   help="also report the graph's plain arithmetic (ONNX Runtime's Q/DQ fusion off); the checks use "
                        "the session config the export declares")
    p.add_argument("--ignore-manifest", action="store_true", help="verify even if CKPT is not the export's source")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..outputs import check_outputs
    from ..verification.ort_vs_torch import format_report, verify
    from .common import onnx_inputs, print_json

    check_outputs(files={"--json": args.json, "--save-inputs": args.save_inputs, "--save-outputs": args.save_outputs},
                  inputs=[*onnx_inputs(args.onnx), args.reference, args.text])
    thresholds = {"max_abs": args.max_abs, "mean_abs": args.mean_abs, "cosine_min": args.min_cosine,
                  "top1_min": args.min_top1, "ppl_rel_max": args.max_ppl_rel}
    report = verify(args.onnx, args.reference, text=args.text, windows=args.windows, seqlen=args.seqlen,
                    decode_steps=args.decode_steps, thresholds=thresholds,
                    providers=args.providers.split(",") if args.providers else None,
                    save_inputs=args.save_inputs, save_outputs=args.save_outputs, engine=args.engine,
                    plugins=args.plugin, ignore_manifest=args.ignore_manifest, plain=args.plain)
    if args.json != "-":
        print(format_report(report))
    if args.json:
        print_json(report.to_dict(), args.json)
    return 0 if report.ok else 1
