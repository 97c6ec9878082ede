"""The whole causal LM as an ONNX graph, built node by node from the PyTorch modules.

Two families of decoders are supported:
  rope decoders (llama, qwen2, gemma3_text): RMSNorm, rotary positions from `position_ids`, GQA, gated MLP;
    Gemma 3 adds (1 + w) norms in fp32, sandwich norms, q/k norms, a scaled embedding, two rope bases and
    sliding-window layers (the window is applied through the mask, so a KV cache longer than the window works).
  opt: LayerNorm, learned positions derived from `attention_mask` (no position_ids input), ReLU MLP, biases.

Attention runs GQA without copying K/V: Q is viewed as [B, Hkv, rep, S, D] and K/V as [B, Hkv, 1, T, D], so
one broadcasting MatMul serves every query head of a KV group. Softmax runs in fp32 with an additive fp32 mask,
like the eager PyTorch path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto
from torch import nn
from tqdm import tqdm

from ..errors import SlimError
from .graph import GraphBuilder
from .head import TokenTable
from .linear import LayerRecord, emit_linear

SUPPORTED = ("llama", "qwen2", "gemma3_text", "opt")
MASK_MIN = float(np.finfo(np.float32).min)


@dataclass
class BuildContext:
    b: GraphBuilder
    lowrank: str
    with_cache: bool
    act_scales: dict[str, float] | None
    records: list[LayerRecord]
    progress: bool = False
    head: str = "none"  # quantization of the embedding / LM head (exporter.head)
    head_record: dict | None = None
    outliers: str = "scatter"  # SpQR outlier form (ExportOptions.outliers)
    zero_points: str = "dq"  # ExportOptions.zero_points

    def linear(self, x: str, module: nn.Module, name: str) -> str:
        scale = None if self.act_scales is None else self.act_scales.get(name)
        return emit_linear(self.b, x, module, name, lowrank=self.lowrank, act_scale=scale, records=self.records,
                           outliers=self.outliers, zero_points=self.zero_points)


def architecture(model: nn.Module) -> str:
    mt = getattr(model.config, "model_type", None)
    if mt == "gemma3":  # the multimodal wrapper config; its text model is what we export
        mt = "gemma3_text"
    if mt not in SUPPORTED:
        raise SlimError(f"cannot export architecture {mt!r}: supported are {', '.join(SUPPORTED)}")
    return mt


def kv_layout(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of the KV cache."""
    c = model.config
    if architecture(model) == "opt":
        return c.num_hidden_layers, c.num_attention_heads, c.hidden_size // c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_key_value_heads, head_dim


# ---------------------------------------------------------------------------------------------------------
# graph inputs, shared pieces
# ---------------------------------------------------------------------------------------------------------

def _declare_io(ctx: BuildContext, model: nn.Module, needs_position_ids: bool) -> dict:
    b = ctx.b
    L, Hkv, D = kv_layout(model)
    total = "total_sequence" if ctx.with_cache else "sequence"
    io = {"input_ids": b.add_input("input_ids", TensorProto.INT64, ["batch", "sequence"]),
          "attention_mask": b.add_input("attention_mask", TensorProto.INT64, ["batch", total])}
    if needs_position_ids:
        io["position_ids"] = b.add_input("position_ids", TensorProto.INT64, ["batch", "sequence"])
    io["past"] = []
    if ctx.with_cache:
        for i in range(L):
            k = b.add_input(f"past_key_values.{i}.key", b.float_type, ["batch", Hkv, "past_sequence", D])
            v = b.add_input(f"past_key_values.{i}.value", b.float_type, ["batch", Hkv, "past_sequence", D])
            io["past"].append((k, v))
    # Sequence and past lengths as 1-element int64 tensors.
    io["seq_len"] = b.op("Shape", [io["input_ids"]], name="lengths/seq", start=1, end=2)
    if ctx.with_cache:
        io["past_len"] = b.op("Shape", [io["past"][0][0]], name="lengths/past", start=2, end=3)
    else:
        io["past_len"] = b.const([0], "i64")
    io["total_len"] = b.op("Add", [io["past_len"], io["seq_len"]], name="lengths/total")
    return io


def _declare_outputs(ctx: BuildContext, model: nn.Module, logits: str, presents: list[tuple[str, str]], vocab: int):
    b = ctx.b
    b.identity_to(logits, "logits", name="logits")
    b.add_output("logits", b.float_type, ["batch", "sequence", vocab])
    if ctx.with_cache:
        _, Hkv, D = kv_layout(model)
        for i, (k, v) in enumerate(presents):
            b.identity_to(k, f"present.{i}.key", name=f"present.{i}")
            b.identity_to(v, f"present.{i}.value", name=f"present.{i}")
            b.add_output(f"present.{i}.key", b.float_type, ["batch", Hkv, "total_sequence", D])
            b.add_output(f"present.{i}.value", b.float_type, ["batch", Hkv, "total_sequence", D])


