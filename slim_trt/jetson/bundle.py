"""`slim-trt deploy jetson EXPORT_DIR -o BUNDLE`: one folder to copy to a Jetson and build there.

BUNDLE/
  README.md            JetPack / TensorRT versions, the commands, the memory budget check, the sparse prediction
  build.sh, run.sh     the engine build (the board's trtexec, or `slim-trt build`) and a timing run; --dry-run
  model/               the export: model.onnx (+ model.onnx.data), slim_export.json, tokenizer/
  inputs/              token ids, attention mask and positions for run.sh's trtexec phases
  plugins/lowrank_add/ the LowRankAdd plugin sources and CMake build (plugin exports only)
  target/NAME.json     the target profile the bundle was made for
  lint.json            `slim-trt lint` for the target: findings and the per-GEMM sparse tensor-core prediction
  slim_bundle.json     what was decided: target, shapes, memory estimate, commands, sha256 of every file
  SHA256SUMS           `sha256sum -c` input (build.sh checks the copy first)

Refused (SlimError, exit 2) before anything is written: an export that fails lint for the target (LintRefused
carries the report), a target that is not a Jetson profile, features the target lacks, shapes that exceed the
model's context, and weights + KV cache + workspace above the board's memory. Built in a temporary folder
beside BUNDLE and renamed at the end. No TensorRT is needed here.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SlimError
from ..outputs import check_outputs, commit_output, prepare_output
from ..trt.memory import GB, MemoryEstimate, estimate_memory
from ..trt.plugins import required_plugins
from ..trt.shapes import Range, ShapeRanges, input_profiles, shape_ranges
from ..targets.profile import TargetProfile, load_target
from . import scripts
from .readme import bundle_readme

PLUGIN_SOURCES = Path(__file__).resolve().parent / "lowrank_add"  # -> plugins/lowrank_add (package data)
MANIFEST = "slim_bundle.json"
_NP_DTYPES = {"int64": np.int64, "int32": np.int32}


class LintRefused(SlimError):
    """The export fails `slim-trt lint` for the target; `report` holds the findings."""

    def __init__(self, message: str, report) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class JetsonConfig:
    """How to bundle an export for a Jetson. Ranges: "MIN,OPT,MAX" strings or Range; None = the target's."""

    target: str = "jetson-orin"  # a Jetson profile name or a profile .json path
    batch: str | Range | None = None
    seq: str | Range | None = None
    past: str | Range | None = None
    workspace_gb: float | None = None  # builder workspace; default: the profile's
    memory_gb: float | None = None  # the board's memory; default: the profile's budget (its smallest module)
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("workspace_gb", "memory_gb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise SlimError(f"bad --{name.replace('_', '-')} {value}: it must be a positive number of GiB")


@dataclass
class JetsonBundle:
    path: Path
    target: TargetProfile
    memory: MemoryEstimate
    lint_line: str
    plugin: bool
    files: dict = field(default_factory=dict)  # relative path -> sha256
    warnings: list[str] = field(default_factory=list)


def _jetson_profile(name: str) -> TargetProfile:
    profile = load_target(name)
    if profile.platform != "jetson":
        raise SlimError(f"--target {profile.name} is a {profile.platform} GPU profile, not a Jetson: choose "
                        f"jetson-orin or jetson-thor (or a Jetson profile .json)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", profile.name):
        raise SlimError(f"target profile name {profile.name!r} must use letters, digits, '.', '_' or '-' only")
    return profile


def _lint(onnx: Path, profile: TargetProfile):
    from ..linter import lint

    report = lint(str(onnx), target=profile.lint_target, gpu=profile)
    if not report.ok:
        first = report.errors[0]
        raise LintRefused(f"lint found {len(report.errors)} error(s) for {profile.name} (TensorRT table "
                          f"{profile.lint_target}), first [{first.rule}] {first.node}: {first.message}; the bundle "
                          f"would not build on the board: fix the export, or pick another --target", report)
    return report


def _phases(meta: dict, shapes: dict, ranges: ShapeRanges) -> dict:
    """run.sh's phases at the opt shapes: prefill (past 0) and, with a KV cache, one decode step after the opt past."""
    b, s = ranges.batch.opt, ranges.sequence.opt
    phases = {"prefill": (b, s, 0)}
    if meta.get("with_cache", True) and ranges.past_sequence.max > 0 and ranges.sequence.min <= 1:
        phases["decode"] = (b, 1, ranges.past_sequence.opt)
    out = {}
    for phase, (batch, seq, past) in phases.items():
        fixed = ShapeRanges(Range(batch, batch, batch), Range(seq, seq, seq), Range(past, past, past))
        feed = {name: dims[1] for name, dims in input_profiles(meta, fixed).items()}
        if any(not lo[i] <= feed[name][i] <= hi[i] for name, (lo, _, hi) in shapes.items()
               for i in range(len(lo))):
            continue  # outside the engine's profile (e.g. --past min > 0): no such phase
        inputs = {n: f"inputs/{phase}/{n}.bin" for n in ("input_ids", "attention_mask", "position_ids") if n in feed}
        out[phase] = {"batch": batch, "seq": seq, "past": past, "shapes": feed, "inputs": inputs}
    if not out:
        raise SlimError("no prefill shape fits the chosen --batch/--seq/--past ranges: give ranges whose opt values "
                        "lie inside min..max")
    return out


def _write_inputs(root: Path, meta: dict, phases: dict) -> None:
    """Token id 0, an all-ones attention mask and positions past..past+seq-1, in the export's integer dtypes."""
    dtypes = {i["name"]: _NP_DTYPES.get(i.get("dtype", "int64"), np.int64) for i in meta["inputs"]}
    for phase, p in phases.items():
        b, s, past = p["batch"], p["seq"], p["past"]
        values = {"input_ids": np.zeros((b, s)), "attention_mask": np.ones((b, past + s)),
                  "position_ids": np.broadcast_to(np.arange(past, past + s), (b, s))}
        for name, rel in p["inputs"].items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(np.ascontiguousarray(values[name], dtype=np.dtype(dtypes[name]).newbyteorder("<"))
                             .tobytes())


def _cuda_architectures(profile: TargetProfile) -> str:
    return ";".join(cc.replace(".", "") for cc in profile.compute_capabilities)


def bundle_jetson(export_dir: str | Path, out: str | Path, config: JetsonConfig | None = None) -> JetsonBundle:
    """Check `export_dir` for the Jetson target and write the bundle folder `out` (see the module docstring)."""
    from ..checkpoint.format import file_sha256 as _sha256
    from ..trt.builder import feature_warnings
    from ..runtime.export_folder import read_export

    config = config or JetsonConfig()
    info = read_export(export_dir)  # an input that is no export at all is named first
    check_outputs(folders={"-o": out}, inputs=[export_dir], force=config.overwrite)
    meta, onnx = info.raw, info.model_path
    profile = _jetson_profile(config.target)
    warnings = feature_warnings(meta, profile, sparsity=True)
    ranges = shape_ranges(meta, profile.default_shapes, batch=config.batch, seq=config.seq, past=config.past)
    shapes = input_profiles(meta, ranges)
    workspace_gb = config.workspace_gb if config.workspace_gb is not None else profile.workspace_gb
    budget_gb = config.memory_gb if config.memory_gb is not None else profile.memory_budget_gb
    report = _lint(onnx, profile)
    memory = estimate_memory(onnx, meta, [ranges], workspace_gb, budget_gb)
    if not memory.fits:
        raise SlimError(f"the engine would not fit the {profile.name}'s memory: {memory.line()}; lower the max of "
                        f"--batch/--seq/--past or --workspace-gb, or give the board's real memory with --memory-gb "
                        f"(the {profile.memory_budget_gb:g} GiB default is the smallest module)")
    plugin = bool(required_plugins(meta, onnx))
    phases = _phases(meta, shapes, ranges)
    plan = scripts.ScriptPlan(
        target=profile.name, target_file=f"target/{profile.name}.json", tensorrt_min=profile.tensorrt_min_version,
        tensorrt_max_major=profile.tensorrt_max_major,
        tensorrt_assumed=(profile.jetpack[0]["tensorrt"] if profile.jetpack else profile.tensorrt_min_version),
        cuda_architectures=_cuda_architectures(profile), plugin=plugin, shapes=shapes, ranges=ranges.to_dict(),
        workspace_mib=int(round(workspace_gb * 1024)), phases=phases)

    out = Path(out)
    tmp = prepare_output(out, config.overwrite)
    try:
        model_dir = tmp / "model"
        model_dir.mkdir()
        for path in info.model_files + [info.folder / "slim_export.json"]:
            shutil.copy2(path, model_dir / path.name)
        if info.tokenizer_dir is not None:
            shutil.copytree(info.tokenizer_dir, model_dir / info.tokenizer_dir.name)
        if plugin:
            shutil.copytree(PLUGIN_SOURCES, tmp / scripts.PLUGIN_SOURCE,
                            ignore=shutil.ignore_patterns("build", "__pycache__"))
        (tmp / "target").mkdir()
        shutil.copy2(profile.source, tmp / plan.target_file)
        _write_inputs(tmp, meta, phases)
        (tmp / "lint.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        for name, text in (("build.sh", scripts.build_script(plan)), ("run.sh", scripts.run_script(plan))):
            (tmp / name).write_text(text)
            (tmp / name).chmod(0o755)
        sparse = report.summary["sparse_tensor_cores"]
        (tmp / "README.md").write_text(bundle_readme(profile=profile, meta=meta, plan=plan, memory=memory,
                                                     lint_report=report, plugin=plugin, budget_gb=budget_gb))
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "schema_version": 1, "target": profile.to_dict(), "export": {
                k: meta.get(k) for k in ("architecture", "dtype", "lowrank", "act_quant", "num_layers",
                                         "max_position_embeddings")}
            | {"checkpoint_manifest_sha256": (meta.get("checkpoint") or {}).get("manifest_sha256")},
            "shapes": ranges.to_dict(), "input_shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
            "workspace_gb": workspace_gb, "memory": memory.to_dict(), "plugin": plugin,
            "lint": {"target": report.target, "gpu": report.gpu, "ok": report.ok, "sparse_tensor_cores": sparse["line"],
                     "warnings": [f"[{f.rule}] {f.message}" for f in report.findings if f.severity == "warning"]},
            "commands": {"build": {"trtexec": ["$TRTEXEC", "--stronglyTyped (TensorRT 10)"]
                                   + scripts.trtexec_build_args(plan),
                                   "slim-trt": scripts.slim_trt_build_args(plan)},
                         "run": {"trtexec": {p: ["$TRTEXEC"] + scripts.trtexec_run_args(plan, p) for p in phases},
                                 "slim-trt": scripts.slim_trt_bench_args(plan)}},
            "warnings": warnings, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        files[MANIFEST] = _sha256(tmp / MANIFEST)
        (tmp / scripts.CHECKSUMS).write_text("".join(f"{digest}  {rel}\n" for rel, digest in sorted(files.items())))
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return JetsonBundle(path=out, target=profile, memory=memory, lint_line=sparse["line"], plugin=plugin,
                        files=files, warnings=warnings)


__all__ = ["GB", "JetsonBundle", "JetsonConfig", "LintRefused", "MANIFEST", "bundle_jetson"]
