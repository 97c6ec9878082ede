"""Which GEMMs TensorRT can run on 2:4 sparse tensor cores, and why the others cannot.

The rules are data (tables/sparse_math.json, each rule with its NVIDIA source): a GEMM with a build-time constant
weight is eligible when the weight is 2:4 along K, the activation x weight precisions form one of the sparse
maths (INT8 x INT8, FP16 x FP16, FP8 x FP8), the target GPU has tensor cores for that math, and K and N are
multiples of the sparse tile. INT4 weights are weight-only (no sparse math). The first rule a GEMM breaks is
its class. Eligible does not mean picked: TensorRT times the sparse kernel against the dense one at build time
(`build.json` shows what it picked, next to this prediction), and an eligible INT8 GEMM has a form: int8-in/
int8-out (an INT8 epilogue: sparse INT8 tactics are candidates) or int8-in/float-out (allowed, but TensorRT is
reported to pick sparse INT8 tactics only with an INT8 epilogue), from the table's "epilogue" rules.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

from .model import GraphView
from .rules import STANDARD_DOMAINS, LayerInfo, _trace_weight

CLASSES = ("eligible", "int4-weight-only", "not-2to4", "precision", "gpu", "shape", "dynamic-weight")
# Short forms for the summary line ("126 are INT4 weight-only").
LABELS = {"int4-weight-only": "INT4 weight-only", "precision": "in a precision without sparse math",
          "gpu": "without sparse tensor cores for their precision on this GPU", "shape": "not tile-aligned"}


@lru_cache(maxsize=None)
def sparse_rules() -> dict:
    return json.loads(files("slim_trt.linter").joinpath("tables", "sparse_math.json").read_text())


@dataclass(frozen=True)
class SparseGpu:
    """The GPU features the prediction assumes: a target profile's `supports`, or the generic Ampere-or-later GPU."""

    name: str
    features: dict
    note: str = ""

    @staticmethod
    def generic() -> "SparseGpu":
        g = sparse_rules()["generic_gpu"]
        return SparseGpu(g["name"], dict(g["features"]), g["note"])

    @staticmethod
    def from_profile(profile) -> "SparseGpu":
        return SparseGpu(profile.name, dict(profile.supports), profile.description)


def gpu_for(table: str, gpu=None) -> SparseGpu:
    """The GPU to predict for: `gpu` (a TargetProfile or a profile name), else the GPU a lint table implies
    (jetson-orin-jp6 -> jetson-orin), else the generic one."""
    if gpu is None:
        gpu = sparse_rules()["gpu_for_table"].get(table)
    if gpu is None:
        return SparseGpu.generic()
    if isinstance(gpu, str):
        from ..targets.profile import load_target

        gpu = load_target(gpu)
    return SparseGpu.from_profile(gpu)


def classify(layer: LayerInfo, gpu: SparseGpu) -> tuple[str, str | None, str]:
    """(class, math, reason) of one constant-weight GEMM: the first rule of sparse_math.json it breaks."""
    rules = sparse_rules()
    if layer.dtype in rules["weight_only"]["dtypes"]:
        return "int4-weight-only", None, rules["weight_only"]["reason"]
    if not layer.is_2to4:
        why = (f"K = {layer.K} is not a multiple of 4" if layer.K % 4 else
               f"{layer.groups_violating} groups of 4 along K keep more than 2 values")
        return "not-2to4", None, f"the weight is not 2:4 along K ({why})"
    math = next((m for m, r in rules["math"].items()
                 if layer.activation in r["activation"] and layer.dtype in r["weight"]), None)
    if math is None:
        undocumented = rules["undocumented_precisions"]
        if layer.activation == layer.dtype and layer.dtype in undocumented:
            return "precision", None, undocumented[layer.dtype]
        if layer.dtype in ("int8", "float8e4m3fn"):
            return "precision", None, (f"a {layer.dtype} weight with a {layer.activation} activation is not an "
                                       f"{layer.dtype} x {layer.dtype} GEMM: quantize the activation too (INT8: "
                                       f"`slim-trt export --act-quant int8`)")
        return "precision", None, (f"{layer.activation} activation x {layer.dtype} weight has no sparse tensor-core "
                                   f"math (INT8 x INT8, FP16 x FP16, FP8 x FP8)")
    rule = rules["math"][math]
    missing = [f for f in rule["gpu_features"] if not gpu.features.get(f, False)]
    if missing:
        return "gpu", math, f"{gpu.name} lacks {', '.join(missing)} tensor-core support for {math.upper()} math"
    multiple = rule["multiple_of"]
    if layer.K % multiple or layer.N % multiple:
        return "shape", math, (f"K = {layer.K}, N = {layer.N}: sparse {math.upper()} GEMMs need both to be multiples "
                               f"of {multiple}")
    reason = f"{math.upper()} x {math.upper()} 2:4 sparse math"
    hint = rules["size_hint"]["min_dim"]
    if min(layer.K, layer.N) < hint:
        reason += (f"; narrower than {hint} (K = {layer.K}, N = {layer.N}), so TensorRT will likely time the dense "
                   f"kernel faster")
    return "eligible", math, reason


