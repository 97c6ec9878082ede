"""Channel permutations folded exactly into the weights before they are compressed (issue 23).

mlp: the MLP's intermediate channels have no order of their own: permuting the output rows of the layers that make
them (gate_proj and up_proj; OPT's fc1, with biases) together with the input columns of the layer that reads them
(down_proj; fc2) leaves the block's function unchanged, because the activation between them is element-wise. The
permutation is chosen (algorithms/permute.py) so that down_proj's 2:4 groups along K keep more Wanda saliency
|W_ij| ||x_j||. It is applied to the float block before SmoothQuant and the activation scales (the statistics are permuted with it: runner.py), so SmoothQuant
factors, scales, masks and adapters are all computed on the permuted block: the checkpoint and the export hold an
ordinary, equivalent network, with no gather at run time.

attn: within one KV head, the head_dim value channels have no order of their own either: permuting V's output
rows (and bias) by P_g permutes the attention output of every query head that reads KV head g by P_g (softmax(q k)
weights mix value rows, channel by channel), so o_proj's input columns of those heads take the same P_g. q/k (and
their norms, rotary embedding) are untouched. Under grouped-query attention one P_g serves all the query heads of
the group, chosen on their stacked o_proj saliency (algorithms/permute.py::head_permutation).
"""
from __future__ import annotations

import torch
from torch import nn

from ...algorithms.permute import head_permutation, kv_rows, nm_permutation, nm_retained

# (layers whose output rows make the channels, the layer whose input columns read them), by family naming
_MLP = ((("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"), (("fc1",), "fc2"))
# (the value projection, the attention output projection), by family naming (OPT's out_proj)
_ATTN = (("self_attn.v_proj", "self_attn.o_proj"), ("self_attn.v_proj", "self_attn.out_proj"))


def mlp_groups(linears: dict[str, nn.Linear]) -> list[tuple[tuple[str, ...], str]]:
    """The MLP (producers, reader) groups whose layers are all being compressed in this block."""
    return [(prod, reader) for prod, reader in _MLP if all(p in linears for p in prod) and reader in linears]


@torch.no_grad()
def permute_channels(linears: dict[str, nn.Linear], producers: tuple[str, ...], reader: str,
                     perm: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """In place: the producers' output rows (and biases) in the order `rows` (default `perm`: the producers make
    exactly the reader's inputs) and the reader's input columns in the order `perm`."""
    rows = perm if rows is None else rows
    for name in producers:
        lin = linears[name]
        lin.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[rows])
    w = linears[reader].weight
    w.copy_(w[:, perm])


@torch.no_grad()
def permute_mlp(linears: dict[str, nn.Linear], act_norm: dict[str, torch.Tensor], n: int, m: int,
                seed: int = 0) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Permute every MLP group of the block for N:M groups along the reader's K; returns, per reader, the share
    of its Wanda saliency an N:M mask keeps before and after ({name: before, name + ":after": after}), and the
    order its input columns were put in ({name: perm}). Groups whose K is not a multiple of m are left alone."""
    out, perms = {}, {}
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
        perms[reader] = perm
    return out, perms


def head_layout(config, v_proj: nn.Linear, o_proj: nn.Linear) -> tuple[int, int] | None:
    """(head_dim, query heads per KV head) from the model's config, checked against the layers' shapes; None
    when the config does not say or the shapes do not match it (the block is then left alone)."""
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    if not isinstance(kv, int) or heads % kv or not head_dim:
        return None
    if v_proj.out_features != kv * head_dim or o_proj.in_features != heads * head_dim:
        return None
    return head_dim, heads // kv


def attn_groups(block: nn.Module, linears: dict[str, nn.Linear]) -> list[tuple[str, str]]:
    """The (v_proj, o_proj) pairs of the block that are both being compressed, in an attention module without a
    norm on V (whose order would be its own)."""
    out = []
    for v, o in _ATTN:
        if v in linears and o in linears:
            attn = block.get_submodule(v.rsplit(".", 1)[0])
            if getattr(attn, "v_norm", None) is None:
                out.append((v, o))
    return out


@torch.no_grad()
def permute_attn(block: nn.Module, config, linears: dict[str, nn.Linear], act_norm: dict[str, torch.Tensor],
                 n: int, m: int, seed: int = 0) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Permute every attention group of the block (value channels within each KV head) for N:M groups along
    o_proj's K; returns, per o_proj, the share of its Wanda saliency an N:M mask keeps before and after and the
    order of its input columns, as permute_mlp. Blocks whose head layout the config does not give, or whose
    head_dim is not a multiple of m, are left alone (no entry)."""
    out, perms = {}, {}
    for v, o in attn_groups(block, linears):
        layout = head_layout(config, linears[v], linears[o])
        if layout is None or layout[0] % m:
            continue
        head_dim, per_group = layout
        W = linears[o].weight.detach().to(torch.float32)
        score = W.abs() * act_norm[o].to(torch.float32).reshape(1, -1)
        perm = head_permutation(score, head_dim, per_group, n, m, seed=seed)
        total = float(score.sum()) or 1.0
        out[o] = nm_retained(score, n, m) / total
        out[o + ":after"] = nm_retained(score[:, perm], n, m) / total
        permute_channels(linears, (v,), o, perm.to(W.device), rows=kv_rows(perm, head_dim, per_group).to(W.device))
        perms[o] = perm
    return out, perms
