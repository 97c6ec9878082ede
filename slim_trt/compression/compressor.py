"""compress(model, config, windows): replace every eligible linear with a CompressedLinear, block by block.

compress_model(source, out, ...) is the whole job behind `slim-trt compress`: load, calibrate, compress with
per-block resume, save the checkpoint atomically.
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..algorithms.pipeline import compress_base, compress_weight, plan_block_ranks, plan_ranks, storage_bits
from ..algorithms.qtensor import QuantizedTensor
from ..algorithms.spqr import SpQRTensor
from .calibration.block_tuning import BlockTuning
from .calibration.runner import ActCalibration, BlockResult, BlockTune, LinearStats, run_layerwise
from .calibration.resume import BlockStore
from ..checkpoint.format import save
from ..models.shards import check_finite
from ..checkpoint.compressed_linear import CompressedLinear
from ..config import CalibConfig, CompressConfig
from ..errors import SlimError
from ..resources import (all_cores, available_memory_bytes, device_peak_gb, device_sync, peak_rss_gb, reset_device_peak,
                         resolve_device)
from .layer_pool import layer_workers, map_layers
from .streaming import host_peak_bound, memory_parts, peak_rss_bytes, rss_bytes, save_streamed
from ..timing import PhaseTimer, phase


@dataclass
class CompressReport:
    layers: dict[str, dict] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_gb: float = 0.0
    rank_ratio: float = 0.0  # the ratio the ranks came from (below the config's when max_bits binds)
    device: str = "cpu"  # where the blocks were compressed
    threads: int = 0  # torch's intra-op threads during the compression
    peak_device_gb: float | None = None  # peak memory torch allocated on a CUDA device (None on the CPU)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (see phase_split)
    refit_phases: dict[str, float] = field(default_factory=dict)  # the refit rounds' seconds by part
    streamed: bool = False  # the blocks were read from the weight files one at a time (slim_trt/compression/streaming.py)
    peak_host_bytes: int | None = None  # measured: the process's peak resident memory, save included
    peak_host_bytes_bound: int | None = None  # predicted (streamed runs): baseline + streaming.host_peak_bound
    host_memory: dict[str, int] = field(default_factory=dict)  # the bound's parts, in bytes
    # channel_permutation: per block and reader ("<block>.<layer>": down_proj for mlp, o_proj for attn, q/k/v/gate/up
    # for residual), the share of Wanda saliency N:M groups keep, before and ":after"
    permutation: dict[str, float] = field(default_factory=dict)

    def bits_per_param(self, with_adapters: bool) -> float:
        params = sum(v["params"] for v in self.layers.values())
        bits = sum(v["base_bits"] + (v["adapter_bits"] if with_adapters else 0) for v in self.layers.values())
        return bits / params if params else 0.0

    def summary(self) -> dict:
        return {
            "compressed_layers": len(self.layers),
            "skipped_layers": self.skipped,
            "seconds": round(self.seconds, 2),
            "peak_rss_gb": round(self.peak_rss_gb, 3),
            "device": self.device,
            "threads": self.threads,
            "peak_device_gb": None if self.peak_device_gb is None else round(self.peak_device_gb, 3),
            "phases": {k: round(v, 2) for k, v in self.phases.items()},
            "refit_phases": {k: round(v, 2) for k, v in self.refit_phases.items()},
            "streamed": self.streamed,
            "peak_host_bytes": self.peak_host_bytes,
            "peak_host_bytes_bound": self.peak_host_bytes_bound,
            "host_memory": self.host_memory,
            "bits_per_param": round(self.bits_per_param(False), 4),
            "bits_per_param_with_adapters": round(self.bits_per_param(True), 4),
            "rank_ratio": round(self.rank_ratio, 6),
            "mean_rel_error_base": _mean(v["rel_error_base"] for v in self.layers.values()),
            "mean_rel_error": _mean(v["rel_error"] for v in self.layers.values()),
            **({"permutation": self.permutation} if self.permutation else {}),
        }


def _mean(xs) -> float:
    xs = list(xs)
    return round(sum(xs) / len(xs), 6) if xs else 0.0


def phase_split(timer: PhaseTimer, total: float) -> dict[str, float]:
    """Seconds per phase of one compression, adding up to `total`:
    calibration_forward (dense block passes, embeddings), hessian (input statistics), act_calibration (W8A8
    passes), sweep (the first SparseGPT / GPTQ / rounding of each base), adapter_svd (H-LoRA's root and SVD),
    adapter_rounding (adapter GPTQ), refit_round_K (each refit round, all its parts), rank_allocation,
    asymmetric_target (dense_target > 0: each layer's target weight),
    lrc_fit, layer_other (error measures, building the layers), block_output (the compressed block's
    forward), save (resume files), other (the rest: planning, checks, moves)."""
    out: dict[str, float] = {}
    for path, sec in timer.seconds.items():
        parts = path.split("/")
        # Under "compress" a refit round keeps its parts; elsewhere the innermost phase (hessian in a forward).
        key = "layer_other" if path == "compress" else parts[1] if parts[0] == "compress" else parts[-1]
        out[key] = out.get(key, 0.0) + sec
    out["other"] = max(total - sum(out.values()), 0.0)
    return out


def refit_split(timer: PhaseTimer) -> dict[str, float]:
    """The refit rounds' seconds by their parts (sweep, adapter_svd, adapter_rounding; refit_round_K itself:
    the error measures), over all rounds."""
    out: dict[str, float] = {}
    for path, sec in timer.seconds.items():
        parts = path.split("/")
        if len(parts) >= 2 and parts[1].startswith("refit_round_"):
            key = parts[2] if len(parts) > 2 else "error_measures"
            out[key] = out.get(key, 0.0) + sec
    return out


def skip_reason(full_name: str, lin: nn.Linear, cfg: CompressConfig) -> str | None:
    """Why a block linear stays dense (None: it is compressed)."""
    if any(fnmatch.fnmatch(full_name, pat) or full_name.endswith("." + pat) for pat in cfg.skip_layers):
        return "--skip"
    sp = cfg.sparsity_spec
    if sp.kind == "nm" and lin.in_features % sp.m:
        return f"K={lin.in_features} is not a multiple of {sp.m}"
    return None


def _skip_filter(cfg: CompressConfig, model: nn.Module, report: CompressReport):
    def skip(full_name: str) -> bool:
        reason = skip_reason(full_name, model.get_submodule(full_name), cfg)
        if reason is None:
            return False
        if reason != "--skip":
            warnings.warn(f"{full_name}: {reason}; kept dense")
        report.skipped.append(full_name)
        return True
    return skip


def block_shapes(model: nn.Module, cfg: CompressConfig) -> list[dict[str, tuple[int, int]]]:
    """Per decoder block, {full name: (N, K)} of every linear `compress` will compress there."""
    from .calibration.families import block_linears, decoder_blocks
    from .calibration.runner import _blocks_prefix

    blocks = decoder_blocks(model)
    prefix = _blocks_prefix(model, blocks)
    return [{f"{prefix}{i}.{rel}": (lin.out_features, lin.in_features) for rel, lin in block_linears(block).items()
             if skip_reason(f"{prefix}{i}.{rel}", lin, cfg) is None} for i, block in enumerate(blocks)]


def compressed_shapes(model: nn.Module, cfg: CompressConfig) -> dict[str, tuple[int, int]]:
    """{full name: (N, K)} of every linear `compress` will compress, in block order."""
    return {name: shape for block in block_shapes(model, cfg) for name, shape in block.items()}


def kept_input_width(model: nn.Module, cfg: CompressConfig) -> int:
    """The most input channels one block's compressed linears read, summed over its linears: what the runner's
    kept inputs (runner.KeptInputs) hold per calibration token, an upper bound (layers that share an input keep
    it once)."""
    return max((sum(k for _, k in block.values()) for block in block_shapes(model, cfg)), default=0)


def keeps_inputs(model: nn.Module, config: CompressConfig, windows: torch.Tensor) -> bool:
    """Whether a W8A8 run keeps each block's linear inputs for its error moments (runner.KeptInputs, one block
    pass fewer): when they take at most a quarter of the host memory available now. The statistics are the same
    either way; on a GPU each block is checked against the device's free memory too."""
    if config.act_bits is None:
        return False
    have = available_memory_bytes()
    return have is None or 4 * windows.numel() * kept_input_width(model, config) <= have // 4