def epilogue(layer: LayerInfo, math: str) -> tuple[str, str, str]:
    """(form, expectation, reason) of an eligible GEMM from the precision its result leaves in."""
    forms = sparse_rules()["epilogue"]["forms"][math]
    rule = forms.get(layer.output) or forms.get("float") or next(iter(forms.values()))
    return rule["form"], rule["expect"], rule["reason"]


def annotate(layers: list[LayerInfo], gpu: SparseGpu) -> None:
    for layer in layers:
        cls, math, reason = classify(layer, gpu)
        layer.sparse_eligible, layer.sparse_class, layer.sparse_math, layer.sparse_reason = \
            cls == "eligible", cls, math, reason
        if cls == "eligible":
            layer.sparse_form, layer.sparse_expect, why = epilogue(layer, math)
            layer.sparse_reason = f"{reason}; {layer.sparse_form}: {why}"


def dynamic_gemms(v: GraphView) -> list[str]:
    """MatMul/Gemm nodes whose second operand is a run-time tensor (attention products, computed weights)."""
    out = []
    for n in v.model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.domain in STANDARD_DOMAINS and len(n.input) >= 2:
            if _trace_weight(v, n.input[1]) is None:
                out.append(n.name)
    return out


def summarize(layers: list[LayerInfo], dynamic: list[str], gpu: SparseGpu) -> dict:
    """Counts and FLOP shares per class, and the one-line summary."""
    total = sum(x.flops for x in layers)
    classes = {}
    for cls in CLASSES:
        members = [x for x in layers if x.sparse_class == cls]
        flops = sum(x.flops for x in members)
        classes[cls] = {"gemms": len(members), "gemms_2to4": sum(x.is_2to4 for x in members),
                        "flops_per_token": flops, "flop_fraction": flops / total if total else 0.0}
    classes["dynamic-weight"] = {"gemms": len(dynamic), "gemms_2to4": 0, "flops_per_token": None,
                                 "flop_fraction": None}  # their FLOPs grow with the sequence length
    eligible = [x for x in layers if x.sparse_eligible]
    n_2to4 = sum(x.is_2to4 for x in layers)
    hint = sparse_rules()["size_hint"]["min_dim"]
    small = sum(min(x.K, x.N) < hint for x in eligible)
    line = f"sparse tensor cores ({gpu.name}): "
    if n_2to4 == 0:
        line += f"no GEMM is 2:4 along K (0 of {len(layers)} constant-weight GEMMs), so none is eligible"
    else:
        line += f"{len(eligible)} of {n_2to4} 2:4 GEMMs eligible"
        maths = {m: sum(x.sparse_math == m for x in eligible) for m in sparse_rules()["math"]}
        if maths.get("fp8"):  # name FP8 where it is the math (the INT8 line stays as it was)
            line += " (" + ", ".join(f"{c} {m.upper()} x {m.upper()}" for m, c in maths.items() if c) + ")"
        blocked = [f"{classes[c]['gemms_2to4']} are {LABELS[c]}" for c in LABELS if classes[c]["gemms_2to4"]]
        if blocked:
            line += f" ({', '.join(blocked)})"
        if small:
            line += f"; {small} of the eligible are narrower than {hint} and likely to run dense"
    forms: dict[str, int] = {}
    for x in eligible:
        forms[x.sparse_form] = forms.get(x.sparse_form, 0) + 1
    unlikely = [x for x in eligible if x.sparse_expect == "allowed-but-unlikely"]
    if unlikely:
        kinds = sorted({x.sparse_math.upper() for x in unlikely})
        tactics = " / ".join(f"sparse {k} tactics for {k}-out GEMMs" for k in kinds)
        line += (f"; {len(unlikely)} of the eligible are {', '.join(sorted({x.sparse_form for x in unlikely}))} "
                 f"(allowed, but TensorRT picks {tactics}{', assumed from INT8 for FP8, not measured' if 'FP8' in kinds else ''}"
                 f": expect dense)")
    fraction = classes["eligible"]["flop_fraction"]
    line += f"; {100 * fraction:.1f}% of constant-weight GEMM FLOPs can run sparse"
    return {"gpu": gpu.name, "gpu_features": gpu.features, "line": line, "gemms": len(layers),
            "gemms_2to4": n_2to4, "eligible": len(eligible), "eligible_narrow": small,
            "flop_fraction_eligible": fraction,
            "math": {m: sum(x.sparse_math == m for x in eligible) for m in sparse_rules()["math"]},
            "forms": forms, "sparse_tactics_available": sum(x.sparse_expect == "sparse-tactics-available"
                                                            for x in eligible),
            "allowed_but_unlikely": len(unlikely),
            "classes": classes, "dynamic_gemms": len(dynamic), "rules": "slim_trt/linter/tables/sparse_math.json"}

