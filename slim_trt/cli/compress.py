"""slim-trt compress MODEL -o OUT"""
from __future__ import annotations

import argparse

from ..config import (ACT_SCALE_METHODS, ADAPTER_QUANTIZERS, BIT_ALLOCATIONS, BLOCK_TUNE_LOSSES, BLOCK_TUNE_TARGETS,
                      DEFAULT_PRESET, FORMATS, LOWRANKS, PRESETS, PRUNERS, QUANTIZERS, RANK_ALLOCATIONS, REFIT_MASKS, REFIT_ROUNDINGS,
                      REFIT_SCALES, SPQR_GROUP_SIZE, FINETUNE_LOSSES, CalibConfig, CompressConfig, FinetuneConfig,
                      describe, recipe_label)
from .common import add_parser, eprint, print_json
from .recipes import default_recipe, default_text, fill, presets_paragraphs

_FLAGS = ("sparsity", "bits", "quantizer", "group_size", "pruner", "lowrank", "rank_ratio", "rank_multiple",
          "quantize_adapters", "adapter_quantizer", "skip_layers", "refit_rounds", "refit_rounding", "refit_scales",
          "refit_mask", "channel_permutation", "dense_target", "dense_target_damp",
          "block_tune_epochs", "block_tune_lr", "block_tune_target", "block_tune_loss", "rank_allocation", "max_bits",
          "act_bits", "act_scale_method", "smooth_alpha", "outlier_share", "zero_point",
          "bit_allocation", "weight_format", "act_format")
# Without --preset, flags that ask for weights INT8 activations cannot multiply start from this weight-only recipe,
# and --act-bits none alone turns these parts of the defaults off (W8A16 with H-LoRA adapters, bench row 27).
WEIGHT_ONLY_PRESET = "slim-2to4"
WEIGHT_ONLY_PARTS = {"act_bits": None, "smooth_alpha": None, "lowrank": "hessian"}
# 2:4 recipes whose refit sweeps choose the mask again / whose MLP channels are permuted drop that part when flags
# leave what it needs (config_from_args).
_RESELECT_RULE = "keep when the flags leave SparseGPT N:M"
_PERMUTE_RULE = "none when the flags leave N:M sparsity"