def _on(x, device: torch.device):
    return None if x is None else x.to(device)  # QuantizedTensor.to moves every field


def compress_linear(name: str, lin: nn.Linear, stats: LinearStats, cfg: CompressConfig, *, rank: int | None = None,
                    base=None, timer: PhaseTimer | None = None, home: torch.device | None = None
                    ) -> tuple[CompressedLinear, dict]:
    """Compress one linear where its weight is; the layer's integer form is kept on `home` (the host: where the
    model lives), its float buffers on the weight's device until the runner moves the block back."""
    W = lin.weight.detach()
    target = W  # what the layer is fitted to reproduce on its inputs
    if stats.drift is not None:  # dense_target > 0: a weight closer to the dense model's output
        from ..algorithms.asymmetric import asymmetric_target, source_ridge

        with phase(timer, "asymmetric_target"):
            ridge = None
            if cfg.dense_target_frame == "source" and stats.smoothing is not None:
                ridge = source_ridge(stats.hessian, stats.smoothing, cfg.dense_target_damp)
            # kept in float32 (compress_weight works in float32): a bf16 model's target is not rounded to bf16
            target = asymmetric_target(W, stats.hessian, stats.drift, cfg.dense_target_damp, cfg.dense_target,
                                       ridge)
    cw = compress_weight(target, stats.hessian, stats.act_norm, stats.saliency, cfg, rank=rank, base=base,
                         act=stats.act_moments, timer=timer)
    sp = cfg.sparsity_spec
    home = W.device if home is None else home
    layer = CompressedLinear(_on(cw.weight, home), mask=_on(cw.mask, home), sparsity=str(sp),
                             lora_L=_on(cw.lora_L, home), lora_R=_on(cw.lora_R, home), bias=_on(lin.bias, home),
                             compute_dtype=W.dtype, act_scale=stats.act_scale,
                             act_format=stats.act_format).to(W.device)
    info = {"rel_error_base": round(cw.rel_error_base, 6), "rel_error": round(cw.rel_error, 6),
            "rank": layer.rank, **storage_bits(cw, sp.kind, sp.n, sp.m)}
    if isinstance(cw.weight, SpQRTensor) and cw.weight.outliers is not None:
        # How many outliers, and in how many input columns (what the exported "columns" form stores densely).
        info["outliers"] = cw.weight.outlier_count
        info["outlier_columns"] = int(torch.unique(cw.weight.outliers.col).numel())
    if layer.act_scale is not None:
        info["act_scale"] = layer.act_scale
    if isinstance(cw.weight, QuantizedTensor) and cw.weight.group_bits is not None:
        # SliM-LLM's allocation for the record: how many groups (of one row) got each width
        widths = cw.weight.group_bits[0].tolist()
        info["group_bits"] = {str(b): widths.count(b) for b in sorted(set(widths))}
    if cfg.refit_rounds:
        info["refit_rounds"] = cw.refit_rounds
    return layer, info


