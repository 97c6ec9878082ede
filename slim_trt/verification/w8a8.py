"""Verifying a W8A8 export: why logits cannot be compared token by token, and what is checked instead.

A model with static per-tensor INT8 activations is discontinuous: a value on the other side of a rounding
boundary moves by a whole step, and every later layer sees a perturbation of about one quantization step, which
flips more roundings. On Gemma 3 270M (the trt-int8-sparse preset) PyTorch against itself, with its input
embeddings scaled by 1 + 1e-7 x N(0, 1), already differs by up to 11.7 in the logits with 75% top-1 agreement,
so any two runtimes (other summation orders, fp16) differ as much. The export is therefore checked in three parts:

  structure         every compressed layer's activation QuantizeLinear/DequantizeLinear pair carries the
                    checkpoint's scale with zero point 0 of the checkpoint's type (int8, or float8e4m3fn for
                    FP8 activations) (exact)
  float activations the graph with those pairs taken out against the checkpoint with act_scale off: weights,
                    adapters, norms (smoothing) and the rest of the arithmetic under the export's usual limits
  whole model       the export as it is against the checkpoint, with limits from the reference's own
                    sensitivity: the worst of FLOOR_DRAWS perturbed PyTorch runs against the clean one, x2

Pure functions on an ONNX ModelProto and on logits; verification.verify drives them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

FLOOR_DRAWS = 3
# Relative size of the reference's input perturbation: about the export dtype's rounding (fp16 2^-11).
FLOOR_EPS = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 1e-3}


def act_scales(model: nn.Module) -> dict[str, float]:
    """{layer name: act_scale} of the checkpoint's compressed linears with static INT8 activations."""
    from ..checkpoint.compressed_linear import CompressedLinear

    return {n: m.act_scale for n, m in model.named_modules()
            if isinstance(m, CompressedLinear) and m.act_scale is not None}


def act_formats(model: nn.Module) -> dict[str, str]:
    """{layer name: "int" | "fp8"} of the same layers: INT8 or FP8 E4M3 activations (issue 24)."""
    from ..checkpoint.compressed_linear import CompressedLinear

    return {n: m.act_format for n, m in model.named_modules()
            if isinstance(m, CompressedLinear) and m.act_scale is not None}


# The zero point's dtype decides the quantized type in ONNX Runtime and in TensorRT's parser (a QuantizeLinear
# without one quantizes to uint8 in ONNX Runtime, INT8 in TensorRT): int8 0 for INT8, float8e4m3fn 0 for FP8.
ZERO_POINT_DTYPE = {"int": "int8", "fp8": "float8_e4m3fn"}


@contextlib.contextmanager
def float_activations(model: nn.Module):
    """The checkpoint with its activation quantization off (the adapters read x as always); restored on exit."""
    from ..checkpoint.compressed_linear import CompressedLinear

    saved = {m: m.act_scale for m in model.modules() if isinstance(m, CompressedLinear)}
    try:
        for m in saved:
            m.act_scale = None
        yield model
    finally:
        for m, s in saved.items():
            m.act_scale = s


def strip_act_qdq(model) -> dict[str, tuple[float, int, str]]:
    """Take every activation Q/DQ pair out of `model` (ModelProto, changed in place): DequantizeLinear's readers
    read QuantizeLinear's input. Returns {layer: (scale, zero point, zero point's dtype)} as the graph had them."""
    from onnx import numpy_helper

    from ..exporter.linear import ACT_QDQ

    g = model.graph
    by_name = {n.name: n for n in g.node}
    inits = {t.name: t for t in g.initializer}  # the exporter writes scales and zero points as initializers

    def value(name: str):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    found, drop, rename = {}, [], {}
    for n in g.node:
        if n.op_type != "QuantizeLinear" or not n.name.endswith(f"{ACT_QDQ}/QuantizeLinear"):
            continue
        layer = n.name[:-len(f"{ACT_QDQ}/QuantizeLinear")]
        dq = by_name.get(f"{layer}{ACT_QDQ}/DequantizeLinear")
        if dq is None or dq.input[0] != n.output[0]:
            continue
        scale, zp = value(n.input[1]), value(n.input[2]) if len(n.input) > 2 else None
        found[layer] = (float(scale.reshape(-1)[0]) if scale is not None and scale.size == 1 else float("nan"),
                        float(zp.reshape(-1)[0].astype("float32")) if zp is not None and zp.size == 1 else 0,
                        str(zp.dtype) if zp is not None else "uint8")
        drop += [n, dq]
        rename[dq.output[0]] = n.input[0]
    for n in drop:
        g.node.remove(n)
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    return found


