"""slim-trt generate EXPORT_DIR "prompt" """
from __future__ import annotations

from .common import add_parser, eprint, print_json


def register(sub) -> None:
    p = add_parser(sub, "generate", "generate text from an export on this machine, with a live tokens/s line",
                   "Greedy (default) or sampled decoding with the KV cache, in ONNX Runtime with the session config "
                   "the export declares: the same runtime as the Triton slim_generate model. The text goes to "
                   "stdout as it is generated; the speed to stderr.",
                   '  slim-trt generate export/gemma-slim "The capital of France is"\n'
                   '  slim-trt generate export/gemma-slim "Once upon a time" --max-new-tokens 64 --temperature 0.8 '
                   "--top-p 0.95 --seed 0\n"
                   '  slim-trt generate export/gemma-slim "Hello" --batch 4 --json timing.json   # batched decode')
    p.add_argument("export", metavar="EXPORT_DIR", help="a folder written by `slim-trt export`")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the smallest set reaching this probability")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--batch", type=int, default=1, help="run the prompt as N sequences of one batch")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write texts, token ids and timings here")
    p.set_defaults(func=run)


class _Live:
    """Streams the first sequence's text to stdout and rewrites one tokens/s line on stderr."""

    def __init__(self, tokenizer, stream: bool):
        import sys
        import time

        self.tokenizer, self.stream, self.shown, self.t0 = tokenizer, stream, "", time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, gens) -> None:
        import sys
        import time

        if self.stream:
            text = self.tokenizer.decode(gens[0].token_ids, skip_special_tokens=True)
            if text.startswith(self.shown):
                sys.stdout.write(text[len(self.shown):])
                sys.stdout.flush()
                self.shown = text
        timing = gens[0].timing
        new = sum(len(g.token_ids) for g in gens)
        rate = timing.decode_tokens_per_second
        line = f"{new} tokens, {time.perf_counter() - self.t0:.1f} s" + (f", {rate:.1f} tokens/s" if rate else "")
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()


def run(args) -> int:
    from ..errors import SlimError
    from ..runtime.generation import Generator
    from ..outputs import check_outputs

    check_outputs(files={"--json": args.json}, inputs=[args.export])
    if args.batch < 1:
        raise SlimError(f"bad --batch {args.batch}: it must be >= 1")
    if args.max_new_tokens < 1:
        raise SlimError(f"bad --max-new-tokens {args.max_new_tokens}: it must be >= 1")
    gen = Generator(args.export, threads=args.threads)
    live = _Live(gen.tokenizer, stream=args.batch == 1)
    result = gen.generate([args.prompt] * args.batch, args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_step=live)
    if args.batch == 1:
        print(result.texts[0][len(live.shown):] if result.texts[0].startswith(live.shown) else "", flush=True)
    else:
        for i, text in enumerate(result.texts):
            print(f"[{i}] {text}")
    t = result.timing
    if live.tty:
        eprint("")
    eprint(f"prompt {t.prompt_tokens} tokens x batch {t.batch}: prefill {t.prefill_seconds:.3f} s "
           f"({t.prefill_tokens_per_second:.1f} tokens/s, first token after {t.first_token_seconds:.3f} s); "
           f"{t.decode_steps} decode steps in {t.decode_seconds:.3f} s: {t.decode_tokens_per_second:.1f} tokens/s")
    eprint(f"ONNX Runtime session: {gen.session_summary()}")
    if args.json:
        print_json({**result.to_dict(), "session": {**gen.cpu.to_dict(), "w8a8_linears": gen.w8a8_linears}},
                   args.json)
    return 0