def block_tune(config: CompressConfig) -> BlockTune | None:
    """run_layerwise's block-wise adapter tuning for `config`, or None (off, or no adapters to tune)."""
    if not config.tunes_blocks:
        return None
    return BlockTune(BlockTuning(config.block_tune_epochs, config.block_tune_lr, loss=config.block_tune_loss),
                     config.block_tune_target)


def act_calibration(config: CompressConfig, model: nn.Module) -> ActCalibration | None:
    """The runner's activation-quantization step for a W8A8 config (None when activations stay float)."""
    if config.act_bits is None:
        return None
    from ..algorithms.actquant import act_scale
    from .calibration.smoothing import smooth_block

    def scale(st: LinearStats) -> float:
        return act_scale(st.abs_hist, config.act_scale_method, config.act_bits, config.act_percentile,
                         config.act_format)

    def smooth(i, block, linears, stats) -> dict[str, torch.Tensor]:
        absmax = {n: st.channel_absmax for n, st in stats.items()}
        return smooth_block(block, model.config, linears, absmax, config.smooth_alpha)

    return ActCalibration(bits=config.act_bits, fmt=config.act_format, scale=scale, smooth=smooth if config.smooth_alpha is not None else None)


def channel_transform(config: CompressConfig, report: "CompressReport", model_config=None):
    """The runner's transform step for config.channel_permutation's per-block parts (None when there are none):
    permute each block's MLP channels ("mlp") and value channels within each KV head ("attn") for its N:M groups;
    the kept saliency shares go to report.permutation."""
    parts = set(config.permutation_parts) if config.permutes_channels else set()
    if not parts & {"mlp", "attn"}:
        return None
    from .calibration.permutation import permute_attn, permute_mlp

    sp = config.sparsity_spec

    def transform(i, block, linears, stats) -> dict[str, torch.Tensor]:
        norms = {n: st.act_norm for n, st in stats.items()}
        shares, perms = permute_mlp(linears, norms, sp.n, sp.m) if "mlp" in parts else ({}, {})
        if "attn" in parts:
            attn_shares, attn_perms = permute_attn(block, model_config, linears, norms, sp.n, sp.m)
            shares.update(attn_shares)
            perms.update(attn_perms)
        report.permutation.update({f"{i}.{k}": round(v, 6) for k, v in shares.items()})
        return perms

    return transform


