"""Static activation scales for `--act-quant int8`: abs-max of each compressed layer's input over sample windows."""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.compressed_linear import compressed_layers


@torch.no_grad()
def activation_scales(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """{layer name: absmax / 127} of the input of every CompressedLinear, over `windows` [n, seqlen] token ids."""
    absmax: dict[str, float] = {}
    hooks = []
    for name, layer in compressed_layers(model):
        def hook(_mod, args, name=name):
            absmax[name] = max(absmax.get(name, 0.0), float(args[0].detach().abs().max()))
        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i:i + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    # A layer whose input is all zeros still needs a positive scale.
    return {n: max(a, 1e-8) / 127.0 for n, a in absmax.items()}
