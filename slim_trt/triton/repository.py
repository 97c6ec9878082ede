"""Generate a Triton model repository from an export folder (and optionally a TensorRT engine).

REPO/
  README.md                   server and client commands for this repository
  slim_repository.json        what was generated: each model's backend, device and dependencies (read by serve)
  NAME_onnx/                  python backend: the ONNX in ONNX Runtime, same inputs/outputs as the ONNX model
  NAME_generate/              python backend: prompt -> text (tokenizer + decode loop with the KV cache)
  NAME_ort/                   platform onnxruntime_onnx (needs Triton's onnxruntime backend)
  NAME_trt/                   platform tensorrt_plan, when an engine is given (needs a GPU)
  plugins/                    custom-op / TensorRT plugin libraries the models need

The repository is built in a temporary folder beside REPO and renamed at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SlimError
from ..outputs import check_outputs, commit_output, prepare_output
from . import configs
from ..runtime.export_folder import ExportInfo, read_export

REPOSITORY_MANIFEST = "slim_repository.json"
GENERATE_VIA = ("local", "onnx", "ort", "trt")
_MODELS_DIR = Path(__file__).parent / "triton_models"
# The runtime the python-backend models import (slim_runtime), and the graph rewrite it applies for ONNX Runtime.
_RUNTIME = Path(__file__).parent.parent / "runtime" / "decoder.py"
_ORT_REWRITE = Path(__file__).parent.parent / "runtime" / "ort_rewrite.py"


@dataclass(frozen=True)
class DeployConfig:
    """How to turn one export into a Triton repository."""

    name: str = "slim"  # model names: NAME_onnx, NAME_generate, NAME_ort, NAME_trt
    engine: str | None = None  # a TensorRT engine (.plan) built from this export
    device: str = "cpu"  # instance group of the onnxruntime model
    instances: int = 1  # instances of each model
    max_batch_size: int = 8  # dynamic batching for the decoder models (0 = off)
    trt_accelerator: bool = False  # TensorRT execution accelerator in the onnxruntime model (GPU only)
    ort_op_library: str | None = None  # native ORT library with LowRankAdd, for a `plugin` export on onnxruntime
    trt_plugin_library: str | None = None  # TensorRT plugin library with LowRankAdd, for a `plugin` engine
    generate_via: str = "local"  # slim_generate's decoder: in-process ORT, or the NAME_onnx / _ort / _trt model
    intra_op_threads: int = 0  # ONNX Runtime threads in each python-backend instance (0 = ORT's default)
    default_max_new_tokens: int = 32
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise SlimError(f"bad --name {self.name!r}: use letters, digits, '_', '-' or '.', e.g. gemma3_slim")
        if self.device not in ("cpu", "gpu"):
            raise SlimError(f"bad --device {self.device!r}: choose cpu or gpu")
        if self.instances < 1:
            raise SlimError(f"bad --instances {self.instances}: it must be >= 1")
        if self.max_batch_size < 0:
            raise SlimError(f"bad --max-batch-size {self.max_batch_size}: it must be >= 0 (0 = no batching)")
        if self.trt_accelerator and self.device != "gpu":
            raise SlimError("--trt-accelerator needs --device gpu: TensorRT runs on the GPU")
        if self.generate_via not in GENERATE_VIA:
            raise SlimError(f"bad --generate-via {self.generate_via!r}: choose one of {', '.join(GENERATE_VIA)}")
        if self.generate_via == "trt" and not self.engine:
            raise SlimError("--generate-via trt needs --engine NAME.plan")
        if self.intra_op_threads < 0 or self.default_max_new_tokens < 0:
            raise SlimError("--intra-op-threads and --max-new-tokens must be >= 0")

    def model_name(self, kind: str) -> str:
        return f"{self.name}_{kind}"


@dataclass
class DeployResult:
    repo: Path
    models: dict[str, str] = field(default_factory=dict)  # model name -> backend
    skipped: dict[str, str] = field(default_factory=dict)  # model name -> why it was not generated


def deploy(export_dir: str | os.PathLike, repo: str | os.PathLike, config: DeployConfig | None = None,
           **overrides) -> DeployResult:
    """Write a Triton model repository for `export_dir` to `repo`. Keyword overrides set DeployConfig fields."""
    config = dataclasses.replace(config or DeployConfig(), **overrides)
    info = read_export(export_dir)  # an input that is no export at all is named first
    check_outputs(folders={"-o": repo}, inputs=[export_dir, config.engine, config.ort_op_library,
                                                config.trt_plugin_library], force=config.overwrite)
    repo = Path(repo).resolve()
    _check_inputs(info, config, repo)
    tmp = prepare_output(repo, config.overwrite)
    try:
        result = _write(info, config, tmp, repo)
        commit_output(tmp, repo)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.repo = repo
    return result


def _check_inputs(info: ExportInfo, config: DeployConfig, repo: Path) -> None:
    if repo.exists() and not config.overwrite:
        raise SlimError(f"{repo} already exists: pass --force to replace it or choose another -o")
    if config.engine:
        engine = Path(config.engine)
        if not engine.is_file():
            raise SlimError(f"engine {engine} does not exist: build it with `slim-trt build` or fix the path")
        if info.lowrank == "plugin" and not config.trt_plugin_library:
            raise SlimError("this export uses the LowRankAdd plugin, so the engine needs it at load time: pass "
                            "--trt-plugin-library path/to/the/plugin.so")
    for flag, path in (("--ort-op-library", config.ort_op_library),
                       ("--trt-plugin-library", config.trt_plugin_library)):
        if path and not Path(path).is_file():
            raise SlimError(f"{flag} {path} does not exist: pass the built shared library")
    if config.generate_via == "ort" and info.lowrank == "plugin" and not config.ort_op_library:
        raise SlimError("--generate-via ort needs the NAME_ort model, which a plugin export only gets with "
                        "--ort-op-library")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard links keep one copy of big weight files on disk when several models share them."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_model(folder: Path, config_message, files: dict[str, Path]) -> None:
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(configs.render(config_message))
    for name, src in files.items():
        if src.is_dir():
            shutil.copytree(src, folder / "1" / name)
        else:
            _link_or_copy(src, folder / "1" / name)


def _write(info: ExportInfo, config: DeployConfig, tmp: Path, final: Path) -> DeployResult:
    result = DeployResult(repo=final)
    manifest: dict = {"schema_version": 1, "name": config.name, "export": str(info.folder.resolve()),
                      "dtype": info.dtype, "lowrank": info.lowrank, "models": {}, "skipped": {},
                      "tensorrt_plugins": [], "onnxruntime_op_libraries": []}
    spec = info.spec
    onnx_files = {p.name: p for p in info.model_files}
    options = configs.ModelOptions(
        device=config.device, instances=config.instances, max_batch_size=config.max_batch_size,
        trt_accelerator=config.trt_accelerator, intra_op_threads=config.intra_op_threads,
        default_max_new_tokens=config.default_max_new_tokens,
        generate_via="" if config.generate_via == "local" else config.model_name(config.generate_via))

    def add(name: str, backend: str, device: str, depends_on: tuple[str, ...] = ()):
        result.models[name] = backend
        manifest["models"][name] = {"backend": backend, "device": device, "depends_on": list(depends_on)}

    def skip(name: str, reason: str):
        result.skipped[name] = reason
        manifest["skipped"][name] = reason

    # Python backend: the ONNX as is, and text generation. The runtime goes beside each model.py.
    python_files = {"slim_runtime.py": _RUNTIME, "slim_ort_rewrite.py": _ORT_REWRITE,
                    "slim_export.json": info.folder / "slim_export.json", **onnx_files}
    name = config.model_name("onnx")
    if info.python_servable:
        _write_model(tmp / name, configs.python_onnx_config(name, spec, options),
                     {"model.py": _MODELS_DIR / "slim_onnx.py", **python_files})
        add(name, "python", "cpu")
    else:
        skip(name, "bf16 tensors cannot cross the python backend's numpy interface; export fp16 or fp32")
    name = config.model_name("generate")
    if info.tokenizer_dir is None:
        skip(name, "the export has no tokenizer/ folder; re-export with the tokenizer")
    elif not info.python_servable:
        skip(name, "the decode loop keeps the KV cache in numpy, which has no bfloat16; export fp16 or fp32")
    else:
        files = {"model.py": _MODELS_DIR / "slim_generate.py", "tokenizer": info.tokenizer_dir, **python_files}
        if config.generate_via != "local":  # the decoder runs in another model; no weights here
            files = {k: v for k, v in files.items() if k not in onnx_files}
        _write_model(tmp / name, configs.python_generate_config(name, options), files)
        add(name, "python", "cpu", (options.generate_via,) if options.generate_via else ())

    # onnxruntime backend. A plugin export needs LowRankAdd as a native ORT custom-op library.
    name = config.model_name("ort")
    if info.lowrank == "plugin" and not config.ort_op_library:
        skip(name, "a plugin export needs --ort-op-library (the native LowRankAdd library) on the onnxruntime "
                   "backend; or deploy a decomposed export")
    else:
        ort_options = options
        if config.ort_op_library:
            library = Path(config.ort_op_library)
            _link_or_copy(library, tmp / "plugins" / "onnxruntime" / library.name)
            # Triton dlopens this path as written, so it names the library's final place.
            final_library = final / "plugins" / "onnxruntime" / library.name
            ort_options = dataclasses.replace(options, ort_op_library=str(final_library))
            manifest["onnxruntime_op_libraries"].append(f"plugins/onnxruntime/{library.name}")
        _write_model(tmp / name, configs.onnxruntime_config(name, spec, info.dtype, ort_options), onnx_files)
        add(name, "onnxruntime", config.device)

    # tensorrt backend, when an engine is given. Its plugin library is loaded server-wide by `serve`.
    name = config.model_name("trt")
    if config.engine:
        _write_model(tmp / name, configs.tensorrt_config(name, spec, options), {"model.plan": Path(config.engine)})
        add(name, "tensorrt", "gpu")
        if config.trt_plugin_library:
            library = Path(config.trt_plugin_library)
            _link_or_copy(library, tmp / "plugins" / "tensorrt" / library.name)
            manifest["tensorrt_plugins"].append(f"plugins/tensorrt/{library.name}")
    else:
        skip(name, "no --engine given")

    (tmp / REPOSITORY_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    from .readme import render_readme

    (tmp / "README.md").write_text(render_readme(final, config, manifest, spec))
    return result


def read_repository(repo: str | os.PathLike) -> dict:
    """slim_repository.json of a generated repository, or a description derived from config.pbtxt files for any
    other Triton repository (so `serve` works on repositories it did not write)."""
    repo = Path(repo)
    path = repo / REPOSITORY_MANIFEST
    if path.is_file():
        return json.loads(path.read_text())
    models = {}
    for config_path in sorted(repo.glob("*/config.pbtxt")):
        message = configs.parse(config_path.read_text())
        backend = message.backend or {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt",
                                      "pytorch_libtorch": "pytorch", "tensorflow_savedmodel": "tensorflow",
                                      "ensemble": "ensemble"}.get(message.platform, message.platform)
        gpu = any(g.kind == g.KIND_GPU for g in message.instance_group)
        models[message.name or config_path.parent.name] = {"backend": backend, "device": "gpu" if gpu else "cpu",
                                                           "depends_on": []}
    return {"schema_version": 1, "models": models, "skipped": {}, "tensorrt_plugins": []}
