"""slim-trt export CKPT_OR_MODEL -o export/NAME/"""
from __future__ import annotations

from ..exporter.options import (DEFAULT_ORT_ACCURACY_LEVEL, EXTERNAL_DATA_THRESHOLD, HEAD_MODES, OPSET,
                                OUTLIER_FORMS, W8A8_ORT_ACCURACY_LEVEL, ZERO_POINT_FORMS, ExportOptions)
from .common import add_parser, eprint
from .recipes import fill


def register(sub) -> None:
    p = add_parser(sub, "export", "export a checkpoint (or a dense model) to ONNX (Q/DQ weights, KV cache)",
                   fill(f"Write OUT/model.onnx (opset {OPSET}; INT4/INT8 weights as DequantizeLinear -> MatMul, the 2:4 "
                   "pattern along K) and OUT/slim_export.json (I/O names, shapes, dynamic axes, checkpoint hash, options, "
                   "the ONNX Runtime session config every consumer uses), and copy the tokenizer to OUT/tokenizer/. "
                   "A plain model (not compressed) exports the same way: the dense baseline."),
                   "  slim-trt export out/gemma-slim -o export/gemma-slim/\n"
                   "  slim-trt export out/gemma-slim -o export/gemma-slim-fp32/ --dtype fp32 --lowrank plugin\n"
                   "  slim-trt export out/gemma-slim -o export/gemma-int4head/ --dtype fp32 --head int4\n"
                   "  slim-trt export gemma3-270m -o export/gemma-dense-fp32/ --dtype fp32      # dense baseline\n"
                   "  slim-trt export out/gemma-slim -o export/gemma-prefill/ --no-cache")
    p.add_argument("checkpoint", metavar="CKPT_OR_MODEL",
                   help="a folder written by `slim-trt compress`, or a plain MODEL (Hugging Face folder, .gguf, "
                        "gemma3-270m, hub id) to export dense")
    p.add_argument("-o", "--out", default=None, metavar="DIR",
                   help="output folder [default: export/NAME/, NAME = the checkpoint folder's name]")
    opts = ExportOptions()  # the defaults of the flags below
    p.add_argument("--dtype", default=opts.dtype, help="compute dtype: fp16 (TensorRT), bf16, or fp32 (CPU checks)")
    p.add_argument("--lowrank", default=opts.lowrank,
                   help="decomposed: Add(Y, MatMul(MatMul(X, R^T), L^T)), runs anywhere; "
                        "plugin: one LowRankAdd node for the fused TensorRT plugin")
    p.add_argument("--act-quant", default=None, metavar="int8|none",
                   help="int8: static symmetric per-tensor INT8 Q/DQ on the inputs of compressed MatMuls (W8A8), "
                        "scales calibrated on the shipped text sample. A checkpoint compressed with --act-bits 8 "
                        "exports its own calibrated scales without this flag (and refuses none)")
    p.add_argument("--head", default=opts.head, metavar="|".join(HEAD_MODES),
                   help="weight-only quantization of the embedding and LM head (read from one tensor when tied): "
                        "int8 = one scale per vocabulary row (TensorRT-parsable), int4 = blocks of 128 (ONNX "
                        "Runtime; TensorRT reads INT4 only as a GEMM weight) [default: %(default)s]")
    p.add_argument("--ort-accuracy-level", type=int, default=None, metavar="1|4",
                   help="ONNX Runtime MatMulNBits activations: 1 = fp32, 4 = int8 (recorded in slim_export.json) "
                        f"[default: {DEFAULT_ORT_ACCURACY_LEVEL}; {W8A8_ORT_ACCURACY_LEVEL} when the graph quantizes its "
                        "activations to INT8 itself (--act-quant int8, W8A8 checkpoints)]")
    p.add_argument("--outliers", default=opts.outliers, metavar="|".join(OUTLIER_FORMS),
                   help="SpQR checkpoints: how the fp16 outliers run. scatter = Gather, Mul, ScatterElements add "
                        "(stores only the outliers; ~12x a layer's prefill time in ONNX Runtime, a plugin in "
                        "TensorRT); columns = Gather the input columns holding any outlier + one fp16 MatMul (faster, "
                        "but stores |columns| x N fp16: nearly dense on Gemma 3 270M); dense = a second fp16 GEMM "
                        "[default: %(default)s]")
    p.add_argument("--zero-points", default=opts.zero_points, choices=ZERO_POINT_FORMS,
                   help="weights with zero points (SpQR): dq = DequantizeLinear with a UINT4 zero point (ONNX "
                        "Runtime's MatMulNBits); fold = signed INT4 codes (zero point 0) + one small fp16 MatMul of "
                        "the group sums of x for the offsets, which TensorRT parses [default: %(default)s]")
    p.add_argument("--no-cache", action="store_true", help="prefill-only graph without KV-cache inputs/outputs")
    p.add_argument("--external-data", action="store_true",
                   help="always store weights in model.onnx.data [default: only above "
                        f"~{EXTERNAL_DATA_THRESHOLD / 2**30:g} GiB]")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the sidecar JSON here ('-' = stdout)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from pathlib import Path

    from ..exporter import MODEL_FILE, SIDECAR, export
    from ..outputs import check_outputs
    from .common import print_json

    t0 = time.perf_counter()
    if args.out is None:
        args.out = str(Path("export") / Path(args.checkpoint).resolve().name)
    # before loading and exporting, not after
    check_outputs(folders={"-o": args.out}, files={"--json": args.json}, inputs=[args.checkpoint], force=args.force)
    meta = export(args.checkpoint, args.out, dtype=args.dtype, with_cache=not args.no_cache, lowrank=args.lowrank,
                  act_quant=args.act_quant, external_data=True if args.external_data else None, head=args.head,
                  ort_accuracy_level=args.ort_accuracy_level, force=args.force, outliers=args.outliers,
                  zero_points=args.zero_points)
    out = Path(args.out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith(MODEL_FILE))
    eprint(f"wrote {out / MODEL_FILE} ({size / 2**20:.1f} MiB{', external data' if meta['external_data'] else ''}) "
           f"and {out / SIDECAR} in {time.perf_counter() - t0:.1f} s")
    print(f"architecture     {meta['architecture']} ({meta['num_layers']} layers, {meta['num_kv_heads']} KV heads "
          f"x {meta['head_dim']})")
    print(f"graph            opset {meta['opset']}, IR {meta['ir_version']}, dtype {meta['dtype']}, "
          f"lowrank {meta['lowrank']}, act-quant {'fp8' if meta.get('act_format') == 'fp8' else meta['act_quant'] or 'none'}, "
          f"{'KV cache' if meta['with_cache'] else 'prefill only'}")
    print(f"compressed       {len(meta['compressed_layers'])} linear layers as Q/DQ MatMul")
    head = meta["head"]
    print(f"embedding/head   {head['quantization']}{' (tied: one tensor)' if head.get('tied') else ''}")
    print(f"onnxruntime      {', '.join(f'{k}={v}' for k, v in meta['onnxruntime']['session_config'].items())}")
    print(f"inputs           {', '.join(i['name'] for i in meta['inputs'][:3])}"
          f"{' + past_key_values.*' if meta['with_cache'] else ''}")
    print(f"outputs          logits{' + present.*' if meta['with_cache'] else ''}")
    print(f"tokenizer        {out / meta['tokenizer'] if meta['tokenizer'] else 'none'}")
    if args.json:
        print_json(meta, args.json)
    return 0
