"""Read and check an export folder (model.onnx + slim_export.json + tokenizer/): read_export is the one gate every
reader of an export passes (generate, deploy triton, deploy jetson, and lint/verify when the model has its sidecar).
It refuses, with one line: a sidecar that is not a JSON object of this schema, a model.onnx that does not parse
(truncated, empty, not ONNX), external data stored outside the folder (a location with '..' or an absolute path,
or a symlink leading out: deploy would link that file into the repository), and tokenizer files that are not
valid JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlimError
from .decoder import MANIFEST, DecoderSpec

DTYPES = ("fp16", "bf16", "fp32")
LOWRANKS = ("decomposed", "plugin")
SIDECAR = MANIFEST  # slim_export.json


@dataclass(frozen=True)
class ExportInfo:
    folder: Path
    spec: DecoderSpec
    raw: dict

    @property
    def dtype(self) -> str:
        return self.raw["dtype"]

    @property
    def lowrank(self) -> str:
        return self.raw["lowrank"]

    @property
    def model_path(self) -> Path:
        return self.folder / self.spec.model_file

    @property
    def model_files(self) -> list[Path]:
        """model.onnx and the external-data files beside it that it refers to."""
        return [self.model_path] + [self.folder / name for name in _external_data_files(self.model_path)]

    @property
    def tokenizer_dir(self) -> Path | None:
        name = self.raw.get("tokenizer")
        return self.folder / name if name else None

    @property
    def python_servable(self) -> bool:
        """The python backend exchanges tensors as numpy arrays, which have no bfloat16."""
        return all(t.dtype not in ("bfloat16", "bf16") for t in self.spec.inputs + self.spec.outputs)


def read_export(folder: str | Path) -> ExportInfo:
    """Parse EXPORT_DIR/slim_export.json and check that the files it names exist; SlimError otherwise."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not folder.is_dir():
        raise SlimError(f"export folder {folder} does not exist: pass the folder written by `slim-trt export`")
    if manifest.exists() and not manifest.is_file():
        raise SlimError(f"{manifest} is not a file: pass the folder written by `slim-trt export`")
    if not manifest.is_file():
        raise SlimError(f"{folder} has no {MANIFEST}: pass the folder written by `slim-trt export`")
    raw = read_json(manifest, "re-run `slim-trt export`")
    if not isinstance(raw, dict):
        raise SlimError(f"{manifest} is not a JSON object: re-run `slim-trt export`")
    if raw.get("schema_version") != 1:
        raise SlimError(f"{manifest} has schema_version {raw.get('schema_version')!r}, this slim-trt reads 1: "
                        "re-export with this version of slim-trt")
    try:
        spec = DecoderSpec.from_manifest(raw)
    except ValueError as e:
        raise SlimError(f"{manifest}: {e}: re-run `slim-trt export`") from None
    if raw.get("dtype") not in DTYPES:
        raise SlimError(f"{manifest}: dtype {raw.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    if raw.get("lowrank") not in LOWRANKS:
        raise SlimError(f"{manifest}: lowrank {raw.get('lowrank')!r} is not one of {', '.join(LOWRANKS)}")
    info = ExportInfo(folder=folder, spec=spec, raw=raw)
    _check_inside(folder, folder / spec.model_file, manifest)
    if not info.model_path.is_file():
        raise SlimError(f"{info.model_path} is missing (named by {manifest}): copy the whole export folder")
    for path in info.model_files:
        _check_inside(folder, path, info.model_path)
        if not path.is_file():
            raise SlimError(f"{path} is missing (named by {info.model_path.name}): copy the whole export folder")
    if info.tokenizer_dir is not None:
        _check_inside(folder, info.tokenizer_dir, manifest)
        if not info.tokenizer_dir.is_dir():
            raise SlimError(f"tokenizer folder {info.tokenizer_dir} is missing (named by {manifest}): copy the whole "
                            "export folder")
        for f in sorted(info.tokenizer_dir.glob("*.json")):
            read_json(f, "re-run `slim-trt export` or copy the export folder again")
    return info


def check_onnx_file(onnx_path: str | Path) -> ExportInfo | None:
    """The gate of a model.onnx given as a file (lint, verify): read_export on its folder when its sidecar beside it
    describes it (the same checks as generate and deploy), else a parse check of the file alone."""
    path = Path(onnx_path)
    if path.is_dir():
        hint = f": give the model.onnx inside it ({path / 'model.onnx'})" if (path / "model.onnx").is_file() else \
            ": give the model.onnx written by `slim-trt export`"
        raise SlimError(f"{path} is a folder{hint}")
    if not path.is_file():
        raise SlimError(f"{path} does not exist: give the model.onnx written by `slim-trt export`")
    sidecar = path.parent / MANIFEST
    if sidecar.exists() and not sidecar.is_file():
        return read_export(path.parent)  # names it: not a file
    if sidecar.exists():
        raw = read_json(sidecar, "re-run `slim-trt export`")
        if isinstance(raw, dict) and raw.get("model_file") == path.name:
            return read_export(path.parent)
    load_onnx_graph(path)
    return None


def read_json(path: Path, fix: str):
    """A JSON file's content; SlimError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SlimError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): {fix}") from None
    except UnicodeDecodeError:
        raise SlimError(f"{path} is not valid JSON (not UTF-8 text): {fix}") from None
    except OSError as e:
        raise SlimError(f"cannot read {path} ({e.strerror}): {fix}") from None


def _check_inside(folder: Path, path: Path, named_by: Path) -> None:
    """A file an export names must be inside the export folder, also after following symlinks."""
    if not path.resolve().is_relative_to(folder.resolve()):
        raise SlimError(f"{named_by} refers to {path}, which is outside the export folder {folder} (an absolute "
                        f"path, '..' or a symlink): an export keeps its files inside its folder; re-run "
                        f"`slim-trt export`")


def _external_data_files(model_path: Path) -> list[str]:
    """Names of the external-data files a model refers to, read without loading the weights."""
    import onnx

    if not model_path.is_file():
        return []
    model = load_onnx_graph(model_path)
    names: set[str] = set()
    for tensor in _all_initializers(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    names.add(entry.value)
    return sorted(names)


def load_onnx_graph(path: Path):
    """The ONNX model at `path` without its external data; SlimError when it does not parse or has no graph."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise SlimError(f"{path} is not an ONNX file ({type(e).__name__}: truncated or corrupt): re-run "
                        f"`slim-trt export` or copy the file again") from None
    if not model.graph.node:
        raise SlimError(f"{path} is not an ONNX model (empty graph): re-run `slim-trt export` or copy the file again")
    return model


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_initializers(attr.g)
            for sub in attr.graphs:
                yield from _all_initializers(sub)


def read_sidecar(onnx_path: str | Path) -> dict | None:
    """slim_export.json beside the model, or None when no export sidecar describes this file (none there, or
    one naming another model file)."""
    onnx_path = Path(onnx_path)
    p = onnx_path.parent / SIDECAR
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SlimError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}): re-run `slim-trt export`") from None
    return meta if meta.get("model_file", onnx_path.name) == onnx_path.name else None
