"""SmoothQuant scale migration (Xiao et al. 2022): y = W x = (W diag(s)) (diag(s)^-1 x).

A per-tensor INT8 scale is set by the few input channels with the largest |x|; dividing channel j by
s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha) (and multiplying the weight's column j by s_j) evens the
channels out, moving part of the difficulty into the weights, whose scales are per output channel. The 1/s is
folded into whatever produced x (a norm's gain, or the rows of a previous linear), so the model computes the same
function. Pure: statistics in, scales out.
"""
from __future__ import annotations

import torch

S_MIN, S_MAX = 1e-4, 1e4  # keep the fold well-conditioned on dead or exploding channels


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] from each input channel's max |x| and the max |w| of that column over every linear reading it.
    Channels with a zero statistic keep s = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.detach().to(torch.float64)
    w = weight_absmax.detach().to(torch.float64)
    if a.shape != w.shape:
        raise ValueError(f"activation and weight statistics differ in shape: {tuple(a.shape)} vs {tuple(w.shape)}")
    live = (a > 0) & (w > 0)
    s = torch.where(live, a.clamp_min(1e-30) ** alpha / w.clamp_min(1e-30) ** (1.0 - alpha), torch.ones_like(a))
    return s.clamp(S_MIN, S_MAX).to(torch.float32)


def tied_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, groups: int,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales for o_proj's input under grouped-query attention: channel (h, d) of the attention output is
    value channel (h // groups, d), so every head of a group must share one scale. Returns (s for v_proj's
    output channels [kv_heads * head_dim], s for o_proj's input channels [heads * head_dim])."""
    kv = act_absmax.numel() // (groups * head_dim)
    a = act_absmax.reshape(kv, groups, head_dim).amax(1).reshape(-1)
    w = weight_absmax.reshape(kv, groups, head_dim).amax(1).reshape(-1)
    s_v = smooth_scales(a, w, alpha)
    return s_v, s_v.reshape(kv, 1, head_dim).expand(kv, groups, head_dim).reshape(-1)
