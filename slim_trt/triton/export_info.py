"""Read and check an export folder (model.onnx + slim_export.json + tokenizer/) before deploying it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlimError
from ..runtime import MANIFEST, DecoderSpec

DTYPES = ("fp16", "bf16", "fp32")
LOWRANKS = ("decomposed", "plugin")


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
    if not manifest.is_file():
        raise SlimError(f"{folder} has no {MANIFEST}: pass the folder written by `slim-trt export`")
    try:
        raw = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise SlimError(f"{manifest} is not valid JSON ({e.msg} at line {e.lineno}): re-run `slim-trt export`") \
            from None
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
    for path in info.model_files:
        if not path.is_file():
            raise SlimError(f"{path} is missing (named by {manifest}): copy the whole export folder")
    if info.tokenizer_dir is not None and not info.tokenizer_dir.is_dir():
        raise SlimError(f"tokenizer folder {info.tokenizer_dir} is missing (named by {manifest}): copy the whole "
                        "export folder")
    return info


def _external_data_files(model_path: Path) -> list[str]:
    """Names of the external-data files a model refers to, read without loading the weights."""
    import onnx

    if not model_path.is_file():
        return []
    model = onnx.load(str(model_path), load_external_data=False)
    names: set[str] = set()
    for tensor in _all_initializers(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    names.add(entry.value)
    return sorted(names)


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_initializers(attr.g)
            for sub in attr.graphs:
                yield from _all_initializers(sub)
