"""Plugin libraries: which ones a model needs, where the built library is, and loading it into TensorRT.

The `plugin` export has LowRankAdd nodes (op "LowRankAdd", plugin_version "1", plugin_namespace "slim_trt")
that TensorRT's ONNX parser resolves through its plugin registry; the library built from plugins/lowrank_add/
registers that creator when it is loaded. Finding and checking is pure; `load_plugins` needs TensorRT.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ..errors import SlimError

PLUGIN_ENV = "SLIM_TRT_PLUGIN_PATH"  # os.pathsep-separated files or folders
LOWRANK_ADD = ("LowRankAdd", "1", "slim_trt")
# (op, version, namespace) -> library file name built by plugins/<dir>/CMakeLists.txt
KNOWN_PLUGINS = {LOWRANK_ADD: "liblowrank_add_plugin.so"}
BUILD_HINT = ("build it on this machine with `cmake -S plugins/lowrank_add -B plugins/build/lowrank_add "
              "-DTENSORRT_ROOT=/path/to/TensorRT && cmake --build plugins/build/lowrank_add -j` "
              "(see plugins/lowrank_add/README.md), or pass --plugins PATH")


def required_plugins(meta: dict | None, onnx_path: str | Path | None = None) -> list[tuple[str, str, str]]:
    """(op, version, namespace) of every custom op, from slim_export.json or else from the ONNX nodes."""
    found: list[tuple[str, str, str]] = []
    if meta is not None and "custom_ops" in meta:
        for op in meta["custom_ops"] or []:
            found.append((op["op_type"], str(op.get("plugin_version", "1")), str(op.get("plugin_namespace", ""))))
    elif onnx_path is not None:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        for node in model.graph.node:
            if node.domain not in ("", "ai.onnx"):
                attrs = {a.name: a.s.decode() for a in node.attribute if a.type == onnx.AttributeProto.STRING}
                found.append((node.op_type, attrs.get("plugin_version", "1"), attrs.get("plugin_namespace", "")))
    return sorted(set(found))


def _repo_build_dirs() -> list[Path]:
    root = Path(__file__).resolve().parents[2]
    return [root / "plugins" / "build" / "lowrank_add", Path.cwd() / "plugins" / "build" / "lowrank_add"]


def find_plugin_library(file_name: str, search: list[Path] | None = None) -> Path | None:
    """The first `file_name` in $SLIM_TRT_PLUGIN_PATH entries, then in plugins/build/lowrank_add/."""
    candidates: list[Path] = []
    for entry in filter(None, os.environ.get(PLUGIN_ENV, "").split(os.pathsep)):
        p = Path(entry)
        candidates.append(p if p.name == file_name else p / file_name)
    candidates += [d / file_name for d in (search if search is not None else _repo_build_dirs())]
    return next((c for c in candidates if c.is_file()), None)


def resolve_plugins(explicit: list[str] | tuple[str, ...], required: list[tuple[str, str, str]],
                    search: list[Path] | None = None) -> list[Path]:
    """The libraries to load: the given paths (checked), or the known library for each required plugin."""
    paths = []
    for p in explicit:
        path = Path(p)
        if not path.is_file():
            raise SlimError(f"plugin library {path} does not exist: {BUILD_HINT}")
        paths.append(path)
    if paths:
        return paths
    for op in required:
        if op not in KNOWN_PLUGINS:
            raise SlimError(f"the model uses custom op {op[0]} (version {op[1]}, namespace {op[2]!r}) that slim-trt "
                            f"does not provide: pass the library that implements it with --plugins PATH")
        lib = find_plugin_library(KNOWN_PLUGINS[op], search)
        if lib is None:
            raise SlimError(f"the model uses the {op[0]} plugin but {KNOWN_PLUGINS[op]} was not found: {BUILD_HINT}")
        paths.append(lib)
    return sorted(set(paths))


def load_plugins(trt, paths: list[Path], required: list[tuple[str, str, str]]) -> None:
    """Load libraries (their static initializers register the creators) and check the registry has each op."""
    for path in paths:
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise SlimError(f"could not load plugin library {path}: {e}; rebuild it against this TensorRT "
                            f"({trt.__version__})") from None
    registry = trt.get_plugin_registry()
    for name, version, namespace in required:
        if registry.get_creator(name, version, namespace) is None:
            raise SlimError(f"{name} (version {version}, namespace {namespace!r}) is not registered after loading "
                            f"{', '.join(map(str, paths)) or 'no library'}: load liblowrank_add_plugin.so (not the "
                            f"_dynamic variant, which is for trtexec --dynamicPlugins)")
