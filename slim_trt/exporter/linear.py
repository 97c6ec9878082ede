"""Linear layers as ONNX: float MatMul, Q/DQ MatMul for compressed weights, and the low-rank path.

Orientation: torch `Linear.weight` is [N, K]; ONNX `MatMul(X, W)` wants [K, N]. Quantized weights are stored
transposed as INT4/INT8 initializers of shape [K, N], so the 2:4 groups (4 consecutive input columns in torch)
become 4 consecutive rows, and per-group scales block along axis 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..algorithms.qtensor import QuantizedTensor
from ..algorithms.spqr import SpQRTensor
from ..algorithms.zeropoint import signed_codes
from ..checkpoint.compressed_linear import CompressedLinear
from ..errors import SlimError
from .graph import GraphBuilder, fp8_tensor, int_tensor, tensor_from_torch, uint_tensor
from .options import DEFAULT_OUTLIER_FORM, OUTLIER_FORMS

# The plugin node contract shared with the TensorRT plugin (plugins/) and ONNX Runtime (ort_lowrank.py).
LOWRANK_PLUGIN = {"op_type": "LowRankAdd", "domain": "slim_trt", "plugin_version": "1", "plugin_namespace": "slim_trt"}


@dataclass
class LayerRecord:
    """What the sidecar says about one compressed layer."""

    name: str
    onnx_weight: str
    K: int
    N: int
    bits: int
    group_size: int | None
    sparsity: str
    rank: int
    act_scale: float | None = None  # static INT8 scale of the MatMul's input (W8A8), None = float activations

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def dequantized(b: GraphBuilder, qt: QuantizedTensor, name: str, *, transpose: bool) -> str:
    """DequantizeLinear over an integer initializer holding `qt` ([rows, cols]), in the compute dtype.

    transpose=True stores [cols, rows] (the MatMul orientation): per-group scales block along axis 0.
    transpose=False keeps [rows, cols] (the plugin's torch orientation): groups block along axis 1.
    """
    qt = qt.to("cpu")
    if qt.is_fp8:  # FP8 E4M3 initializer, DequantizeLinear without a zero point (its type says FP8)
        return _dequantized_fp8(b, qt, name, transpose=transpose)
    codes, bits, zero = stored_codes(qt)
    q = codes.numpy()
    scale = qt.scale.detach().to(torch.float32)
    rows, cols = q.shape
    if transpose:
        q = np.ascontiguousarray(q.T)
    qname = b.add_initializer(int_tensor(f"{name}.qweight", q, bits) if zero is None
                              else uint_tensor(f"{name}.qweight", q, bits))
    attrs: dict = {}
    if qt.group_size == 0:
        s = scale.reshape(())
    elif qt.group_size == -1:
        s = scale.reshape(rows)
        attrs["axis"] = 1 if transpose else 0
    else:
        s = scale.reshape(rows, -1)
        if transpose:
            s = s.T
        attrs.update(axis=0 if transpose else 1, block_size=int(qt.group_size))
    sname = b.add_initializer(tensor_from_torch(f"{name}.scale", s, b.dtype))
    if zero is None:
        # No zero point: symmetric quantization (or zero points folded into the codes), zero point 0 by
        # definition (TensorRT requires zero).
        return b.op("DequantizeLinear", [qname, sname], name=name, **attrs)
    z = zero.reshape(s.shape) if qt.group_size != -1 else zero.reshape(rows)
    if transpose and qt.group_size > 0:
        z = z.reshape(rows, -1).T
    zname = b.add_initializer(uint_tensor(f"{name}.zero_point", np.ascontiguousarray(z.numpy()), bits))
    return b.op("DequantizeLinear", [qname, sname, zname], name=name, **attrs)


def _dequantized_fp8(b: GraphBuilder, qt: QuantizedTensor, name: str, *, transpose: bool) -> str:
    """float8e4m3fn codes [K, N] (transposed) -> DequantizeLinear (per-channel scale along the output axis, or one
    per tensor). A weight DQ takes no zero point: TensorRT reads FP8 from the initializer's type, and the linter's
    sparsity count reads the codes as they are."""
    q = qt.q.T.contiguous() if transpose else qt.q.contiguous()
    qname = b.add_initializer(fp8_tensor(f"{name}.qweight", q))
    scale = qt.scale.detach().to(torch.float32)
    attrs: dict = {}
    if qt.group_size == -1:
        scale = scale.reshape(qt.shape[0])
        attrs["axis"] = 1 if transpose else 0
    else:
        scale = scale.reshape(())
    sname = b.add_initializer(tensor_from_torch(f"{name}.scale", scale, b.dtype))
    return b.op("DequantizeLinear", [qname, sname], name=name, **attrs)


def stored_codes(qt: QuantizedTensor) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(codes, container bits, zero point or None) of the exported initializer.

    Symmetric weights as they are. Zero-point weights whose q - zero fits signed INT4 (every grid of <= 3 bits,
    SliM-LLM at averages 2 and 3) fold the zero point into signed INT4 codes: the same values, exactly, with
    zero point 0, which both ONNX Runtime and TensorRT run. Others keep unsigned codes and a uint4 / uint8 zero
    point (ONNX Runtime runs them; TensorRT's DequantizeLinear takes only zero points of 0, see the linter)."""
    if qt.zero is None:
        return qt.q, qt.bits, None
    folded = signed_codes(qt)
    if folded is not None:
        return folded, 4, None
    return qt.q, qt.bits, qt.zero


def emit_outliers(b: GraphBuilder, x: str, y: str, table, name: str, form: str = DEFAULT_OUTLIER_FORM) -> str:
    """y + x @ O^T for SpQR's sparse outliers O [N, K] (an OutlierTable), as standard ONNX ops.

    scatter: the nnz products x[..., col] * val, Gather + Mul, added into y[..., row] by ScatterElements
      (reduction add): nnz values, nnz column and nnz row indices, nnz multiply-adds per token.
    columns: Gather the input columns that hold any outlier, MatMul with that dense fp16 slice [|C|, N].
    dense: MatMul with the whole fp16 O^T [K, N] (a second GEMM of the layer's size; for comparison).
    """
    if form not in OUTLIER_FORMS:
        raise ValueError(f"unknown outlier form {form!r}: choose one of {', '.join(OUTLIER_FORMS)}")
    if table is None or table.nnz == 0:
        return y
    cols = table.col  # int32 indices: half the bytes of int64, and every runtime here takes them
    if form == "dense":
        d = b.weight(f"{name}.outliers.dense", table.to_dense(torch.float32).T)
        u = b.op("MatMul", [x, d], name=f"{name}.outliers")
    elif form == "columns":
        used = torch.unique(cols)
        ci = b.add_initializer(tensor_from_torch(f"{name}.outliers.columns", used))
        dense = table.to_dense(torch.float32)[:, used].T  # [|C|, N]
        xc = b.op("Gather", [x, ci], name=f"{name}.outliers", axis=-1)
        u = b.op("MatMul", [xc, b.weight(f"{name}.outliers.values", dense)], name=f"{name}.outliers")
    else:
        ci = b.add_initializer(tensor_from_torch(f"{name}.outliers.col", cols))
        ri = b.add_initializer(tensor_from_torch(f"{name}.outliers.row", table.rows().to(torch.int32)))
        vals = b.weight(f"{name}.outliers.val", table.val.to(torch.float32))
        xg = b.op("Gather", [x, ci], name=f"{name}.outliers", axis=-1)  # [..., nnz]
        upd = b.op("Mul", [xg, vals], name=f"{name}.outliers")
        idx = b.op("Expand", [ri, b.op("Shape", [upd], name=f"{name}.outliers")], name=f"{name}.outliers")
        # ONNX Runtime's CPU ScatterElements adds only in fp32 (fp16 with reduction "add" is refused at run time).
        out = b.op("ScatterElements", [b.to_f32(y, name=f"{name}.outliers"), idx, b.to_f32(upd, name=f"{name}.outliers")],
                   name=f"{name}.outliers", axis=-1, reduction="add")
        return b.to_compute(out, name=f"{name}.outliers")
    return b.op("Add", [y, u], name=f"{name}.outliers")


def symmetric_codes(qt: QuantizedTensor) -> QuantizedTensor:
    """Unsigned codes q in [0, 2^bits - 1] as signed INT4/INT8 codes q - 2^(bits-1) on the same scales, zero point
    0: (q - z) s = (q - m) s + (m - z) s with m = 2^(bits-1); the second term is zero_point_offset's."""
    mid = 2 ** (qt.bits - 1)
    return QuantizedTensor(q=(qt.q.to(torch.int16) - mid).to(torch.int8), scale=qt.scale, bits=4 if qt.bits <= 4 else 8,
                           group_size=qt.group_size)


def zero_point_offset(b: GraphBuilder, x: str, qt: QuantizedTensor, name: str) -> str:
    """x @ C^T with C[n, k] = (m - zero[n, g(k)]) * scale[n, g(k)]: per group of G input columns, the sum of x over
    the group times one fp16 offset per output (Reshape [..., K/G, G], ReduceSum, MatMul [K/G, N])."""
    N, K = qt.shape
    G = qt.group_size
    if G <= 0 or K % G:
        raise SlimError(f"{name}: --zero-points fold needs groups along K that divide K (got group {G}, K {K}); "
                        f"export with --zero-points dq (ONNX Runtime)")
    offset = ((2 ** (qt.bits - 1) - qt.zero.to(torch.float32)) * qt.scale.to(torch.float32)).T  # [K/G, N]
    lead = b.op("Shape", [x], name=f"{name}.zero_offset", end=-1)
    shape = b.op("Concat", [lead, b.const([K // G, G], "i64")], name=f"{name}.zero_offset", axis=0)
    sums = b.op("ReduceSum", [b.op("Reshape", [x, shape], name=f"{name}.zero_offset"), b.const([-1], "i64")],
                name=f"{name}.zero_offset", keepdims=0)
    return b.op("MatMul", [sums, b.weight(f"{name}.zero_offset", offset)], name=f"{name}.zero_offset")


def pad_rank_even(m: CompressedLinear) -> tuple[torch.Tensor, QuantizedTensor | None, torch.Tensor,
                                                QuantizedTensor | None]:
    """The adapters (L, L_q, R, R_q) with an odd rank padded to even by one zero rank-1 term.

    TensorRT packs INT4 in pairs along the last dimension, and the rank is the last dimension of R^T [K, r] (and
    of L [N, r] in the plugin's orientation). A zero column of L and a zero row of R add nothing to L R, so the
    exported arithmetic is unchanged; float adapters need no padding.
    """
    L, Lq, R, Rq = m.lora_L, m.lora_L_q, m.lora_R, m.lora_R_q
    if m.rank % 2 == 0 or not any(f is not None and f.bits == 4 for f in (Lq, Rq)):
        return L, Lq, R, Rq
    L = torch.cat([L, L.new_zeros(L.shape[0], 1)], dim=1)
    R = torch.cat([R, R.new_zeros(1, R.shape[1])], dim=0)
    if Lq is not None:  # [N, r]: groups run along r; r odd and the group even, so the scales keep their shape
        q = torch.cat([Lq.q, Lq.q.new_zeros(Lq.q.shape[0], 1)], dim=1)
        if Lq.group_size > 0 and Lq.scale.shape[1] * Lq.group_size < q.shape[1]:
            scale = torch.cat([Lq.scale, torch.ones_like(Lq.scale[:, :1])], dim=1)
        else:
            scale = Lq.scale
        Lq = QuantizedTensor(q, scale, Lq.bits, Lq.group_size)
    if Rq is not None:  # [r, K]: one more output row, whose scales are 1 (any positive value dequantizes to 0)
        q = torch.cat([Rq.q, Rq.q.new_zeros(1, Rq.q.shape[1])], dim=0)
        scale = Rq.scale if Rq.group_size == 0 else torch.cat([Rq.scale, torch.ones_like(Rq.scale[:1])], dim=0)
        Rq = QuantizedTensor(q, scale, Rq.bits, Rq.group_size)
    return L, Lq, R, Rq


def _factor(b: GraphBuilder, f: torch.Tensor, fq: QuantizedTensor | None, name: str, *, transpose: bool) -> str:
    if fq is not None:
        return dequantized(b, fq, name, transpose=transpose)
    return b.weight(name, f.T if transpose else f)


# The activation pair of layer L is named f"L{ACT_QDQ}/QuantizeLinear" and ".../DequantizeLinear" (verify_w8a8 finds
# them by these names).
ACT_QDQ = "/act"


def activation_qdq(b: GraphBuilder, x: str, scale: float, name: str, fmt: str = "int") -> str:
    """Static symmetric per-tensor INT8 Q/DQ on an activation (zero point an explicit int8 0). fmt "fp8": E4M3
    (zero point an explicit float8e4m3fn 0, which is what makes both ONNX Runtime and TensorRT quantize to FP8;
    saturate=1, what TensorRT always does)."""
    s = b.add_initializer(tensor_from_torch(f"{name}.act_scale", torch.tensor(float(scale)), b.dtype))
    if fmt == "fp8":
        zp = fp8_tensor(f"{name}.act_zero_point", torch.zeros((), dtype=torch.float8_e4m3fn))
        attrs = {"saturate": 1}
    else:
        zp, attrs = tensor_from_torch(f"{name}.act_zero_point", torch.tensor(0, dtype=torch.int8)), {}
    zp = b.add_initializer(zp)
    q = b.op("QuantizeLinear", [x, s, zp], name=f"{name}{ACT_QDQ}", **attrs)
    return b.op("DequantizeLinear", [q, s, zp], name=f"{name}{ACT_QDQ}")


def emit_linear(b: GraphBuilder, x: str, module: nn.Module, name: str, *, lowrank: str = "decomposed",
                act_scale: float | None = None, records: list[LayerRecord] | None = None,
                outliers: str = DEFAULT_OUTLIER_FORM, zero_points: str = "dq") -> str:
    """y = module(x) as ONNX nodes; returns the output name. Appends a LayerRecord for compressed layers."""
    if isinstance(module, CompressedLinear):
        return _emit_compressed(b, x, module, name, lowrank=lowrank, act_scale=act_scale, records=records,
                                outliers=outliers, zero_points=zero_points)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name}: cannot export {type(module).__name__} as a linear layer")
    w = b.weight(f"{name}.weight", module.weight.T)
    y = b.op("MatMul", [x, w], name=name)
    if module.bias is not None:
        y = b.op("Add", [y, b.weight(f"{name}.bias", module.bias)], name=name)
    return y


def _emit_compressed(b, x, m: CompressedLinear, name, *, lowrank, act_scale, records, outliers,
                     zero_points="dq") -> str:
    # --zero-points fold: only where the zero point cannot be folded into signed INT4 codes exactly (4-bit SpQR
    # codes; stored_codes folds every grid of <= 3 bits with no extra term).
    fold = (m.qweight is not None and m.qweight.zero is not None and zero_points == "fold"
            and signed_codes(m.qweight) is None)
    if fold:
        w = dequantized(b, symmetric_codes(m.qweight), name, transpose=True)
        weight_name = f"{name}.qweight"
    elif m.qweight is not None:
        w = dequantized(b, m.qweight, name, transpose=True)
        weight_name = f"{name}.qweight"
    else:  # bits=16: pruned but not quantized
        weight_name = b.weight(f"{name}.weight", m.weight.T)
        w = weight_name
    x_in = activation_qdq(b, x, act_scale, name, m.act_format) if act_scale is not None else x
    y = b.op("MatMul", [x_in, w], name=name)
    if fold:
        y = b.op("Add", [y, zero_point_offset(b, x_in, m.qweight, name)], name=f"{name}.zero_offset")
    if m.bias is not None:
        y = b.op("Add", [y, b.weight(f"{name}.bias", m.bias)], name=name)
    if isinstance(m.qweight, SpQRTensor):  # the outliers read the float input, as the adapters do
        y = emit_outliers(b, x, y, m.qweight.outliers, name, outliers)
    if m.lora_L is not None:
        # The adapters see the unquantized activation: they are the (fp16) correction path.
        L, Lq, R, Rq = pad_rank_even(m)
        if lowrank == "decomposed":
            rt = _factor(b, R, Rq, f"{name}.lora_R", transpose=True)   # [K, r]
            lt = _factor(b, L, Lq, f"{name}.lora_L", transpose=True)   # [r, N]
            t = b.op("MatMul", [x, rt], name=f"{name}.lora_R")
            u = b.op("MatMul", [t, lt], name=f"{name}.lora_L")
            y = b.op("Add", [y, u], name=f"{name}.lora")
        else:
            r = _factor(b, R, Rq, f"{name}.lora_R", transpose=False)   # [r, K]
            l_ = _factor(b, L, Lq, f"{name}.lora_L", transpose=False)  # [N, r]
            b.opsets[LOWRANK_PLUGIN["domain"]] = 1
            y = b.op(LOWRANK_PLUGIN["op_type"], [y, x, r, l_], name=f"{name}.lora", domain=LOWRANK_PLUGIN["domain"],
                     plugin_version=LOWRANK_PLUGIN["plugin_version"],
                     plugin_namespace=LOWRANK_PLUGIN["plugin_namespace"])
    if records is not None:
        # A weight folded with --zero-points fold is dense in the file (pruned codes are -m + zero, cancelled by
        # the offset term); an exact fold (stored_codes) keeps pruned codes at 0.
        bits = stored_codes(m.qweight)[1] if m.qweight is not None else 16  # the exported container
        records.append(LayerRecord(name=name, onnx_weight=weight_name, K=m.in_features, N=m.out_features, bits=bits,
                                   group_size=m.qweight.group_size if m.qweight is not None else None,
                                   sparsity="none" if fold else str(m.sparsity), rank=m.rank, act_scale=act_scale))
    return y

