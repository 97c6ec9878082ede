"""The compressed checkpoint: a folder that reloads into a runnable PyTorch model.

  config.json, generation_config.json, tokenizer files   as Hugging Face writes them
  model.safetensors        every tensor that is not a compressed linear (embeddings, norms, lm_head, ...)
  slim_layers.safetensors  the compressed linears: packed INT4 (two per byte, low nibble first) or INT8 values,
                           N:M metadata (position of each kept value inside its group), scales, adapters
  slim_manifest.json       schema version, method config, per-layer shapes/bits/sparsity/rank, sha256 of every
                           tensor and of every other file of the folder, the source model, and `content_sha256`:
                           the sha256 of the manifest's own content (canonical JSON without that field)

Only safetensors are read back (no pickle). Every byte that decides the loaded model (config, generation config,
tokenizer, tensors, the manifest itself) is covered by a checksum that every reader verifies, and a file in the
folder that the manifest does not list is refused, since transformers might read it. The checksums catch
corruption and edits, not a forger, who can recompute them: they are not a signature.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..algorithms.qtensor import QuantizedTensor
from ..algorithms.spqr import OutlierTable, SpQRTensor
from ..algorithms.quantize import nm_compress, nm_decompress, pack_bits, pack_int4, unpack_bits, unpack_int4
from .compressed_linear import CompressedLinear, compressed_layers
from ..errors import SlimError
from ..outputs import commit_output, prepare_output

FORMAT = "slim-trt-checkpoint"
# 2: the manifest lists every file of the folder (config, tokenizer, ...) and carries content_sha256.
SCHEMA_VERSION = 2
MANIFEST = "slim_manifest.json"
DENSE_FILE = "model.safetensors"
LAYERS_FILE = "slim_layers.safetensors"
CONFIG_FILE = "config.json"
DIGEST_KEY = "content_sha256"
# Files a checkpoint folder may hold beyond the manifest's list: nothing transformers reads (the fine-tuning loss
# curve, notes), and hidden files (editor and OS droppings).
_UNCHECKED_SUFFIXES = (".png", ".md")


# ---------------------------------------------------------------- packing of small unsigned fields
def pack_uint(x: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack a [rows, cols] tensor of values < 2**nbits (nbits in 1, 2, 4, 8) into uint8, first value lowest."""
    per = 8 // nbits
    rows, cols = x.shape
    pad = (-cols) % per
    x = torch.nn.functional.pad(x.to(torch.int32), (0, pad)).reshape(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * nbits
    return (x << shifts).sum(-1).to(torch.uint8)


def unpack_uint(p: torch.Tensor, nbits: int, cols: int) -> torch.Tensor:
    per = 8 // nbits
    shifts = torch.arange(per, dtype=torch.int32) * nbits
    x = (p.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << nbits) - 1)
    return x.reshape(p.shape[0], -1)[:, :cols].to(torch.uint8)


def _index_bits(m: int) -> int:
    need = max(1, (m - 1).bit_length())
    return next(b for b in (1, 2, 4, 8) if b >= need)


# ---------------------------------------------------------------- one tensor <-> stored fields
def _pack_codes(f: QuantizedTensor) -> torch.Tensor:
    """Signed INT4 in ONNX's nibble layout; unsigned codes (with a zero point, <= 4 bits) as 4-bit fields."""
    if f.zero is not None and f.bits <= 4:
        return pack_uint(f.q.to(torch.uint8), 4)
    return pack_int4(f.q) if f.bits == 4 else f.q.contiguous()


def _unpack_codes(p: torch.Tensor, bits: int, cols: int, zero_point: bool) -> torch.Tensor:
    if zero_point and bits <= 4:
        return unpack_uint(p, 4, cols).to(torch.int8)
    return unpack_int4(p, cols) if bits == 4 else p