def _mask(ctx: BuildContext, io: dict, window: int | None, cache: dict) -> str:
    """Additive fp32 mask [B, 1, 1, S, T]: causal (by absolute cache position), padding, optional window."""
    if window in cache:
        return cache[window]
    b = ctx.b
    n = f"mask_w{window}" if window else "mask"
    if "positions" not in cache:
        scalar = lambda t, nm: b.op("Squeeze", [t, b.const([0], "i64")], name=nm)  # noqa: E731
        past, total = scalar(io["past_len"], "mask/past"), scalar(io["total_len"], "mask/total")
        one, zero = b.const(1, "i64"), b.const(0, "i64")
        q_pos = b.op("Range", [past, total, one], name="mask/q_pos")                      # [S]
        k_pos = b.op("Range", [zero, total, one], name="mask/k_pos")                      # [T]
        q_col = b.op("Unsqueeze", [q_pos, b.const([1], "i64")], name="mask/q_col")        # [S, 1]
        k_row = b.op("Unsqueeze", [k_pos, b.const([0], "i64")], name="mask/k_row")        # [1, T]
        pad = b.op("Cast", [io["attention_mask"]], name="mask/pad", to=TensorProto.BOOL)  # [B, T]
        pad = b.op("Unsqueeze", [pad, b.const([1, 2, 3], "i64")], name="mask/pad")       # [B, 1, 1, 1, T]
        causal = b.op("LessOrEqual", [k_row, q_col], name="mask/causal")                 # [S, T]
        cache["positions"] = (q_col, k_row, pad, causal)
    q_col, k_row, pad, causal = cache["positions"]
    allowed = causal
    if window:
        lo = b.op("Sub", [q_col, b.const(int(window), "i64")], name=f"{n}/lo")
        allowed = b.op("And", [allowed, b.op("Greater", [k_row, lo], name=n)], name=n)
    allowed = b.op("And", [allowed, pad], name=n)                                         # [B, 1, 1, S, T]
    cache[window] = b.op("Where", [allowed, b.const(0.0, "f32"), b.const(MASK_MIN, "f32")], name=n)
    return cache[window]


def _heads(b: GraphBuilder, x: str, n_heads: int, head_dim: int, name: str) -> str:
    """[B, S, H*D] -> [B, H, S, D]."""
    x = b.op("Reshape", [x, b.const([0, 0, n_heads, head_dim], "i64")], name=name)
    return b.op("Transpose", [x], name=name, perm=[0, 2, 1, 3])


def _attention(b: GraphBuilder, q: str, k: str, v: str, mask: str, *, n_heads: int, n_kv: int, head_dim: int,
               scaling: float, softcap: float | None, name: str) -> str:
    """softmax(q k^T * scaling + mask) v for q [B,H,S,D], k/v [B,Hkv,T,D]; returns [B, S, H*D]."""
    rep = n_heads // n_kv
    q5 = b.op("Reshape", [q, b.const([0, n_kv, rep, -1, head_dim], "i64")], name=f"{name}/q")
    k5 = b.op("Unsqueeze", [k, b.const([2], "i64")], name=f"{name}/k")
    v5 = b.op("Unsqueeze", [v, b.const([2], "i64")], name=f"{name}/v")
    kt = b.op("Transpose", [k5], name=f"{name}/k", perm=[0, 1, 2, 4, 3])
    s = b.op("MatMul", [q5, kt], name=f"{name}/qk")
    if scaling != 1.0:
        s = b.op("Mul", [s, b.const(scaling, "float")], name=f"{name}/qk")
    if softcap:
        s = b.op("Div", [s, b.const(softcap, "float")], name=f"{name}/softcap")
        s = b.op("Tanh", [s], name=f"{name}/softcap")
        s = b.op("Mul", [s, b.const(softcap, "float")], name=f"{name}/softcap")
    s = b.to_f32(s, name=f"{name}/qk")
    s = b.op("Add", [s, mask], name=f"{name}/mask")
    p = b.op("Softmax", [s], name=f"{name}/softmax", axis=-1)
    p = b.to_compute(p, name=f"{name}/softmax")
    o = b.op("MatMul", [p, v5], name=f"{name}/pv")                                        # [B, Hkv, rep, S, D]
    o = b.op("Reshape", [o, b.const([0, n_heads, -1, head_dim], "i64")], name=f"{name}/o")
    o = b.op("Transpose", [o], name=f"{name}/o", perm=[0, 2, 1, 3])
    return b.op("Reshape", [o, b.const([0, 0, n_heads * head_dim], "i64")], name=f"{name}/o")


