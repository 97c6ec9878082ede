"""Channel permutations folded exactly into one block's weights before it is compressed (issue 23).

The MLP's intermediate channels have no order of their own: permuting the output rows of the layers that make
them (gate_proj and up_proj; OPT's fc1, with biases) together with the input columns of the layer that reads them
(down_proj; fc2) leaves the block's function unchanged, because the activation between them is element-wise. The
permutation is chosen (algorithms/permute.py) so that down_proj's 2:4 groups along K keep more Wanda saliency
|W_ij| ||x_j||. It is applied to the float block before its statistics are gathered again, so SmoothQuant
factors, scales, masks and adapters are all computed on the permuted block: the checkpoint and the export hold an
ordinary, equivalent network, with no gather at run time.
"""
from __future__ import annotations

import torch
from torch import nn

from ...algorithms.permute import nm_permutation, nm_retained

# (layers whose output rows make the channels, the layer whose input columns read them), by family naming
_MLP = ((("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"), (("fc1",), "fc2"))


def mlp_groups(linears: dict[str, nn.Linear]) -> list[tuple[tuple[str, ...], str]]:
    """The MLP (producers, reader) groups whose layers are all being compressed in this block."""
    return [(prod, reader) for prod, reader in _MLP if all(p in linears for p in prod) and reader in linears]


@torch.no_grad()
def permute_channels(linears: dict[str, nn.Linear], producers: tuple[str, ...], reader: str,
                     perm: torch.Tensor) -> None:
    """In place: the producers' output rows (and biases) and the reader's input columns in the order `perm`."""
    for name in producers:
        lin = linears[name]
        lin.weight.copy_(lin.weight[perm])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[perm])
    w = linears[reader].weight
    w.copy_(w[:, perm])


@torch.no_grad()
def permute_mlp(linears: dict[str, nn.Linear], act_norm: dict[str, torch.Tensor], n: int, m: int,
                seed: int = 0) -> dict[str, float]:
    """Permute every MLP group of the block for N:M groups along the reader's K; returns, per reader, the share
    of its Wanda saliency an N:M mask keeps before and after ({name: before, name + ":after": after}). Groups
    whose K is not a multiple of m are left alone."""
    out = {}
    for producers, reader in mlp_groups(linears):
        W = linears[reader].weight.detach().to(torch.float32)
        if W.shape[1] % m:
            continue
        score = W.abs() * act_norm[reader].to(torch.float32).reshape(1, -1)
        perm = nm_permutation(score, n, m, seed=seed)
        total = float(score.sum()) or 1.0
        out[reader] = nm_retained(score, n, m) / total
        out[reader + ":after"] = nm_retained(score[:, perm], n, m) / total
        permute_channels(linears, producers, reader, perm.to(W.device))
    return out
