"""Compress a model larger than host memory: its weights are read from the safetensors shards when needed.

The model is built on the meta device (accelerate's init_empty_weights: no memory). A tensor becomes real only
while it is needed: the embedding, final norm and head for the calibration's first forward pass and again for
the save; one decoder block for its compression. Each tensor is read in its stored dtype through safetensors'
safe_open, in row slices of at most SLICE_BYTES with the file opened per slice (its memory map never holds more
than one slice), converted to the float32 the compression computes in (what from_pretrained(dtype=float32) does;
bf16/fp16 -> fp32 is exact) and put in place with accelerate's set_module_tensor_to_device. A finished block's
compressed layers are in OUT.partial (the resume files) and leave memory: the checkpoint's compressed tensors are
assembled from those files at the end. So the checkpoint is bit-identical to the in-memory path's.

Peak host memory, over the process's memory before the first weight is read (host_peak_bound):
  128 MiB + max(outer32 + 2 A + kw + F,  kept32 + kw + 3 A + B32 + 16 sum_K K^2 + F + X,
                kept32 + kw + 3 A + 8 B32 + 16 sum_K K^2 + F,  outer32 + kept32 + packed)
for the first calibration pass, a block's statistics, its compression, and the save (plus the dense stream's
2 A + 16 b S width in the middle two when the run carries one). outer32: the tensors outside the blocks in float32
(embedding, final norm, head); kept32: the block tensors that stay dense (norms, skipped linears) in float32;
packed: the compressed layers as stored; kw: the recorded masks and rotary tables; A: one block's calibration
activations (n x S x d float32); B32: the largest block in float32; K: each distinct linear input size; X: W8A8
only, a block's linear inputs kept over the calibration tokens (4 n S times the input channels of its linears);
F = 4 b S (4 I + 2 h S) one batch's forward temporaries (batch size, window length, MLP width, heads); 128 MiB:
code and work buffers of torch's math libraries. host_peak_bound explains each factor.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import SlimError
from ..models.shards import shard_index, stored_name, tied_aliases
from ..resources import proc_kib_field

# The largest piece of a tensor read at once (and so the most a safetensors memory map holds in this process).
SLICE_BYTES = 64 << 20

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class _Entry:
    file: Path  # the shard holding the tensor
    name: str  # its name in the shard
    shape: tuple[int, ...]
    stored_bytes: int


@dataclass
class StreamedModel:
    """A causal LM on the meta device whose tensors are read from `folder` on demand (see the module doc)."""

    folder: Path
    model: nn.Module
    entries: dict[str, _Entry]  # state-dict key -> where its tensor is stored
    tied: dict[str, str]  # alias key -> source key (tied embeddings)
    blocks_prefix: str
    home: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    outer_keys: list[str] = field(default_factory=list)
    kw_cache_bytes: int = 0  # the recorded block arguments (set by the runner)
    tokenizer: object = None

    # ------------------------------------------------------------ reading
    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` in float32 (self.dtype), read slice by slice in its stored dtype."""
        out = torch.empty(self.entries[key].shape, dtype=self.dtype)
        if out.dim() == 0:
            out.copy_(next(self.stored_slices(key)))
            return out
        start = 0
        for part in self.stored_slices(key):
            out[start:start + part.shape[0]].copy_(part)
            start += part.shape[0]
        return out

    def stored_slices(self, key: str):
        """Yield the tensor `key` in its stored dtype, in row slices of at most SLICE_BYTES."""
        from safetensors import safe_open

        e = self.entries[key]
        rows = e.shape[0] if e.shape else 1
        step = max(1, SLICE_BYTES // max(1, e.stored_bytes // max(rows, 1)))
        for start in range(0, rows, step):
            with safe_open(str(e.file), framework="pt") as f:
                sl = f.get_slice(e.name)
                part = sl[start:start + step] if e.shape else sl[:]
            yield part

    # ------------------------------------------------------------ placing
    def _set(self, key: str, value: torch.Tensor | None) -> None:
        from accelerate.utils import set_module_tensor_to_device

        if value is None:
            set_module_tensor_to_device(self.model, key, "meta")
        else:
            set_module_tensor_to_device(self.model, key, self.home, value=value)

    def _retie(self) -> None:
        for alias, source in self.tied.items():
            parent, _, leaf = alias.rpartition(".")
            src_parent, _, src_leaf = source.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, getattr(self.model.get_submodule(src_parent), src_leaf))

    def _load(self, keys) -> None:
        for key in keys:
            if key in self.entries and _tensor(self.model, key).is_meta:
                self._set(key, self.read(key))
        self._retie()

    def load_outer(self) -> None:
        """The tensors outside the decoder blocks (embedding, final norm, head), in float32."""
        self._load(self.outer_keys)

    def release_outer(self) -> None:
        for key in self.outer_keys:
            if key in self.entries:
                self._set(key, None)
        self._retie()

    def block_keys(self, index: int) -> list[str]:
        prefix = f"{self.blocks_prefix}{index}."
        return [k for k in self.entries if k.startswith(prefix)]

    def load_block(self, index: int) -> None:
        """Block `index`'s tensors still on the meta device, in float32."""
        self._load(self.block_keys(index))

    def release_block(self, index: int, block: nn.Module) -> None:
        """Drop the block's compressed layers from memory (they are in the resume files); its dense tensors
        (norms, skipped linears) stay for the save."""
        from ..checkpoint.compressed_linear import CompressedLinear

        for name, mod in list(block.named_modules()):
            if isinstance(mod, CompressedLinear):
                block.set_submodule(name, _Released(mod.out_features, mod.in_features))
        _return_freed_memory()

    # ------------------------------------------------------------ sizes
    def stored_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.entries.values())

    def fp32_bytes(self, keys) -> int:
        return sum(4 * math.prod(self.entries[k].shape) for k in keys if k in self.entries)

    def check(self) -> None:
        """Refuse NaN or Inf anywhere in the stored weights before the compression starts (as check_finite does
        for a model in memory), reading each tensor once, slice by slice, in its stored dtype."""
        for key, e in self.entries.items():
            bad = 0
            for part in self.stored_slices(key):
                if part.is_floating_point() and part.numel() and not (
                        torch.isfinite(part.amax()) and torch.isfinite(part.amin())):
                    bad += int((~torch.isfinite(part)).sum())
            if bad:
                raise SlimError(f"NaN or Inf in {key} of the source model ({bad} of {math.prod(e.shape)} values): "
                                f"the model is broken (its outputs would be NaN); fix its weights or use another "
                                f"copy")