def _permute_residual(model, config: CompressConfig, windows, batch_size: int, store, weights, report) -> None:
    """channel_permutation's "residual" part: the whole float model's hidden channels, once, before the first
    block (a resumed run re-applies the permutation its blocks were compressed in)."""
    if weights is not None:
        raise SlimError("--channel-permutation residual permutes the whole model before its first block: it cannot "
                        "stream the blocks from disk; use --no-stream or drop residual")
    from .calibration.residual import permute_residual

    sp = config.sparsity_spec
    perm, shares = permute_residual(model, windows, sp.n, sp.m, batch_size=batch_size,
                                    perm=store.load_residual() if store is not None else None)
    if store is not None:
        store.save_residual(perm)
    report.permutation.update({k: round(v, 6) for k, v in shares.items()})


def compress(model: nn.Module, config: CompressConfig, windows: torch.Tensor, *, batch_size: int = 8,
             progress: bool = True, resume_dir: Path | None = None,
             device: str | torch.device | None = "auto", weights=None,
             keep_inputs: bool | None = None) -> CompressReport:
    """Compress `model` in place with calibration token windows [n, seqlen]; returns a report.

    With `resume_dir`, each finished block is saved there and blocks found there are restored instead of
    recomputed, so an interrupted run continues where it stopped and ends with the same result.
    device: "auto" (a CUDA GPU when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N". The model stays
    in host memory; one decoder block at a time is compressed on the device. torch uses every core this
    process is given while it runs (unless OMP_NUM_THREADS says otherwise): the block passes on all of them, and
    on a CPU up to two of a block's layers at once, one per core (layer_pool.py).
    weights: a slim_trt.compression.streaming.StreamedModel when `model` is on the meta device (compress_model streams);
    then every finished block's compressed layers are in `resume_dir` only, and leave `model`.
    keep_inputs: whether W8A8 keeps each block's linear inputs for one pass fewer (None: keeps_inputs decides).
    """
    dev = resolve_device(device)
    if weights is not None and resume_dir is None:
        raise ValueError("a streamed compression keeps its finished blocks in resume_dir: give one")
    with all_cores() as threads:
        keep = keeps_inputs(model, config, windows) if keep_inputs is None else keep_inputs
        report = _compress(model, config, windows, batch_size, progress, resume_dir, dev, weights, keep)
    report.threads = threads
    return report


