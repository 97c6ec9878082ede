"""Adapter fine-tuning (SLiM's recipe): train only L and R of every CompressedLinear on calibration text.

The base (quantized, pruned) weights and every other parameter stay frozen. Quantized adapters are trained as
fp32 master copies fake-quantized in the forward (straight-through estimator) and re-quantized on the same
AbsMax grid at the end, so the saved adapters are exactly what the last training forward used.

Defaults follow the reference fine-tuning script (Mohammad-Mozaffari/slim, slim/fine_tune.py, which drives the
Hugging Face Trainer): AdamW, lr 1e-4, 5 warmup steps, no weight decay, gradient clipping at 1.0, next-token
cross-entropy. Its global batch of 64 sequences x 1024 tokens over 30k C4 samples is a GPU budget; here the
batch is 8 windows and the run is bounded by --steps and/or --minutes.

Resumable: every `save_every` steps the adapters, the AdamW moments, the step, the RNG state and the loss
history go to `state_dir` (tensors in safetensors, the rest in JSON); a re-run with the same checkpoint, data
and config continues from there and ends with the same adapters as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.compressed_linear import CompressedLinear, compressed_layers
from ..config import FinetuneConfig  # a dataclass config like the others (re-exported here for callers)
from ..errors import SlimError

LOSS_LABELS = {"ce": "next-token cross-entropy (nats/token)", "kd": "KL(dense || compressed) (nats/token)"}
LOSS_CURVE = "finetune_loss.png"


@dataclass
class FinetuneReport:
    losses: list[float] = field(default_factory=list)  # the batch loss of each step, before its update
    steps: int = 0
    stopped: str = "steps"  # "steps" (reached cfg.steps) or "time" (cfg.minutes ran out)
    resumed_from: int = 0  # the step a resumed run started from (0 = fresh)
    seconds: float = 0.0  # training time over all runs of this fine-tuning
    trainable_params: int = 0
    adapted_layers: int = 0
    eval_ppl_before: float | None = None
    eval_ppl_after: float | None = None

    @property
    def initial_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def summary(self) -> dict:
        r = lambda x: None if x is None else round(x, 5)  # noqa: E731
        return {"steps": self.steps, "stopped": self.stopped, "resumed_from": self.resumed_from,
                "seconds": round(self.seconds, 2), "trainable_params": self.trainable_params,
                "adapted_layers": self.adapted_layers, "initial_loss": r(self.initial_loss),
                "final_loss": r(self.final_loss), "eval_ppl_before": r(self.eval_ppl_before),
                "eval_ppl_after": r(self.eval_ppl_after)}


# ------------------------------------------------------------------------------------------- pure pieces
def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to 0 at cfg.steps or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_hint(cfg: FinetuneConfig, summary: dict) -> str | None:
    """One line for a run the time budget stopped before its cosine schedule ended (FinetuneReport.summary() in
    `summary`): the step it stopped at, how much of the peak learning rate was left, and the --steps that would end
    the schedule within --minutes at the pace measured. None when the schedule ran to its end. (Bench row 92
    stopped at step 32 of 50, the rate still 35% of its peak.)"""
    steps = summary.get("steps") or 0
    if summary.get("stopped") != "time" or cfg.schedule != "cosine" or steps >= cfg.steps or steps == 0:
        return None
    per_step = summary["seconds"] / steps
    fit = max(1, int(60.0 * cfg.minutes / per_step)) if cfg.minutes else steps
    return (f"the time budget stopped the cosine schedule at step {steps} of {cfg.steps}, its learning rate still "
            f"{lr_at(steps, cfg) / cfg.lr:.0%} of the peak: at {per_step:.0f} s a step, --steps {fit} would end it "
            f"within the {cfg.minutes:g} minutes")


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The windows of optimizer step `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch),
    so any step's batch is known without replaying the run (what makes resuming exact)."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = (pos // n).tolist()
    perms = {e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e)) for e in set(epochs)}
    return torch.stack([perms[e][p % n] for e, p in zip(epochs, pos.tolist())])


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch of windows."""
    logits = model(input_ids=ids, use_cache=False).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       ids[:, 1:].reshape(-1), reduction="sum")


