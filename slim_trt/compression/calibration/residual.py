"""The residual stream's channels permuted by one permutation shared by the whole model (issue 23, "residual").

The hidden channels of a decoder-only transformer have no order of their own: every layer that reads the residual
stream (q/k/v, gate/up; OPT's fc1) reads it through a norm, which is the same function of permuted channels if its
gain (and bias) are permuted alike (RMSNorm's and LayerNorm's statistics are sums over the channels; Gemma's
(1 + w) gain too), and every layer that writes it (o/down; OPT's out_proj, fc2) adds rows. So one permutation of
the embedding's columns (OPT: project_in's rows, the learned positions' columns), every norm's gain and bias, the
readers' input columns, the writers' output rows and biases, the final norm and the LM head's input columns
(OPT: project_out's) leaves the logits unchanged; tied embeddings are one tensor, permuted once.

It is chosen once, before the first block is compressed, from one dense pass over the calibration windows (each
reader's input norms ||x_j||): the permutation whose N:M groups keep the most Wanda saliency |W| ||x|| of all the
readers at once (algorithms/permute.py, on their stacked and normalised scores). The model is checked to compute
the same logits afterwards: a layout this module does not know is refused, never half-permuted into a checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn

from ...algorithms.permute import nm_permutation, nm_retained, stacked_scores
from ...errors import SlimError
from .families import block_linears, decoder_blocks

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "fc1")
WRITERS = ("self_attn.o_proj", "mlp.down_proj", "self_attn.out_proj", "fc2")


def _hidden(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "hidden_size", 0) or 0)


def _is_gain(mod: nn.Module, hidden: int) -> bool:
    """A norm over the hidden channels: a module with a 1-D weight of `hidden` entries (and maybe a bias) and no
    submodules."""
    w = getattr(mod, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == hidden and not list(mod.children())
            and not isinstance(mod, nn.Linear))


def _base(model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
    """The module that holds the blocks (LLaMA's model.model, OPT's model.model.decoder)."""
    return next(m for m in model.modules() if any(c is blocks for c in m.children()))


def residual_plan(model: nn.Module) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Every tensor the permutation moves, with the dimension it moves along ({"readers": ..., "other": ...}),
    each distinct tensor once (tied embeddings). SlimError (one line) for a layout it does not know."""
    hidden = _hidden(model)
    blocks = decoder_blocks(model)
    base = _base(model, blocks)
    mtype = getattr(model.config, "model_type", "?")

    def refuse(what: str):
        raise SlimError(f"--channel-permutation residual cannot permute {mtype}'s {what} exactly: drop residual "
                        f"(e.g. --channel-permutation mlp,attn)")

    moves: list[tuple[torch.Tensor, int]] = []
    readers: list[tuple[torch.Tensor, str]] = []
    for name, child in base.named_children():
        if child is blocks or not list(child.parameters()):
            continue
        if isinstance(child, nn.Embedding) and child.embedding_dim == hidden:
            moves.append((child.weight, 1))  # token embeddings; OPT's learned positions
        elif isinstance(child, nn.Embedding) and name == "embed_tokens":
            continue  # OPT's word_embed_proj_dim != hidden: project_in makes the hidden channels
        elif isinstance(child, nn.Linear) and name == "project_in" and child.out_features == hidden:
            moves.append((child.weight, 0))
            if child.bias is not None:
                moves.append((child.bias, 0))
        elif isinstance(child, nn.Linear) and name == "project_out" and child.in_features == hidden:
            moves.append((child.weight, 1))
        elif _is_gain(child, hidden):
            moves.extend((p, 0) for p in child.parameters(recurse=False))
        else:
            refuse(f"{name}")
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block).items():
            if name in READERS and lin.in_features == hidden:
                readers.append((lin.weight, f"{i}.{name}"))
            elif name in WRITERS and lin.out_features == hidden:
                moves.append((lin.weight, 0))
                if lin.bias is not None:
                    moves.append((lin.bias, 0))
            else:
                refuse(f"layer {i}.{name}")
        for name, child in block.named_children():
            if _is_gain(child, hidden):
                moves.extend((p, 0) for p in child.parameters(recurse=False))
            elif name not in ("self_attn", "mlp") and list(child.parameters()) and not any(
                    isinstance(m, nn.Linear) for m in child.modules()):
                refuse(f"block {i}'s {name}")
    head = model.get_output_embeddings()
    if head is not None and head.weight.shape[-1] == hidden and not any(
            isinstance(c, nn.Linear) and n == "project_out" for n, c in base.named_children()):
        moves.append((head.weight, 1))
    seen, unique = set(), []
    for t, dim in moves:
        if t.data_ptr() not in seen:  # a tied head is the embedding: permuted once
            seen.add(t.data_ptr())
            unique.append((t, dim))
    return {"readers": readers, "other": unique}


@torch.no_grad()
def reader_norms(model: nn.Module, windows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """One dense pass over the windows: ||x_j|| over all tokens of each block's q/k/v/gate/up (fc1) input."""
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(decoder_blocks(model)):
        for name, lin in block_linears(block).items():
            if name in READERS:
                key = f"{i}.{name}"

                def hook(_m, args, _out, key=key):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                    s = x.pow(2).sum(0)
                    sq[key] = s if key not in sq else sq[key] + s
                handles.append(lin.register_forward_hook(hook))
    try:
        for batch in windows.split(batch_size):
            model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v.sqrt() for k, v in sq.items()}


@torch.no_grad()
def permute_residual(model: nn.Module, windows: torch.Tensor, n: int, m: int, *, batch_size: int = 8,
                     perm: torch.Tensor | None = None, seed: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """Choose (unless `perm` is given: a resumed run's) and apply the residual permutation to the float model in
    place; returns it and, per reader ("<block>.<name>"), the share of its Wanda saliency an N:M mask keeps before
    and after (":after"). Refuses (SlimError) a layout it does not know, or a model whose logits moved."""
    plan = residual_plan(model)  # refuses before anything moves
    hidden = _hidden(model)
    if hidden % m:
        raise SlimError(f"--channel-permutation residual arranges N:M groups of the {hidden} hidden channels, "
                        f"which {m} does not divide: drop residual")
    if perm is not None and perm.numel() != hidden:
        raise SlimError(f"the saved residual permutation has {perm.numel()} channels, the model {hidden}: the resume "
                        f"folder is another model's; remove OUT.partial and run again")
    probe = windows[:1]
    ref = model(input_ids=probe, use_cache=False).logits.float()
    norms = reader_norms(model, windows, batch_size)
    scores = {k: w.detach().abs().float() * norms[k].reshape(1, -1).to(w.device) for w, k in plan["readers"]}
    if perm is None:
        perm = nm_permutation(stacked_scores(list(scores.values()), seed=seed), n, m, seed=seed)
    shares = {}
    for k, s in scores.items():
        total = float(s.sum()) or 1.0
        shares[k] = nm_retained(s, n, m) / total
        shares[k + ":after"] = nm_retained(s[:, perm.to(s.device)], n, m) / total
    for t, dim in [(w, 1) for w, _ in plan["readers"]] + plan["other"]:
        t.copy_(t.index_select(dim, perm.to(t.device)))
    got = model(input_ids=probe, use_cache=False).logits.float()
    err = float((got - ref).norm() / (ref.norm() or 1.0))
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    if not err <= tol:
        raise SlimError(f"--channel-permutation residual changed {getattr(model.config, 'model_type', '?')}'s "
                        f"logits (relative error {err:.2e}): a part of this architecture is not permuted; drop "
                        f"residual (e.g. --channel-permutation mlp,attn)")
    return perm, shares
