"""slim-trt info CKPT"""
from __future__ import annotations

from ..config import DEFAULT_REASON
from .common import add_parser, print_json
from .recipes import default_line, fill


def register(sub) -> None:
    p = add_parser(sub, "info", "summarise a compressed checkpoint",
                   fill("Print the recipe (the preset it is, and whether that is the default), the method, the "
                        "calibration, and per layer: shape, bits, sparsity, rank, error. The default recipe is "
                        f"{default_line()}: {DEFAULT_REASON}."),
                   "  slim-trt info out/gemma-slim\n  slim-trt info out/gemma-slim --json -")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--json", default=None, metavar="FILE", help="write the manifest summary as JSON ('-' = stdout)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint.format import verify_checkpoint
    from ..outputs import check_outputs

    check_outputs(files={"--json": args.json}, inputs=[args.checkpoint])
    # What info prints is what load() would load: the manifest's own checksum and every file's are verified.
    m = verify_checkpoint(args.checkpoint)
    stats = m.get("layer_stats", {})
    verified = f"{len(m['files'])} files and the manifest match their sha256"
    recipe = recipe_of(m.get("method", {}))
    if args.json:
        print_json({k: m.get(k) for k in ("source_model", "architecture", "method", "calibration", "summary",
                                          "finetune")}
                   | {"verified": verified, "recipe": recipe,
                      "layers": {n: {**meta, **stats.get(n, {})} for n, meta in m["layers"].items()}}, args.json)
        return 0
    print(f"checkpoint   {args.checkpoint}  ({verified})")
    print(f"source       {m.get('source_model')}  ({m.get('architecture')})")
    meth = m.get("method", {})
    name = recipe["preset"]
    print(f"recipe       {'--preset ' + name if name else 'custom (no preset)'}"
          + (" (the default)" if recipe["default"] else "") + f": {recipe['description']}")
    if recipe["default"]:
        print(f"             (the default because {recipe['why_default']})")
    else:
        print(f"             (the default is --preset {recipe['default_preset']}: {recipe['why_default']})")
    print("method       " + ", ".join(f"{k}={meth[k]}" for k in ("sparsity", "bits", "quantizer",
          "effective_group_size", "pruner", "lowrank", "rank_ratio", "quantize_adapters", "refit_rounds",
          "rank_allocation", "act_bits", "act_scale_method", "smooth_alpha", "weight_format", "act_format")
          if k in meth and (meth.get("act_bits") or not k.startswith(("act_", "smooth")))
          and (meth.get("weight_format") == "fp8" or not k.endswith("_format"))))
    cal = m.get("calibration", {})
    print(f"calibration  {cal.get('source')}  {cal.get('nsamples')} x {cal.get('seqlen')} tokens, seed {cal.get('seed')}")
    acts = any(meta.get("act_bits") for meta in m["layers"].values())  # W8A8: the static input scale per layer
    print(f"{'layer':<44} {'shape':>12} {'bits':>4} {'sparsity':>9} {'rank':>5} {'err':>7} {'err+lr':>7}"
          + (f" {'act scale':>10}" if acts else ""))
    for name, meta in m["layers"].items():
        st = stats.get(name, {})
        shape = "x".join(map(str, meta["shape"]))
        print(f"{name:<44} {shape:>12} {meta['bits']:>4} {meta['sparsity']:>9} {meta['rank']:>5} "
              f"{st.get('rel_error_base', float('nan')):>7.4f} {st.get('rel_error', float('nan')):>7.4f}"
              + (f" {meta.get('act_scale', float('nan')):>10.4g}" if acts else ""))
    ft = m.get("finetune")
    if ft:
        print(f"finetune     {ft.get('steps')} steps, loss {ft.get('initial_loss')} -> {ft.get('final_loss')}")
    s = m.get("summary", {})
    if s:
        print(f"{s.get('compressed_layers')} layers, {s.get('bits_per_param')} bits/param "
              f"({s.get('bits_per_param_with_adapters')} with adapters), compressed in {s.get('seconds')} s")
    return 0


def recipe_of(method: dict) -> dict:
    """Which preset a checkpoint's method is, whether it is the default, and why the default is what it is."""
    from ..config import DEFAULT_PRESET, DEFAULT_REASON, CompressConfig, describe, preset_name
    from ..errors import SlimError

    # A manifest without the W8A8 fields predates them: it was weight-only.
    legacy = {"act_bits": None, "smooth_alpha": None}
    try:
        config = CompressConfig.from_dict({**legacy, **method})
    except (SlimError, TypeError, ValueError):
        return {"preset": None, "default": False, "description": "unreadable method", "default_preset": DEFAULT_PRESET,
                "why_default": DEFAULT_REASON}
    name = preset_name(config)
    return {"preset": name, "default": name == DEFAULT_PRESET, "description": describe(config),
            "default_preset": DEFAULT_PRESET, "why_default": DEFAULT_REASON}