def _compress(model, config, windows, batch_size, progress, resume_dir, dev: torch.device,
              weights=None, keep_inputs: bool = False) -> CompressReport:
    from .calibration.families import decoder_blocks

    t0 = time.time()
    report = CompressReport(device=str(dev))
    timer = PhaseTimer(sync=device_sync(dev))
    reset_device_peak(dev)
    home = weights.home if weights is not None else next(model.parameters()).device
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks) + "."
    skip = _skip_filter(config, model, report)
    # Ranks come from the shapes alone, planned for the whole model up front so the bits budget holds.
    planned, report.rank_ratio = plan_ranks(compressed_shapes(model, config), config)
    if weights is None:  # a streamed model's weights were checked in its files (StreamedModel.check)
        check_finite(model)
    store = BlockStore(resume_dir) if resume_dir is not None else None
    if config.permutes_residual:
        with timer.phase("permutation"):
            _permute_residual(model, config, windows, batch_size, store, weights, report)

    def compress_block(i, block, linears, stats):
        infos = {}
        ranks, bases = {}, {}
        if config.rank_allocation == "sensitivity" and linears and report.rank_ratio > 0:  # 0: no adapters planned
            # Ranks depend on every linear's error, so all bases of the block come first.
            with timer.phase("sweep"):
                bases = {n: compress_base(lin.weight, stats[n].hessian, stats[n].act_norm, config)
                         for n, lin in linears.items()}
            with timer.phase("rank_allocation"):
                ranks = plan_block_ranks({n: lin.weight for n, lin in linears.items()},
                                     {n: b[0] for n, b in bases.items()},
                                         {n: stats[n].saliency for n in linears}, config,
                                         {n: stats[n].hessian for n in linears},
                                         {n: planned[f"{prefix}{i}.{n}"] for n in linears})

        def job(rel_name: str):
            full = f"{prefix}{i}.{rel_name}"
            held = [stats[rel_name], bases.pop(rel_name, None)]
            stats[rel_name] = None

            def run(t):
                st, base = held
                held.clear()  # the Hessian (and its cached factorisations) go as soon as the layer is done
                return compress_linear(full, linears[rel_name], st, config, rank=ranks.get(rel_name, planned[full]),
                                       base=base, timer=t, home=home)
            return run

        # Largest first, so that with several workers (layer_pool.py) the last layer to finish is a small one.
        order = sorted(linears, key=lambda n: -linears[n].in_features * linears[n].out_features)
        done = map_layers({n: job(n) for n in order}, layer_workers(dev, len(linears)), timer)
        for rel_name in linears:
            layer, infos[f"{prefix}{i}.{rel_name}"] = done.pop(rel_name)
            block.set_submodule(rel_name, layer)
        report.layers.update(infos)
        return infos

    def restore_block(i, block):
        found = store.load(i) if store is not None else None
        if found is None:
            return False
        layers, meta = found
        if "dense" in meta:  # the norms / dense linears that absorbed SmoothQuant scales
            block.load_state_dict(meta["dense"], strict=False)
        for full, layer in layers.items():
            block.set_submodule(full[len(f"{prefix}{i}."):], layer.to(next(model.parameters()).dtype))
        report.layers.update(meta["infos"])
        report.skipped.extend(meta.get("skipped", []))
        report.blocks.append(meta["block"])
        return True

    def on_block_done(res: BlockResult):
        entry = {"index": res.index, "output_rel_error": round(res.output_rel_error, 6)}
        if res.drift_rel_error is not None:
            entry["drift_rel_error"] = round(res.drift_rel_error, 6)
        if res.tuning is not None:
            entry["tuning"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in res.tuning.items()}
        report.blocks.append(entry)
        if progress:
            errs = "  ".join(f"{n.rsplit('.', 1)[-1]} {v['rel_error_base']:.3f}->{v['rel_error']:.3f}"
                             for n, v in res.layers.items())
            drift = "" if res.drift_rel_error is None else f" (from dense {res.drift_rel_error:.4f})"
            if res.tuning is not None:
                drift += f" tuned {res.tuning['loss_before']:.4f}->{res.tuning['loss_after']:.4f}"
            bar.write(f"block {res.index:>3}: out err {res.output_rel_error:.4f}{drift} | {errs}")
        if store is not None:
            skipped = [s for s in report.skipped if s.startswith(f"{prefix}{res.index}.")]
            # the block's norms absorbed SmoothQuant scales, or its channels were permuted: keep its whole state
            smoothed = config.smooth_alpha is not None or config.permutes_channels
            with timer.phase("save"):
                store.save(res.index, {n: model.get_submodule(n) for n in res.layers},
                           {"infos": res.layers, "skipped": skipped, "block": entry},
                           dense=blocks[res.index].state_dict() if smoothed else None)

    from tqdm.auto import tqdm

    bar = tqdm(range(len(blocks)), desc="compress", unit="block", disable=not progress, file=sys.stderr)
    with torch.no_grad():
        run_layerwise(model, windows, compress_block, batch_size=batch_size, skip=skip,
                      restore_block=restore_block, on_block_done=on_block_done, progress=bar,
                      act=act_calibration(config, model), device=dev, timer=timer, weights=weights,
                      transform=channel_transform(config, report, model.config),
                      asymmetric=config.dense_target > 0,
                      tune=block_tune(config), keep_inputs=keep_inputs,
                      restorable=store.has if store is not None else lambda i: False)
    bar.close()
    report.skipped = sorted(set(report.skipped))
    report.seconds = time.time() - t0
    report.phases = phase_split(timer, report.seconds)
    report.refit_phases = refit_split(timer)
    report.peak_rss_gb = peak_rss_gb()
    report.peak_host_bytes = int(report.peak_rss_gb * 2**30)
    report.peak_device_gb = device_peak_gb(dev)
    report.streamed = weights is not None
    return report


