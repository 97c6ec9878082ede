"""The build report (NAME.build.json): what TensorRT did with the 2:4 weights, layer by layer.

Users of ModelOpt and TensorRT-LLM repeatedly find 2:4 models running dense kernels without a word. TensorRT
does say it, in two places this module reads:

1. The builder log, at INFO severity, two lines per build (wording from TensorRT 8.x-10.x builds quoted in
   NVIDIA/TensorRT issues #2169, #4054 and #4056; an empty list after the colon means none):
       (Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51, ...
       (Sparsity) TRT inference plan picked sparse implementation for layers: Conv_22, ...
   Layer names are engine layer names, fused layers joined by " + ", separated by ", ".
2. The engine inspector (IEngineInspector.get_engine_information(LayerInformationFormat.JSON), built with
   ProfilingVerbosity.DETAILED): {"Layers": [{"Name", "LayerType", "Inputs"/"Outputs" (each with "Name",
   "Dimensions" and "Format/Datatype" in TensorRT 10, "Format" + "DataType" in 11), "TacticName",
   "TacticValue", "HasSparseWeights" (convolution/GEMM layers), "Metadata"}, ...], "Bindings": [...] (10.x) or
   "I/O Tensors": [...] (11.x)}. Format: TensorRT developer guide "Engine Inspector" and the 10.x -> 11.x
   IEngineInspector migration page; with a lower profiling verbosity "Layers" holds bare name strings.

The log is the authority for eligible/picked; the inspector adds each layer's type and tactic, and a tactic
name containing "sparse" is shown as corroborating evidence. When the lint pre-flight ran, its per-GEMM sparse
tensor-core prediction (slim_trt.linter.sparse) is set beside what TensorRT listed and picked
(`sparsity.lint_comparison`). Pure functions, no TensorRT.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)$")
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)$")


def _split_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(", ") if n.strip()]


def parse_sparsity_log(log: str) -> tuple[list[str] | None, list[str] | None]:
    """(eligible layer names, picked layer names) from a TensorRT builder log; None when the line is absent.

    The last occurrence wins (a log may hold several builds). Works on trtexec output
    ("[date] [I] [TRT] (Sparsity) ...") and on messages captured from a Python ILogger alike.
    """
    eligible = picked = None
    for line in log.splitlines():
        if m := _ELIGIBLE.search(line):
            eligible = _split_names(m.group(1))
        elif m := _PICKED.search(line):
            picked = _split_names(m.group(1))
    return eligible, picked


def _tensor_dtype(t: dict) -> str | None:
    for key in ("Format/Datatype", "DataType", "Datatype"):
        if isinstance(t.get(key), str):
            return t[key]
    return None


@dataclass
class EngineLayer:
    name: str
    layer_type: str = "unknown"
    tactic: str | None = None
    output_types: list[str] = field(default_factory=list)
    has_sparse_weights: bool | None = None
    origin: str | None = None

    @property
    def sparse_tactic_name(self) -> bool:
        return bool(self.tactic) and "sparse" in self.tactic.lower()


def parse_layer_information(info: str | dict | list) -> tuple[list[EngineLayer], list[str]]:
    """(layers, I/O tensor names) from the engine inspector's JSON (TensorRT 10 or 11 layout)."""
    data = json.loads(info) if isinstance(info, str) else info
    if isinstance(data, list):
        data = {"Layers": data}
    if not isinstance(data, dict) or not isinstance(data.get("Layers"), list):
        raise ValueError("engine information JSON has no 'Layers' list")
    layers = []
    for entry in data["Layers"]:
        if isinstance(entry, str):  # profiling verbosity LAYER_NAMES_ONLY
            layers.append(EngineLayer(name=entry))
            continue
        tactic = entry.get("TacticName") or entry.get("TacticValue")
        sparse = entry.get("HasSparseWeights")
        outputs = [d for t in entry.get("Outputs", []) if isinstance(t, dict) and (d := _tensor_dtype(t))]
        metadata = entry.get("Metadata")
        layers.append(EngineLayer(name=str(entry.get("Name", "")), layer_type=str(entry.get("LayerType", "unknown")),
                                  tactic=str(tactic) if tactic is not None else None, output_types=outputs,
                                  has_sparse_weights=None if sparse is None else bool(int(sparse)),
                                  origin=str(metadata) if metadata else entry.get("Origin")))
    io = data.get("I/O Tensors")  # TensorRT 11
    if isinstance(io, list):
        names = [t["Name"] if isinstance(t, dict) else str(t) for t in io]
    else:
        names = [str(b) for b in data.get("Bindings", [])]  # TensorRT 10
    return layers, names


