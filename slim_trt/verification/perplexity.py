"""Perplexity and next-token agreement on token windows.

Batches default to one window: with a 262k-token vocabulary (Gemma) the logits of a single 512-token window
are already 0.5 GB in float32.
"""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def window_logits(model: nn.Module, windows: torch.Tensor, batch_size: int = 1):
    """Yield (window batch, logits float32) over the windows, in order."""
    for batch in windows.split(batch_size):
        yield batch, model(input_ids=batch, use_cache=False).logits.float()


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp(mean next-token NLL) over every predicted token of the windows."""
    from tqdm.auto import tqdm

    nll, count = 0.0, 0
    it = window_logits(model, windows, batch_size)
    for batch, logits in tqdm(it, total=math.ceil(len(windows) / batch_size), desc="perplexity",
                              disable=not progress, leave=False):
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                           reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def compare(model: nn.Module, reference: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> dict:
    """Perplexity of both models and the top-1 next-token agreement of `model` with `reference`."""
    nll = {"model": 0.0, "reference": 0.0}
    agree, count = 0, 0
    for batch in windows.split(batch_size):
        a = model(input_ids=batch, use_cache=False).logits.float()[:, :-1]
        b = reference(input_ids=batch, use_cache=False).logits.float()[:, :-1]
        target = batch[:, 1:].reshape(-1)
        nll["model"] += float(nn.functional.cross_entropy(a.reshape(-1, a.shape[-1]), target, reduction="sum"))
        nll["reference"] += float(nn.functional.cross_entropy(b.reshape(-1, b.shape[-1]), target, reduction="sum"))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        count += target.numel()
    return {"perplexity": math.exp(nll["model"] / count), "reference_perplexity": math.exp(nll["reference"] / count),
            "top1_agreement": agree / count, "tokens": count}
