"""slim-trt compress MODEL -o OUT"""
from __future__ import annotations

import argparse

from ..config import DEFAULT_PRESET, PRESETS
from .common import add_parser, eprint, print_json

_FLAGS = ("sparsity", "bits", "quantizer", "group_size", "pruner", "lowrank", "rank_ratio", "rank_multiple",
          "quantize_adapters", "adapter_quantizer", "skip_layers", "refit_rounds", "refit_rounding", "refit_scales",
          "refit_mask", "channel_permutation", "rank_allocation", "max_bits", "act_bits", "act_scale_method", "smooth_alpha", "outlier_share", "zero_point",
          "bit_allocation", "weight_format", "act_format")


def register(sub) -> None:
    p = add_parser(
        sub, "compress", "compress a Hugging Face causal LM one-shot with SLiM",
        "Quantize (INT8/INT4, optionally 2-3 bits), prune along K (2:4), and fit low-rank adapters on the total\n"
        "error, one decoder block at a time on calibration text, each block fed by the compressed ones before it.\n"
        "The defaults are --preset trt-int8-sparse (W8A8 2:4): SparseGPT 2:4 with INT8 weights per output\n"
        "channel, static per-tensor INT8 activations after SmoothQuant alpha 0.5, LRC adapters (rank 0.23, they\n"
        "read the float activation) rounded to 4 bits, 3 refit rounds choosing the 2:4 mask again, MLP channels\n"
        "permuted for down_proj's 2:4 groups; 1.23x dense perplexity on Gemma 3 270M at 6.36 bits/param. Why: 2:4 INT8 x INT8 is the math TensorRT's sparse INT8 tensor cores run on every NVIDIA\n"
        "GPU since Ampere and on Jetson Orin; INT4 is weight-only in TensorRT (no sparse kernel reads it).\n"
        "--preset int4-dense: dense INT4 GPTQ (groups of 128) + 4-bit H-LoRA within 4.5 bits/param (1.14x, the\n"
        "defaults before issue 23; weight-only INT4 GEMMs, no sparse math).\n"
        "--preset slim-2to4: the best 2:4 W4A16 recipe (SparseGPT 2:4 with SLiM-Quant scales, 1.30x).\n"
        "--preset slim-paper: the SLiM paper's exact recipe (Wanda, per-tensor SLiM-Quant, SLiM-LoRA r 0.1).\n"
        "--preset trt-fp8-sparse: the same 2:4 recipe in FP8 E4M3 (weights and activations) for Hopper, Ada\n"
        "and Jetson Thor (docs/fp8.md).\n"
        "Flags change the preset's recipe (the default's without --preset). Without --preset, weights that INT8\n"
        "activations cannot multiply (--bits 2, 3, 4 or 16, --quantizer spqr, --bit-allocation slim-llm) start\n"
        "from --preset slim-2to4, the weight-only 2:4 recipe: `--bits 4` alone is exactly --preset slim-2to4.\n"
        "--act-bits none alone keeps the default's 2:4 INT8 weights and drops its activation parts (INT8\n"
        "activations, SmoothQuant; LRC becomes H-LoRA): W8A16 2:4. --act-bits 8 with weight-only weights is refused.\n"
        "An interrupted run resumes when re-run unchanged.",
        "  slim-trt compress gemma3-270m -o out/gemma-slim --nsamples 32 --seqlen 512\n"
        "  slim-trt compress ./my-llama -o out/llama --preset slim-2to4 --calib data.txt\n"
        "  slim-trt compress ./my-llama -o out/llama-int4 --preset int4-dense\n"
        "  slim-trt compress model.gguf -o out/m --preset int4-dense --sparsity unstructured:0.5",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a local Hugging Face folder, a hub id, a .gguf file, or 'gemma3-270m' (the embedded default)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoint folder to write")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help=f"start from a named recipe; explicit flags still override it [default: {DEFAULT_PRESET}]")
    p.add_argument("--sparsity", default=None, help="2:4, N:M, unstructured:RATIO or none [default: 2:4; none in --preset int4-dense]")
    p.add_argument("--bits", type=int, default=None, metavar="{2,3,4,8,16}",
                   help="weight bits (the average with --bit-allocation slim-llm); 2 and 3 bits use zero points and "
                        "INT4 containers and need --quantizer gptq or spqr; 16 = no quantization; without --preset, any but 8 "
                        "starts from --preset slim-2to4 (weight-only) [default: 8; 4 in the INT4 presets]")
    p.add_argument("--zero-point", action=argparse.BooleanOptionalAction, default=None,
                   help="asymmetric min-max grids with an integer zero point per group [default: on at 2-3 bits and "
                        "with slim-llm, off at 4 (the symmetric INT4 grid, the only one TensorRT's INT4 takes)]")
    p.add_argument("--bit-allocation", default=None, choices=["uniform", "slim-llm"],
                   help="slim-llm: SliM-LLM's salience-driven N-1 / N / N+1 bits per group of 128 columns around "
                        "--bits N (2, 3 or 4), with salience-weighted clip calibration [default: uniform]")
    p.add_argument("--quantizer", default=None, choices=["slim", "absmax", "gptq", "spqr"], help="slim = SLiM-Quant (histogram-optimal clip per group), in the SparseGPT sweep when --pruner "
                        "sparsegpt; spqr = SpQR (GPTQ sweep, groups of 16 with 3-bit quantized scales and zero "
                        "points, fp16 outliers up to --outlier-share; with --sparsity 2:4 the mask comes first and "
                        "outliers sit only at kept positions) [default: slim; gptq in --preset int4-dense]")
    p.add_argument("--outlier-share", type=float, default=None, metavar="SHARE",
                   help="--quantizer spqr: the largest share of each layer's weights kept as fp16 outliers "
                        "(32 bits each in bits/param) [default: 0.01]")
    p.add_argument("--group-size", type=int, default=None,
                   help="0 per tensor, -1 per channel, G groups along K [default: -1 (INT8 GEMMs take no groups); 128 in the "
                        "INT4 presets; 16 with --quantizer spqr]")
    p.add_argument("--pruner", default=None, choices=["wanda", "sparsegpt", "magnitude"], help="[default: sparsegpt]")
    p.add_argument("--lowrank", default=None, choices=["slim", "hessian", "svd", "lrc", "none"],
                   help="adapters: slim = SLiM-LoRA (diagonal saliency), hessian = the exact output-error optimum with "
                        "the full input covariance, svd = plain SVD, lrc = low-rank correction of weight and "
                        "activation quantization (needs --act-bits 8), none [default: lrc; hessian in the weight-only presets]")
    p.add_argument("--rank-ratio", type=float, default=None, help="rank = ratio x min(d_in, d_out) [default: 0.23]")
    p.add_argument("--rank-multiple", type=int, default=None, help="round the rank up to a multiple [default: 1]")
    p.add_argument("--max-bits", type=_max_bits, default=None, metavar="BITS",
                   help="budget of the compressed layers in bits/param, adapters included (README 'Bits per "
                        "parameter'): when the ranks from --rank-ratio would exceed it, the ratio is lowered for "
                        "the whole model until they fit; 'none' turns the budget off [default: none (INT8 2:4 stores 5 "
                        "bits/param before adapters); 4.5 in --preset int4-dense and slim-2to4]")
    p.add_argument("--quantize-adapters", action=argparse.BooleanOptionalAction, default=None,
                   help="store the adapters in 4 bits (groups of 128); --no-quantize-adapters keeps fp16 "
                        "[default: on]")
    p.add_argument("--adapter-quantizer", default=None, choices=["gptq", "rtn"],
                   help="how 4-bit adapters are rounded: gptq = R by GPTQ with the layer's H, then L re-fitted to the "
                        "rounded R and rounded by GPTQ too (keeps nearly all the adapters' gain); rtn = round to "
                        "nearest, as the SLiM paper [default: gptq; rtn in --preset int4-dense and slim-paper]")
    p.add_argument("--refit-rounds", type=int, default=None, metavar="N",
                   help="after the adapters, re-quantize the base from W - L R and re-fit the adapters, up to N "
                        "rounds, each kept only if the layer's output error drops [default: 3]")
    p.add_argument("--refit-rounding", default=None, choices=["last", "every"],
                   help="when the refit rounds round the 4-bit adapters: last = float adapters between rounds, "
                        "rounded once at the end (faster; bench row 56: 1.341x dense against row 24's 1.320x); every = in every round [default: every]")
    p.add_argument("--refit-scales", default=None, choices=["first", "every"],
                   help="the refit rounds' SparseGPT sweeps round on the group scales the first sweep chose (first) "
                        "(faster) or search them again on W - L R (every) [default: every]")
    p.add_argument("--refit-mask", default=None, choices=["keep", "reselect"],
                   help="the refit rounds' SparseGPT sweeps keep the first sweep's 2:4 mask (keep) or choose it again "
                        "on W - L R, the part the adapters leave to the base (reselect; a round is still kept only "
                        "if the layer's error drops) [default: reselect in the 2:4 SparseGPT recipes (rows 63, 64: 1.320x -> 1.298x, "
                        "1.298x -> 1.287x dense on Gemma 3 270M), keep elsewhere]")
    p.add_argument("--channel-permutation", default=None, choices=["none", "mlp"],
                   help="mlp: permute each block's MLP intermediate channels (gate/up output rows with down input "
                        "columns; an equivalent network, nothing at run time) so that down_proj's 2:4 groups keep "
                        "more saliency |W| ||x|| [default: mlp in the W8A8 2:4 recipe (row 67: 1.287x -> 1.232x dense on "
                        "Gemma 3 270M), none elsewhere]")
    p.add_argument("--rank-allocation", default=None, choices=["uniform", "sensitivity"],
                   help="sensitivity: share each block's uniform adapter budget among its layers by the error "
                        "their singular values leave [default: uniform]")
    p.add_argument("--act-bits", type=_act_bits, default=None, metavar="{8,none}",
                   help="8: quantize every compressed linear's input to INT8 with a static per-tensor scale "
                        "calibrated on the calibration windows (W8A8; needs --bits 8 and --group-size -1 or 0); "
                        "none: weight-only [default: 8; none in the weight-only presets]")
    p.add_argument("--weight-format", default=None, choices=["int", "fp8"],
                   help="number format of the 8-bit weights: int (INT8) or fp8 (FP8 E4M3, absmax/448 per output "
                        "channel; Hopper, Ada, Jetson Thor); fp8 needs --act-format fp8 [default: int; fp8 in "
                        "--preset trt-fp8-sparse]")
    p.add_argument("--act-format", default=None, choices=["int", "fp8"],
                   help="number format of the static per-tensor activations: int (INT8) or fp8 (FP8 E4M3) "
                        "[default: int; fp8 in --preset trt-fp8-sparse]")
    p.add_argument("--act-scale", dest="act_scale_method", default=None, choices=["max", "percentile", "mse"],
                   help="activation scale estimator: max |x|, the 99.99th percentile of |x|, or the clip with the "
                        "least squared error [default: mse]")
    p.add_argument("--smooth-alpha", type=_number_or_none("a strength in [0, 1] (e.g. 0.5)"), default=None,
                   metavar="A", help="SmoothQuant: move activation outliers into the weights with strength A in "
                        "[0, 1], folded into the previous norm or linear; 'none' turns it off [default: 0.5 (1.409x -> "
                        "1.298x dense on Gemma 3 270M); off in the weight-only presets]")
    p.add_argument("--finetune-steps", type=int, default=None, metavar="N",
                   help="fine-tune the adapters for N steps on the calibration windows before saving "
                        "(see slim-trt finetune)")
    p.add_argument("--finetune-minutes", type=float, default=None, metavar="M",
                   help="fine-tune the adapters for at most M minutes (the schedule still spans --finetune-steps, "
                        "default 100; whichever ends first)")
    p.add_argument("--finetune-loss", choices=["ce", "kd"], default=None,
                   help="loss of the fine-tuning: ce (next-token cross-entropy) or kd (distil the dense model) "
                        "[default: ce]")
    p.add_argument("--skip", dest="skip_layers", action="append", default=None, metavar="PATTERN",
                   help="keep matching layers dense (glob on the full name, e.g. '*.down_proj'); repeatable")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text file (or a HF dataset name when the hub is reachable) "
                        "[default: the shipped WikiText-2 validation excerpt]")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="where each decoder block is compressed: auto (a CUDA GPU when torch sees one, else the "
                        "CPU), cpu, cuda or cuda:N; the model stays in host memory. One device per run: blocks are "
                        "not split or spread across GPUs (a list such as cuda:0,1 is refused; a block that does not "
                        "fit the GPU is refused with the bytes it needs and the bytes free) [default: auto]")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="read one decoder block at a time from the safetensors files, in their stored dtype, and "
                        "keep only its compressed result: host memory holds about one block, not the model (README "
                        "'Memory'); the checkpoint is bit-identical to --no-stream, which loads the whole model in "
                        "float32. Hub ids and --finetune-* load the model whole [default: on]")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the run summary as JSON ('-' = stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _number_or_none(what: str):
    """argparse type for a float that 'none' turns off (a preset's value included)."""
    def parse(text: str):
        if text.strip().lower() == "none":
            return "none"
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} or 'none'")
    return parse


