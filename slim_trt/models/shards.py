"""Where a source model's tensors are stored (safetensors shards, tied aliases), and the finite-weights check.

Shared by the loader (models/source.py) and the streamed compression (compression/streaming.py), which reads
the same shards one block at a time.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import SlimError


def shard_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from model.safetensors.index.json or the single model.safetensors."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: folder / f for name, f in weight_map.items()}
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise SlimError(f"{index} is not a safetensors index ({e}): download or save the model again")
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise SlimError(f"{index} names {f.name}, which is missing: download or save the model again")
        return files
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            out.update({name: f for name in handle.keys()})
    return out



def stored_name(model: nn.Module, key: str, files) -> str | None:
    """The name under which the model's state-dict `key` is stored in `files` (as it is, without or with the
    model's base prefix: what from_pretrained accepts too), or None."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [key, key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else None,
                  f"{prefix}.{key}" if prefix else None]
    return next((c for c in candidates if c and c in files), None)



def tied_aliases(model: nn.Module) -> dict[str, str]:
    """alias key -> source key for parameters shared by several modules (tied embeddings)."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def check_finite(model: nn.Module) -> None:
    """Refuse NaN/Inf anywhere in the model's weights and buffers, not only in the linears to compress: one in a
    norm weight or an embedding row makes the outputs NaN just as well."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        t = t.detach()
        # max and min propagate NaN and reach +-Inf: two reductions, no tensor-sized mask (5x faster on a 1 GB model)
        if t.is_floating_point() and t.numel() and not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):
            bad = int((~torch.isfinite(t)).sum())
            raise SlimError(f"NaN or Inf in {name} of the source model ({bad} of {t.numel()} values): the model is "
                            f"broken (its outputs would be NaN); fix its weights or use another copy")
