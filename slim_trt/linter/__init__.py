"""CPU-only lint of an ONNX file against what TensorRT's ONNX parser and builder accept.

    report = lint("export/NAME/model.onnx", target="trt10")          # a TensorRT version's table
    report = lint("export/NAME/model.onnx", target="jetson-orin")    # a GPU profile: its table and its GPU
    report.ok, report.findings, report.layers, report.summary, report.to_dict()

The TensorRT builder calls lint() before building and stops on errors. Support lists live as data in
slim_trt/linter/tables/<target>.json; which GEMMs can run on 2:4 sparse tensor cores, per GPU, in
tables/sparse_math.json (summary["sparse_tensor_cores"], and per layer in report.layers).

May import: exporter (the plugin's name), runtime (the export gate), targets (GPU profiles) and the root helpers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import SlimError
from ..targets.profile import DEFAULT_LINT_TARGET
from .model import GraphView
from .quantized_tables import check_quantized_tables
from .rules import Finding, LayerInfo, check_fp8, check_opset, check_ops, check_plugins, check_qdq, layers_and_sparsity
from .scatter import check_scatter_reduction
from .sparse import SparseGpu, annotate, dynamic_gemms, gpu_for, summarize
from .tables import TARGETS, load_table

__all__ = ["TARGETS", "Finding", "LayerInfo", "LintReport", "lint", "format_report"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class LintReport:
    target: str  # the TensorRT table checked against
    model: str
    findings: list[Finding] = field(default_factory=list)
    layers: list[LayerInfo] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    gpu: str = ""  # the GPU the sparse tensor-core prediction is for

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict:
        return {"target": self.target, "gpu": self.gpu, "model": self.model, "ok": self.ok, "summary": self.summary,
                "findings": [f.to_dict() for f in self.findings], "layers": [x.to_dict() for x in self.layers]}


def _load(model_or_path) -> tuple[onnx.ModelProto, str, Path | None]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "<in-memory model>", None
    from ..runtime.export_folder import check_onnx_file

    path = Path(model_or_path)
    check_onnx_file(path)  # the export gate (sidecar, external data inside the folder, tokenizer) or a parse check
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError / RuntimeWarning-like errors on non-ONNX bytes
        raise SlimError(f"{path} is not an ONNX file ({type(e).__name__}): give a .onnx model") from e
    if not model.graph.node:
        raise SlimError(f"{path} is not an ONNX model (empty graph): give a .onnx model")
    return model, str(path), path


def _expected_2to4(path: Path | None, sidecar: dict | None) -> set[str] | None:
    """Weights the export says are 2:4 (from slim_export.json), or None to fall back on the 50%-zeros heuristic."""
    if sidecar is None and path is not None and (path.parent / "slim_export.json").is_file():
        from ..runtime.export_folder import read_json

        meta = read_json(path.parent / "slim_export.json", "re-run `slim-trt export`")
        if isinstance(meta, dict) and meta.get("model_file") == path.name:
            sidecar = meta
    if sidecar is None:
        return None
    return {r["onnx_weight"] for r in sidecar.get("compressed_layers", []) if r.get("sparsity") == "2:4"}


def resolve_target(target, gpu=None) -> tuple[str, object]:
    """(TensorRT table name, GPU for the sparse prediction) from a table name (trt10, trt11, jetson-orin-jp6) or
    a GPU target profile (name such as jetson-orin, path to a .json, or a TargetProfile)."""
    if isinstance(target, str) and target in TARGETS:
        return target, gpu_for(target, gpu)
    from ..targets.profile import TargetProfile, list_targets, load_target

    if isinstance(target, TargetProfile):
        profile = target
    else:
        try:
            profile = load_target(str(target))
        except SlimError:
            raise SlimError(f"unknown target {target!r}: choose a TensorRT table ({', '.join(TARGETS)}) or a GPU "
                            f"profile ({', '.join(list_targets())}), or give a profile .json path") from None
    return profile.lint_target, gpu_for(profile.lint_target, gpu if gpu is not None else profile)


def lint(onnx_path_or_model, target=DEFAULT_LINT_TARGET, *, sidecar: dict | None = None, gpu=None) -> LintReport:
    """Check a model (path or ModelProto) against `target`: a TensorRT table ("trt10", "trt11",
    "jetson-orin-jp6") or a GPU profile ("jetson-orin", "hopper", ...; its lint table and its GPU features).
    `gpu` (a profile name or TargetProfile) sets the GPU of the sparse tensor-core prediction explicitly."""
    table_name, sparse_gpu = resolve_target(target, gpu)
    table = load_table(table_name)
    model, name, path = _load(onnx_path_or_model)
    view = GraphView(model)
    report = LintReport(target=table_name, model=name, gpu=sparse_gpu.name)
    for rule in (check_opset, check_ops, check_plugins, check_qdq, check_quantized_tables, check_scatter_reduction):
        report.findings.extend(rule(view, table))
    report.findings.extend(check_fp8(view, sparse_gpu.name, bool(sparse_gpu.features.get("fp8")),
                                     sparse_gpu.name == SparseGpu.generic().name))
    layers, sparsity = layers_and_sparsity(view, _expected_2to4(path, sidecar))
    annotate(layers, sparse_gpu)
    report.layers, report.findings = layers, report.findings + sparsity
    report.findings.sort(key=lambda f: SEVERITY_ORDER[f.severity])
    total = sum(x.flops for x in layers)
    eligible = sum(x.flops for x in layers if x.is_2to4)
    report.summary = {
        "target": table["title"], "opset": view.opset, "nodes": len(model.graph.node),
        "gemm_layers": len(layers), "gemm_layers_2to4": sum(x.is_2to4 for x in layers),
        "gemm_flops_per_token": total, "flops_2to4_per_token": eligible,
        "flop_fraction_2to4": (eligible / total) if total else 0.0,
        "sparse_tensor_cores": summarize(layers, dynamic_gemms(view), sparse_gpu),
        "errors": sum(f.severity == "error" for f in report.findings),
        "warnings": sum(f.severity == "warning" for f in report.findings),
    }
    return report


def format_report(report: LintReport, *, show_layers: bool = True) -> str:
    """A plain-text table: findings, the per-layer 2:4 report (like `polygraphy inspect sparsity`), a summary."""
    lines = [f"slim-trt lint: {report.model} against {report.summary['target']}"]
    if report.findings:
        w = max(len(f.rule) for f in report.findings)
        lines.append(f"{'SEVERITY':8}  {'RULE':{w}}  NODE / MESSAGE")
        for f in report.findings:
            lines.append(f"{f.severity.upper():8}  {f.rule:{w}}  {f.node + ': ' if f.node else ''}{f.message}")
    else:
        lines.append("no findings")
    if show_layers and report.layers:
        w = max(len(x.name) for x in report.layers)
        lines.append("")
        lines.append(f"{'LAYER':{w}}  {'K':>6}  {'N':>7}  {'WEIGHT':7}  {'INPUT':7}  {'2:4':3}  GFLOP/token  "
                     f"SPARSE TENSOR CORES")
        for x in report.layers:
            sparse = f"{x.sparse_math.upper()} {x.sparse_form}" if x.sparse_eligible else x.sparse_class
            lines.append(f"{x.name:{w}}  {x.K:6d}  {x.N:7d}  {_short(x.dtype):7}  {_short(x.activation):7}  "
                         f"{'yes' if x.is_2to4 else 'no':3}  {x.flops / 1e9:11.6f}  {sparse}")
    s = report.summary
    lines.append("")
    lines.append(f"{s['gemm_layers_2to4']}/{s['gemm_layers']} constant-weight GEMMs are 2:4 along K: "
                 f"{100 * s['flop_fraction_2to4']:.1f}% of GEMM FLOPs are 2:4-eligible")
    lines.append(s["sparse_tensor_cores"]["line"])
    lines.append(f"{s['errors']} error(s), {s['warnings']} warning(s): {'OK' if report.ok else 'FAILED'}")
    return "\n".join(lines)


def _short(dtype: str) -> str:
    return {"float16": "fp16", "bfloat16": "bf16", "float": "fp32", "float8e4m3fn": "fp8"}.get(dtype, dtype)