_max_bits = _number_or_none("a number of bits (e.g. 4.5)")


def _act_bits(text: str):
    """8, or 'none' (weight-only); other numbers reach CompressConfig, which names the supported one."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 8 (static INT8 activations) or none (weight-only)")


def weight_only_flags(args) -> list[str]:
    """The flags given that ask for weights INT8 activations cannot multiply in TensorRT (weight-only GEMMs)."""
    out = []
    if getattr(args, "bits", None) not in (None, 8):
        out.append(f"--bits {args.bits}")
    if getattr(args, "quantizer", None) == "spqr":
        out.append("--quantizer spqr")
    if getattr(args, "bit_allocation", None) == "slim-llm":
        out.append("--bit-allocation slim-llm")
    return out


def base_recipe(args) -> dict:
    """The recipe the flags change: --preset's; without it the defaults (DEFAULT_PRESET), or, when the flags ask
    for weight-only weights, slim-2to4 (the weight-only 2:4 recipe), or, for --act-bits none alone, the defaults
    without their activation parts (W8A16 2:4 with H-LoRA adapters, bench row 27)."""
    preset = getattr(args, "preset", None)
    if preset:
        return dict(PRESETS[preset])
    if weight_only_flags(args):
        return dict(PRESETS["slim-2to4"])
    if getattr(args, "act_bits", None) == "none":
        return {**PRESETS[DEFAULT_PRESET], "act_bits": None, "smooth_alpha": None, "lowrank": "hessian"}
    return dict(PRESETS[DEFAULT_PRESET])


def config_from_args(args):
    import dataclasses

    from ..config import CompressConfig

    # Explicit flags on top of the base recipe; flags that cannot combine are refused by CompressConfig in one line
    # (e.g. --act-bits 8 --bits 4: TensorRT has no INT4 x INT8 GEMM).
    values = base_recipe(args)
    for k in _FLAGS:
        v = getattr(args, k, None)
        if v is not None:
            values[k] = tuple(v) if k == "skip_layers" else v
    if values.get("quantizer") == "spqr" and getattr(args, "group_size", None) is None:
        values["group_size"] = 16  # SpQR's small groups (the paper's 16), over a preset's, unless --group-size says
    for k in ("max_bits", "smooth_alpha", "act_bits"):
        if values.get(k) == "none":
            values[k] = None
    # The 2:4 recipes choose the mask again in their SparseGPT refit sweeps; flags that leave SparseGPT N:M (another
    # pruner, no sparsity, SpQR) drop that part of the recipe, and an explicit --refit-mask reselect there is refused.
    cfg = CompressConfig(**values)
    if cfg.refit_mask == "reselect" and not cfg.reselects_mask:
        if getattr(args, "refit_mask", None) == "reselect":
            from ..errors import SlimError

            raise SlimError("--refit-mask reselect chooses the mask again in the refit rounds' SparseGPT sweeps: it "
                            "needs --pruner sparsegpt with a sparsity (2:4) and a quantizer other than spqr; drop it "
                            "or use --refit-mask keep")
        cfg = dataclasses.replace(cfg, refit_mask="keep")
    if cfg.channel_permutation != "none" and not cfg.permutes_channels:
        if getattr(args, "channel_permutation", None) not in (None, "none"):
            from ..errors import SlimError

            raise SlimError("--channel-permutation arranges channels for N:M groups: it needs --sparsity N:M (e.g. "
                            "2:4); drop it for dense or unstructured sparsity")
        cfg = dataclasses.replace(cfg, channel_permutation="none")
    return cfg


def finetune_config_from_args(args):
    """A FinetuneConfig when --finetune-steps or --finetune-minutes is given, else None."""
    steps, minutes = getattr(args, "finetune_steps", None), getattr(args, "finetune_minutes", None)
    if steps is None and minutes is None:
        if getattr(args, "finetune_loss", None):
            from ..errors import SlimError

            raise SlimError("--finetune-loss needs --finetune-steps N and/or --finetune-minutes M (how long to "
                            "fine-tune)")
        return None
    from ..compression.finetune import FinetuneConfig

    kw = {"seed": args.seed, "minutes": minutes}
    if steps is not None:
        kw["steps"] = steps
    if getattr(args, "finetune_loss", None):
        kw["loss"] = args.finetune_loss
    return FinetuneConfig(**kw)


def run(args) -> int:
    from ..compression.compressor import compress_model
    from ..config import CalibConfig
    from ..outputs import check_outputs

    check_outputs(folders={"-o": args.output}, files={"--json": args.json}, inputs=[args.model, args.calib],
                  force=args.force)
    cfg = config_from_args(args)
    calib = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        batch_size=args.batch_size)
    ft_cfg = finetune_config_from_args(args)
    if ft_cfg is not None and cfg.lowrank == "none":
        from ..errors import SlimError

        raise SlimError("--finetune-steps / --finetune-minutes train the adapters, but --lowrank none makes none: "
                        "drop the fine-tuning flags or choose --lowrank hessian (or slim, svd)")
    out, report = compress_model(args.model, args.output, cfg, calib, force=args.force, progress=not args.quiet,
                                 trust_remote_code=args.trust_remote_code, finetune=ft_cfg, device=args.device,
                                 stream=args.stream)
    s = report.summary()
    device_mem = "" if s["peak_device_gb"] is None else f", peak {s['device']} memory {s['peak_device_gb']:.2f} GB"
    if s.get("peak_host_bytes_bound"):  # a streamed run states its bound (README 'Memory')
        device_mem = f" (streamed; bound {s['peak_host_bytes_bound'] / 2**30:.2f} GB){device_mem}"
    eprint(f"wrote {out}: {s['compressed_layers']} layers in {s['seconds']:.1f} s on {s['device']} "
           f"({s['threads']} threads), peak host memory {s['peak_rss_gb']:.2f} GB{device_mem}, "
           f"{s['bits_per_param']:.3f} bits/param "
           f"({s['bits_per_param_with_adapters']:.3f} with adapters), mean layer error "
           f"{s['mean_rel_error_base']:.4f} -> {s['mean_rel_error']:.4f} with adapters")
    eprint(f"time split: {format_phases(s['phases'], s['refit_phases'])}")
    if cfg.lowrank != "none" and s["rank_ratio"] == 0:
        eprint(f"no adapters: even rank 1 would take these layers past --max-bits {cfg.max_bits:g} (small shapes); "
               f"--max-bits none keeps rank ratio {cfg.rank_ratio:g}")
    elif cfg.lowrank != "none" and s["rank_ratio"] < cfg.rank_ratio:
        eprint(f"adapter ranks lowered from ratio {cfg.rank_ratio:g} to {s['rank_ratio']:.4f} to fit --max-bits "
               f"{cfg.max_bits:g}")
    if s["skipped_layers"]:
        eprint(f"kept dense: {', '.join(s['skipped_layers'])}")
    ft = None
    if ft_cfg is not None:
        from ..checkpoint.format import read_manifest

        ft = {k: v for k, v in read_manifest(out)["finetune"].items() if k != "losses"}
        eprint(f"fine-tuned the adapters: {ft['steps']} steps in {ft['seconds']:.1f} s, loss {ft['initial_loss']} -> "
               f"{ft['final_loss']}")
    if args.json:
        print_json({"output": str(out), "config": cfg.to_dict(), **s, **({"finetune": ft} if ft else {})}, args.json)
    return 0


def format_phases(phases: dict[str, float], refit_phases: dict[str, float] | None = None) -> str:
    """'refit rounds 51.0 + 49.8 s (sweep 60.2, adapter_svd 30.1, ...), sweep 40.1 s, ...', the largest first."""
    rounds = [phases[k] for k in sorted((k for k in phases if k.startswith("refit_round_")),
                                        key=lambda k: int(k.rsplit("_", 1)[1]))]
    items = [(k, v) for k, v in phases.items() if not k.startswith("refit_round_")]
    if rounds:
        items.append(("refit rounds", sum(rounds)))
    parts = []
    for k, v in sorted(items, key=lambda kv: -kv[1]):
        text = f"{k} {v:.1f} s"
        if k == "refit rounds":
            text = f"refit rounds {' + '.join(f'{r:.1f}' for r in rounds)} s"
            if refit_phases:
                inner = sorted(refit_phases.items(), key=lambda kv: -kv[1])
                text += f" ({', '.join(f'{n} {t:.1f}' for n, t in inner)})"
        parts.append(text)
    return ", ".join(parts)
