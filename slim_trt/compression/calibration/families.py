"""Where the decoder blocks live in each supported architecture (no tracing: a small table)."""
from __future__ import annotations

from torch import nn

from ...errors import SlimError

# model_type -> dotted path of the ModuleList of decoder blocks inside the *ForCausalLM model.
BLOCKS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "opt": "model.decoder.layers",
}


def supported() -> str:
    return ", ".join(sorted(BLOCKS))


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = BLOCKS.get(model_type)
    if path is None:
        raise SlimError(f"unsupported architecture {model_type!r}: slim-trt supports {supported()}")
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear layers inside one block, by their name relative to the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
