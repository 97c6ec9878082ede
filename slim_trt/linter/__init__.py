"""CPU-only lint of an ONNX file against what TensorRT's ONNX parser and builder accept.

    report = lint("export/NAME/model.onnx", target="trt10")
    report.ok, report.findings, report.layers, report.summary, report.to_dict()

The TensorRT builder calls lint() before building and stops on errors. Support lists live as data in
slim_trt/linter/tables/<target>.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import SlimError
from .model import GraphView
from .quantized_tables import check_quantized_tables
from .rules import Finding, LayerInfo, check_opset, check_ops, check_plugins, check_qdq, layers_and_sparsity
from .tables import TARGETS, load_table

__all__ = ["TARGETS", "Finding", "LayerInfo", "LintReport", "lint", "format_report"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class LintReport:
    target: str
    model: str
    findings: list[Finding] = field(default_factory=list)
    layers: list[LayerInfo] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict:
        return {"target": self.target, "model": self.model, "ok": self.ok, "summary": self.summary,
                "findings": [f.to_dict() for f in self.findings], "layers": [x.to_dict() for x in self.layers]}


def _load(model_or_path) -> tuple[onnx.ModelProto, str, Path | None]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "<in-memory model>", None
    path = Path(model_or_path)
    if not path.is_file():
        raise SlimError(f"{path} does not exist: give the model.onnx written by `slim-trt export`")
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
        meta = json.loads((path.parent / "slim_export.json").read_text())
        if meta.get("model_file") == path.name:
            sidecar = meta
    if sidecar is None:
        return None
    return {r["onnx_weight"] for r in sidecar.get("compressed_layers", []) if r.get("sparsity") == "2:4"}


def lint(onnx_path_or_model, target: str = "trt10", *, sidecar: dict | None = None) -> LintReport:
    """Check a model (path or ModelProto) against `target` ("trt10", "trt11", "jetson-orin-jp6")."""
    table = load_table(target)
    model, name, path = _load(onnx_path_or_model)
    view = GraphView(model)
    report = LintReport(target=target, model=name)
    for rule in (check_opset, check_ops, check_plugins, check_qdq, check_quantized_tables):
        report.findings.extend(rule(view, table))
    layers, sparsity = layers_and_sparsity(view, _expected_2to4(path, sidecar))
    report.layers, report.findings = layers, report.findings + sparsity
    report.findings.sort(key=lambda f: SEVERITY_ORDER[f.severity])
    total = sum(x.flops for x in layers)
    eligible = sum(x.flops for x in layers if x.is_2to4)
    report.summary = {
        "target": table["title"], "opset": view.opset, "nodes": len(model.graph.node),
        "gemm_layers": len(layers), "gemm_layers_2to4": sum(x.is_2to4 for x in layers),
        "gemm_flops_per_token": total, "flops_2to4_per_token": eligible,
        "flop_fraction_2to4": (eligible / total) if total else 0.0,
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
        lines.append(f"{'LAYER':{w}}  {'K':>6}  {'N':>7}  {'DTYPE':7}  {'2:4':3}  GFLOP/token")
        for x in report.layers:
            lines.append(f"{x.name:{w}}  {x.K:6d}  {x.N:7d}  {x.dtype:7}  {'yes' if x.is_2to4 else 'no':3}  "
                         f"{x.flops / 1e9:.6f}")
    s = report.summary
    lines.append("")
    lines.append(f"{s['gemm_layers_2to4']}/{s['gemm_layers']} constant-weight GEMMs are 2:4 along K: "
                 f"{100 * s['flop_fraction_2to4']:.1f}% of GEMM FLOPs are 2:4-eligible")
    lines.append(f"{s['errors']} error(s), {s['warnings']} warning(s): {'OK' if report.ok else 'FAILED'}")
    return "\n".join(lines)
