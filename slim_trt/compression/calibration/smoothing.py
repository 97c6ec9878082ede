"""Where SmoothQuant scales can be folded in each architecture, and the folding itself (in place, on one block).

A group is (source, kind, targets): the targets' shared input is produced by `source`, which absorbs 1/s.
  norm      RMSNorm/LayerNorm gain (and LayerNorm bias) divided by s
  norm1p    Gemma's RMSNorm, whose gain is (1 + weight): weight <- (1 + weight) / s - 1
  linear    a previous linear's output rows (and bias) divided by s: v_proj -> o_proj (attention is linear in V;
            with grouped-query attention the heads sharing a value head share its scales) and up_proj ->
            down_proj (act(gate) * up is linear in up)
The targets' weight columns are multiplied by s. Families without an entry, and groups with a target that is
not being compressed (--skip), are left as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from ...algorithms.smooth import smooth_scales, tied_scales

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA = (("input_layernorm", "norm", _ATTN), ("post_attention_layernorm", "norm", _MLP),
          ("self_attn.v_proj", "linear", ("self_attn.o_proj",)), ("mlp.up_proj", "linear", ("mlp.down_proj",)))
_GEMMA2 = (("input_layernorm", "norm1p", _ATTN), ("pre_feedforward_layernorm", "norm1p", _MLP), *_LLAMA[2:])

GROUPS = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma": (("input_layernorm", "norm1p", _ATTN), ("post_attention_layernorm", "norm1p", _MLP), *_LLAMA[2:]),
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "opt": (("self_attn_layer_norm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", "norm", ("fc1",)), ("self_attn.v_proj", "linear", ("self_attn.out_proj",))),
}


def _groups_for(config) -> tuple:
    groups = GROUPS.get(getattr(config, "model_type", None), ())
    if getattr(config, "model_type", None) == "opt" and not getattr(config, "do_layer_norm_before", True):
        groups = tuple(g for g in groups if g[1] == "linear")  # OPT-350m normalises after the sublayers
    return groups


@torch.no_grad()
def smooth_block(block: nn.Module, config, linears: dict[str, nn.Linear], channel_absmax: dict[str, torch.Tensor],
                 alpha: float) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into one block in place; returns {target: s}: each smoothed linear's input is now
    x / s, channel by channel (the source absorbed 1/s, the target's columns s).

    linears: the block's linears being compressed (by name inside the block); channel_absmax: each one's max |x|
    per input channel over the calibration tokens (any target's: they share the input)."""
    done = {}
    for source, kind, targets in _groups_for(config):
        if not all(t in linears for t in targets):
            continue
        try:
            src = block.get_submodule(source)
        except AttributeError:
            continue
        w_absmax = torch.stack([linears[t].weight.detach().abs().amax(0).float() for t in targets]).amax(0)
        a_absmax = channel_absmax[targets[0]]
        if kind == "linear":
            if source.endswith("v_proj"):
                heads = int(config.num_attention_heads)
                head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
                groups = a_absmax.numel() // src.weight.shape[0]  # query heads per value head
                s_src, s = tied_scales(a_absmax, w_absmax, alpha, groups, head_dim)
            else:
                s_src = s = smooth_scales(a_absmax, w_absmax, alpha)
            src.weight.div_(s_src.to(src.weight.dtype)[:, None])
            if src.bias is not None:
                src.bias.div_(s_src.to(src.bias.dtype))
        else:
            s = smooth_scales(a_absmax, w_absmax, alpha)
            if kind == "norm1p":
                src.weight.copy_((1.0 + src.weight.float()) / s - 1.0)
            else:
                src.weight.div_(s.to(src.weight.dtype))
                if getattr(src, "bias", None) is not None:
                    src.bias.div_(s.to(src.bias.dtype))
        for t in targets:
            linears[t].weight.mul_(s.to(linears[t].weight.dtype)[None, :])
        done.update({t: s for t in targets})
    return done