def distill_loss(model: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) of the next-token distributions at every predicting position of a batch
    (the same positions as next_token_loss). The teacher runs without gradients."""
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    log_p = torch.log_softmax(logits, dim=-1)
    return nn.functional.kl_div(log_p.reshape(-1, log_p.shape[-1]), target.reshape(-1, target.shape[-1]),
                                log_target=True, reduction="sum")


# ------------------------------------------------------------------------------------------- resumable state
def _state_files(state_dir: Path) -> list[tuple[int, Path, Path]]:
    out = []
    for j in state_dir.glob("step-*.json"):
        t = j.with_suffix(".safetensors")
        if t.exists():
            out.append((int(j.stem.split("-")[1]), j, t))
    return sorted(out)


def _save_state(state_dir: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                meta: dict) -> None:
    """One generation step-N.{safetensors,json}: tensors first, the JSON (written last) marks it complete and
    carries the tensors' sha256 and its own content checksum."""
    from safetensors.torch import save_file

    from ..checkpoint.format import file_sha256, with_digest

    tensors = {f"param/{n}": p.detach().contiguous() for n, p in params.items()}
    for n, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt/{k}/{n}"] = torch.as_tensor(v).detach().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    state_dir.mkdir(parents=True, exist_ok=True)
    t_path, j_path = state_dir / f"step-{step:07d}.safetensors", state_dir / f"step-{step:07d}.json"
    save_file(tensors, str(t_path.with_suffix(".safetensors.tmp")))
    os.replace(t_path.with_suffix(".safetensors.tmp"), t_path)
    tmp = j_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(with_digest({**meta, "step": step, "file_sha256": file_sha256(t_path)})))
    os.replace(tmp, j_path)
    for s, j, t in _state_files(state_dir):
        if s != step:
            j.unlink(missing_ok=True)
            t.unlink(missing_ok=True)


