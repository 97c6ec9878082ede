"""`build`: ONNX export -> TensorRT engine (NAME.plan) + build report (NAME.build.json) + builder log.

Two halves:
* `plan_build` - everything that needs no GPU: paths, the target profile, optimization-profile shapes from
  slim_export.json and flags, plugin libraries, a memory estimate, and the `slim-trt lint` pre-flight that
  stops on errors.
* `build` - the TensorRT half, through Polygraphy's loaders (NetworkFromOnnxPath -> CreateConfig ->
  EngineFromNetwork -> SaveEngine): strongly typed network (precision comes from the graph: Q/DQ and the
  export dtype; TensorRT 11 is always strongly typed), SPARSE_WEIGHTS unless --no-sparsity, DETAILED
  profiling verbosity so the engine inspector can list layers and tactics, the builder log captured for the
  "(Sparsity)" lines.
Outputs are written to NAME.plan.partial etc. and renamed at the end.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SlimError
from ..runtime.export_folder import read_sidecar
from .backend import GpuInfo, TensorRTNotInstalled, import_tensorrt, parse_version, require_gpu
from .plugins import required_plugins, resolve_plugins
from .report import BuildReport, make_report
from .memory import estimate_memory
from .shapes import ShapeRanges, input_profiles, io_from_onnx, shape_ranges
from ..targets.profile import TargetProfile, check_target, load_target, target_for_gpu

GB = 2**30


@dataclass
class BuildPlan:
    onnx: Path
    engine: Path
    report: Path
    log: Path
    meta: dict
    target: TargetProfile | None
    ranges: list[ShapeRanges]
    shapes: list[dict]
    sparsity: bool
    workspace_bytes: int | None
    timing_cache: Path | None
    required_plugins: list[tuple[str, str, str]]
    plugins: list[Path]
    lint_target: str | None
    lint: dict | None
    warnings: list[str] = field(default_factory=list)

    def options(self) -> dict:
        return {"sparsity": self.sparsity, "strongly_typed": True,
                "profiles": [r.to_dict() for r in self.ranges],
                "input_shapes": [{k: [list(s) for s in v] for k, v in shapes.items()} for shapes in self.shapes],
                "workspace_gb": None if self.workspace_bytes is None else round(self.workspace_bytes / GB, 3),
                "timing_cache": None if self.timing_cache is None else str(self.timing_cache),
                "plugins": [str(p) for p in self.plugins], "lint_target": self.lint_target,
                "export_dtype": self.meta.get("dtype"), "lowrank": self.meta.get("lowrank")}


def side_files(engine_path: Path) -> tuple[Path, Path]:
    """engines/NAME.plan -> (engines/NAME.build.json, engines/NAME.build.log)."""
    stem = engine_path.name[: -len(engine_path.suffix)] if engine_path.suffix else engine_path.name
    return engine_path.with_name(f"{stem}.build.json"), engine_path.with_name(f"{stem}.build.log")


def _ranges_list(profiles, meta: dict, target: TargetProfile | None, batch, seq, past) -> list[ShapeRanges]:
    if profiles is None:
        return [shape_ranges(meta, target.default_shapes if target else None, batch=batch, seq=seq, past=past)]
    if batch is not None or seq is not None or past is not None:
        raise SlimError("give either profiles= or batch/seq/past ranges, not both")
    items = profiles if isinstance(profiles, (list, tuple)) else [profiles]
    out = []
    for p in items:
        ranges = p if isinstance(p, ShapeRanges) else ShapeRanges.from_dict(p)
        out.append(shape_ranges(meta, None, batch=ranges.batch, seq=ranges.sequence, past=ranges.past_sequence))
    if not out:
        raise SlimError("profiles= is empty: give at least one shape profile")
    return out


def feature_warnings(meta: dict, target: TargetProfile, sparsity: bool) -> list[str]:
    s = target.supports
    bits = {layer.get("bits") for layer in meta.get("compressed_layers", [])}
    if 4 in bits and not s["int4_weights"]:
        raise SlimError(f"the export has INT4 weights but target {target.name} does not support INT4 weight-only "
                        f"quantization: export with --bits 8 or pick another target")
    if meta.get("dtype") == "bf16" and not s["bf16"]:
        raise SlimError(f"the export is bf16 but target {target.name} has no bf16 support: export with --dtype fp16")
    if meta.get("act_format") == "fp8" and not s["fp8"]:
        raise SlimError(f"the export is FP8 but target {target.name} has no FP8 tensor cores (Ampere and Jetson Orin "
                        f"have none): compress with --preset trt-int8-sparse for it, or pick hopper, ada or jetson-thor")
    if meta.get("act_quant") == "int8" and meta.get("act_format") != "fp8" and not s["int8"]:
        raise SlimError(f"the export quantizes activations to INT8 but target {target.name} lacks INT8 support")
    if sparsity and not s["sparsity_2_4"]:
        return [f"target {target.name} has no 2:4 sparse tensor cores: SPARSE_WEIGHTS will have no effect"]
    return []


LINT_GEMM_FIELDS = ("name", "weight", "K", "N", "dtype", "activation", "sparse_eligible", "sparse_class",
                    "sparse_math", "sparse_reason")


def run_lint(onnx_path: Path, lint_target: str, gpu: TargetProfile | None = None) -> dict:
    """The `slim-trt lint` pre-flight: stop on errors, return the report as a dict, with lint's per-GEMM sparse
    tensor-core prediction for the target GPU (the build report compares it with what TensorRT picked)."""
    try:
        from ..linter import lint
    except ImportError as e:
        raise SlimError("slim_trt.linter is missing from this installation: reinstall slim-trt, or pass --skip-lint "
                        "to build without the pre-flight check") from e
    report = lint(str(onnx_path), target=lint_target, gpu=gpu)
    if not report.ok:
        errors = [f for f in report.findings if f.severity == "error"]
        first = errors[0]
        raise SlimError(f"lint found {len(errors)} error(s) for target {lint_target}, first [{first.rule}] "
                        f"{first.node}: {first.message}; see `slim-trt lint {onnx_path} --target {lint_target}`, "
                        f"fix the export, or pass --skip-lint")
    return {"target": lint_target, "gpu": report.gpu, "ok": True, "summary": report.summary,
            "warnings": [f"[{f.rule}] {f.node + ': ' if f.node else ''}{f.message}" for f in report.findings
                         if f.severity == "warning"],
            "gemms": [{k: getattr(x, k) for k in LINT_GEMM_FIELDS} for x in report.layers]}


def plan_build(onnx_path: str | Path, engine_path: str | Path, *, target: str | TargetProfile | None = None,
               sparsity: bool = True, profiles=None, batch=None, seq=None, past=None,
               workspace_gb: float | None = None, timing_cache: str | Path | None = None,
               plugins: list[str] | tuple[str, ...] = (), skip_lint: bool = False, force: bool = False,
               tensorrt_version: str | None = None, gpu: GpuInfo | None = None) -> BuildPlan:
    """Check and resolve everything the TensorRT build needs; runs the lint pre-flight. No TensorRT needed."""
    onnx = Path(onnx_path)
    if not onnx.is_file():
        raise SlimError(f"{onnx} does not exist: give the model.onnx written by `slim-trt export`")
    if onnx.suffix != ".onnx":
        raise SlimError(f"{onnx} is not an .onnx file: give the model.onnx written by `slim-trt export`")
    engine = Path(engine_path)
    if engine.suffix not in (".plan", ".engine"):
        raise SlimError(f"engine path {engine} should end in .plan (or .engine), e.g. engines/NAME.plan")
    report_path, log_path = side_files(engine)
    if engine.exists() and not force:
        raise SlimError(f"{engine} already exists: pass --force to overwrite it, or choose another -o")
    if workspace_gb is not None and workspace_gb <= 0:
        raise SlimError(f"bad --workspace-gb {workspace_gb}: it must be positive (GiB)")
    cache = Path(timing_cache) if timing_cache else None
    if cache is not None and not cache.parent.is_dir():
        raise SlimError(f"the folder of --timing-cache {cache} does not exist")

    warnings: list[str] = []
    meta = read_sidecar(onnx)
    if meta is None:
        meta = io_from_onnx(onnx)
        warnings.append(f"no slim_export.json beside {onnx.name}: shapes were read from the ONNX graph")

    profile = load_target(target) if isinstance(target, str) else target
    if profile is None and gpu is not None:
        profile = target_for_gpu(gpu)
        if profile is None:
            warnings.append(f"no target profile covers {gpu.name} ({gpu.cc}); generic defaults are used")
    ranges = _ranges_list(profiles, meta, profile, batch, seq, past)
    shapes = [input_profiles(meta, r) for r in ranges]
    if profile is not None:
        warnings += feature_warnings(meta, profile, sparsity)
    workspace = workspace_gb if workspace_gb is not None else (profile.workspace_gb if profile else None)

    if profile is not None:
        need = estimate_memory(onnx, meta, ranges, workspace, profile.memory_budget_gb)
        if not need.fits:
            warnings.append(f"weights + KV cache at the max shapes + workspace need about {need.total_bytes / GB:.1f} "
                            f"GiB, above target {profile.name}'s {profile.memory_budget_gb:g} GiB budget: lower "
                            f"--batch/--seq/--past max")

    needed = required_plugins(meta, onnx)
    libs = resolve_plugins(list(plugins), needed)

    if profile is not None:
        lint_target = profile.lint_target_for(tensorrt_version)
    elif tensorrt_version:
        lint_target = "trt11" if parse_version(tensorrt_version)[0] >= 11 else "trt10"
    else:
        lint_target = "trt10"
    lint_info = None if skip_lint else run_lint(onnx, lint_target, profile)
    if skip_lint:
        warnings.append("lint pre-flight skipped (--skip-lint)")
    else:
        warnings += [f"lint {lint_target}: {w}" for w in lint_info["warnings"]]
    return BuildPlan(onnx=onnx, engine=engine, report=report_path, log=log_path, meta=meta, target=profile,
                     ranges=ranges, shapes=shapes, sparsity=sparsity,
                     workspace_bytes=None if workspace is None else int(workspace * GB), timing_cache=cache,
                     required_plugins=needed, plugins=libs, lint_target=None if skip_lint else lint_target,
                     lint=lint_info, warnings=warnings)


def _try_tensorrt():
    try:
        return import_tensorrt()
    except TensorRTNotInstalled:
        return None  # reported after the checks that need no TensorRT


def build(onnx_path: str | Path, engine_path: str | Path, *, target: str | None = None, sparsity: bool = True,
          profiles=None, workspace_gb: float | None = None, timing_cache: str | Path | None = None,
          plugins: list[str] | tuple[str, ...] = (), verbose: bool = False, batch=None, seq=None, past=None,
          skip_lint: bool = False, force: bool = False) -> BuildReport:
    """Build NAME.plan from an export and write NAME.build.json and NAME.build.log beside it.

    profiles: None (from slim_export.json, the target's defaults and batch/seq/past), a ShapeRanges, a dict
    {"batch": (min, opt, max), "sequence": ..., "past_sequence": ...}, or a list of them (one TensorRT
    optimization profile each). Raises MissingDependencyError without TensorRT or a GPU.
    """
    trt = _try_tensorrt()
    gpu = None
    if target is None:  # the target comes from the GPU, so TensorRT and the GPU are needed up front
        if trt is None:
            import_tensorrt()  # raises the "not installed" error
        gpu = require_gpu()
    plan = plan_build(onnx_path, engine_path, target=target, sparsity=sparsity, profiles=profiles, batch=batch,
                      seq=seq, past=past, workspace_gb=workspace_gb, timing_cache=timing_cache, plugins=plugins,
                      skip_lint=skip_lint, force=force, tensorrt_version=trt.__version__ if trt else None, gpu=gpu)
    if trt is None:
        trt = import_tensorrt()
    if gpu is None:
        gpu = require_gpu()
    if plan.target is not None:
        check_target(plan.target, gpu, trt.__version__)
    return _build_engine(trt, gpu, plan, verbose)


# ----------------------------------------------------------------------------------------------------------
# the TensorRT half (runs only on a GPU machine)
# ----------------------------------------------------------------------------------------------------------

_KEEP_LOGGER = []  # TensorRT keeps a raw pointer to the logger: it must outlive every builder and runtime


def _capturing_logger(trt, verbose: bool):
    """An ILogger that records INFO and above (the "(Sparsity)" lines are INFO) and prints warnings/errors."""
    sev = trt.ILogger.Severity
    names = {sev.INTERNAL_ERROR: "F", sev.ERROR: "E", sev.WARNING: "W", sev.INFO: "I", sev.VERBOSE: "V"}
    shown = {sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING} | ({sev.INFO} if verbose else set())

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity, msg):  # called by TensorRT; must not raise
            try:
                if severity == sev.VERBOSE and not verbose:
                    return
                self.lines.append(f"[{names.get(severity, '?')}] {msg}")
                if severity in shown:
                    print(f"[TRT] {msg}", file=sys.stderr)
            except Exception:  # noqa: BLE001 - an exception must not cross into TensorRT
                pass

    return CapturingLogger()


def _install_logger(trt, verbose: bool):
    # Polygraphy creates every builder/runtime with its one global logger; putting ours there routes the
    # builder's log to us without hand-writing the builder code.
    from polygraphy.backend.trt import util as trt_util

    logger = _capturing_logger(trt, verbose)
    trt_util.TRT_LOGGER = logger
    _KEEP_LOGGER.append(logger)
    return logger


def _build_engine(trt, gpu: GpuInfo, plan: BuildPlan, verbose: bool) -> BuildReport:
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    from .plugins import load_plugins

    logger = _install_logger(trt, verbose)
    load_plugins(trt, plan.plugins, plan.required_plugins)
    major = parse_version(trt.__version__)[0]
    # TensorRT 10 needs the STRONGLY_TYPED flag; 11.x is always strongly typed (the flag is deprecated, ignored).
    network = NetworkFromOnnxPath(str(plan.onnx), strongly_typed=True if major == 10 else None)
    trt_profiles = []
    for shapes in plan.shapes:
        p = Profile()
        for name, (lo, opt, hi) in shapes.items():
            p.add(name, min=lo, opt=opt, max=hi)
        trt_profiles.append(p)
    pools = {trt.MemoryPoolType.WORKSPACE: plan.workspace_bytes} if plan.workspace_bytes else None
    config = CreateConfig(profiles=trt_profiles, sparse_weights=plan.sparsity, memory_pool_limits=pools,
                          load_timing_cache=str(plan.timing_cache) if plan.timing_cache else None,
                          profiling_verbosity=trt.ProfilingVerbosity.DETAILED)

    plan.engine.parent.mkdir(parents=True, exist_ok=True)
    tmp_engine = plan.engine.with_name(plan.engine.name + ".partial")
    tmp_log = plan.log.with_name(plan.log.name + ".partial")
    with G_LOGGER.verbosity(G_LOGGER.INFO if verbose else G_LOGGER.WARNING):
        start = time.perf_counter()
        try:
            engine = EngineFromNetwork(network, config=config,
                                       save_timing_cache=str(plan.timing_cache) if plan.timing_cache else None)()
        except PolygraphyException as e:  # parser or builder failure: keep the log, report one line
            tmp_log.write_text("\n".join(logger.lines) + "\n")
            os.replace(tmp_log, plan.log)
            raise SlimError(f"TensorRT could not build {plan.engine} ({(str(e).strip().splitlines() or ['error'])[-1]}): the "
                            f"builder log is in {plan.log}") from e
        seconds = time.perf_counter() - start
        SaveEngine(engine, str(tmp_engine))()
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    log_text = "\n".join(logger.lines) + "\n"
    report = make_report(engine=str(plan.engine), onnx=str(plan.onnx), tensorrt_version=trt.__version__,
                         gpu=gpu.to_dict(), target=plan.target.to_dict() if plan.target else None,
                         options=plan.options(), build_seconds=seconds, engine_bytes=tmp_engine.stat().st_size,
                         layer_information=info, build_log=log_text, sparsity_enabled=plan.sparsity,
                         lint=plan.lint, extra_warnings=plan.warnings)
    report.files = {"engine": str(plan.engine), "report": str(plan.report), "log": str(plan.log)}
    tmp_log.write_text(log_text)
    os.replace(tmp_engine, plan.engine)
    os.replace(tmp_log, plan.log)
    report.save(plan.report)
    return report
