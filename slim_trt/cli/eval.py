"""slim-trt eval MODEL_OR_CKPT --data FILE"""
from __future__ import annotations

from .common import add_parser, eprint, print_json


def register(sub) -> None:
    p = add_parser(sub, "eval", "perplexity of a model or a compressed checkpoint on text",
                   "Non-overlapping windows of --seqlen tokens (BOS first), the first --windows of them.",
                   "  slim-trt eval out/gemma-slim --data ../shared/data/wikitext-2/test.txt --seqlen 512\n"
                   "  slim-trt eval gemma3-270m --windows 8")
    p.add_argument("model", metavar="MODEL_OR_CKPT", help="a slim-trt checkpoint, or any MODEL accepted by compress")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="evaluation text [default: the shipped WikiText-2 test excerpt]")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", default="32", help="how many windows, or 'all'")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--json", default=None, metavar="FILE")
    p.set_defaults(func=run)


def load_any(ref: str):
    """(model, tokenizer) for a slim-trt checkpoint or any MODEL."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..checkpoint.format import load, looks_like_checkpoint
    from ..models.source import load_model

    if looks_like_checkpoint(Path(ref)):
        return load(ref), AutoTokenizer.from_pretrained(ref)  # load verified every file, the tokenizer's too
    return load_model(ref)


def run(args) -> int:
    from ..data.windows import SHIPPED_EVAL, eval_windows, load_text, parse_window_count
    from ..verification.perplexity import perplexity
    from ..models.source import check_seqlen
    from ..outputs import check_outputs

    check_outputs(files={"--json": args.json}, inputs=[args.model, args.data])
    limit = parse_window_count(args.windows)
    text = load_text(args.data, default=SHIPPED_EVAL)
    model, tok = load_any(args.model)
    check_seqlen(model.config, args.seqlen)
    windows = eval_windows(tok, text, args.seqlen, limit)
    ppl = perplexity(model, windows, args.batch_size, progress=True)
    eprint(f"perplexity {ppl:.3f} on {len(windows)} windows x {args.seqlen} tokens")
    if args.json:
        print_json({"model": args.model, "perplexity": ppl, "windows": len(windows), "seqlen": args.seqlen}, args.json)
    else:
        print(f"{ppl:.4f}")
    return 0