def _factor_to_tensors(prefix: str, f: QuantizedTensor | torch.Tensor, out: dict) -> dict:
    if isinstance(f, QuantizedTensor):
        out[f"{prefix}.q"] = _pack_codes(f)
        out[f"{prefix}.scale"] = f.scale.to(torch.float32).contiguous()
        if f.zero is not None:
            out[f"{prefix}.zero"] = f.zero.to(torch.int8).contiguous()
        info = {"bits": f.bits, "group_size": f.group_size, "shape": list(f.shape), "zero_point": f.zero is not None}
        if f.group_bits is not None:  # mixed precision (SliM-LLM): each group's width, exactly
            out[f"{prefix}.group_bits"] = f.group_bits.to(torch.int8).contiguous()
            info["group_bits"] = True
        return info
    out[f"{prefix}.float"] = f.to(torch.float32).contiguous()
    return {"bits": 16, "shape": list(f.shape)}


def _factor_from_tensors(prefix: str, t: dict, meta: dict) -> QuantizedTensor | torch.Tensor:
    if meta["bits"] == 16:
        return t[f"{prefix}.float"]
    rows, cols = meta["shape"]
    q = _unpack_codes(t[f"{prefix}.q"], meta["bits"], cols, bool(meta.get("zero_point")))
    return QuantizedTensor(q=q, scale=t[f"{prefix}.scale"], bits=meta["bits"], group_size=meta["group_size"],
                           zero=t.get(f"{prefix}.zero") if meta.get("zero_point") else None,
                           group_bits=t.get(f"{prefix}.group_bits") if meta.get("group_bits") else None)


def outliers_to_tensors(prefix: str, w: SpQRTensor, out: dict) -> dict:
    """SpQR's outlier table as CSR (int32 row pointers, int32 column indices, fp16 values), exactly."""
    out[f"{prefix}.outliers.crow"] = w.outliers.crow.contiguous()
    out[f"{prefix}.outliers.col"] = w.outliers.col.contiguous()
    out[f"{prefix}.outliers.val"] = w.outliers.val.contiguous()
    return {"nnz": w.outliers.nnz, "stat_bits": w.stat_bits, "stat_group": w.stat_group}


def outliers_from_tensors(prefix: str, t: dict, meta: dict, base: QuantizedTensor) -> SpQRTensor:
    table = OutlierTable(tuple(base.shape), t[f"{prefix}.outliers.crow"], t[f"{prefix}.outliers.col"],
                         t[f"{prefix}.outliers.val"])
    return SpQRTensor(q=base.q, scale=base.scale, bits=base.bits, group_size=base.group_size, zero=base.zero,
                      outliers=table, stat_bits=meta["stat_bits"], stat_group=meta["stat_group"])