def sparsity_summary(layers: list[EngineLayer], eligible: list[str] | None, picked: list[str] | None,
                     enabled: bool) -> tuple[dict, str, list[str]]:
    """Per-layer sparsity rows, the one-line summary and the warnings a user must see."""
    warnings: list[str] = []
    eligible_set, picked_set = set(eligible or []), set(picked or [])
    engine_names = {layer.name for layer in layers}
    rows = [{"name": layer.name, "type": layer.layer_type, "tactic": layer.tactic,
             "sparse_eligible": layer.name in eligible_set, "sparse_picked": layer.name in picked_set,
             "has_sparse_weights": layer.has_sparse_weights, "sparse_tactic_name": layer.sparse_tactic_name}
            for layer in layers]
    info = {"enabled": enabled, "log_found": eligible is not None or picked is not None,
            "eligible": sorted(eligible_set), "picked": sorted(picked_set),
            "eligible_count": len(eligible_set), "picked_count": len(picked_set & eligible_set) if eligible_set
            else len(picked_set),
            "eligible_not_in_engine": sorted(eligible_set - engine_names) if engine_names else [],
            "layers": rows}
    if not enabled:
        return info, "sparsity disabled (--no-sparsity): dense build", warnings
    if not info["log_found"]:
        summary = "sparsity unknown: the build log has no (Sparsity) lines"
        warnings.append("TensorRT printed no '(Sparsity)' lines, so this report cannot tell whether sparse kernels "
                        "run; check that the build log was captured at INFO level")
        return info, summary, warnings
    e, p = info["eligible_count"], info["picked_count"]
    summary = f"sparse tactics picked for {p} of {e} eligible layers"
    if e == 0:
        warnings.append("TensorRT found no layer eligible for sparse math, so the engine runs dense kernels: check "
                        "`slim-trt lint` for weights that are not 2:4 along K")
    elif p == 0:
        warnings.append(f"{e} layers were eligible for sparse math but TensorRT picked dense kernels for all of them "
                        "(its timing found them faster at these shapes); try a larger --seq/--batch opt shape")
    elif p < e:
        warnings.append(f"{e - p} eligible layers run dense kernels (TensorRT timed them faster at the opt shapes)")
    stray = picked_set - eligible_set if eligible_set else set()
    if stray:
        warnings.append(f"{len(stray)} layers picked sparse kernels without being listed as eligible: "
                        f"{', '.join(sorted(stray)[:3])}")
    return info, summary, warnings


def _parts(name: str) -> set[str]:
    """The ONNX layer names inside an engine layer name ("a + b + c" for fused layers)."""
    return {p.strip() for p in name.split(" + ")}