def _load_state(state_dir: Path, fingerprint: str, params: dict[str, nn.Parameter],
                opt: torch.optim.Optimizer) -> dict | None:
    import warnings

    from safetensors.torch import load_file

    from ..checkpoint.format import DIGEST_KEY, digest_ok, file_sha256

    files = _state_files(state_dir) if state_dir.exists() else []
    if not files:
        return None
    _, j_path, t_path = files[-1]
    try:
        meta = json.loads(j_path.read_text(encoding="utf-8"))
        # A state saved by an earlier slim-trt has no checksums; it is resumed from as before.
        intact = isinstance(meta, dict) and (DIGEST_KEY not in meta or (
            digest_ok(meta) and file_sha256(t_path) == meta.get("file_sha256")))
    except (ValueError, UnicodeDecodeError, OSError):
        intact = False
    if not intact:
        # A damaged state would resume from wrong adapters (or fail on every re-run): start again instead.
        warnings.warn(f"{state_dir}: the saved fine-tuning state {j_path.stem} is corrupt; deleted it, fine-tuning "
                      f"from the start", stacklevel=2)
        j_path.unlink(missing_ok=True)
        t_path.unlink(missing_ok=True)
        return None
    if meta.get("fingerprint") != fingerprint:
        raise SlimError(f"{state_dir} holds an interrupted fine-tuning run with a different checkpoint, data or "
                        f"config: re-run that exact command to resume it, or delete {state_dir} to start over")
    t = load_file(str(t_path))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(t[f"param/{n}"])
    index = {n: i for i, n in enumerate(params)}  # the optimizer numbers its parameters in this order
    state: dict[int, dict] = {}
    for k, v in t.items():
        if k.startswith("opt/"):
            _, key, name = k.split("/", 2)
            state.setdefault(index[name], {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    torch.set_rng_state(t["rng/torch"])
    return meta


def _fingerprint(cfg: FinetuneConfig, windows: torch.Tensor, params: dict[str, nn.Parameter]) -> str:
    """The config's trajectory, the training windows and the starting adapters (which identify the checkpoint)."""
    h = hashlib.sha256(cfg.trajectory_fingerprint().encode())
    h.update(windows.to(torch.int64).numpy().tobytes())
    for n, p in params.items():
        h.update(n.encode())
        h.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------------------- training
def adapter_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in compressed_layers(model) if m.rank > 0}


def finetune(model: nn.Module, windows: torch.Tensor, cfg: FinetuneConfig | None = None, *,
             state_dir: str | Path | None = None, eval_windows: torch.Tensor | None = None,
             progress: bool = True, on_step: Callable[[int, float], None] | None = None,
             teacher: nn.Module | None = None) -> FinetuneReport:
    """Train the adapters of `model` in place on token windows [n, seqlen]; returns a report.

    teacher: the dense model, needed by cfg.loss == "kd" (it is only run forward, in eval mode).

    state_dir: where the resumable state lives (resumed when it holds a run with the same fingerprint).
    eval_windows: held-out windows whose perplexity is measured before and after.
    on_step(step, loss) is called after each optimizer step (step counts from 1).
    """
    from tqdm.auto import tqdm

    from ..verification.perplexity import perplexity

    cfg = cfg or FinetuneConfig()
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise SlimError(f"fine-tuning needs token windows [n >= 1, seqlen >= 2], got {tuple(windows.shape)}")
    if cfg.loss == "kd" and teacher is None:
        raise SlimError("--loss kd distils from the dense model, but none was given: pass --teacher MODEL (the "
                        "model that was compressed) or use --loss ce")
    layers = adapter_layers(model)
    if not layers:
        raise SlimError("the model has no low-rank adapters to fine-tune (--lowrank none, or a --max-bits budget "
                        "too small for any rank on these shapes): compress it with --lowrank hessian, and "
                        "--max-bits none on small models")
    state_dir = Path(state_dir) if state_dir is not None else None
    t_run = time.time()
    was_training = model.training
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    deterministic = torch.are_deterministic_algorithms_enabled()
    report = FinetuneReport(adapted_layers=len(layers))
    try:
        model.requires_grad_(False)
        params: dict[str, nn.Parameter] = {}
        for name, layer in layers.items():
            L, R = layer.train_adapters()
            params[f"{name}.lora_L"], params[f"{name}.lora_R"] = L, R
        report.trainable_params = sum(p.numel() for p in params.values())
        opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        fp = _fingerprint(cfg, windows, params)
        meta = _load_state(state_dir, fp, params, opt) if state_dir is not None else None
        if meta is None:
            torch.manual_seed(cfg.seed)
            meta = {"fingerprint": fp, "losses": [], "seconds": 0.0, "eval_ppl_before": None}
            if eval_windows is not None:
                model.eval()
                meta["eval_ppl_before"] = perplexity(model, eval_windows)
        start = report.resumed_from = meta["step"] if "step" in meta else 0
        losses: list[float] = list(meta["losses"])
        report.eval_ppl_before = meta["eval_ppl_before"]
        torch.use_deterministic_algorithms(True, warn_only=True)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        model.train()  # as the reference Trainer does (dropout, if the model has any, draws from the saved RNG)
        tokens_per_step = cfg.batch_size * (windows.shape[1] - 1)
        bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step", disable=not progress,
                   file=sys.stderr)
        step, saved = start, start
        deadline = None if cfg.minutes is None else t_run + 60.0 * cfg.minutes

        def save_now() -> None:
            if state_dir is not None:
                _save_state(state_dir, step, params, opt,
                            {**meta, "losses": losses, "seconds": meta["seconds"] + time.time() - t_run})

        while step < cfg.steps:
            if deadline is not None and time.time() >= deadline:
                report.stopped = "time"
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            batch = windows[batch_indices(step, cfg.batch_size, windows.shape[0], cfg.seed)]
            total = 0.0
            for micro in batch.split(cfg.micro_batch_size):
                loss = (distill_loss(model, teacher, micro) if cfg.loss == "kd"
                        else next_token_loss(model, micro)) / tokens_per_step
                loss.backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise SlimError(f"the fine-tuning loss became {total} at step {step + 1}: lower --lr")
            if cfg.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            step += 1
            losses.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr_at(step - 1, cfg):.2e}")
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_now()
                saved = step
            if on_step is not None:
                on_step(step, total)
        if saved != step:
            save_now()  # stopped by the time budget between two saves
        bar.close()
        report.losses, report.steps = losses, step
        report.seconds = meta["seconds"] + time.time() - t_run
    finally:
        for layer in layers.values():
            layer.freeze_adapters()
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        torch.use_deterministic_algorithms(deterministic)
        model.train(was_training)
    if eval_windows is not None:
        model.eval()
        report.eval_ppl_after = perplexity(model, eval_windows)
        model.train(was_training)
    return report


# ------------------------------------------------------------------------------------------- outputs
def save_loss_curve(losses: list[float], path: str | Path, title: str = "adapter fine-tuning",
                    loss: str = "ce") -> bool:
    """Write the loss curve as a PNG (matplotlib, Agg canvas); False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=1, alpha=0.5, label="batch loss")
    k = max(1, len(losses) // 20)
    if k > 1:  # a running mean makes the trend readable when batches are noisy
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel(LOSS_LABELS.get(loss, loss))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    return True


def finetune_manifest(cfg: FinetuneConfig, report: FinetuneReport, **extra) -> dict:
    """The manifest's "finetune" entry: config, report and the loss history."""
    return {"config": cfg.to_dict(), **extra, **report.summary(), "losses": [round(x, 5) for x in report.losses]}


