"""Target profiles: what each deployment GPU supports, kept as data in JSON files.

A profile names the GPUs it covers (by compute capability), the TensorRT versions that run there, the lint
target to check the ONNX against, which precisions and 2:4 sparsity the hardware supports, a memory budget and
default optimization-profile shapes. `slim-trt build --target NAME` reads one; without --target the profile
is picked from the GPU's compute capability. Pure data handling, no TensorRT.

Where a name is looked up, first match wins (`profile_dirs()`):
  1. $SLIM_TRT_PROFILES_DIR: one or more folders (os.pathsep-separated) of the user's own profiles;
  2. engines/profiles/ under the working directory (beside the engines `slim-trt build` writes by default);
  3. the profiles shipped inside the package (slim_trt/targets/profiles/, package data: found by any install).
A user profile with a shipped name replaces the shipped one. Any profile file can also be given by path.
"""
from __future__ import annotations

import json
import re
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlimError

PROFILES_ENV = "SLIM_TRT_PROFILES_DIR"
SUPPORT_KEYS = ("int4_weights", "int8", "fp8", "fp4", "bf16", "sparsity_2_4")
SHAPE_AXES = ("batch", "sequence", "past_sequence")
PLATFORMS = ("datacenter", "workstation", "jetson")
# The linter's TensorRT tables (slim_trt/linter/tables/NAME.json): a profile's lint target names one of them.
LINT_TABLES = ("trt10", "trt11", "jetson-orin-jp6")
DEFAULT_LINT_TARGET = "trt10"  # what `slim-trt lint`, lint() and the demo check against when not told


def parse_version(text: str) -> tuple[int, ...]:
    """'10.13.3.9' -> (10, 13, 3, 9); 'TensorRT 11.1' -> (11, 1)."""
    m = re.search(r"(\d+(?:\.\d+)*)", str(text))
    if not m:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in m.group(1).split("."))


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "compute_capability": self.cc,
                "memory_gb": round(self.total_memory_bytes / 2**30, 2)}


SHIPPED_DIR = Path(__file__).resolve().parent / "profiles"
USER_DIR = Path("engines") / "profiles"  # relative to the working directory


def profile_dirs() -> list[Path]:
    """The folders searched for a profile name, first match wins (see the module docstring)."""
    dirs = [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    return dirs + [USER_DIR.resolve(), SHIPPED_DIR]


def _dirs(directory: Path | list[Path] | None) -> list[Path]:
    if directory is None:
        return profile_dirs()
    return list(directory) if isinstance(directory, (list, tuple)) else [Path(directory)]


def lint_targets() -> tuple[str, ...]:
    return LINT_TABLES


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    compute_capabilities: tuple[str, ...]
    platform: str
    lint_target: str
    lint_target_by_tensorrt_major: dict
    tensorrt_min_version: str
    tensorrt_max_major: int
    supports: dict
    memory_budget_gb: float
    workspace_gb: float
    default_shapes: dict
    notes: str
    source: str
    jetpack: tuple = ()  # Jetson: the JetPack releases that carry a supported TensorRT, as {version, tensorrt, cuda}

    def lint_target_for(self, tensorrt_version: str | None) -> str:
        """The lint table matching the installed TensorRT (the profile's default when unknown)."""
        if tensorrt_version:
            major = str(parse_version(tensorrt_version)[0])
            return self.lint_target_by_tensorrt_major.get(major, self.lint_target)
        return self.lint_target

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "compute_capabilities": list(self.compute_capabilities), "platform": self.platform,
                "lint_target": self.lint_target, "supports": dict(self.supports),
                "memory_budget_gb": self.memory_budget_gb, "workspace_gb": self.workspace_gb,
                "tensorrt": {"min_version": self.tensorrt_min_version, "max_major": self.tensorrt_max_major},
                "jetpack": [dict(j) for j in self.jetpack], "source": self.source}


def _fail(source: str, what: str) -> SlimError:
    return SlimError(f"target profile {source}: {what}")


def _shape_triple(source: str, axis: str, value) -> tuple[int, int, int]:
    if (not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in value)):
        raise _fail(source, f"default_shapes.{axis} must be [min, opt, max] integers, got {value!r}")
    lo, opt, hi = value
    floor = 0 if axis == "past_sequence" else 1
    if not floor <= lo <= opt <= hi:
        raise _fail(source, f"default_shapes.{axis} needs {floor} <= min <= opt <= max, got {value}")
    return lo, opt, hi


