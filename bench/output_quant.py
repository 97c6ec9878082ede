#!/usr/bin/env python
"""What an INT8 output quantizer on every compressed GEMM would cost (issue 23, item 2): a fake-quant estimate.

TensorRT is reported to choose its structured-sparse INT8 kernels only for GEMMs that are INT8 in and INT8 out
(docs/tensorrt-sparsity.md). The W8A8 export quantizes GEMM inputs only. This measures, on the dense model in
PyTorch, what per-tensor symmetric INT8 fake quantization of each decoder linear's output costs in perplexity,
alone and on top of the same quantization of its input, with static scales chosen by the compressor's own
estimator (algorithms/actquant.py, MSE by default) on a few calibration windows.

Why the dense model is a fair proxy for the base GEMM's output: SmoothQuant rescales a GEMM's input and weight
so that their product is unchanged, so the output a quantizer would see is the same function of the input with or
without smoothing; 2:4 + INT8 weights change it only by the compression error. Inputs here are not smoothed, so the
input-only row is worse than the product's W8A8 recipe; the output row is what the output quantizer adds.

    python bench/output_quant.py --calib-windows 4 --eval-windows 4 --seqlen 512 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from harness import DEFAULT_CALIB, DEFAULT_DATA

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_linears(model, which=LINEARS) -> dict:
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in which}


def calibrate(model, windows, method: str) -> dict:
    """{name: (input scale, output scale)} from |x| and |y| histograms over the calibration windows."""
    import torch

    from slim_trt.algorithms.actquant import accumulate_abs_histogram, act_scale

    hists, hooks = {}, []
    for name, lin in decoder_linears(model).items():
        def hook(mod, args, out, name=name):
            hin, hout = hists.get(name, (None, None))
            hists[name] = (accumulate_abs_histogram(hin, args[0].detach()),
                           accumulate_abs_histogram(hout, out.detach()))
        hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    return {n: (act_scale(a, method), act_scale(b, method)) for n, (a, b) in hists.items()}


def fake_quantized(model, scales: dict, inputs: bool, outputs: bool, which=LINEARS) -> list:
    """Forward hooks quantizing each decoder linear's input and/or output to INT8 (per tensor, static)."""
    from slim_trt.algorithms.actquant import fake_quant

    hooks = []
    for name, lin in decoder_linears(model, which).items():
        s_in, s_out = scales[name]
        if inputs:
            hooks.append(lin.register_forward_pre_hook(lambda m, args, s=s_in: (fake_quant(args[0], s),)))
        if outputs:
            hooks.append(lin.register_forward_hook(lambda m, args, out, s=s_out: fake_quant(out, s)))
    return hooks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--calib-windows", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--act-scale", default="mse", choices=["max", "percentile", "mse"])
    p.add_argument("--calib", default=str(DEFAULT_CALIB), metavar="FILE", help="calibration text")
    p.add_argument("--data", default=str(DEFAULT_DATA), metavar="FILE", help="evaluation text")
    p.add_argument("--linears", default=",".join(LINEARS),
                   help="which decoder linears get the quantizers [default: all seven]")
    p.add_argument("--outputs-only", action="store_true", help="skip the input-quantized conditions")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from slim_trt.data.windows import calibration_windows, load_text
    from slim_trt.verification.perplexity import perplexity
    from slim_trt.models.source import load_model

    t0 = time.time()
    model, tok = load_model(args.model)
    model.eval()
    calib = calibration_windows(tok, load_text(args.calib), args.calib_windows, args.seqlen, 0)
    ev = harness.evaluation_windows(tok, args.data, args.seqlen, args.eval_windows)
    scales = calibrate(model, calib, args.act_scale)
    rows = {}
    which = tuple(x.strip() for x in args.linears.split(",") if x.strip())
    if not which or set(which) - set(LINEARS):
        p.error(f"--linears: choose among {', '.join(LINEARS)}")
    conditions = [("dense", False, False), ("int8 inputs", True, False), ("int8 outputs", False, True),
                  ("int8 inputs + outputs", True, True)]
    if args.outputs_only:
        conditions = [c for c in conditions if not c[1]]
    for label, inputs, outputs in conditions:
        hooks = fake_quantized(model, scales, inputs, outputs, which)
        rows[label] = perplexity(model, ev, batch_size=2)
        for h in hooks:
            h.remove()
        print(f"{label:24} perplexity {rows[label]:.3f} (x{rows[label] / rows['dense']:.4f} dense)", flush=True)
    out = {"model": args.model, "calib_windows": len(calib), "eval_windows": len(ev), "seqlen": args.seqlen,
           "act_scale": args.act_scale, "quantized": list(which),
           "linears": len(decoder_linears(model, which)), "perplexity": rows,
           "ratio_to_dense": {k: round(v / rows["dense"], 4) for k, v in rows.items()},
           "outputs_over_inputs_only": (round(rows["int8 inputs + outputs"] / rows["int8 inputs"], 4)
                                        if "int8 inputs" in rows else None),
           "seconds": round(time.time() - t0, 1), "loadavg": harness.loadavg()}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