def _activation(b: GraphBuilder, x: str, act: str, name: str) -> str:
    if act == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x], name=name)], name=name)
    if act in ("gelu_pytorch_tanh", "gelu_new"):
        return b.op("Gelu", [x], name=name, approximate="tanh")
    if act == "gelu":
        return b.op("Gelu", [x], name=name)
    if act == "relu":
        return b.op("Relu", [x], name=name)
    raise SlimError(f"cannot export activation {act!r}: supported are silu, gelu, gelu_pytorch_tanh, relu")


def _rms_norm(b: GraphBuilder, x: str, norm: nn.Module, name: str, *, gemma: bool) -> str:
    """RMSNorm computed in fp32 like the PyTorch module (Gemma: (x * (1 + w)) then cast; Llama: cast then * w)."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    xf = b.to_f32(x, name=name)
    ms = b.op("ReduceMean", [b.op("Mul", [xf, xf], name=name), b.const([-1], "i64")], name=name, keepdims=1)
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [ms, b.const(eps, "f32")], name=name)], name=name)],
               name=name)
    y = b.op("Mul", [xf, inv], name=name)
    if gemma:
        y = b.op("Mul", [y, b.weight(f"{name}.weight_plus_one", 1.0 + norm.weight.float(), "fp32")], name=name)
        return b.to_compute(y, name=name)
    y = b.to_compute(y, name=name)
    return b.op("Mul", [y, b.weight(f"{name}.weight", norm.weight)], name=name)


# ---------------------------------------------------------------------------------------------------------
# rope decoders: llama, qwen2, gemma3_text
# ---------------------------------------------------------------------------------------------------------

def _rope_tables(model: nn.Module) -> tuple[dict, list]:
    """Per layer type: (inv_freq, attention_scaling); and each layer's type."""
    rot = model.model.rotary_emb
    rope_type = getattr(rot, "rope_type", "default")
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    for t in types:
        if t in ("dynamic", "longrope"):
            raise SlimError(f"cannot export rope type {t!r}: its frequencies depend on the sequence length")
    layer_types = list(getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers)
    tables = {}
    for lt in set(layer_types):
        if hasattr(rot, f"{lt}_inv_freq"):
            tables[lt] = (getattr(rot, f"{lt}_inv_freq"), float(getattr(rot, f"{lt}_attention_scaling")))
        else:
            tables[lt] = (rot.inv_freq, float(rot.attention_scaling))
    return tables, layer_types


def _rope_cos_sin(b: GraphBuilder, pos_f: str, inv_freq: torch.Tensor, scaling: float, name: str):
    """cos, sin of shape [B, 1, S, D] in the compute dtype (computed in fp32)."""
    f = b.op("Unsqueeze", [pos_f, b.const([2], "i64")], name=name)
    f = b.op("Mul", [f, b.weight(f"{name}.inv_freq", inv_freq.float(), "fp32")], name=name)   # [B, S, D/2]
    emb = b.op("Concat", [f, f], name=name, axis=-1)
    out = []
    for fn in ("Cos", "Sin"):
        t = b.op(fn, [emb], name=name)
        if scaling != 1.0:
            t = b.op("Mul", [t, b.const(scaling, "f32")], name=name)
        t = b.to_compute(t, name=name)
        out.append(b.op("Unsqueeze", [t, b.const([1], "i64")], name=name))
    return out


def _apply_rope(b: GraphBuilder, x: str, cos: str, sin: str, name: str) -> str:
    x1, x2 = b.op("Split", [x], name=name, outputs=2, axis=-1, num_outputs=2)
    rot = b.op("Concat", [b.op("Neg", [x2], name=name), x1], name=name, axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos], name=name), b.op("Mul", [rot, sin], name=name)], name=name)


