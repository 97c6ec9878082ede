"""Block-wise adapter reconstruction: after a block is compressed, train its adapters (L, R of every
CompressedLinear, nothing else) so the whole block's output matches a dense target on the calibration windows.

The layer-wise fits (SparseGPT, LRC, the refit rounds) each see one linear's output; the block's output also goes
through attention's softmax, the MLP's gate and the norms, where the layers' errors meet. Training the adapters
against the block's output (as block-wise reconstruction does in OmniQuant, EBFT or EfficientQAT's Block-AP)
fits them to the error that reaches the next block. The artifact stays a plain 2:4 GEMM plus LowRankAdd: only
the factors' values change, on their own bits and groups (CompressedLinear.train_adapters' straight-through
estimator on the AbsMax grid; freeze_adapters rounds them back).

The target is chosen by the caller: the dense block's output on the same (compressed-stream) inputs, or the
dense model's own hidden states after this block (then the block also corrects some of the error it receives).
A tuning that does not lower the loss on the windows it trained on is undone.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...checkpoint.compressed_linear import CompressedLinear


@dataclass(frozen=True)
class BlockTuning:
    epochs: int  # passes over the calibration windows per block
    lr: float  # Adam's peak learning rate (cosine decay to 0 over the steps)
    micro_batch: int = 2  # windows per step
    seed: int = 0
    # "mse": the squared error over all hidden units, relative to the targets' mean square; "channel": each hidden
    # unit's squared error relative to its own mean square (a few units with massive activations do not decide it)
    loss: str = "mse"


def _loss(block: nn.Module, x: torch.Tensor, y: torch.Tensor, kwargs: dict, scale: torch.Tensor) -> torch.Tensor:
    out = block(x, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return ((out.float() - y.float()).pow(2) / scale).mean()


def tune_block(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor],
               kwargs_for: Callable[[int], dict], cfg: BlockTuning, index: int = 0) -> dict:
    """Train the adapters of `block`'s CompressedLinears so block(inputs) approaches targets (lists of [b, t, h]).

    Returns {"loss_before", "loss_after", "steps", "kept"}: the mean squared error over all windows relative to
    the targets' mean square, before and after (after = before when the tuning was undone)."""
    layers = [m for m in block.modules() if isinstance(m, CompressedLinear) and m.lora_L is not None]
    xs = [x for b in inputs for x in b.split(cfg.micro_batch)]
    ys = [y for b in targets for y in b.split(cfg.micro_batch)]
    tokens = sum(y.numel() // y.shape[-1] for y in ys)
    scale = sum(y.float().pow(2).reshape(-1, y.shape[-1]).sum(0) for y in ys) / tokens  # per hidden unit
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny) if cfg.loss == "channel" else scale.mean().clamp_min(
        torch.finfo(torch.float32).tiny)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(_loss(block, x, y, kwargs_for(x.shape[0]), scale)) * x.shape[0]
                       for x, y in zip(xs, ys)) / sum(x.shape[0] for x in xs)

    before = mean_loss()
    if not layers or cfg.epochs <= 0:
        return {"loss_before": before, "loss_after": before, "steps": 0, "kept": False}
    saved = [(m.lora_L_q, m.lora_R_q, m.lora_L.clone(), m.lora_R.clone()) for m in layers]
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:  # norms and the like: no gradients wanted
        p.requires_grad_(False)
    params = [p for m in layers for p in m.train_adapters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps = cfg.epochs * len(xs)
    gen = torch.Generator().manual_seed(cfg.seed * 1009 + index)
    step = 0
    try:
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                for j in torch.randperm(len(xs), generator=gen).tolist():
                    for group in opt.param_groups:  # cosine decay: the last steps settle on the grid
                        group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                    loss = _loss(block, xs[j], ys[j], kwargs_for(xs[j].shape[0]), scale)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
    finally:
        for m in layers:
            m.freeze_adapters()
        for p in frozen:
            p.requires_grad_(True)
    after = mean_loss()
    if after < before:
        return {"loss_before": before, "loss_after": after, "steps": steps, "kept": True}
    for m, (Lq, Rq, L, R) in zip(layers, saved):  # no better on its own windows: undo
        m.lora_L_q, m.lora_R_q, m.lora_L, m.lora_R = Lq, Rq, L, R
    return {"loss_before": before, "loss_after": before, "steps": steps, "kept": False}