def _return_freed_memory() -> None:
    """Free the finished block now and hand its memory back to the system. Modules, hooks and closures form
    reference cycles that only Python's cyclic collector frees, which runs by object counts, not bytes: without
    it the blocks' tensors pile up. And glibc keeps freed heap memory for reuse, which fragments over the blocks
    and would keep the resident memory near its highest point."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Released(nn.Module):
    """Where a compressed layer was, once its block is finished and saved to the resume files: it holds nothing
    and must not run."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features

    def forward(self, x):
        raise RuntimeError("this layer was streamed out of memory after its block was compressed")


def _tensor(model: nn.Module, key: str) -> torch.Tensor:
    parent, _, leaf = key.rpartition(".")
    return getattr(model.get_submodule(parent) if parent else model, leaf)


def _entries(folder: Path, model: nn.Module, files: dict[str, Path],
             tied: dict[str, str]) -> tuple[dict[str, _Entry], str | None]:
    """Where each persistent tensor of `model` is stored (a tied alias is read through its source), or (partial,
    reason) when the names do not match the model's (a checkpoint transformers renames on load: the caller then
    loads the model whole)."""
    from safetensors import safe_open

    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    entries, missing = {}, []
    handles: dict[Path, object] = {}
    try:
        for key, t in model.state_dict(keep_vars=True).items():
            if key in tied:
                continue
            name = stored_name(model, key, files)
            if name is None:
                if key in params:
                    missing.append(key)
                continue
            f = files[name]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt").__enter__()
            sl = handles[f].get_slice(name)
            shape = tuple(sl.get_shape())
            if shape != tuple(t.shape):
                raise SlimError(f"{folder}: config.json does not match the weights ({name} is {list(shape)} in the "
                                f"file, {list(t.shape)} by the config): fix config.json or use the config the "
                                f"weights were saved with")
            entries[key] = _Entry(f, name, shape, math.prod(shape) * _DTYPE_BYTES.get(sl.get_dtype(), 4))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return entries, (f"the weights lack {len(missing)} tensor name(s) the model has (e.g. {missing[0]})"
                     if missing else None)