def _fingerprint(source: str, cfg: CompressConfig, windows: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(source.encode())
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(windows.numpy().tobytes())
    return h.hexdigest()[:24]


def _check_divisible(model: nn.Module, cfg: CompressConfig) -> None:
    """Fail early on an unsupported architecture or an N:M pattern that fits no layer."""
    from .calibration.families import block_linears, decoder_blocks

    blocks = decoder_blocks(model)
    sp = cfg.sparsity_spec
    if sp.kind != "nm":
        return
    ks = sorted({lin.in_features for b in blocks for lin in block_linears(b).values()})
    if all(k % sp.m for k in ks):
        raise SlimError(f"sparsity {sp} does not divide the input size of any layer (K = {ks}): choose M that "
                        f"divides K, e.g. 2:4")


def _open_streamed(source: str, trust_remote_code: bool, progress: bool):
    """(the model to stream (slim_trt/compression/streaming.py), None) or (None, why it is loaded whole). The reason is said
    on stderr only once the whole load has worked: a folder that cannot load at all gets its one error line."""
    from ..models.source import model_folder
    from .streaming import open_streamed

    folder = model_folder(source)
    if isinstance(folder, str):
        return None, (f"{source}: a hub model is loaded whole (streaming reads a local folder: download it and "
                      f"pass the folder to stream it)")
    streamed, why_not = open_streamed(Path(folder), trust_remote_code=trust_remote_code)
    return streamed, (None if streamed is not None else f"{source}: loaded whole, not streamed: {why_not}")


def compress_model(source: str, out: str | Path, config: CompressConfig | None = None,
                   calib: CalibConfig | None = None, *, force: bool = False, progress: bool = True,
                   trust_remote_code: bool = False, finetune=None,
                   device: str | torch.device | None = "auto", stream: bool = True) -> tuple[Path, CompressReport]:
    """Load MODEL, calibrate on text, compress block by block (resumable), save a checkpoint folder at `out`.

    device: where the blocks are compressed (see compress); the model stays in host memory.

    stream: read each decoder block from the safetensors files when its turn comes, in its stored dtype, and
    keep only its compressed result (slim_trt/compression/streaming.py): host memory holds about one block, not the model,
    and the checkpoint is bit-identical. A hub id, weights whose names the model does not use as they are, and
    fine-tuning (which trains the whole model) load the model whole instead, saying so; so does
    channel_permutation's "residual" (which permutes the whole model before the first block).

    finetune: a slim_trt.compression.finetune.FinetuneConfig to fine-tune the adapters on the calibration windows right
    after compression, before saving (resumable too, from OUT.partial/finetune).
    """
    from .calibration.resume import PartialLock
    from ..outputs import check_outputs

    config = config or CompressConfig()
    calib = calib or CalibConfig()
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    # Everything that can be checked is checked before the compression starts, not after it.
    device = resolve_device(device)
    check_outputs(folders={"-o": out}, inputs=[source, calib.source], force=force)
    lock = PartialLock(partial)  # one run per output: a second one is refused here, before any work
    try:
        return _compress_locked(source, out, partial, config, calib, force=force, progress=progress,
                                trust_remote_code=trust_remote_code, finetune=finetune, device=device, stream=stream)
    except SlimError:
        # A user error will not go away on a re-run, so there is nothing worth resuming.
        if lock.created:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        lock.release()


def _compress_locked(source: str, out: Path, partial: Path, config: CompressConfig, calib: CalibConfig, *,
                     force: bool, progress: bool, trust_remote_code: bool, finetune, device,
                     stream: bool) -> tuple[Path, CompressReport]:
    """compress_model's work, with OUT.partial locked for this run."""
    from ..data.windows import calibration_windows, load_text
    from .calibration.families import decoder_blocks
    from .calibration.resume import check_partial_state
    from ..models.source import check_seqlen, load_model

    text = load_text(calib.source)
    # Fine-tuning trains the whole model and the residual permutation permutes it before the first block: both
    # load it whole.
    streamed, whole_why = (_open_streamed(source, trust_remote_code, progress)
                           if stream and finetune is None and not config.permutes_residual else (None, None))
    if stream and finetune is None and config.permutes_residual:
        whole_why = (f"{source}: loaded whole, not streamed: --channel-permutation residual permutes the whole "
                     f"model before its first block")
    if streamed is not None:
        model, tok = streamed.model, streamed.tokenizer
        baseline = rss_bytes()  # the code is loaded, no weight yet: what the bound is counted from
        streamed.check()
    else:
        model, tok = load_model(source, trust_remote_code=trust_remote_code)  # the source gate, NaN/Inf included
        if whole_why:
            from .streaming import note
            note(whole_why, True)
    check_seqlen(model.config, calib.seqlen)
    _check_divisible(model, config)
    # Distillation needs the dense model after compression has replaced the layers in place.
    teacher = copy.deepcopy(model) if finetune is not None and finetune.loss == "kd" else None
    # The layer-wise runner holds a block's inputs, dense outputs and new outputs in float32 (3 A in
    # streaming.host_peak_bound): 12 bytes per calibration token and hidden unit, checked before they exist; the
    # dense model's hidden states in and out as well when it carries them (config.dense_stream: 20 bytes).
    hidden = int(getattr(model.config.get_text_config(), "hidden_size", 0) or 0)
    windows = calibration_windows(tok, text, calib.nsamples, calib.seqlen, calib.seed,
                                  bytes_per_token=(20 if config.dense_stream else 12) * hidden)
    keep = keeps_inputs(model, config, windows)  # decided once: the memory bound counts them
    if streamed is not None:  # the memory bound's parts, predicted before the compression starts
        memory = memory_parts(streamed, windows, calib.batch_size, compressed_shapes(model, config),
                              config.dense_stream, kept_input_width(model, config) if keep else 0)
    fp = _fingerprint(source, config, windows)
    if check_partial_state(partial, {"fingerprint": fp, "source": source, "config": config.to_dict()}) and progress:
        done = BlockStore(partial).count(len(decoder_blocks(model)))
        print(f"resuming from {partial}: {done} block(s) already compressed", file=sys.stderr)
    report = compress(model, config, windows, batch_size=calib.batch_size, progress=progress,
                      resume_dir=partial, device=device, weights=streamed, keep_inputs=keep)
    manifest_extra = {
        "source_model": source,
        "method": config.to_dict(),
        "calibration": {"source": calib.source or "shipped:calib_sample.txt", "nsamples": calib.nsamples,
                        "seqlen": calib.seqlen, "seed": calib.seed, "fingerprint": fp},
        "layer_stats": report.layers,
        "summary": report.summary(),
    }
    if streamed is not None:
        def measure(packed: int) -> None:
            # Everything the save holds is in memory now: the peak (and the bound's last part) is known.
            report.host_memory = {**memory, "packed": packed, "kwargs": streamed.kw_cache_bytes}
            report.peak_host_bytes_bound = baseline + host_peak_bound(report.host_memory)
            report.peak_host_bytes = peak_rss_bytes()
            report.peak_rss_gb = report.peak_host_bytes / 2**30
            report.host_memory["baseline"] = baseline
            report.host_memory["stored_bytes"] = streamed.stored_bytes()
            manifest_extra["summary"] = report.summary()

        save_streamed(streamed, out, BlockStore(partial), tokenizer=tok, manifest_extra=manifest_extra, force=force,
                      before_write=measure)
    elif finetune is None:
        save(model, out, tokenizer=tok, manifest_extra=manifest_extra, force=force)
    else:
        from .finetune import finetune as finetune_adapters, finetune_manifest, save_finetuned

        ft = finetune_adapters(model, windows, finetune, state_dir=partial / "finetune", progress=progress,
                               teacher=teacher)
        del teacher
        manifest_extra["finetune"] = finetune_manifest(finetune, ft, calibration="the compression windows",
                                                       teacher=source if finetune.loss == "kd" else None)
        save_finetuned(model, out, tokenizer=tok, manifest_extra=manifest_extra, report=ft, force=force,
                       loss=finetune.loss)
    shutil.rmtree(partial, ignore_errors=True)
    return out, report
