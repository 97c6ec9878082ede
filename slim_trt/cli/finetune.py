"""slim-trt finetune CKPT -o OUT"""
from __future__ import annotations

from ..config import FINETUNE_LOSSES, FINETUNE_SCHEDULES, FinetuneConfig
from .common import add_parser, eprint, print_json


def register(sub) -> None:
    p = add_parser(
        sub, "finetune", "fine-tune the low-rank adapters of a compressed checkpoint",
        "Train only L and R of every compressed layer (the quantized, pruned base and every other weight stay\n"
        "frozen) with next-token cross-entropy on calibration text (SLiM's recipe) or by distilling the dense\n"
        "model (--loss kd): AdamW, linear warmup, cosine or constant schedule, gradient clipping. 4-bit\n"
        "adapters are trained through a straight-through estimator and saved on their quantization grid.\n"
        "Bounded by --steps and/or --minutes; an interrupted run resumes from --state when re-run unchanged.\n"
        "Writes a new checkpoint with the loss curve (finetune_loss.png) and the fine-tuning config and\n"
        "report in its manifest.",
        "  slim-trt finetune out/gemma-slim -o out/gemma-slim-ft --minutes 30\n"
        "  slim-trt finetune out/gemma-slim -o out/gemma-slim-ft --steps 200 --lr 2e-4 --calib data.txt",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="a slim-trt checkpoint with adapters")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoint folder to write")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="training text [default: the shipped WikiText-2 validation excerpt]")
    p.add_argument("--nsamples", type=int, default=128, help="training windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    ft = FinetuneConfig()  # the defaults of every training knob below
    p.add_argument("--steps", type=int, default=ft.steps, help="optimizer steps (the schedule's length)")
    p.add_argument("--minutes", type=float, default=ft.minutes, help="stop after this much wall time (then save)")
    p.add_argument("--lr", type=float, default=ft.lr, help="peak learning rate")
    p.add_argument("--schedule", choices=FINETUNE_SCHEDULES, default=ft.schedule, help="after the warmup")
    p.add_argument("--warmup-steps", type=int, default=ft.warmup_steps, help="steps of linear warmup to --lr")
    p.add_argument("--batch-size", type=int, default=ft.batch_size, help="windows per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=ft.micro_batch_size,
                   help="windows per forward/backward pass")
    p.add_argument("--max-grad-norm", type=float, default=ft.max_grad_norm, help="gradient clipping (0 = off)")
    p.add_argument("--loss", choices=FINETUNE_LOSSES, default=ft.loss,
                   help="ce: next-token cross-entropy (SLiM's recipe); kd: distil the dense model's next-token "
                        "distribution (KL), which learns more per window")
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="the dense model for --loss kd [default: the checkpoint's source model]")
    p.add_argument("--seed", type=int, default=ft.seed, help="window sampling and batch order")
    p.add_argument("--save-every", type=int, default=ft.save_every, help="steps between resumable states")
    p.add_argument("--state", default=None, metavar="DIR", help="resumable state folder [default: OUT.partial]")
    p.add_argument("--eval-data", default=None, metavar="FILE",
                   help="held-out text for perplexity before/after [default: the shipped WikiText-2 test excerpt]")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows (0 = no evaluation)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the run summary as JSON ('-' = stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..compression.finetune import FinetuneConfig, finetune_checkpoint, schedule_hint
    from ..outputs import check_outputs

    check_outputs(folders={"-o": args.output}, files={"--json": args.json},
                  inputs=[args.checkpoint, args.calib, args.eval_data, args.teacher], force=args.force)
    cfg = FinetuneConfig(steps=args.steps, minutes=args.minutes, lr=args.lr, schedule=args.schedule,
                         warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                         micro_batch_size=args.micro_batch_size, max_grad_norm=args.max_grad_norm, seed=args.seed,
                         save_every=args.save_every, loss=args.loss)
    out, report, plotted = finetune_checkpoint(
        args.checkpoint, args.output, cfg, calib_source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        calib_seed=args.seed, eval_source=args.eval_data, eval_windows=args.eval_windows, state_dir=args.state,
        force=args.force, progress=not args.quiet, teacher=args.teacher)
    s = report.summary()
    eprint(f"wrote {out}: {s['steps']} steps ({'time budget reached' if s['stopped'] == 'time' else 'done'}) in "
           f"{s['seconds']:.1f} s, {s['trainable_params']} adapter parameters in {s['adapted_layers']} layers, "
           f"loss {s['initial_loss']} -> {s['final_loss']}")
    hint = schedule_hint(cfg, s)
    if hint:
        eprint(hint)
    if s["eval_ppl_before"] is not None:
        eprint(f"held-out perplexity {s['eval_ppl_before']:.3f} -> {s['eval_ppl_after']:.3f}")
    if not plotted:
        eprint("loss curve not drawn: pip install matplotlib (the losses are in the manifest)")
    if args.json:
        print_json({"output": str(out), "config": cfg.to_dict(), **s}, args.json)
    return 0
