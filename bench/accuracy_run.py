"""The accuracy benchmark's runner: one row from the dense model to its record (compress or run the peer,
fine-tune when the row says so, evaluate, record the storage, time, memory and load).
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import harness
from accuracy_rows import PEERS, Row, finetune_settings, row_config
from harness import BENCH, RowFailed, peak_rss_gb, reset_peak_rss

DENSE_BITS = 16.0  # the dense reference is deployed in fp16/bf16
PEER_BITS_NOTE = ("peer bits: the same storage formula as our rows (slim_trt.algorithms.pipeline.storage_bits) for "
                  "the pattern found in the saved weights: 2:4 with a 2-bit index per kept value when every group of "
                  "4 holds <= 2 non-zeros, else dense; the peer's value width and 16-bit scales (INT4 peers: 4-bit "
                  "values, one scale per 128 input columns; INT8 peers: 8-bit values, one scale per output channel); "
                  "plus 16 bits per input channel for a pre-quant scale (AWQ's, or SmoothQuant's smoothing factor) "
                  "when the peer has one")


# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    model: str
    calib: str
    data: str
    nsamples: int
    seqlen: int
    seed: int
    windows: int | None  # None = the whole split

    def to_dict(self) -> dict:
        return {"model": self.model, "calib": self.calib, "data": self.data, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed, "windows": "all" if self.windows is None else self.windows}


# ----------------------------------------------------------------------------------------------------------------
# Pure evaluation helpers


def score(model, windows, reference_top1, batch_size: int = 4) -> dict:
    """Perplexity of `model` over every predicted token, and its top-1 agreement with precomputed reference
    top-1 predictions [n, seqlen - 1]. The same numbers as slim_trt.verification.perplexity.compare, without re-running the
    dense model for every row (its logits over a 262k vocabulary are half the cost of each evaluation)."""
    import torch

    from slim_trt.verification.perplexity import window_logits

    nll, agree, count, offset = 0.0, 0, 0, 0
    for batch, logits in window_logits(model, windows, batch_size):
        a = logits[:, :-1]
        target = batch[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(a.reshape(-1, a.shape[-1]), target.reshape(-1), reduction="sum"))
        if reference_top1 is not None:
            agree += int((a.argmax(-1) == reference_top1[offset:offset + len(batch)]).sum())
        count += target.numel()
        offset += len(batch)
    return {"perplexity": math.exp(nll / count), "top1_agreement": agree / count if reference_top1 is not None else None,
            "tokens": count}


def reference_pass(model, windows, batch_size: int = 4):
    """(perplexity, top-1 predictions [n, seqlen - 1]) of the dense model."""
    import torch

    from slim_trt.verification.perplexity import window_logits

    nll, count, tops = 0.0, 0, []
    for batch, logits in window_logits(model, windows, batch_size):
        a = logits[:, :-1]
        nll += float(torch.nn.functional.cross_entropy(a.reshape(-1, a.shape[-1]), batch[:, 1:].reshape(-1),
                                                       reduction="sum"))
        count += batch[:, 1:].numel()
        tops.append(a.argmax(-1))
    return math.exp(nll / count), torch.cat(tops)


def check_weight_pattern(W, n: int = 2, m: int = 4, group_size: int = 128, bits: int = 4, prescale=None) -> dict:
    """Count what a saved weight really is: N:M violations along K and distinct values per quantization group.

    `prescale` [K] undoes a per-input-channel factor folded into the weight (AWQ's pre-quant scale), so the
    levels are counted on the quantizer's own grid.
    """
    import torch

    W = W.detach().to(torch.float32)
    if prescale is not None:
        W = W / prescale.to(torch.float32).reshape(1, -1)
    N, K = W.shape
    nz = W != 0
    violations = int((nz[:, : K - K % m].reshape(N, -1, m).sum(-1) > n).sum()) if K >= m else 0
    max_levels, over = 0, 0
    for g0 in range(0, K, group_size):
        blk = W[:, g0:g0 + group_size]
        # Distinct values per row of the group (zero counts as a level of the symmetric grid), compared on a
        # grid of 2^-14 of the group's max |w|: on a 4-bit grid the levels are q / q_max apart by >= 1/8, while
        # a folded-back pre-quant scale leaves float round-off of ~1e-7 that must not count as a new level.
        amax = blk.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        srt = torch.round(blk / amax * 2 ** 14).sort(dim=1).values
        levels = 1 + (srt[:, 1:] != srt[:, :-1]).sum(1)
        max_levels = max(max_levels, int(levels.max()))
        over += int((levels > 2 ** bits).sum())
    return {"nm_violations": violations, "zero_fraction": float(1 - nz.float().mean()),
            "max_levels_per_group": max_levels, "groups_over_levels": over, "groups": N * math.ceil(K / group_size)}


def peer_storage_bits(N: int, K: int, is_nm: bool, prescale: bool, bits: int = 4, group_size: int = 128) -> dict:
    """Storage bits of a peer layer with our formula: `bits`-bit values, a 16-bit scale per `group_size` columns
    (-1: one per output channel), 2:4 metadata, 16 bits per input channel for a pre-quant scale."""
    import torch

    from slim_trt.algorithms.pipeline import CompressedWeight, storage_bits
    from slim_trt.algorithms.qtensor import QuantizedTensor

    groups = 1 if group_size == -1 else math.ceil(K / group_size)
    qt = QuantizedTensor(q=torch.zeros(N, K, dtype=torch.int8), scale=torch.zeros(N, groups), bits=bits,
                         group_size=group_size)
    cw = CompressedWeight(weight=qt, mask=None, lora_L=None, lora_R=None, rel_error_base=0.0, rel_error=0.0)
    out = storage_bits(cw, "nm" if is_nm else "none", 2, 4)
    if prescale:
        out["base_bits"] += 16 * K
    return out


def peer_evaluation(report: dict, top1, reference_top1, dense_ppl: float, tolerance: float = 1e-3) -> dict:
    """Perplexity and top-1 agreement of a peer that evaluated in its own venv (its report's "evaluation": summed
    NLL and token counts of the dense and the quantized model; `top1` its predictions [n, seqlen - 1]).

    The peer's dense perplexity must match ours within `tolerance` (relative), or its numbers are not computed
    like ours (another transformers, other windows): RowFailed saying both."""
    ev = report.get("evaluation") or {}
    try:
        peer_dense = math.exp(ev["dense"]["nll"] / ev["dense"]["tokens"])
        ppl = math.exp(ev["quantized"]["nll"] / ev["quantized"]["tokens"])
    except (KeyError, TypeError, ZeroDivisionError):
        raise RowFailed(f"the peer evaluates in its venv but its report has no usable evaluation ({ev!r})",
                        report=report) from None
    if abs(peer_dense / dense_ppl - 1) > tolerance:
        raise RowFailed(f"the peer's dense perplexity {peer_dense:.4f} is not ours ({dense_ppl:.4f}, tolerance "
                        f"{tolerance:g}): its evaluation is not comparable", report=report)
    if tuple(top1.shape) != tuple(reference_top1.shape):
        raise RowFailed(f"the peer's top-1 predictions have shape {tuple(top1.shape)}, not "
                        f"{tuple(reference_top1.shape)}", report=report)
    return {"perplexity": ppl, "top1_agreement": float((top1 == reference_top1).float().mean()),
            "dense_perplexity_peer": peer_dense}


# ----------------------------------------------------------------------------------------------------------------
# Running rows


@dataclass
class Context:
    dense: object  # the untouched dense model (copied for every row)
    tokenizer: object
    folder: Path  # the HF folder the peers load
    calib: object  # LongTensor [nsamples, seqlen]
    eval: object  # LongTensor [windows, seqlen]
    ref_top1: object
    dense_ppl: float
    batch_size: int
    eval_batch_size: int
    settings: Settings
    out_dir: Path


def run_ours(row: Row, ctx: Context) -> dict:
    from slim_trt.compression.compressor import compress
    from slim_trt.config import CompressConfig

    model = copy.deepcopy(ctx.dense)  # compress works in place; the dense copy stays in memory
    reset_peak_rss()
    report = compress(model, CompressConfig(**row.compress), ctx.calib, batch_size=ctx.batch_size, progress=True)
    peak = peak_rss_gb()
    summary = report.summary()
    extra = {}
    if row.finetune is not None:
        extra["finetune"] = run_finetune(row, ctx, model)
        peak = peak_rss_gb()
    ev = score(model, ctx.eval, ctx.ref_top1, ctx.eval_batch_size)
    del model
    return {**extra, "perplexity": ev["perplexity"], "top1_agreement": ev["top1_agreement"],
            "bits_per_param": summary["bits_per_param"],
            "bits_per_param_with_adapters": summary["bits_per_param_with_adapters"],
            "compress_seconds": summary["seconds"], "peak_rss_gb": round(peak, 3),
            "mean_rel_error_base": summary["mean_rel_error_base"], "mean_rel_error": summary["mean_rel_error"],
            "layers": {n: {"rel_error_base": v["rel_error_base"], "rel_error": v["rel_error"], "rank": v["rank"],
                           **{k: v[k] for k in ("refit_rounds", "act_scale", "outliers", "outlier_columns",
                                                "group_bits") if k in v}}
                       for n, v in report.layers.items()},
            "block_output_rel_error": [b["output_rel_error"] for b in sorted(report.blocks, key=lambda b: b["index"])]}


def run_finetune(row: Row, ctx: Context, model) -> dict:
    """Fine-tune the compressed model's adapters in place (teacher: the dense model); the loss curve goes next to
    the results as finetune_<row key>.png."""
    from slim_trt.data.windows import calibration_windows, load_text
    from slim_trt.compression.finetune import FinetuneConfig, finetune, save_loss_curve

    st = finetune_settings(row)
    cfg = FinetuneConfig(**{k: v for k, v in st.items() if k != "windows"})
    windows = calibration_windows(ctx.tokenizer, load_text(ctx.settings.calib), st["windows"], ctx.settings.seqlen,
                                  ctx.settings.seed + 1)
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as state:
        rep = finetune(model, windows, cfg, state_dir=state, progress=True, teacher=ctx.dense)
    model.eval()
    png = ctx.out_dir / f"finetune_{row.key}.png"
    ctx.out_dir.mkdir(parents=True, exist_ok=True)  # a new --out folder is made only when results are written
    with tempfile.TemporaryDirectory(dir=ctx.out_dir) as tmp:
        if save_loss_curve(rep.losses, Path(tmp) / png.name, title=f"row {row.number}: adapter fine-tuning",
                           loss=cfg.loss):
            os.replace(Path(tmp) / png.name, png)
    return {**rep.summary(), "loss_curve": png.name, "losses": [round(x, 5) for x in rep.losses]}


def run_peer(row: Row, ctx: Context, venv_dir: Path, timeout: float) -> dict:
    """Run the peer's script in its venv; load, check and evaluate what it saved. Raises RowFailed."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slim_trt.compression.calibration.families import block_linears, decoder_blocks

    peer = PEERS[row.peer]
    py = harness.peer_python(venv_dir, peer_venv(row.peer), "bench-peers")
    wbits, group_size = peer.get("weight_bits", 4), peer.get("group_size", 128)
    with tempfile.TemporaryDirectory(prefix=f"peer-{row.peer}-") as tmp:
        tmp = Path(tmp)
        torch.save(ctx.calib, tmp / "calib.pt")
        out = tmp / "model"
        cmd = [str(py), str(BENCH / "peers" / peer.get("script", f"run_{row.peer}.py")), "--model", str(ctx.folder),
               "--calib", str(tmp / "calib.pt"), "--out", str(out), "--batch-size", str(ctx.batch_size)]
        if peer.get("evaluates"):
            torch.save(ctx.eval, tmp / "eval.pt")
            cmd += ["--eval", str(tmp / "eval.pt"), "--eval-batch-size", str(ctx.eval_batch_size)]
        print(f"  $ {' '.join(cmd)}", flush=True)
        log = tmp / "peer.log"
        try:
            with open(log, "w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=harness.peer_env(),
                                      timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RowFailed(f"timed out after {timeout:.0f} s", report=_peer_report(out))
        report = _peer_report(out)
        if proc.returncode != 0 or report is None or report.get("status") != "ok":
            tail = harness.log_tail(log)
            err = (report or {}).get("error") or (tail.splitlines()[-1] if tail else f"exit code {proc.returncode}")
            raise RowFailed(err, tail, report)
        prescales = load_file(out / "prescale.safetensors") if (out / "prescale.safetensors").exists() else {}
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        bits, params = 0, 0
        blocks = decoder_blocks(model)
        prefix = next(n for n, m in model.named_modules() if m is blocks)
        per_layer = {}
        for i, block in enumerate(blocks):
            for rel, lin in block_linears(block).items():
                name = f"{prefix}.{i}.{rel}"
                pre = prescales.get(f"{name}.weight")
                per_layer[name] = check_weight_pattern(lin.weight, prescale=pre, bits=wbits,
                                                       group_size=group_size if group_size > 0 else lin.in_features)
        nm_ok_all = all(c["nm_violations"] == 0 for c in per_layer.values())
        for name in per_layer:
            N, K = model.get_submodule(name).weight.shape
            b = peer_storage_bits(N, K, nm_ok_all, f"{name}.weight" in prescales, wbits, group_size)
            bits += b["base_bits"]
            params += b["params"]
        checks = {"layers_checked": len(per_layer), "is_2_4": nm_ok_all,
                  "nm_violations": sum(c["nm_violations"] for c in per_layer.values()),
                  "zero_fraction": round(sum(c["zero_fraction"] for c in per_layer.values()) / len(per_layer), 4),
                  "max_levels_per_group": max(c["max_levels_per_group"] for c in per_layer.values()),
                  f"groups_over_{2 ** wbits}_levels": sum(c["groups_over_levels"] for c in per_layer.values()),
                  "groups": sum(c["groups"] for c in per_layer.values()),
                  f"on_{wbits}bit_grid": all(c["groups_over_levels"] == 0 for c in per_layer.values())}
        ev = score(model, ctx.eval, ctx.ref_top1, ctx.eval_batch_size)
        del model
        extra = {}
        if peer.get("evaluates"):  # the peer's own model (activations quantized too) scored in its venv
            extra["weights_only"] = {"perplexity": ev["perplexity"], "top1_agreement": ev["top1_agreement"],
                                     "ratio_to_dense": round(ev["perplexity"] / ctx.dense_ppl, 4),
                                     "note": "the saved effective weights in our harness, activations not quantized"}
            ev = peer_evaluation(report, torch.load(out / "eval_top1.pt"), ctx.ref_top1, ctx.dense_ppl)
            extra["dense_perplexity_peer"] = ev["dense_perplexity_peer"]
    return {**extra, "perplexity": ev["perplexity"], "top1_agreement": ev["top1_agreement"],
            "bits_per_param": round(bits / params, 4), "bits_per_param_with_adapters": round(bits / params, 4),
            "bits_note": PEER_BITS_NOTE, "compress_seconds": report.get("seconds"),
            "peak_rss_gb": report.get("peak_rss_gb"), "pattern_check": checks, "peer_report": report}


def peer_venv(peer: str) -> str:
    """The venv a peer runs in (bench/.venv-<this>): its own, or the one it shares with another recipe of its
    library ("venv" in the rows file)."""
    return PEERS[peer].get("venv", peer)


def _peer_report(out: Path) -> dict | None:
    f = out / "peer_report.json"
    if not f.exists():
        f = out.with_name(out.name + ".report.json")  # the peer writes here when it failed before saving
    return json.loads(f.read_text()) if f.exists() else None


def prepare(args, settings: Settings) -> Context:
    import torch

    from slim_trt.data.windows import calibration_windows, load_text
    from slim_trt.models.source import load_model, model_folder

    t0 = time.time()
    dense, tok = load_model(settings.model)
    calib = calibration_windows(tok, load_text(settings.calib), settings.nsamples, settings.seqlen, settings.seed)
    ev = harness.evaluation_windows(tok, settings.data, settings.seqlen, settings.windows)
    print(f"loaded {settings.model}, {len(calib)} calibration and {len(ev)} evaluation windows of {settings.seqlen} "
          f"tokens ({time.time() - t0:.0f} s); dense reference pass ...", flush=True)
    with torch.no_grad():
        dense_ppl, top1 = reference_pass(dense, ev, args.eval_batch_size)
    print(f"dense perplexity {dense_ppl:.3f} ({time.time() - t0:.0f} s)", flush=True)
    return Context(dense=dense, tokenizer=tok, folder=Path(model_folder(settings.model)), calib=calib, eval=ev,
                   ref_top1=top1, dense_ppl=dense_ppl, batch_size=args.batch_size,
                   eval_batch_size=args.eval_batch_size, settings=settings, out_dir=Path(args.out))


def run_row(row: Row, ctx: Context, args, base_versions: dict) -> dict:
    record = {"number": row.number, "name": row.name, "label": row.label, "config": row_config(row),
              "versions": dict(base_versions), "loadavg_start": harness.loadavg()}
    t0 = time.time()
    try:
        if row.compress is None and row.peer is None:
            record.update(status="ok", perplexity=ctx.dense_ppl, top1_agreement=1.0, bits_per_param=DENSE_BITS,
                          bits_per_param_with_adapters=DENSE_BITS, compress_seconds=0.0, peak_rss_gb=None,
                          note="the reference; bits are those of fp16 storage")
        elif row.peer is not None:
            record["versions"][PEERS[row.peer]["package"]] = None
            res = run_peer(row, ctx, Path(args.peer_venvs), args.peer_timeout)
            rep = res["peer_report"]
            record["versions"].update({f"peer_{k}": v for k, v in rep.get("versions", {}).items()})
            record["versions"][PEERS[row.peer]["package"]] = rep.get("versions", {}).get(PEERS[row.peer]["package"])
            record.update(status="ok", **res)
        else:
            record.update(status="ok", **run_ours(row, ctx))
    except RowFailed as e:  # only peer rows fail into the record; our rows' errors stop the run
        rep, package = e.report or {}, PEERS[row.peer]["package"]
        record["versions"].update({f"peer_{k}": v for k, v in rep.get("versions", {}).items()})
        record["versions"][package] = (rep.get("versions", {}).get(package)
                                       or harness.venv_version(harness.venv_python(args.peer_venvs, peer_venv(row.peer)),
                                                                            package))
        record.update(status="failed", error=e.error, perplexity=None, ratio_to_dense=None, top1_agreement=None,
                      bits_per_param=None, bits_per_param_with_adapters=None,
                      compress_seconds=rep.get("seconds"), peak_rss_gb=rep.get("peak_rss_gb"),
                      traceback=rep.get("traceback"), log_tail=e.log_tail)
    record["ratio_to_dense"] = (round(record["perplexity"] / ctx.dense_ppl, 4)
                                if record.get("perplexity") is not None else None)
    record["wall_seconds"] = round(time.time() - t0, 1)
    record["loadavg_end"] = harness.loadavg()
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return record