def compare_with_lint(gemms: list[dict], layers: list[EngineLayer], eligible: list[str] | None,
                      picked: list[str] | None) -> tuple[dict, list[str]]:
    """Per lint GEMM: predicted eligible (lint) vs listed eligible and picked sparse (TensorRT), and the counts.

    A GEMM is matched by its ONNX node name among the " + "-joined parts of the log's and the inspector's layer
    names. One that appears in neither (fused into a Myelin ForeignNode, or renamed) is "not visible": TensorRT
    did not say, so it counts neither way.
    """
    eligible_parts = set().union(*map(_parts, eligible)) if eligible else set()
    picked_parts = set().union(*map(_parts, picked)) if picked else set()
    engine_parts = set().union(*(_parts(layer.name) for layer in layers)) if layers else set()
    log_found = eligible is not None or picked is not None
    rows, counts = [], Counter()
    for g in gemms:
        name, predicted = g["name"], bool(g["sparse_eligible"])
        visible = log_found and name in (eligible_parts | picked_parts | engine_parts)
        listed = (name in eligible_parts or name in picked_parts) if visible else None
        chosen = (name in picked_parts) if visible else None
        if listed is None:
            verdict = "not-visible"
        elif listed == predicted:
            verdict = "agree"
        else:
            verdict = "lint-only" if predicted else "tensorrt-only"
        counts[verdict] += 1
        counts["predicted"] += predicted
        counts["listed"] += bool(listed)
        counts["picked"] += bool(chosen)
        counts["picked_of_predicted"] += bool(chosen) and predicted
        rows.append({"name": name, "predicted_eligible": predicted, "predicted_class": g.get("sparse_class"),
                     "predicted_math": g.get("sparse_math"), "tensorrt_eligible": listed, "tensorrt_picked": chosen,
                     "verdict": verdict})
    n = len(gemms)
    summary = (f"lint predicted {counts['predicted']} of {n} GEMMs eligible for sparse math, TensorRT listed "
               f"{counts['listed']}: {counts['agree']} agree, {counts['lint-only']} predicted but not listed, "
               f"{counts['tensorrt-only']} listed but not predicted, {counts['not-visible']} not visible; sparse "
               f"kernels picked for {counts['picked_of_predicted']} of the {counts['predicted']} predicted")
    warnings = []
    if counts["lint-only"]:
        first = next(r["name"] for r in rows if r["verdict"] == "lint-only")
        warnings.append(f"{counts['lint-only']} GEMMs lint predicted eligible were not listed eligible by TensorRT "
                        f"(first: {first}): report it with this build.json, the rules are in "
                        f"slim_trt/linter/tables/sparse_math.json")
    if counts["tensorrt-only"]:
        first = next(r["name"] for r in rows if r["verdict"] == "tensorrt-only")
        warnings.append(f"{counts['tensorrt-only']} GEMMs TensorRT listed eligible were predicted not eligible by "
                        f"lint (first: {first}): lint's rules are stricter than this TensorRT")
    info = {"summary": summary, "gemms": n, "predicted": counts["predicted"], "listed": counts["listed"],
            "agree": counts["agree"], "lint_only": counts["lint-only"], "tensorrt_only": counts["tensorrt-only"],
            "not_visible": counts["not-visible"], "picked": counts["picked"],
            "picked_of_predicted": counts["picked_of_predicted"], "layers": rows}
    return info, warnings


@dataclass
class BuildReport:
    engine: str
    onnx: str
    tensorrt_version: str
    gpu: dict
    target: dict | None
    options: dict
    build_seconds: float
    engine_bytes: int
    summary: str
    sparsity: dict
    lint: dict | None = None
    io_tensors: list[str] = field(default_factory=list)
    layer_types: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    files: dict = field(default_factory=dict)
    schema_version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write as JSON through a temporary file, renamed at the end."""
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def format(self) -> str:
        lines = [f"engine      {self.engine} ({self.engine_bytes / 2**20:.1f} MiB, built in {self.build_seconds:.1f} s)",
                 f"tensorrt    {self.tensorrt_version} on {self.gpu.get('name')} "
                 f"(compute capability {self.gpu.get('compute_capability')})"]
        if self.target:
            lines.append(f"target      {self.target.get('name')}")
        lines.append(f"sparsity    {self.summary}")
        if "lint_comparison" in self.sparsity:
            lines.append(f"vs lint     {self.sparsity['lint_comparison']['summary']}")
        lines += [f"warning     {w}" for w in self.warnings]
        return "\n".join(lines)


def make_report(*, engine: str, onnx: str, tensorrt_version: str, gpu: dict, target: dict | None, options: dict,
                build_seconds: float, engine_bytes: int, layer_information: str | dict | list, build_log: str,
                sparsity_enabled: bool, lint: dict | None = None, extra_warnings: list[str] | None = None
                ) -> BuildReport:
    """Assemble the report from the inspector JSON and the captured builder log."""
    layers, io = parse_layer_information(layer_information)
    eligible, picked = parse_sparsity_log(build_log)
    sparsity, summary, warnings = sparsity_summary(layers, eligible, picked, sparsity_enabled)
    if lint and lint.get("gemms") is not None and sparsity_enabled:
        sparsity["lint_comparison"], more = compare_with_lint(lint["gemms"], layers, eligible, picked)
        warnings += more
    return BuildReport(engine=engine, onnx=onnx, tensorrt_version=tensorrt_version, gpu=gpu, target=target,
                       options=options, build_seconds=round(build_seconds, 3), engine_bytes=engine_bytes,
                       summary=summary, sparsity=sparsity, lint=lint, io_tensors=io,
                       layer_types=dict(Counter(layer.layer_type for layer in layers)),
                       warnings=list(extra_warnings or []) + warnings)
