"""Shared by the peer scripts. Runs inside a peer's venv, so it needs only torch, transformers and safetensors.

Protocol (bench/accuracy.py is the caller): `run_<peer>.py --model HF_FOLDER --calib calib.pt --out DIR`
  calib.pt   LongTensor [nsamples, seqlen], the exact calibration windows of our rows
  DIR/       a plain HF folder (config, tokenizer, model.safetensors) with dense fake-quantized weights, plus
             DIR/prescale.safetensors when the peer folds a per-input-channel scale into the weights (AWQ)
  DIR/peer_report.json   status, versions, seconds, peak RSS, export check; on failure it is written to
             DIR.report.json with the exact error and traceback, and the script exits 1.

A peer whose quantized model does more than its weights show (W8A8: the activations are fake-quantized too) also
gets `--eval eval.pt` (the evaluation windows, LongTensor [n, seqlen]) and `--eval-batch-size`, scores the dense
and the quantized model on them with `score_windows` (the harness's own perplexity arithmetic), puts both in the
report ("evaluation") and the quantized model's top-1 predictions in DIR/eval_top1.pt. The saved folder then holds
the weights only (what the harness checks for the pattern and scores as the weight-only twin).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="Hugging Face folder of the dense model")
    p.add_argument("--calib", required=True, help="calibration windows, torch.save'd LongTensor [n, seqlen]")
    p.add_argument("--out", required=True, help="output HF folder (dense fake-quantized weights)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval", help="evaluation windows, torch.save'd LongTensor [n, seqlen] (peers that evaluate)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    return p.parse_args()


def versions(*packages: str) -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", *packages):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def load_dense(folder: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load_calib(path: str):
    import torch

    w = torch.load(path)
    if w.dim() != 2 or w.dtype != torch.long:
        raise ValueError(f"{path}: expected a LongTensor [n, seqlen], got {w.dtype} {tuple(w.shape)}")
    return w


def forward_loop_over(windows, batch_size: int):
    """A forward loop over the calibration windows, the shape every peer API takes."""
    import torch

    def loop(model):
        with torch.no_grad():
            for batch in windows.split(batch_size):
                model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    return loop


def score_windows(model, windows, batch_size: int) -> dict:
    """Summed next-token NLL over every predicted token of the windows, the token count and the top-1 predictions
    [n, seqlen - 1]: the arithmetic of bench/accuracy_run.py's reference_pass and score (fp32 logits, batches of
    `batch_size` windows in order), so a number computed here is the number the harness would compute."""
    import torch

    nll, count, tops = 0.0, 0, []
    with torch.no_grad():
        for batch in windows.split(batch_size):
            logits = model(input_ids=batch, use_cache=False).logits.float()[:, :-1]
            target = batch[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                           reduction="sum"))
            count += target.numel()
            tops.append(logits.argmax(-1))
    return {"nll": nll, "tokens": count, "top1": torch.cat(tops)}


def decoder_linears(model) -> dict:
    """name -> nn.Linear (or a peer's Linear subclass) inside the decoder blocks (lm_head and embeddings excluded)."""
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def save_dense_folder(src_folder: str, weights: dict, out: Path, prescale: dict | None, probe, reference_logits):
    """Write a clean HF folder: the original model with `weights` (name.weight -> tensor) substituted.

    `probe` is one calibration window and `reference_logits` the peer model's own logits on it, so the saved
    folder is checked to compute what the peer's quantized model computes.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    model = load_dense(src_folder)
    sd = model.state_dict()
    missing = [k for k in weights if k not in sd]
    if missing:
        raise KeyError(f"peer weights not in the dense model: {missing[:3]}")
    with torch.no_grad():
        for k, v in weights.items():
            sd[k].copy_(v.to(sd[k].dtype))
        logits = model(input_ids=probe, use_cache=False).logits.float()
    ref = reference_logits.float()
    check = {"probe_max_abs_diff": float((logits - ref).abs().max()),
             "probe_rel_diff": float((logits - ref).norm() / ref.norm()),
             "probe_top1_match": float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src_folder).save_pretrained(tmp)
        if prescale:
            save_file({k: v.contiguous() for k, v in prescale.items()}, str(tmp / "prescale.safetensors"))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check


def run(main, packages: tuple[str, ...]) -> None:
    """Call main(args) -> report dict; write the report (ok or failed) and exit with 0 or 1."""
    args = parse_args(main.__doc__ or "")
    out = Path(args.out)
    t0 = time.time()
    report = {"versions": versions(*packages)}
    try:
        report.update(main(args))
        report.update(status="ok", seconds=round(report.get("seconds", time.time() - t0), 1),
                      peak_rss_gb=round(peak_rss_gb(), 3))
        (out / "peer_report.json").write_text(json.dumps(report, indent=1))
        sys.exit(0)
    except Exception as e:  # noqa: BLE001  (record any failure of the peer library exactly, for the table)
        report.update(status="failed", error=f"{type(e).__name__}: {e}".strip()[:2000],
                      traceback=traceback.format_exc()[-6000:], seconds=round(time.time() - t0, 1),
                      peak_rss_gb=round(peak_rss_gb(), 3))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".report.json").write_text(json.dumps(report, indent=1))
        traceback.print_exc()
        sys.exit(1)


def effective_weights(model, linears: dict) -> dict:
    """name.weight -> the [N, K] matrix each (quantized) linear really applies, read off by feeding it the
    identity: y = I W_eff^T + b. It works for any peer's fake-quant module without touching its internals."""
    import torch

    out = {}
    with torch.no_grad():
        for name, lin in linears.items():
            K = lin.in_features
            eye = torch.eye(K, dtype=next(lin.parameters()).dtype, device=next(lin.parameters()).device)
            y = lin(eye.unsqueeze(0))[0]
            if getattr(lin, "bias", None) is not None:
                y = y - lin.bias
            out[f"{name}.weight"] = y.T.contiguous().float().cpu()
    return out