def register(sub) -> None:
    d, calib, ft = default_recipe(), CalibConfig(), FinetuneConfig()
    act_none = CompressConfig(**{**PRESETS[DEFAULT_PRESET], **WEIGHT_ONLY_PARTS})
    p = add_parser(
        sub, "compress", "compress a Hugging Face causal LM one-shot with SLiM",
        fill("Quantize (INT8/INT4, optionally 2-3 bits), prune along K (2:4), and fit low-rank adapters on the total "
             "error, one decoder block at a time on calibration text, each block fed by the compressed ones before "
             "it.",
             *presets_paragraphs(),
             f"Flags change the preset's recipe (the default's without --preset). Without --preset, weights that INT8 "
             f"activations cannot multiply (--bits 2, 3, 4 or 16, --quantizer spqr, --bit-allocation slim-llm) start "
             f"from --preset {WEIGHT_ONLY_PRESET}, the weight-only recipe: `--bits "
             f"{PRESETS[WEIGHT_ONLY_PRESET]['bits']}` alone is exactly --preset {WEIGHT_ONLY_PRESET}. --act-bits none "
             f"alone keeps the default's weights and drops its activation parts ({recipe_label(act_none)}: "
             f"{describe(act_none)}). --act-bits 8 with weight-only weights is refused.",
             "An interrupted run resumes when re-run unchanged."),
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
    p.add_argument("--sparsity", default=None,
                   help=f"2:4, N:M, unstructured:RATIO or none {default_text('sparsity')}")
    p.add_argument("--bits", type=int, default=None, metavar="{2,3,4,8,16}",
                   help="weight bits (the average with --bit-allocation slim-llm); 2 and 3 bits use zero points and "
                        "INT4 containers and need --quantizer gptq or spqr; 16 = no quantization; without --preset, "
                        f"any but 8 starts from --preset {WEIGHT_ONLY_PRESET} (weight-only) "
                        f"{default_text('bits')}")
    p.add_argument("--zero-point", action=argparse.BooleanOptionalAction, default=None,
                   help="asymmetric min-max grids with an integer zero point per group "
                        + default_text("zero_point", {None: "on at 2-3 bits and with slim-llm, off at 4: the "
                                                            "symmetric INT4 grid, the only one TensorRT's INT4 takes"},
                                       none="auto"))
    p.add_argument("--bit-allocation", default=None, choices=BIT_ALLOCATIONS,
                   help="slim-llm: SliM-LLM's salience-driven N-1 / N / N+1 bits per group of 128 columns around "
                        "--bits N (2, 3 or 4), with salience-weighted clip calibration "
                        + default_text("bit_allocation"))
    p.add_argument("--quantizer", default=None, choices=QUANTIZERS,
                   help="slim = SLiM-Quant (histogram-optimal clip per group), in the SparseGPT sweep when --pruner "
                        f"sparsegpt; spqr = SpQR (GPTQ sweep, groups of {SPQR_GROUP_SIZE} with 3-bit quantized scales "
                        "and zero points, fp16 outliers up to --outlier-share; with --sparsity 2:4 the mask comes "
                        "first and outliers sit only at kept positions) " + default_text("quantizer"))
    p.add_argument("--outlier-share", type=float, default=None, metavar="SHARE",
                   help="--quantizer spqr: the largest share of each layer's weights kept as fp16 outliers "
                        "(32 bits each in bits/param) " + default_text("outlier_share"))
    p.add_argument("--group-size", type=int, default=None,
                   help="0 per tensor, -1 per channel, G groups along K "
                        + default_text("group_size", {-1: "INT8 GEMMs take no groups"},
                                       then=f"{SPQR_GROUP_SIZE} with --quantizer spqr"))
    p.add_argument("--pruner", default=None, choices=PRUNERS, help=default_text("pruner"))
    p.add_argument("--lowrank", default=None, choices=LOWRANKS,
                   help="adapters: slim = SLiM-LoRA (diagonal saliency), hessian = the exact output-error optimum with "
                        "the full input covariance, svd = plain SVD, lrc = low-rank correction of weight and "
                        "activation quantization (needs --act-bits 8), none " + default_text("lowrank"))
    p.add_argument("--rank-ratio", type=float, default=None,
                   help="rank = ratio x min(d_in, d_out) " + default_text("rank_ratio"))
    p.add_argument("--rank-multiple", type=int, default=None,
                   help="round the rank up to a multiple " + default_text("rank_multiple"))
    p.add_argument("--max-bits", type=_max_bits, default=None, metavar="BITS",
                   help="budget of the compressed layers in bits/param, adapters included (docs/recipes.md "
                        "'Bits per parameter'): when the ranks from --rank-ratio would exceed it, the ratio is lowered for "
                        "the whole model until they fit; 'none' turns the budget off (INT8 2:4 stores 5 bits/param "
                        "before adapters) " + default_text("max_bits"))
    p.add_argument("--quantize-adapters", action=argparse.BooleanOptionalAction, default=None,
                   help=f"store the adapters in {d.adapter_bits} bits (groups of {d.adapter_group_size}); "
                        f"--no-quantize-adapters keeps fp16 " + default_text("quantize_adapters"))
    p.add_argument("--adapter-quantizer", default=None, choices=ADAPTER_QUANTIZERS,
                   help=f"how {d.adapter_bits}-bit adapters are rounded: gptq = R by GPTQ with the layer's H, then L "
                        "re-fitted to the rounded R and rounded by GPTQ too (keeps nearly all the adapters' gain); rtn "
                        "= round to nearest, as the SLiM paper " + default_text("adapter_quantizer"))
    p.add_argument("--refit-rounds", type=int, default=None, metavar="N",
                   help="after the adapters, re-quantize the base from W - L R and re-fit the adapters, up to N "
                        "rounds, each kept only if the layer's output error drops " + default_text("refit_rounds"))
    p.add_argument("--refit-rounding", default=None, choices=REFIT_ROUNDINGS,
                   help=f"when the refit rounds round the {d.adapter_bits}-bit adapters: last = float adapters "
                        "between rounds, rounded once at the end (faster; bench row 56: 1.341x dense against row "
                        "24's 1.320x); every = in every round " + default_text("refit_rounding"))
    p.add_argument("--refit-scales", default=None, choices=REFIT_SCALES,
                   help="the refit rounds' SparseGPT sweeps round on the group scales the first sweep chose (first) "
                        "(faster) or search them again on W - L R (every) " + default_text("refit_scales"))
    p.add_argument("--refit-mask", default=None, choices=REFIT_MASKS,
                   help="the refit rounds' SparseGPT sweeps keep the first sweep's 2:4 mask (keep) or choose it again "
                        "on W - L R, the part the adapters leave to the base (reselect; a round is still kept only "
                        "if the layer's error drops; rows 63, 64: 1.320x -> 1.298x, 1.298x -> 1.287x dense on Gemma 3 "
                        "270M) " + default_text("refit_mask", then=_RESELECT_RULE))
    p.add_argument("--channel-permutation", default=None, metavar="{none,PART[,PART...]}",
                   help="exact channel permutations, so that 2:4 groups keep more saliency |W| ||x|| (an equivalent "
                        "network, nothing at run time): none, or a comma list of mlp (each block's MLP intermediate "
                        "channels: gate/up output rows with down input columns, for down_proj's groups; row 67: "
                        "1.287x -> 1.232x dense on Gemma 3 270M), attn (each block's value channels within a KV "
                        "head: v output rows with o input columns, for o_proj's groups; row 74: 1.239x, no gain), residual "
                        "(the hidden channels of the whole model, once before the first block, for q/k/v/gate/up's "
                        "groups; loads the model whole; row 75: 1.272x, worse) "
                        + default_text("channel_permutation", then=_PERMUTE_RULE))
    p.add_argument("--dense-target", type=float, default=None, metavar="ALPHA",
                   help="asymmetric calibration (GPTAQ): move each layer's target from its own dense output on the "
                        "inputs the compressed layers before it give it (0, as SparseGPT and GPTQ) toward the dense "
                        "model's output on the dense model's inputs (1, GPTAQ's least-squares fit; its code uses "
                        "0.25), so a layer also corrects some of what the layers before it got wrong; above 0 one "
                        "more dense forward per block " + default_text("dense_target"))
    p.add_argument("--dense-target-damp", type=float, default=None, metavar="RIDGE",
                   help="the ridge of that step's least-squares solve, times mean(diag H): larger keeps the step to "
                        "the input directions with energy (GPTQ damps its own solves by 0.01) "
                        + default_text("dense_target_damp"))
    p.add_argument("--block-tune-epochs", type=int, default=None, metavar="N",
                   help="block-wise adapter tuning: after each block is compressed, train its adapters (only them, "
                        "on their own quantization grid) N passes over the calibration windows so the block's "
                        "output matches --block-tune-target; a tuning that does not lower the block's error is "
                        "undone. Costs a forward and a backward pass of the block per window and epoch (~160 s "
                        "for Gemma 3 270M at 2 epochs on two cores); on Gemma 3 270M it raised top-1 agreement "
                        "with the dense model but not perplexity (bench rows 88-93: 1.203-1.276x against 1.202x), "
                        "so 0 = off "
                        + default_text("block_tune_epochs"))
    p.add_argument("--block-tune-lr", type=float, default=None, metavar="LR",
                   help="Adam's peak learning rate for that tuning (cosine decay to 0) " + default_text("block_tune_lr"))
    p.add_argument("--block-tune-target", default=None, choices=BLOCK_TUNE_TARGETS,
                   help="what the tuned block reproduces: layer (the dense block's output on the same inputs) or "
                        "dense (the dense model's hidden states after the block, so the block also corrects some "
                        "of the error it receives; one more dense forward per block) "
                        + default_text("block_tune_target"))
    p.add_argument("--block-tune-loss", default=None, choices=BLOCK_TUNE_LOSSES,
                   help="that tuning's loss: mse (squared error over all hidden units) or channel (each unit's "
                        "squared error relative to its own mean square, so the few units with massive activations "
                        "do not decide the fit alone) " + default_text("block_tune_loss"))
    p.add_argument("--rank-allocation", default=None, choices=RANK_ALLOCATIONS,
                   help="sensitivity: share each block's uniform adapter budget among its layers by the error "
                        "their singular values leave " + default_text("rank_allocation"))
    p.add_argument("--act-bits", type=_act_bits, default=None, metavar="{8,none}",
                   help="8: quantize every compressed linear's input to INT8 with a static per-tensor scale "
                        "calibrated on the calibration windows (W8A8; needs --bits 8 and --group-size -1 or 0); "
                        "none: weight-only " + default_text("act_bits"))
    p.add_argument("--weight-format", default=None, choices=FORMATS,
                   help="number format of the 8-bit weights: int (INT8) or fp8 (FP8 E4M3, absmax/448 per output "
                        "channel; Hopper, Ada, Jetson Thor); fp8 needs --act-format fp8 " + default_text("weight_format"))
    p.add_argument("--act-format", default=None, choices=FORMATS,
                   help="number format of the static per-tensor activations: int (INT8) or fp8 (FP8 E4M3) "
                        + default_text("act_format"))
    p.add_argument("--act-scale", dest="act_scale_method", default=None, choices=ACT_SCALE_METHODS,
                   help="activation scale estimator: max |x|, the 99.99th percentile of |x|, or the clip with the "
                        "least squared error " + default_text("act_scale_method"))
    p.add_argument("--smooth-alpha", type=_number_or_none("a strength in [0, 1] (e.g. 0.5)"), default=None,
                   metavar="A", help="SmoothQuant: move activation outliers into the weights with strength A in "
                        "[0, 1], folded into the previous norm or linear; 'none' turns it off (alpha 0.5 on the 2:4 "
                        "W8A8 recipe, rows 30, 31: 1.409x -> 1.298x dense on Gemma 3 270M) "
                        + default_text("smooth_alpha"))
    p.add_argument("--finetune-steps", type=int, default=None, metavar="N",
                   help="fine-tune the adapters for N steps on the calibration windows before saving "
                        "(see slim-trt finetune)")
    p.add_argument("--finetune-minutes", type=float, default=None, metavar="M",
                   help="fine-tune the adapters for at most M minutes (the schedule still spans --finetune-steps, "
                        f"default {ft.steps}; whichever ends first)")
    p.add_argument("--finetune-loss", choices=FINETUNE_LOSSES, default=None,
                   help="loss of the fine-tuning: ce (next-token cross-entropy) or kd (distil the dense model) "
                        f"[default: {ft.loss}]")
    p.add_argument("--skip", dest="skip_layers", action="append", default=None, metavar="PATTERN",
                   help="keep matching layers dense (glob on the full name, e.g. '*.down_proj'); repeatable")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text file (or a HF dataset name when the hub is reachable) "
                        "[default: the shipped WikiText-2 validation excerpt]")
    p.add_argument("--nsamples", type=int, default=calib.nsamples, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=calib.seqlen, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=calib.seed, help="which calibration windows are drawn")
    p.add_argument("--batch-size", type=int, default=calib.batch_size, help="windows per forward pass")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="where each decoder block is compressed: auto (a CUDA GPU when torch sees one, else the "
                        "CPU), cpu, cuda or cuda:N; the model stays in host memory. One device per run: blocks are "
                        "not split or spread across GPUs (a list such as cuda:0,1 is refused; a block that does not "
                        "fit the GPU is refused with the bytes it needs and the bytes free) [default: auto]")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="read one decoder block at a time from the safetensors files, in their stored dtype, and "
                        "keep only its compressed result: host memory holds about one block, not the model (docs/"
                        "compression.md, 'Memory'); the checkpoint is bit-identical to --no-stream, which loads the whole model in "
                        "float32. Hub ids and --finetune-* load the model whole [default: on]")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the run summary as JSON ('-' = stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def permutation_line(shares: dict[str, float]) -> str:
    """'down_proj 0.804 -> 0.829, o_proj ...' from report.permutation ({"<block>.<layer>": before, ...":after"}):
    each permuted layer's kept share before and after, averaged over the blocks."""
    by_layer: dict[str, list[tuple[float, float]]] = {}
    for key, before in shares.items():
        if not key.endswith(":after"):
            by_layer.setdefault(key.rsplit(".", 1)[-1], []).append((before, shares[key + ":after"]))
    return ", ".join(f"{name} {sum(b for b, _ in v) / len(v):.3f} -> {sum(a for _, a in v) / len(v):.3f}"
                     for name, v in by_layer.items())


def _number_or_none(what: str, cast=float, message: str | None = None):
    """argparse type for a number that 'none' turns off (a preset's value included); `message` replaces the default
    complaint ({text} is the given text)."""
    def parse(text: str):
        if text.strip().lower() == "none":
            return "none"
        try:
            return cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError((message or "{text!r} is not " + what + " or 'none'").format(text=text))
    return parse


_max_bits = _number_or_none("a number of bits (e.g. 4.5)")
# 8 or 'none' (weight-only); other integers reach CompressConfig, which names the supported one.
_act_bits = _number_or_none("8", int, "{text!r}: give 8 (static INT8 activations) or none (weight-only)")


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
    for weight-only weights, WEIGHT_ONLY_PRESET (the weight-only 2:4 recipe), or, for --act-bits none alone, the
    defaults without their activation parts (WEIGHT_ONLY_PARTS: W8A16 2:4 with H-LoRA adapters, bench row 27)."""
    preset = getattr(args, "preset", None)
    if preset:
        return dict(PRESETS[preset])
    if weight_only_flags(args):
        return dict(PRESETS[WEIGHT_ONLY_PRESET])
    if getattr(args, "act_bits", None) == "none":
        return {**PRESETS[DEFAULT_PRESET], **WEIGHT_ONLY_PARTS}
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
        values["group_size"] = SPQR_GROUP_SIZE  # SpQR's small groups, over a preset's, unless --group-size says
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
    if s.get("peak_host_bytes_bound"):  # a streamed run states its bound (docs/compression.md, 'Memory')
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
    if s.get("permutation"):
        eprint(f"channel permutation ({cfg.channel_permutation}), the share of Wanda saliency 2:4 keeps, mean over "
               f"blocks: {permutation_line(s['permutation'])}")
    ft = None
    if ft_cfg is not None:
        from ..checkpoint.format import read_manifest

        ft = {k: v for k, v in read_manifest(out)["finetune"].items() if k != "losses"}
        eprint(f"fine-tuned the adapters: {ft['steps']} steps in {ft['seconds']:.1f} s, loss {ft['initial_loss']} -> "
               f"{ft['final_loss']}")
        from ..compression.finetune import schedule_hint

        hint = schedule_hint(ft_cfg, ft)
        if hint:
            eprint(hint.replace("--steps", "--finetune-steps"))
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