def build_rope_decoder(ctx: BuildContext, model: nn.Module) -> None:
    b, cfg = ctx.b, model.config
    arch = architecture(model)
    gemma = arch == "gemma3_text"
    L, Hkv, D = kv_layout(model)
    H = cfg.num_attention_heads
    act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    io = _declare_io(ctx, model, needs_position_ids=True)
    inner = model.model

    embed = inner.embed_tokens
    table = TokenTable(b, model, embed, "model.embed_tokens", ctx.head)
    h = table.lookup(io["input_ids"])
    if hasattr(embed, "embed_scale"):
        h = b.op("Mul", [h, b.const(float(embed.embed_scale.to(embed.weight.dtype)), "float")], name="model.embed_tokens")

    tables, layer_types = _rope_tables(model)
    pos_f = b.op("Cast", [io["position_ids"]], name="rope/positions", to=TensorProto.FLOAT)
    rope = {lt: _rope_cos_sin(b, pos_f, inv, sc, f"rope.{lt}") for lt, (inv, sc) in tables.items()}
    masks: dict = {}
    presents = []
    layers = list(enumerate(inner.layers))
    for i, layer in tqdm(layers, desc="export", unit="layer", disable=not ctx.progress):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        window = getattr(attn, "sliding_window", None)
        mask = _mask(ctx, io, window, masks)
        cos, sin = rope[layer_types[i]]

        x = _rms_norm(b, h, layer.input_layernorm, f"{p}.input_layernorm", gemma=gemma)
        q = _heads(b, ctx.linear(x, attn.q_proj, f"{p}.self_attn.q_proj"), H, D, f"{p}.self_attn.q")
        k = _heads(b, ctx.linear(x, attn.k_proj, f"{p}.self_attn.k_proj"), Hkv, D, f"{p}.self_attn.k")
        v = _heads(b, ctx.linear(x, attn.v_proj, f"{p}.self_attn.v_proj"), Hkv, D, f"{p}.self_attn.v")
        if hasattr(attn, "q_norm"):
            q = _rms_norm(b, q, attn.q_norm, f"{p}.self_attn.q_norm", gemma=gemma)
            k = _rms_norm(b, k, attn.k_norm, f"{p}.self_attn.k_norm", gemma=gemma)
        q = _apply_rope(b, q, cos, sin, f"{p}.self_attn.rope_q")
        k = _apply_rope(b, k, cos, sin, f"{p}.self_attn.rope_k")
        if ctx.with_cache:
            pk, pv = io["past"][i]
            k = b.op("Concat", [pk, k], name=f"{p}.self_attn.cache_k", axis=2)
            v = b.op("Concat", [pv, v], name=f"{p}.self_attn.cache_v", axis=2)
        presents.append((k, v))
        o = _attention(b, q, k, v, mask, n_heads=H, n_kv=Hkv, head_dim=D, scaling=float(attn.scaling),
                       softcap=getattr(cfg, "attn_logit_softcapping", None), name=f"{p}.self_attn")
        o = ctx.linear(o, attn.o_proj, f"{p}.self_attn.o_proj")
        if gemma:
            o = _rms_norm(b, o, layer.post_attention_layernorm, f"{p}.post_attention_layernorm", gemma=True)
        h = b.op("Add", [h, o], name=f"{p}.residual_attn")

        mlp_norm = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
        x = _rms_norm(b, h, mlp_norm, f"{p}.{'pre_feedforward' if gemma else 'post_attention'}_layernorm",
                      gemma=gemma)
        g = _activation(b, ctx.linear(x, layer.mlp.gate_proj, f"{p}.mlp.gate_proj"), act, f"{p}.mlp.act")
        u = ctx.linear(x, layer.mlp.up_proj, f"{p}.mlp.up_proj")
        m = ctx.linear(b.op("Mul", [g, u], name=f"{p}.mlp"), layer.mlp.down_proj, f"{p}.mlp.down_proj")
        if gemma:
            m = _rms_norm(b, m, layer.post_feedforward_layernorm, f"{p}.post_feedforward_layernorm", gemma=True)
        h = b.op("Add", [h, m], name=f"{p}.residual_mlp")

    h = _rms_norm(b, h, inner.norm, "model.norm", gemma=gemma)
    logits = table.head(h, ctx.linear)
    ctx.head_record = table.record
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = b.op("Mul", [b.op("Tanh", [b.op("Div", [logits, b.const(cap, "float")], name="softcap")],
                                   name="softcap"), b.const(cap, "float")], name="softcap")
    _declare_outputs(ctx, model, logits, presents, cfg.vocab_size)


# ---------------------------------------------------------------------------------------------------------
# OPT
# ---------------------------------------------------------------------------------------------------------

def _layer_norm(b: GraphBuilder, x: str, ln: nn.LayerNorm, name: str) -> str:
    if ln.weight is None:
        raise SlimError(f"{name}: LayerNorm without affine weights is not supported by the exporter")
    bias = b.weight(f"{name}.bias", ln.bias) if ln.bias is not None else b.weight(f"{name}.bias", torch.zeros_like(ln.weight))
    return b.op("LayerNormalization", [x, b.weight(f"{name}.weight", ln.weight), bias], name=name,
                axis=-1, epsilon=float(ln.eps), stash_type=1)