def open_streamed(folder: Path, *, trust_remote_code: bool = False) -> tuple[StreamedModel | None, str | None]:
    """The model in `folder` on the meta device with its tensors' locations, or (None, why not) when it cannot
    be streamed (then compress loads it whole)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .calibration.families import decoder_blocks
    from .calibration.runner import _blocks_prefix
    from ..models.source import check_source_weights, check_weight_files, load_source_tokenizer

    folder = Path(folder)
    check_weight_files(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
        tokenizer = load_source_tokenizer(folder, trust_remote_code)
    except SlimError:
        raise
    except (OSError, ValueError) as e:
        raise SlimError(f"could not load the model in {folder}: {str(e).splitlines()[0]}")
    # from_config leaves tied weights (tie_word_embeddings) as two tensors until from_pretrained would tie them
    model.tie_weights()
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    blocks = decoder_blocks(model)
    prefix = _blocks_prefix(model, blocks)
    tied = tied_aliases(model)
    files = shard_index(folder)
    entries, why_not = _entries(folder, model, files, tied)
    if why_not is not None:
        return None, why_not
    check_source_weights(folder, model, files=files)
    outer = [k for k in entries if not k.startswith(prefix)]
    return StreamedModel(folder, model.eval(), entries, tied, prefix, outer_keys=outer, tokenizer=tokenizer), None


# Code and work buffers torch's math libraries page in on first use (LAPACK, OpenMP) and the allocator's slack,
# which grows with the number of blocks: 3.4 MB test blocks with the default recipe peaked 45 MB (16 blocks)
# and 91 MB (64 blocks) over the data terms on this machine.
RUNTIME_BYTES = 128 << 20


def host_peak_bound(parts: dict[str, int]) -> int:
    """The most host memory a streamed compression holds over its baseline, in bytes, from its parts:
      outer32    tensors outside the blocks in float32 (embedding, final norm, head)
      kept32     block tensors that stay dense (norms, skipped linears) in float32, kept for the save
      packed     every compressed layer as stored
      kwargs     the recorded block arguments (masks, rotary tables)
      acts       one block's calibration activations, n x S x d float32 (A)
      block32    the largest block in float32 (B32)
      hessians   16 K^2 per distinct input size K (H, its factor and float64 copies while factorising)
      forward    one batch's temporaries in a block's forward: 4 b S (4 I + 2 h S) (MLP activations, the float32
                 input rows and their products, attention scores and probabilities)
      runtime    RUNTIME_BYTES
      dense      config.dense_stream only: the dense model's hidden states entering and leaving the block
                 (2 A) and one batch's dense inputs of every linear, kept for pairing (4 b S 4 width); else 0
      inputs     W8A8 runs that keep them only: a block's linear inputs over the calibration tokens, kept for its
                 quantization-error moments (runner.KeptInputs); else 0
    The run has four stages, each bounded by what it holds:
      start      outer32 + 2 A + kwargs + forward: the embedding, the first block's inputs and one batch's
                 pass (the blocks are stand-ins that run nothing)
      statistics kept32 + kwargs + 3 A + B32 + hessians + forward + dense + inputs: a block's statistics passes,
                 the dense block and its kept inputs (released before its layers are compressed)
      a block    kept32 + kwargs + 3 A + 8 B32 + hessians + forward + dense: the block's inputs, dense outputs
                 (kept to measure its error) and new outputs; 8 B32 holds the dense block, its compressed layers
                 (float view, mask, codes, adapters: about 1.6 B32) and the work copies of the sweeps, SVDs and
                 refit rounds of its largest layers
      the save   outer32 + kept32 + packed
    plus runtime in each; the bound is the largest of the four."""
    start = parts["outer32"] + 2 * parts["acts"] + parts["kwargs"] + parts["forward"]
    held = parts["kept32"] + parts["kwargs"] + 3 * parts["acts"] + parts["hessians"] + parts["forward"] + parts.get(
        "dense", 0)
    statistics = held + parts["block32"] + parts.get("inputs", 0)
    block = held + 8 * parts["block32"]
    save = parts["outer32"] + parts["kept32"] + parts["packed"]
    return parts["runtime"] + max(start, statistics, block, save)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (the kernel's VmHWM). Unlike getrusage's ru_maxrss it does not carry
    the memory of the parent this process was forked from over exec (a CLI started from a large Python process
    would report that parent's size); ru_maxrss where /proc is not available."""
    peak = proc_kib_field("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def note(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr)


def memory_parts(sm: StreamedModel, windows: torch.Tensor, batch_size: int, compressed,
                 dense_target: bool = False, kept_width: int = 0) -> dict[str, int]:
    """The parts of host_peak_bound for a streamed compression of `sm` on `windows` [n, S], before it starts
    (`compressed`: the full names of the linears it compresses; dense_target: config.dense_stream; kept_width:
    the input channels a block's kept inputs hold per token, compressor.kept_input_width, 0 without W8A8);
    "packed" and "kwargs" are known at its end."""
    from .calibration.families import block_linears, decoder_blocks

    blocks = decoder_blocks(sm.model)
    config = sm.model.config.get_text_config() if hasattr(sm.model.config, "get_text_config") else sm.model.config
    linears = [m for b in blocks for m in block_linears(b).values()]
    compressed = {f"{name}.weight" for name in compressed}
    block_keys = [k for k in sm.entries if k.startswith(sm.blocks_prefix)]
    n, S = windows.shape
    b = min(batch_size, n)
    width = max([max(m.in_features, m.out_features) for m in linears] or [0])
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    return {
        "outer32": sm.fp32_bytes(sm.outer_keys),
        # Every block tensor but the compressed linears' weights stays dense (their biases too: an upper bound).
        "kept32": sm.fp32_bytes([k for k in block_keys if k not in compressed]),
        "packed": 0,
        "kwargs": 0,
        "acts": n * S * int(config.hidden_size) * 4,
        "block32": max(sm.fp32_bytes(sm.block_keys(i)) for i in range(len(blocks))),
        "hessians": sum(16 * k * k for k in {m.in_features for m in linears}),
        "forward": 4 * b * S * (4 * width + 2 * heads * S),
        "runtime": RUNTIME_BYTES,
        "dense": 2 * n * S * int(config.hidden_size) * 4 + 16 * b * S * width if dense_target else 0,
        "inputs": 4 * n * S * kept_width,
    }


def save_streamed(sm: StreamedModel, out: Path, store, *, tokenizer, manifest_extra: dict, force: bool,
                  before_write=None) -> Path:
    """The checkpoint of a streamed compression: the compressed layers from the resume files (already in their
    stored form), the dense tensors from the model (the blocks' norms stayed; the embedding, final norm and head
    are read again). before_write(packed_bytes) runs once everything the save holds is in memory."""
    from .calibration.families import decoder_blocks
    from ..checkpoint.format import save

    tensors, metas = {}, {}
    for i in range(len(decoder_blocks(sm.model))):
        t, record = store.load_tensors(i)
        tensors.update(t)
        metas.update(record["layers"])
    sm.load_outer()
    if before_write is not None:
        before_write(sum(v.numel() * v.element_size() for v in tensors.values()))
    return save(sm.model, out, tokenizer=tokenizer, manifest_extra=manifest_extra, force=force,
                layers=(tensors, metas))