def profile_from_dict(d: dict, source: str = "<dict>") -> TargetProfile:
    """Validate a profile's JSON content; every problem names the field and the file."""
    if not isinstance(d, dict):
        raise _fail(source, "must be a JSON object")
    if d.get("schema_version") != 1:
        raise _fail(source, f"schema_version must be 1, got {d.get('schema_version')!r}")
    for key in ("name", "description", "platform", "lint_target"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise _fail(source, f"{key!r} must be a non-empty string")
    if d["platform"] not in PLATFORMS:
        raise _fail(source, f"platform must be one of {', '.join(PLATFORMS)}, got {d['platform']!r}")
    ccs = d.get("compute_capabilities")
    if not isinstance(ccs, list) or not ccs:
        raise _fail(source, "compute_capabilities must be a non-empty list such as [\"9.0\"]")
    for cc in ccs:
        parts = str(cc).split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise _fail(source, f"compute capability {cc!r} must look like \"8.7\"")
    known = lint_targets()
    by_major = d.get("lint_target_by_tensorrt_major", {})
    if not isinstance(by_major, dict):
        raise _fail(source, "lint_target_by_tensorrt_major must map a TensorRT major version to a lint target")
    for t in [d["lint_target"], *by_major.values()]:
        if t not in known:
            raise _fail(source, f"lint target {t!r} is not one of slim-trt lint's targets ({', '.join(known)})")
    trt = d.get("tensorrt")
    if not isinstance(trt, dict) or "min_version" not in trt or not isinstance(trt.get("max_major"), int):
        raise _fail(source, "tensorrt must be {\"min_version\": \"10.0\", \"max_major\": 11}")
    try:
        min_v = parse_version(trt["min_version"])
    except ValueError:
        raise _fail(source, f"tensorrt.min_version {trt['min_version']!r} is not a version") from None
    if min_v[0] > trt["max_major"]:
        raise _fail(source, "tensorrt.min_version is above tensorrt.max_major")
    supports = d.get("supports")
    if not isinstance(supports, dict) or set(supports) != set(SUPPORT_KEYS) or not all(
            isinstance(v, bool) for v in supports.values()):
        raise _fail(source, f"supports must give true/false for exactly: {', '.join(SUPPORT_KEYS)}")
    for key in ("memory_budget_gb", "workspace_gb"):
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise _fail(source, f"{key} must be a positive number, got {v!r}")
    if d["workspace_gb"] >= d["memory_budget_gb"]:
        raise _fail(source, "workspace_gb must be smaller than memory_budget_gb")
    shapes = d.get("default_shapes")
    if not isinstance(shapes, dict) or set(shapes) != set(SHAPE_AXES):
        raise _fail(source, f"default_shapes must give [min, opt, max] for exactly: {', '.join(SHAPE_AXES)}")
    triples = {axis: _shape_triple(source, axis, shapes[axis]) for axis in SHAPE_AXES}
    jetpack = d.get("jetpack", [])
    if not isinstance(jetpack, list) or not all(
            isinstance(j, dict) and all(isinstance(j.get(k), str) and j[k] for k in ("version", "tensorrt"))
            for j in jetpack):
        raise _fail(source, "jetpack must be a list of {\"version\": \"6.1\", \"tensorrt\": \"10.3\", ...}")
    return TargetProfile(
        name=d["name"], description=d["description"], compute_capabilities=tuple(str(c) for c in ccs),
        platform=d["platform"], lint_target=d["lint_target"], lint_target_by_tensorrt_major=dict(by_major),
        tensorrt_min_version=str(trt["min_version"]), tensorrt_max_major=int(trt["max_major"]),
        supports=dict(supports), memory_budget_gb=float(d["memory_budget_gb"]),
        workspace_gb=float(d["workspace_gb"]), default_shapes=triples, notes=str(d.get("notes", "")),
        source=source, jetpack=tuple(dict(j) for j in jetpack))


def list_targets(directory: Path | list[Path] | None = None) -> list[str]:
    """Names of every profile found (`directory` = one folder or a list; default: `profile_dirs()`)."""
    return sorted({p.stem for d in _dirs(directory) if d.is_dir() for p in d.glob("*.json")})


def find_profile(name: str, directory: Path | list[Path] | None = None) -> Path | None:
    """The file that `--target name` means: the first NAME.json in the search folders."""
    return next((d / f"{name}.json" for d in _dirs(directory) if (d / f"{name}.json").is_file()), None)


def load_target(name_or_path: str, directory: Path | list[Path] | None = None) -> TargetProfile:
    """A profile by name (`hopper`, looked up in `profile_dirs()`) or any profile file by path (`./my_gpu.json`)."""
    text = str(name_or_path)
    path = Path(text)
    by_name = not (text.endswith(".json") or os.sep in text)
    if by_name:
        found = find_profile(text, directory)
        if found is None:
            names = ", ".join(list_targets(directory)) or "none found"
            searched = ", ".join(str(d) for d in _dirs(directory))
            raise SlimError(f"unknown --target {text!r}: choose one of {names} (searched {searched}), or give a "
                            f"profile .json path")
        path = found
    if not path.is_file():
        raise SlimError(f"target profile {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SlimError(f"target profile {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    profile = profile_from_dict(data, str(path))
    if by_name and profile.name != path.stem:
        raise SlimError(f"target profile {path}: its name {profile.name!r} must match the file name")
    return profile


def target_for_gpu(gpu: GpuInfo, directory: Path | list[Path] | None = None) -> TargetProfile | None:
    """The shipped profile covering this GPU's compute capability, if any."""
    for name in list_targets(directory):
        profile = load_target(name, directory)
        if gpu.cc in profile.compute_capabilities:
            return profile
    return None


def check_target(profile: TargetProfile, gpu: GpuInfo | None, tensorrt_version: str | None) -> None:
    """A TensorRT engine runs only on the GPU family and TensorRT it was built with: refuse mismatches."""
    if gpu is not None and gpu.cc not in profile.compute_capabilities:
        raise SlimError(
            f"--target {profile.name} is for compute capability {', '.join(profile.compute_capabilities)} but this "
            f"GPU is {gpu.name} ({gpu.cc}): build on the target device, or drop --target to build for this GPU")
    if tensorrt_version:
        v = parse_version(tensorrt_version)
        if v < parse_version(profile.tensorrt_min_version) or v[0] > profile.tensorrt_max_major:
            raise SlimError(
                f"--target {profile.name} needs TensorRT {profile.tensorrt_min_version} to "
                f"{profile.tensorrt_max_major}.x, this machine has {tensorrt_version}")