def layer_to_tensors(name: str, layer: CompressedLinear) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored fields of one compressed linear, and its manifest entry (without checksums)."""
    from ..config import Sparsity

    t: dict[str, torch.Tensor] = {}
    sp = Sparsity.parse(layer.sparsity)
    meta: dict = {"shape": [layer.out_features, layer.in_features], "sparsity": str(sp), "rank": layer.rank,
                  "bias": layer.bias is not None}
    qw = layer.qweight
    # The N:M form finds pruned weights as code 0, which a zero point moves: zero-point weights keep every code
    # (pruned ones at their zero point) plus the 1-bit keep-mask ("masked" storage below).
    if qw is not None and sp.kind == "nm" and qw.zero is None:
        # N:M storage: only the kept values plus each one's position inside its group of M.
        # FP8 codes go through the N:M form as their bytes (+0 is byte 0: algorithms/fp8.py) and are stored as
        # F8_E4M3 values.
        values, idx = nm_compress(qw.q.view(torch.int8) if qw.is_fp8 else qw.q, sp.n, sp.m)
        if qw.is_fp8:
            values = values.view(torch.float8_e4m3fn)
        vals = QuantizedTensor(q=values, scale=qw.scale, bits=qw.bits, group_size=qw.group_size)
        t[f"{name}.weight.values"] = pack_int4(vals.q) if qw.bits == 4 else vals.q.contiguous()
        t[f"{name}.weight.scale"] = qw.scale.to(torch.float32).contiguous()
        t[f"{name}.weight.indices"] = pack_uint(idx, _index_bits(sp.m))
        meta.update(storage="nm", bits=qw.bits, group_size=qw.group_size, n=sp.n, m=sp.m,
                    values_cols=int(values.shape[1]))
    else:
        info = _factor_to_tensors(f"{name}.weight", qw if qw is not None else layer.weight, t)
        meta.update(storage="dense", bits=info["bits"], group_size=info.get("group_size"))
        for key in ("zero_point", "group_bits"):
            if info.get(key):
                meta[key] = True
        if sp.kind != "none" and layer.mask is not None:
            t[f"{name}.mask"] = pack_bits(layer.mask)
            meta["storage"] = "masked"
    if qw is not None and qw.is_fp8:
        meta["weight_format"] = "fp8"
    if isinstance(qw, SpQRTensor) and qw.outliers is not None:
        meta["outliers"] = outliers_to_tensors(f"{name}.weight", qw, t)
    if layer.rank:
        L = layer.lora_L_q if layer.lora_L_q is not None else layer.lora_L
        R = layer.lora_R_q if layer.lora_R_q is not None else layer.lora_R
        meta["lora_L"] = _factor_to_tensors(f"{name}.lora_L", L, t)
        meta["lora_R"] = _factor_to_tensors(f"{name}.lora_R", R, t)
    if layer.bias is not None:
        t[f"{name}.bias"] = layer.bias.to(torch.float32).contiguous()
    if layer.act_scale is not None:
        # Static INT8 activation scale: the tensor is what load() reads (exact, checksummed); the manifest copy
        # is for people and tools reading the JSON.
        t[f"{name}.act_scale"] = torch.tensor(layer.act_scale, dtype=torch.float32)
        meta.update(act_bits=layer.act_bits, act_scale=layer.act_scale)
        if layer.act_format != "int":
            meta["act_format"] = layer.act_format
    return t, meta


def layer_from_tensors(name: str, t: dict[str, torch.Tensor], meta: dict) -> CompressedLinear:
    N, K = meta["shape"]
    mask = None
    if meta["storage"] == "nm":
        n, m = meta["n"], meta["m"]
        cols = meta["values_cols"]
        vals = t[f"{name}.weight.values"]
        vals = unpack_int4(vals, cols) if meta["bits"] == 4 else vals
        idx = unpack_uint(t[f"{name}.weight.indices"], _index_bits(m), cols)
        fp8 = vals.dtype == torch.float8_e4m3fn
        q = nm_decompress(vals.view(torch.int8) if fp8 else vals, idx, n, m, K)
        mask = q != 0
        weight = QuantizedTensor(q=q.view(torch.float8_e4m3fn) if fp8 else q, scale=t[f"{name}.weight.scale"],
                                 bits=meta["bits"], group_size=meta["group_size"])
    else:
        weight = _factor_from_tensors(f"{name}.weight", t, {"bits": meta["bits"], "shape": meta["shape"],
                                                             "group_size": meta.get("group_size"),
                                                             "zero_point": meta.get("zero_point"),
                                                             "group_bits": meta.get("group_bits")})
        if meta["storage"] == "masked":
            mask = unpack_bits(t[f"{name}.mask"], K)
        if meta.get("outliers"):
            weight = outliers_from_tensors(f"{name}.weight", t, meta["outliers"], weight)
    L = R = None
    if meta.get("rank"):
        L = _factor_from_tensors(f"{name}.lora_L", t, meta["lora_L"])
        R = _factor_from_tensors(f"{name}.lora_R", t, meta["lora_R"])
    act_scale = float(t[f"{name}.act_scale"]) if meta.get("act_bits") else None
    return CompressedLinear(weight, mask=mask, sparsity=meta["sparsity"], lora_L=L, lora_R=R,
                            bias=t.get(f"{name}.bias"), act_scale=act_scale, act_bits=meta.get("act_bits") or 8,
                            act_format=meta.get("act_format", "int"))


# ---------------------------------------------------------------- checksums
def tensor_sha256(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def content_sha256(record: dict) -> str:
    """sha256 of a JSON record's content without its own DIGEST_KEY: canonical JSON (sorted keys, no spaces), so
    the digest does not depend on how the file was indented, only on what it says."""
    body = {k: v for k, v in record.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def with_digest(record: dict) -> dict:
    return {**record, DIGEST_KEY: content_sha256(record)}


def digest_ok(record) -> bool:
    return isinstance(record, dict) and record.get(DIGEST_KEY) == content_sha256(record)


def folder_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest, by path relative to the folder."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def save_layers(path: Path, layers: dict[str, CompressedLinear]) -> dict:
    """Write compressed layers to one safetensors file; return their manifest entries with checksums."""
    tensors, metas = {}, {}
    for name, layer in layers.items():
        t, meta = layer_to_tensors(name, layer)
        meta["tensors"] = {k[len(name) + 1:]: tensor_sha256(v) for k, v in t.items()}
        tensors.update(t)
        metas[name] = meta
    save_file(tensors, str(path))
    return metas


def check_layer_tensors(t: dict[str, torch.Tensor], metas: dict) -> None:
    """Every stored tensor of the layers in `metas` is in `t` with the checksum its entry gives."""
    for name, meta in metas.items():
        for key, sha in meta["tensors"].items():
            full = f"{name}.{key}"
            if full not in t or tensor_sha256(t[full]) != sha:
                raise SlimError(f"checkpoint tensor {full} is missing or its checksum does not match the "
                                f"manifest: the checkpoint is corrupt or was modified; re-run compress")


def load_layers(path: Path, metas: dict, verify: bool = True) -> dict[str, CompressedLinear]:
    t = load_file(str(path))
    if verify:
        check_layer_tensors(t, metas)
    return {name: layer_from_tensors(name, t, meta) for name, meta in metas.items()}


# ---------------------------------------------------------------- whole model
def _dense_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Persistent tensors that are not compressed layers, with shared tensors stored once (tied embeddings)."""
    seen: dict[tuple, str] = {}
    state, tied = {}, {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        state[k] = v.detach().contiguous()
    return state, tied


def save(model: torch.nn.Module, path: str | Path, *, tokenizer=None, manifest_extra: dict | None = None,
         force: bool = False, layers: tuple[dict[str, torch.Tensor], dict] | None = None) -> Path:
    """Save a compressed model as a checkpoint folder (written to a temporary folder, then renamed).

    layers: the compressed linears already in their stored form (tensors, manifest entries), as a streamed
    compression keeps them (slim_trt/compression/streaming.py); by default the model's CompressedLinear modules."""
    path = Path(path)
    tmp = prepare_output(path, force)
    try:
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state, tied = _dense_state(model)
        save_file(state, str(tmp / DENSE_FILE))
        if layers is None:
            layer_meta = save_layers(tmp / LAYERS_FILE, dict(compressed_layers(model)))
        else:
            save_file(layers[0], str(tmp / LAYERS_FILE))
            layer_meta = layers[1]
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "architecture": model.config.model_type,
            "tied": tied,
            "layers": layer_meta,
            "files": folder_checksums(tmp),  # config, generation config, tokenizer, both tensor files
        }
        # Extra records (method, calibration, fine-tuning, ...) never override the fields above.
        manifest.update({k: v for k, v in (manifest_extra or {}).items() if k not in manifest and k != DIGEST_KEY})
        (tmp / MANIFEST).write_text(json.dumps(with_digest(manifest), indent=1, sort_keys=False))
        commit_output(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def looks_like_checkpoint(folder: Path) -> bool:
    """True for a folder holding slim-trt files (a checkpoint, maybe without its manifest)."""
    return folder.is_dir() and any((folder / f).exists() for f in (MANIFEST, LAYERS_FILE))


def read_manifest(path: str | Path) -> dict:
    """The checkpoint's manifest, after checking its format, schema and its own content checksum."""
    path = Path(path)
    if not path.exists():
        raise SlimError(f"no such checkpoint: {path}")
    mf = path / MANIFEST
    if not path.is_dir() or not mf.exists():
        if looks_like_checkpoint(path):
            raise SlimError(f"{path} holds slim-trt files ({LAYERS_FILE}) but no {MANIFEST}: the checkpoint is "
                            f"incomplete or damaged and cannot be verified; re-run compress")
        raise SlimError(f"{path} is not a slim-trt checkpoint (no {MANIFEST}): run `slim-trt compress` first")
    if not mf.is_file():
        raise SlimError(f"{mf} is not a file (a folder or a special file): the checkpoint is damaged; re-run compress")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimError(f"{mf} is not valid JSON ({e}): the checkpoint is corrupt; re-run compress")
    except OSError as e:
        raise SlimError(f"cannot read {mf} ({e.strerror}): check its permissions, or re-run compress") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SlimError(f"{mf} is not a slim-trt manifest")
    schema = manifest.get("schema_version")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise SlimError(f"{mf} has schema_version {schema!r}, which is not a whole number: the manifest is damaged "
                        f"or was edited; re-run compress")
    if schema > SCHEMA_VERSION:
        raise SlimError(f"{path} was written by a newer slim-trt (schema {schema}): upgrade slim-trt")
    if schema < SCHEMA_VERSION:
        raise SlimError(f"{path} was written by an older slim-trt (checkpoint schema {schema}) whose checksums do "
                        f"not cover config.json, the tokenizer and the manifest itself: re-run compress to write a "
                        f"checkpoint this version can verify")
    if not digest_ok(manifest):
        raise SlimError(f"{mf} was edited or is corrupt (its {DIGEST_KEY} does not match its content): the manifest "
                        f"decides how the model loads, so it is refused; re-run compress")
    return manifest


def _unchecked(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts) or rel.suffix.lower() in _UNCHECKED_SUFFIXES


def verify_checkpoint(path: str | Path) -> dict:
    """read_manifest, then every file against its sha256 (missing, flipped or truncated files are refused) and no
    file transformers might read that the manifest does not list. Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or not {CONFIG_FILE, DENSE_FILE, LAYERS_FILE} <= set(files):
        raise SlimError(f"{path / MANIFEST} does not list the checkpoint's files: the checkpoint is corrupt; "
                        f"re-run compress")
    root = path.resolve()
    for f, sha in files.items():
        p = path / f
        if Path(f).is_absolute() or ".." in Path(f).parts or not p.resolve().is_relative_to(root):
            raise SlimError(f"{path / MANIFEST} lists {f!r}, which is outside the checkpoint folder: the manifest "
                            f"was edited; re-run compress")
        if not p.is_file():
            raise SlimError(f"checkpoint file {p} is missing: the checkpoint is incomplete; re-run compress")
        if file_sha256(p) != sha:
            raise SlimError(f"checksum mismatch for {p}: the file was modified, truncated or corrupted; re-run "
                            f"compress (or restore the checkpoint from a good copy)")
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and p.name != MANIFEST and rel.as_posix() not in files and not _unchecked(rel):
            raise SlimError(f"{p} is not part of the checkpoint (its manifest does not list it) and could change "
                            f"what loads: remove it")
    return manifest


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def load(path: str | Path, *, verify: bool = True, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a checkpoint folder into a runnable causal LM whose compressed linears are CompressedLinear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    manifest = verify_checkpoint(path) if verify else read_manifest(path)
    config = AutoConfig.from_pretrained(path)
    with _no_init_weights():  # every parameter is overwritten below; random init would cost seconds
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, layer in load_layers(path / LAYERS_FILE, manifest["layers"], verify=verify).items():
        model.set_submodule(name, layer.to(dtype))
    state = load_file(str(path / DENSE_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = manifest.get("tied", {})
    for alias, source in tied.items():
        parent, _, leaf = alias.rpartition(".")
        src_parent, _, src_leaf = source.rpartition(".")
        setattr(model.get_submodule(parent), leaf, getattr(model.get_submodule(src_parent), src_leaf))
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SlimError(f"checkpoint {path} does not match its config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}): the checkpoint is corrupt; re-run compress")
    return model.eval()