def check_structure(graph_pairs: dict[str, tuple[float, int, str]], scales: dict[str, float],
                    formats: dict[str, str] | None = None) -> dict:
    """Compare the graph's activation pairs with the checkpoint's scales (and formats, "int" when not given):
    {ok, layers, problems}."""
    problems = []
    for layer, want in scales.items():
        got = graph_pairs.get(layer)
        if got is None:
            problems.append(f"{layer}: no activation QuantizeLinear/DequantizeLinear in the graph")
            continue
        scale, zp, zp_dtype = got
        if not abs(scale - want) <= 1e-6 * want:
            problems.append(f"{layer}: activation scale {scale:g} in the graph, {want:g} in the checkpoint")
        fmt = (formats or {}).get(layer, "int")
        if zp != 0 or zp_dtype != ZERO_POINT_DTYPE[fmt]:
            kind = " for the checkpoint's FP8 activations" if fmt == "fp8" else ""
            problems.append(f"{layer}: zero point {zp:g} ({zp_dtype}); TensorRT needs {ZERO_POINT_DTYPE[fmt]} zero "
                            f"point 0{kind}")
    for layer in sorted(set(graph_pairs) - set(scales)):
        problems.append(f"{layer}: activation Q/DQ in the graph, but the checkpoint quantizes no input there")
    return {"ok": not problems, "layers": len(scales), "problems": problems}


@torch.no_grad()
def sensitivity_floor(model: nn.Module, ids: torch.Tensor, ref: torch.Tensor, eps: float,
                      draws: int = FLOOR_DRAWS, batch_size: int = 4) -> dict:
    """The worst metrics (verification.compare_logits) of `draws` runs of `model` with its input embeddings scaled by
    1 + eps x N(0, 1) (seeded) against its clean logits `ref`."""
    from .compare import compare_logits, reference_logits

    emb = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(draws):
        h = emb.register_forward_hook(
            lambda mod, inp, out: out * (1 + eps * torch.randn(out.shape, generator=gen).to(out)))
        try:
            runs.append(compare_logits(reference_logits(model, ids, batch_size), ref, ids))
        finally:
            h.remove()
    worst = {k: pick(r[k] for r in runs) for k, pick in (("max_abs", max), ("mean_abs", max), ("cosine_min", min),
                                                          ("top1", min), ("ppl_rel", max))}
    return {**worst, "eps": eps, "draws": draws}


@dataclass(frozen=True)
class FloorLimits:
    """Whole-model limits: no worse than twice the reference's own sensitivity, never tighter than `base`."""

    margin: float = 2.0

    def apply(self, base, floor: dict):
        from .compare import Thresholds

        m = self.margin
        return Thresholds(max_abs=max(base.max_abs, m * floor["max_abs"]),
                          mean_abs=max(base.mean_abs, m * floor["mean_abs"]),
                          cosine_min=min(base.cosine_min, max(-1.0, 1.0 - m * (1.0 - floor["cosine_min"]))),
                          top1_min=min(base.top1_min, max(0.0, 1.0 - m * (1.0 - floor["top1"]))),
                          ppl_rel_max=max(base.ppl_rel_max, m * floor["ppl_rel"]))