def build_opt(ctx: BuildContext, model: nn.Module) -> None:
    b, cfg = ctx.b, model.config
    dec = model.model.decoder
    L, H, D = kv_layout(model)
    io = _declare_io(ctx, model, needs_position_ids=False)

    table = TokenTable(b, model, dec.embed_tokens, "model.decoder.embed_tokens", ctx.head)
    h = table.lookup(io["input_ids"])
    if dec.project_in is not None:
        h = ctx.linear(h, dec.project_in, "model.decoder.project_in")
    # Positions as in OPTLearnedPositionalEmbedding: cumsum of the mask, minus one, the last S of them, + 2.
    am = io["attention_mask"]
    pos = b.op("CumSum", [am, b.const(1, "i64")], name="positions")
    pos = b.op("Sub", [b.op("Mul", [pos, am], name="positions"), b.const(1, "i64")], name="positions")
    pos = b.op("Slice", [pos, io["past_len"], b.const([2**62], "i64"), b.const([1], "i64")], name="positions")
    pos = b.op("Add", [pos, b.const(dec.embed_positions.offset, "i64")], name="positions")
    pe = b.weight("model.decoder.embed_positions.weight", dec.embed_positions.weight)
    h = b.op("Add", [h, b.op("Gather", [pe, pos], name="model.decoder.embed_positions")], name="embed")

    masks: dict = {}
    presents = []
    for i, layer in tqdm(list(enumerate(dec.layers)), desc="export", unit="layer", disable=not ctx.progress):
        p = f"model.decoder.layers.{i}"
        attn = layer.self_attn
        mask = _mask(ctx, io, None, masks)
        residual = h
        x = _layer_norm(b, h, layer.self_attn_layer_norm, f"{p}.self_attn_layer_norm") if layer.do_layer_norm_before else h
        q = ctx.linear(x, attn.q_proj, f"{p}.self_attn.q_proj")
        q = b.op("Mul", [q, b.const(float(attn.scaling), "float")], name=f"{p}.self_attn.q_scale")
        q = _heads(b, q, H, D, f"{p}.self_attn.q")
        k = _heads(b, ctx.linear(x, attn.k_proj, f"{p}.self_attn.k_proj"), H, D, f"{p}.self_attn.k")
        v = _heads(b, ctx.linear(x, attn.v_proj, f"{p}.self_attn.v_proj"), H, D, f"{p}.self_attn.v")
        if ctx.with_cache:
            pk, pv = io["past"][i]
            k = b.op("Concat", [pk, k], name=f"{p}.self_attn.cache_k", axis=2)
            v = b.op("Concat", [pv, v], name=f"{p}.self_attn.cache_v", axis=2)
        presents.append((k, v))
        o = _attention(b, q, k, v, mask, n_heads=H, n_kv=H, head_dim=D, scaling=1.0, softcap=None,
                       name=f"{p}.self_attn")
        o = ctx.linear(o, attn.out_proj, f"{p}.self_attn.out_proj")
        h = b.op("Add", [residual, o], name=f"{p}.residual_attn")
        if not layer.do_layer_norm_before:
            h = _layer_norm(b, h, layer.self_attn_layer_norm, f"{p}.self_attn_layer_norm")
        residual = h
        x = _layer_norm(b, h, layer.final_layer_norm, f"{p}.final_layer_norm") if layer.do_layer_norm_before else h
        x = _activation(b, ctx.linear(x, layer.fc1, f"{p}.fc1"), cfg.activation_function, f"{p}.act")
        h = b.op("Add", [residual, ctx.linear(x, layer.fc2, f"{p}.fc2")], name=f"{p}.residual_mlp")
        if not layer.do_layer_norm_before:
            h = _layer_norm(b, h, layer.final_layer_norm, f"{p}.final_layer_norm")

    if dec.final_layer_norm is not None:
        h = _layer_norm(b, h, dec.final_layer_norm, "model.decoder.final_layer_norm")
    if dec.project_out is not None:
        h = ctx.linear(h, dec.project_out, "model.decoder.project_out")
    logits = table.head(h, ctx.linear)
    ctx.head_record = table.record
    _declare_outputs(ctx, model, logits, presents, cfg.vocab_size)


def build(ctx: BuildContext, model: nn.Module) -> None:
    if architecture(model) == "opt":
        build_opt(ctx, model)
    else:
        build_rope_decoder(ctx, model)