def save_finetuned(model: nn.Module, out: str | Path, *, tokenizer=None, manifest_extra: dict, report: FinetuneReport,
                   force: bool = False, loss: str = "ce") -> tuple[Path, bool]:
    """checkpoint.save plus the loss curve PNG, both in place before the folder appears at `out`.
    Returns (out, whether the PNG was written)."""
    from ..checkpoint.format import save
    from ..outputs import commit_output, prepare_output

    out = Path(out)
    staging = prepare_output(out, force)
    try:
        save(model, staging, tokenizer=tokenizer, manifest_extra=manifest_extra, force=True)
        plotted = save_loss_curve(report.losses, staging / LOSS_CURVE, loss=loss)
        commit_output(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, plotted


_CHECKPOINT_KEYS = ("format", "schema_version", "architecture", "tied", "layers", "files")


def finetune_checkpoint(ckpt: str | Path, out: str | Path, cfg: FinetuneConfig | None = None, *,
                        calib_source: str | None = None, nsamples: int = 128, seqlen: int = 512, calib_seed: int = 0,
                        eval_source: str | None = None, eval_windows: int = 0, state_dir: str | Path | None = None,
                        force: bool = False, progress: bool = True, teacher: str | None = None,
                        trust_remote_code: bool = False) -> tuple[Path, FinetuneReport, bool]:
    """The job behind `slim-trt finetune`: load CKPT, fine-tune its adapters on calibration windows, save OUT
    (a new checkpoint whose manifest records the fine-tuning). Returns (out, report, loss curve written).

    teacher: the dense model for cfg.loss == "kd" (MODEL as `slim-trt compress` takes it); by default the
    checkpoint's own source model, as its manifest names it."""
    from transformers import AutoTokenizer

    from ..data.windows import SHIPPED_EVAL, calibration_windows, eval_windows as make_eval_windows, load_text
    from ..checkpoint.format import load, read_manifest
    from ..config import CalibConfig
    from ..models.source import check_seqlen
    from ..outputs import check_output, check_outputs

    cfg = cfg or FinetuneConfig()
    CalibConfig(source=calib_source, nsamples=nsamples, seqlen=seqlen, seed=calib_seed)  # validates
    if eval_windows < 0:
        raise SlimError(f"bad --eval-windows {eval_windows}: give 0 (no evaluation) or more")
    ckpt, out = Path(ckpt), Path(out)
    # is, contains or lies inside the checkpoint (or another input): refused before anything is read
    check_outputs(folders={"-o": out}, inputs=[ckpt, calib_source, eval_source, teacher], force=force)
    manifest = read_manifest(ckpt)
    if not any(meta.get("rank") for meta in manifest["layers"].values()):
        raise SlimError(f"{ckpt} has no low-rank adapters to fine-tune (--lowrank none, or a --max-bits budget too "
                        f"small for any rank on these shapes): compress with --lowrank hessian, and --max-bits none on "
                        f"small models")
    check_output(out, force)  # before hours of training rather than after
    try:
        tok = AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError) as e:
        raise SlimError(f"{ckpt} has no usable tokenizer ({type(e).__name__}): re-run compress, which saves it")
    teacher_model = None
    if cfg.loss == "kd":
        from ..models.source import load_model

        teacher = teacher or manifest.get("source_model")
        if not teacher:
            raise SlimError(f"--loss kd needs the dense model and {ckpt}'s manifest does not name one: pass "
                            f"--teacher MODEL")
        teacher_model, _ = load_model(teacher, trust_remote_code=trust_remote_code)
    model = load(ckpt)
    check_seqlen(model.config, seqlen)
    windows = calibration_windows(tok, load_text(calib_source), nsamples, seqlen, calib_seed)
    held_out = None
    if eval_windows:
        held_out = make_eval_windows(tok, load_text(eval_source, default=SHIPPED_EVAL), seqlen, eval_windows)
    state_dir = Path(state_dir) if state_dir is not None else out.with_name(out.name + ".partial")
    if progress and state_dir.exists() and _state_files(state_dir):
        print(f"resuming from {state_dir}", file=sys.stderr)
    report = finetune(model, windows, cfg, state_dir=state_dir, eval_windows=held_out, progress=progress,
                      teacher=teacher_model)
    del teacher_model
    extra = {k: v for k, v in manifest.items() if k not in _CHECKPOINT_KEYS and k != "finetune"}
    calibration = {"source": calib_source or "shipped:calib_sample.txt", "nsamples": nsamples, "seqlen": seqlen,
                   "seed": calib_seed}
    extra["finetune"] = finetune_manifest(cfg, report, source_checkpoint=str(ckpt), calibration=calibration,
                                          teacher=teacher if cfg.loss == "kd" else None,
                                          eval={"source": eval_source or "shipped:eval_sample.txt",
                                                "windows": len(held_out) if held_out is not None else 0})
    out, plotted = save_finetuned(model, out, tokenizer=tok, manifest_extra=extra, report=report, force=force,
                                  loss=cfg.loss)
    shutil.rmtree(state_dir, ignore_errors=True)
    return out, report, plotted
