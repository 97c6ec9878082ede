"""The exported graph as ONNX Runtime runs it: an in-memory rewrite; the file on disk keeps the TensorRT form.

ONNX Runtime fuses DequantizeLinear(INT4/INT8 [K, N], axis 0) -> MatMul into MatMulNBits by itself (packed integer
weights, never a float copy). Three forms of an export need help to reach the same kernels:

- `LowRankAdd(Y, X, R, L)` (the TensorRT plugin node of a `--lowrank plugin` export) has no ONNX Runtime kernel. It
  becomes the decomposed arithmetic it stands for, `Y + MatMul(MatMul(X, R^T), L^T)`, with the quantized factors
  transposed into the [K, N] layout that ONNX Runtime fuses (the integers are moved, never rounded again).
- A quantized embedding `Gather(DequantizeLinear(E [V, H]), ids)` (`--head int8|int4`) has no fusion: ONNX Runtime
  would dequantize the whole table at every run. It becomes com.microsoft GatherBlockQuantized.
- The tied head `MatMul(h, Transpose(DequantizeLinear(E)))` reads the same table transposed, which ONNX Runtime does
  not fuse either. It becomes com.microsoft MatMulNBits over the SAME packed tensor GatherBlockQuantized reads, so the
  table is stored once in memory's packed form as on disk.

- Every compressed linear `MatMul(x, DequantizeLinear(W [K, N]))` becomes com.microsoft MatMulNBits, and the ones
  that read the SAME input become ONE MatMulNBits over their weights concatenated along N, then a Split: q/k/v and
  their low-rank R factors, gate/up and theirs, o_proj with its R, down_proj with its R. At batch 1 a decoder step is
  a few hundred small GEMVs, each paying a fixed kernel cost; this halves their number. Each output column keeps
  its own weights and scales and sees the same blocks of x, so the arithmetic is the unfused one's. The block
  along K (16 to 128) never straddles two scale groups and wastes the least padding. Only fp32 graphs
  (ONNX Runtime's CPU kernel computes in fp32; fp16 graphs keep ONNX Runtime's own Q/DQ fusion); 8-bit weights
  only at accuracy level 4 (see _head_accuracy_level).

- RMSNorm as the exporter spells it (Mul, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) becomes ONNX Runtime's
  SimplifiedLayerNormalization kernel, which its optimizer only finds for the Pow/Div spelling (fp32 graphs).

- Every W8A8 linear `MatMul(DequantizeLinear(QuantizeLinear(x, s, int8 0)), DequantizeLinear(int8 W [K, N]))`
  becomes QuantizeLinear(x, s, uint8 128) -> com.microsoft MatMulIntegerToFloat, one per input x and scale (q/k/v,
  gate/up share it, then a Split): the integer GEMM whose operand types the caller picks from the CPU (W8A8_FORMS:
  ONNX Runtime's own fusion hands AVX2-only CPUs a kernel that saturates). q_u8 = q_s8 + 128 over the same clamp
  range, so the integers are the graph's, exactly. An fp16 graph with W8A8 linears is first widened to fp32 as a
  whole (_upcast_fp16: ONNX Runtime's CPU kernels are fp32), so everything below applies to it as to an fp32 graph.

- A graph output that is an Identity copy, Identity(t) -> present.* (t: the KV cache's Concat, which the attention
  reads too) or logits, is written by t's producer under the output's name: ONNX Runtime copies at every Identity,
  here the whole cache twice per layer at every decode step. The same tensors, no copy.

The last six only apply when `fuse` is on (the session runs ONNX Runtime's Q/DQ fusion); with the fusion off the
graph's plain arithmetic (dequantize, then float ops) is what runs.

Standalone (numpy + onnx): `slim-trt deploy` copies it beside the Triton models as `slim_ort_rewrite.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LOWRANK_OP = ("slim_trt", "LowRankAdd")
MS_DOMAIN = "com.microsoft"
INT_TYPES = {TensorProto.INT4: 4, TensorProto.INT8: 8}
# MatMulNBits / GatherBlockQuantized need a power-of-two block >= 16 along K; a per-row or per-tensor scale is
# repeated over blocks of this size (the same numbers, a finer bookkeeping).
DEFAULT_BLOCK = 128


def pack_int4(q: np.ndarray) -> bytes:
    """Pack signed 4-bit values (int8 array in [-8, 7]) two per byte, first element in the low nibble (ONNX order)."""
    flat = (q.astype(np.int8).reshape(-1).astype(np.uint8)) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def int_initializer(name: str, q: np.ndarray, bits: int) -> TensorProto:
    """An INT4 (packed) or INT8 initializer from an int8 array."""
    if bits == 4:
        return helper.make_tensor(name, TensorProto.INT4, list(q.shape), pack_int4(q), raw=True)
    if bits == 8:
        return helper.make_tensor(name, TensorProto.INT8, list(q.shape), q.astype(np.int8).tobytes(), raw=True)
    raise ValueError(f"no integer initializer for {bits} bits")


def unique_name(taken: set[str], base: str) -> str:
    """`base`, or `base_2`, `base_3`, ... whichever is not taken yet; marks it taken."""
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


class _Graph:
    """Producers, consumers and initializers of a graph, for local pattern rewrites."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i, x in enumerate(n.input):
                self.consumers.setdefault(x, []).append((n, i))
        self.graph_outputs = {o.name for o in self.g.output}
        self.new_inits: list[TensorProto] = []
        self.dropped: set[int] = set()  # id() of nodes to remove
        self._held: list = []  # nodes dropped by drop(): their id() stays theirs while this graph lives
        self.replacements: dict[int, list] = {}  # id() of a node -> the nodes that take its place
        self._names = set(self.inits) | set(self.producer) | {i.name for i in self.g.input}

    def unique(self, base: str) -> str:
        return unique_name(self._names, base)

    def dq_of(self, name: str):
        """The DequantizeLinear node producing `name` from constant INT4/INT8 weights, or None."""
        n = self.producer.get(name)
        if n is None or n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx"):
            return None
        if n.input[0] not in self.inits or n.input[1] not in self.inits:
            return None
        if self.inits[n.input[0]].data_type not in INT_TYPES or len(self.inits[n.input[0]].dims) != 2:
            return None
        if len(n.input) > 2 and n.input[2] and np.any(numpy_helper.to_array(self.inits[n.input[2]]) != 0):
            return None
        return n

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def add_init(self, t: TensorProto) -> str:
        t.name = self.unique(t.name)
        self.new_inits.append(t)
        return t.name

    def drop(self, node) -> None:
        """Remove `node` at finish() (held here: a node no map refers to any more keeps its id())."""
        self._held.append(node)
        self.dropped.add(id(node))

    def replace(self, node, new_nodes: list) -> None:
        """`new_nodes` take `node`'s place in the node order (their inputs are available there)."""
        self.replacements.setdefault(id(node), []).extend(new_nodes)
        self.dropped.add(id(node))

    def finish(self) -> None:
        nodes = []
        for n in self.g.node:
            nodes += self.replacements.get(id(n), [])
            if id(n) not in self.dropped:
                nodes.append(n)
        used = {x for n in nodes for x in n.input} | self.graph_outputs
        inits = [t for t in list(self.g.initializer) + self.new_inits if t.name in used]
        del self.g.node[:]
        self.g.node.extend(nodes)
        del self.g.initializer[:]
        self.g.initializer.extend(inits)


def _dq_layout(g: _Graph, dq) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(q int8 [rows, cols], scale broadcast to [rows, ceil(cols/B)], B, bits) of a DQ over 2-D integer weights,
    with the scale grouped along the columns (the layout MatMulNBits and GatherBlockQuantized read)."""
    q = g.array(dq.input[0]).astype(np.int8)
    s = g.array(dq.input[1]).astype(np.float32)
    bits = INT_TYPES[g.inits[dq.input[0]].data_type]
    rows, cols = q.shape
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    axis, block = attrs.get("axis", 1) % 2, attrs.get("block_size", 0)
    if s.ndim == 0 or s.size == 1:
        b = DEFAULT_BLOCK
        grid = np.full((rows, -(-cols // b)), float(s.reshape(-1)[0]), np.float32)
    elif block == 0 and axis == 0:  # one scale per row
        b = DEFAULT_BLOCK
        grid = np.repeat(s.reshape(rows, 1), -(-cols // b), axis=1)
    elif block and axis == 1 and block >= 16 and block & (block - 1) == 0:
        b, grid = block, s.reshape(rows, -1)
    else:
        raise ValueError("layout not handled")
    return q, grid, b, bits


def _packed_unsigned(q: np.ndarray, block: int, bits: int) -> np.ndarray:
    """Signed q [rows, cols] as MatMulNBits stores B: unsigned (q + 2^(bits-1), the default zero point),
    padded to whole blocks with the zero point, packed low nibble first: uint8 [rows, blocks, block * bits / 8]."""
    rows, cols = q.shape
    zp = 1 << (bits - 1)
    nb = -(-cols // block)
    u = np.full((rows, nb * block), zp, np.uint8)
    u[:, :cols] = (q.astype(np.int16) + zp).astype(np.uint8)
    if bits == 4:
        u = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    return u.reshape(rows, nb, block * bits // 8)


def _compute_type(g: _Graph) -> int:
    """The graph's float type (that of its logits output)."""
    logits = [o for o in g.g.output if o.name == "logits"] or list(g.g.output)
    return logits[0].type.tensor_type.elem_type


def _head_accuracy_level(bits: int, level: int) -> int:
    # ONNX Runtime's CPU MatMulNBits has no fp32-activation kernel for 8-bit weights: below level 4 it dequantizes
    # the whole weight at every call (measured: 2.5 s per token for a 262144 x 640 head). 8-bit tables run int8
    # activations; 4-bit ones the level the export declares.
    return max(level, 4) if bits == 8 else level


def _fuse_quantized_table(g: _Graph, dq, compute_type: int, accuracy_level: int) -> dict[str, int]:
    """Gather(DQ(E)) -> GatherBlockQuantized and MatMul(h, Transpose(DQ(E))) -> MatMulNBits over one packed E.
    Returns the counts of new nodes; nothing changes when the DQ also feeds anything else."""
    uses = g.consumers.get(dq.output[0], [])
    gathers, heads = [], []
    for n, idx in uses:
        if n.op_type == "Gather" and idx == 0 and _attr(n, "axis", 0) == 0:
            gathers.append(n)
        elif n.op_type == "Transpose" and list(_attr(n, "perm", [1, 0])) == [1, 0]:
            mm = g.consumers.get(n.output[0], [])
            if not mm or n.output[0] in g.graph_outputs or any(m.op_type != "MatMul" or i != 1 for m, i in mm):
                return {}
            heads.append((n, [m for m, _ in mm]))
        else:
            return {}
    if dq.output[0] in g.graph_outputs or not gathers:
        return {}
    try:
        q, grid, block, bits = _dq_layout(g, dq)
    except ValueError:
        return {}
    rows, cols = q.shape
    nb = grid.shape[1]
    base = dq.input[0]
    packed = g.add_init(numpy_helper.from_array(_packed_unsigned(q, block, bits), f"{base}.ort_packed"))
    to_compute = compute_type != TensorProto.FLOAT  # the CPU kernels compute in fp32, as ORT's own fusion does
    s3 = g.add_init(numpy_helper.from_array(grid.reshape(rows, nb, 1), f"{base}.ort_gather_scale"))
    flat_shape = g.add_init(numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{base}.ort_flat"))
    for n in gathers:
        blocks, flat = g.unique(f"{n.name}/gbq_blocks"), g.unique(f"{n.name}/gbq_flat")
        new = [helper.make_node("GatherBlockQuantized", [packed, n.input[1], s3], [blocks], domain=MS_DOMAIN,
                                name=g.unique(f"{n.name}/GatherBlockQuantized"), gather_axis=0, quantize_axis=2,
                               block_size=block, bits=bits),
               helper.make_node("Reshape", [blocks, flat_shape], [flat], name=g.unique(f"{n.name}/gbq_reshape"))]
        if nb * block != cols:  # padded blocks: keep the real columns
            cut = g.unique(f"{n.name}/gbq_cut")
            ends = g.add_init(numpy_helper.from_array(np.array([cols], np.int64), f"{base}.ort_cols"))
            zero = g.add_init(numpy_helper.from_array(np.array([0], np.int64), f"{base}.ort_zero"))
            last = g.add_init(numpy_helper.from_array(np.array([-1], np.int64), f"{base}.ort_last"))
            new.append(helper.make_node("Slice", [flat, zero, ends, last], [cut], name=g.unique(f"{n.name}/gbq_cut")))
            flat = cut
        new.append(helper.make_node("Cast", [flat], [n.output[0]], name=g.unique(f"{n.name}/gbq_cast"),
                                    to=compute_type) if to_compute else
                   helper.make_node("Identity", [flat], [n.output[0]], name=g.unique(f"{n.name}/gbq_out")))
        g.replace(n, new)
    matmuls = 0
    if heads:
        s_flat = g.add_init(numpy_helper.from_array(grid.reshape(-1), f"{base}.ort_matmul_scale"))
        for tr, mms in heads:
            for m in mms:
                a, y, new = m.input[0], m.output[0], []
                if to_compute:
                    a, y = g.unique(f"{m.name}/nbits_in"), g.unique(f"{m.name}/nbits_out")
                    new.append(helper.make_node("Cast", [m.input[0]], [a], name=g.unique(f"{m.name}/cast_in"),
                                                to=TensorProto.FLOAT))
                new.append(helper.make_node("MatMulNBits", [a, packed, s_flat], [y], domain=MS_DOMAIN,
                                            name=g.unique(f"{m.name}/MatMulNBits"), K=cols, N=rows, bits=bits,
                                            block_size=block,
                                            accuracy_level=_head_accuracy_level(bits, accuracy_level)))
                if to_compute:
                    new.append(helper.make_node("Cast", [y], [m.output[0]], name=g.unique(f"{m.name}/cast_out"),
                                                to=compute_type))
                g.replace(m, new)
                matmuls += 1
            g.dropped.add(id(tr))
    g.dropped.add(id(dq))
    return {"gather_block_quantized": len(gathers), "matmul_nbits_head": matmuls}


def _transposed_factor(g: _Graph, name: str, new: list) -> str:
    """A [rows, cols] LowRankAdd factor (float initializer or DQ of integers) as a [cols, rows] MatMul weight,
    in the layout ONNX Runtime fuses (integers moved, blocks now along axis 0); nodes it needs go to `new`."""
    dq = g.dq_of(name)
    if dq is None:
        if name in g.inits:
            return g.add_init(numpy_helper.from_array(np.ascontiguousarray(g.array(name).T), f"{name}.T"))
        t = g.unique(f"{name}/T")
        new.append(helper.make_node("Transpose", [name], [t], name=g.unique(f"{name}/Transpose"), perm=[1, 0]))
        return t
    q = g.array(dq.input[0]).astype(np.int8)
    s = g.array(dq.input[1])
    bits = INT_TYPES[g.inits[dq.input[0]].data_type]
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    new_attrs = {}
    if s.size > 1:  # per-row becomes per-column and blocks along axis 1 become blocks along axis 0
        new_attrs["axis"] = 1 - attrs.get("axis", 1) % 2
        s = s.T if s.ndim == 2 else s
        if "block_size" in attrs:
            new_attrs["block_size"] = attrs["block_size"]
    qn = g.add_init(int_initializer(f"{dq.input[0]}.T", np.ascontiguousarray(q.T), bits))
    sn = g.add_init(numpy_helper.from_array(np.ascontiguousarray(s), f"{dq.input[1]}.T"))
    out = g.unique(f"{dq.output[0]}.T")
    new.append(helper.make_node("DequantizeLinear", [qn, sn], [out], name=g.unique(f"{dq.name}.T"), **new_attrs))
    if all((c.domain, c.op_type) == LOWRANK_OP for c, _ in g.consumers.get(dq.output[0], [])):
        g.dropped.add(id(dq))
    return out


NBITS_BLOCKS = (128, 64, 32, 16)  # MatMulNBits block sizes along K this rewrite emits


@dataclass
class _LinearWeight:
    """A quantized MatMul weight W [K, N] = q * scale, its scales grouped along K (one group spans K for per-column
    or per-tensor scales)."""

    q: np.ndarray  # int8 [K, N]
    scales: np.ndarray  # float32 [groups, N]
    group: int
    bits: int

    @property
    def blocks(self) -> set[int]:
        """MatMulNBits block sizes that never straddle two scale groups."""
        k = self.q.shape[0]
        return {b for b in NBITS_BLOCKS if self.group % b == 0 or self.group >= k}

    def packed(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(B uint8 [N, blocks, block * bits / 8], scales [N, blocks]) as MatMulNBits reads them."""
        nb = -(-self.q.shape[0] // block)
        grid = self.scales[np.minimum(np.arange(nb) * block // self.group, self.scales.shape[0] - 1)].T
        return _packed_unsigned(np.ascontiguousarray(self.q.T), block, self.bits), np.ascontiguousarray(grid)


def _linear_weight(g: _Graph, dq) -> _LinearWeight | None:
    """DQ(W [K, N]) read by MatMul, or None for a layout this rewrite does not take (ONNX Runtime then fuses it)."""
    q = g.array(dq.input[0]).astype(np.int8)
    s = g.array(dq.input[1]).astype(np.float32)
    bits = INT_TYPES[g.inits[dq.input[0]].data_type]
    k, n = q.shape
    axis, group = _attr(dq, "axis", 1) % 2, _attr(dq, "block_size", 0)
    if s.size == 1:  # per tensor: one scale for every column and block
        return _LinearWeight(q, np.full((1, n), float(s.reshape(-1)[0]), np.float32), k, bits)
    if group == 0 and axis == 1 and s.shape == (n,):  # one scale per output column
        return _LinearWeight(q, s.reshape(1, n), k, bits)
    if group > 0 and axis == 0 and s.shape == (-(-k // group), n):
        return _LinearWeight(q, s, group, bits)
    return None


def _best_block(k: int, blocks: set[int]) -> int:
    """The block wasting the least padding along K (an adapter factor with K = rank 148 and groups of 128 runs
    blocks of 32: 160 columns, not 256); the larger one on a tie."""
    return min(blocks, key=lambda b: (-(-k // b) * b, -b))


def _linear_groups(g: _Graph, accuracy_level: int) -> list[tuple[str, int, list]]:
    """[(x, block, [(MatMul, DQ, _LinearWeight), ...])]: the quantized MatMuls reading each input x that one
    MatMulNBits can serve (same K and bits, a common block size), in node order."""
    by_input: dict[tuple, list] = {}
    for x, uses in g.consumers.items():
        for n, idx in uses:
            if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx") or idx != 0 or x in g.inits:
                continue
            dq = g.dq_of(n.input[1])
            if dq is None or dq.output[0] in g.graph_outputs or any(
                    c.op_type != "MatMul" or i != 1 for c, i in g.consumers[dq.output[0]]):
                continue
            w = _linear_weight(g, dq)
            if w is None or not w.blocks or (w.bits == 8 and accuracy_level < 4):
                continue  # 8-bit weights with fp32 activations: ONNX Runtime's CPU kernel dequantizes per call
            by_input.setdefault((x, w.q.shape[0], w.bits), []).append((n, dq, w))
    groups = []
    for (x, k, _), members in by_input.items():
        common = set.intersection(*(w.blocks for _, _, w in members))
        if common:
            groups.append((x, _best_block(k, common), members))
        else:  # no block fits all: one group per preferred block
            split: dict[int, list] = {}
            for m in members:
                split.setdefault(_best_block(k, m[2].blocks), []).append(m)
            groups += [(x, b, ms) for b, ms in split.items()]
    return groups


def _fuse_linears(g: _Graph, accuracy_level: int, share_inputs: bool = True) -> dict[str, int]:
    """MatMul(x, DQ(W_i)) for every quantized W_i -> MatMulNBits, one per input x (share_inputs=False: one per
    MatMul), its output split back into the original outputs. Returns the counts of MatMulNBits built and MatMuls
    replaced."""
    counts = {"matmul_nbits_linear": 0, "linears_fused": 0}
    fused_dqs: set[int] = set()
    groups = _linear_groups(g, accuracy_level)
    if not share_inputs:
        groups = [(x, block, [m]) for x, block, members in groups for m in members]
    for x, block, members in groups:
        first = members[0][0]
        k, bits = members[0][2].q.shape[0], members[0][2].bits
        parts = [w.packed(block) for _, _, w in members]
        widths = [p[0].shape[0] for p in parts]
        base = first.name if len(members) == 1 else f"{first.name}+{len(members) - 1}"
        b_name = g.add_init(numpy_helper.from_array(np.concatenate([p[0] for p in parts]), f"{base}.ort_nbits"))
        s_name = g.add_init(numpy_helper.from_array(np.concatenate([p[1] for p in parts]).reshape(-1),
                                                    f"{base}.ort_nbits_scale"))
        single = len(members) == 1
        y = first.output[0] if single else g.unique(f"{base}/nbits_out")
        new = [helper.make_node("MatMulNBits", [x, b_name, s_name], [y], domain=MS_DOMAIN,
                                name=g.unique(f"{base}/MatMulNBits"), K=k, N=int(sum(widths)), bits=bits,
                                block_size=block, accuracy_level=accuracy_level)]
        if not single:
            sizes = g.add_init(numpy_helper.from_array(np.array(widths, np.int64), f"{base}.ort_split"))
            new.append(helper.make_node("Split", [y, sizes], [n.output[0] for n, _, _ in members],
                                        name=g.unique(f"{base}/Split"), axis=-1))
        # The first member in node order hosts the fused node: x exists there and every output is read later.
        g.replace(first, new)
        for n, _, _ in members[1:]:
            g.dropped.add(id(n))
        fused_dqs.update(id(dq) for _, dq, _ in members)
        counts["matmul_nbits_linear"] += 1
        counts["linears_fused"] += len(members)
    for n in g.g.node:  # a DQ goes only when every MatMul reading it was fused
        if id(n) in fused_dqs and all(id(c) in g.dropped for c, _ in g.consumers[n.output[0]]):
            g.dropped.add(id(n))
    return counts


# How the integer GEMM of a W8A8 linear is handed to ONNX Runtime (com.microsoft MatMulIntegerToFloat, activations
# uint8 with zero point 128 in both):
#   "u8u8"  weights uint8 with zero point 128 as well. MLAS's U8U8 kernels widen both operands to int16 before any
#           multiply (VPMADDWD on x86, UMULL/UDOT on ARM): the int32 sums are exact on every CPU.
#   "u8s8"  weights int8 as exported (ONNX Runtime's own Q/DQ fusion picks the same). On x86 without VNNI/AMX MLAS
#           runs it with VPMADDUBSW, whose int16 sum of two u8 x s8 products saturates above 32767 (255 x 127 x 2
#           = 64770): wrong logits on AVX2-only CPUs. Exact with VNNI (VPDPBUSD sums into int32) and AMX.
W8A8_FORMS = ("u8u8", "u8s8")
ACT_ZERO_POINT = 128  # uint8 activations: q_u8 = q_s8 + 128 exactly, over the same clamp range


@dataclass
class _W8A8Linear:
    matmul: object
    act_q: object  # the activation QuantizeLinear feeding it (through its DequantizeLinear)
    act_dq: object
    weight_dq: object
    q: np.ndarray  # int8 [K, N]
    scales: np.ndarray  # float32 [N]


def _scalar(g: _Graph, name: str) -> np.ndarray | None:
    value = _const(g, name) if name else None
    return value if value is not None and value.size == 1 else None


def _w8a8_linear(g: _Graph, mm) -> _W8A8Linear | None:
    """MatMul(DQ(Q(x, s, int8 0)), DQ(int8 W [K, N], per-column or per-tensor scale)), or None."""
    if mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx"):
        return None
    act_dq, w_dq = g.producer.get(mm.input[0]), g.dq_of(mm.input[1])
    if act_dq is None or act_dq.op_type != "DequantizeLinear" or w_dq is None:
        return None
    act_q = g.producer.get(act_dq.input[0])
    if act_q is None or act_q.op_type != "QuantizeLinear" or len(act_q.input) < 3 or len(act_dq.input) < 3:
        return None
    s, zp = _scalar(g, act_q.input[1]), _scalar(g, act_q.input[2])
    if s is None or zp is None or zp.dtype != np.int8 or int(zp.reshape(-1)[0]) != 0 or \
            list(act_dq.input[1:3]) != list(act_q.input[1:3]):
        return None
    if g.inits[w_dq.input[0]].data_type != TensorProto.INT8 or w_dq.output[0] in g.graph_outputs or \
            any(c.op_type != "MatMul" or i != 1 for c, i in g.consumers[w_dq.output[0]]):
        return None
    q = g.array(w_dq.input[0]).astype(np.int8)
    ws = g.array(w_dq.input[1]).astype(np.float32)
    n = q.shape[1]
    if ws.size == 1:
        scales = np.full(n, float(ws.reshape(-1)[0]), np.float32)
    elif _attr(w_dq, "block_size", 0) == 0 and _attr(w_dq, "axis", 1) % 2 == 1 and ws.shape == (n,):
        scales = ws
    else:
        return None  # blocks along K: no single integer GEMM takes them
    return _W8A8Linear(mm, act_q, act_dq, w_dq, q, scales)


def _fuse_w8a8(g: _Graph, form: str) -> dict[str, int]:
    """Every W8A8 linear -> QuantizeLinear(uint8, zero point 128) + com.microsoft MatMulIntegerToFloat, in fp32 (Cast
    at the boundaries of an fp16 graph: ONNX Runtime's CPU kernel has no fp16 output, and its fp16
    DequantizeLinear -> MatMul is unfused, ~50x slower than dense). The linears that quantize the same input with
    the same scale (q/k/v, gate/up) share one QuantizeLinear and one GEMM over their weights concatenated along N,
    then a Split. `form`: W8A8_FORMS. Returns the counts of GEMMs built and linears replaced."""
    groups: dict[tuple, list[_W8A8Linear]] = {}
    for n in g.g.node:
        lin = _w8a8_linear(g, n)
        if lin is not None:
            s = float(_scalar(g, lin.act_q.input[1]).reshape(-1)[0])
            groups.setdefault((lin.act_q.input[0], s, lin.q.shape[0]), []).append(lin)
    counts = {"w8a8_gemms": 0, "w8a8_linears": 0}
    for (x, s, _), members in groups.items():
        first = members[0].matmul
        base = first.name if len(members) == 1 else f"{first.name}+{len(members) - 1}"
        new = []
        # QuantizeLinear's x and DequantizeLinear's output have their scale's type: the graph's float type here.
        x_type = g.inits[members[0].act_q.input[1]].data_type
        y_type = g.inits[members[0].weight_dq.input[1]].data_type
        if x_type != TensorProto.FLOAT:
            xf = g.unique(f"{base}/w8a8_in")
            new.append(helper.make_node("Cast", [x], [xf], name=g.unique(f"{base}/w8a8_cast_in"), to=TensorProto.FLOAT))
            x = xf
        q = np.concatenate([m.q for m in members], axis=1)
        if form == "u8u8":
            b = numpy_helper.from_array((q.astype(np.int16) + ACT_ZERO_POINT).astype(np.uint8), f"{base}.w8a8_u8")
            b_zp = numpy_helper.from_array(np.array(ACT_ZERO_POINT, np.uint8), f"{base}.w8a8_b_zero_point")
        else:
            b = numpy_helper.from_array(q, f"{base}.w8a8_s8")
            b_zp = numpy_helper.from_array(np.array(0, np.int8), f"{base}.w8a8_b_zero_point")
        a_scale = g.add_init(numpy_helper.from_array(np.array(s, np.float32), f"{base}.w8a8_a_scale"))
        a_zp = g.add_init(numpy_helper.from_array(np.array(ACT_ZERO_POINT, np.uint8), f"{base}.w8a8_a_zero_point"))
        b_scale = g.add_init(numpy_helper.from_array(np.concatenate([m.scales for m in members]), f"{base}.w8a8_b_scale"))
        a = g.unique(f"{base}/w8a8_a")
        new.append(helper.make_node("QuantizeLinear", [x, a_scale, a_zp], [a], name=g.unique(f"{base}/w8a8_quantize")))
        outs = [m.matmul.output[0] for m in members]
        cast_out = y_type != TensorProto.FLOAT
        y = outs[0] if len(members) == 1 and not cast_out else g.unique(f"{base}/w8a8_out")
        new.append(helper.make_node("MatMulIntegerToFloat", [a, g.add_init(b), a_scale, b_scale, a_zp, g.add_init(b_zp)],
                                    [y], domain=MS_DOMAIN, name=g.unique(f"{base}/MatMulIntegerToFloat")))
        if cast_out:
            yc = outs[0] if len(members) == 1 else g.unique(f"{base}/w8a8_out_cast")
            new.append(helper.make_node("Cast", [y], [yc], name=g.unique(f"{base}/w8a8_cast_out"), to=y_type))
            y = yc
        if len(members) > 1:
            sizes = g.add_init(numpy_helper.from_array(np.array([m.q.shape[1] for m in members], np.int64),
                                                       f"{base}.w8a8_split"))
            new.append(helper.make_node("Split", [y, sizes], outs, name=g.unique(f"{base}/Split"), axis=-1))
        g.replace(first, new)  # the first in node order: x exists there and every output is read later
        for m in members[1:]:
            g.dropped.add(id(m.matmul))
        counts["w8a8_gemms"] += 1
        counts["w8a8_linears"] += len(members)
    for n in g.g.node:  # activation pairs and weight DQs go once nothing reads them any more
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in g.graph_outputs and \
                g.consumers.get(n.output[0]) and all(id(c) in g.dropped for c, _ in g.consumers[n.output[0]]):
            g.dropped.add(id(n))
    for n in g.g.node:  # a QuantizeLinear whose DequantizeLinear just went
        if n.op_type == "QuantizeLinear" and n.output[0] not in g.graph_outputs and \
                all(id(c) in g.dropped for c, _ in g.consumers.get(n.output[0], [])):
            g.dropped.add(id(n))
    return counts


def _output_identities(g: _Graph) -> int:
    """Identity(t) -> graph output y, where t is a node's output (present.*: the KV cache's Concat, which the
    attention reads too; logits): that node writes y itself and t's other readers read y. ONNX Runtime copies the
    tensor at every Identity (the whole cache, twice per layer and step). Returns how many went."""
    inputs = {i.name for i in g.g.input}
    dropped = 0
    for n in list(g.g.node):
        if n.op_type != "Identity" or n.output[0] not in g.graph_outputs:
            continue
        t = n.input[0]
        src = g.producer.get(t)
        if src is None or t in g.graph_outputs or t in inputs or t in g.inits:
            continue
        y = n.output[0]
        src.output[:] = [y if o == t else o for o in src.output]
        for c, i in g.consumers.get(t, []):
            if c is not n:
                c.input[i] = y
        g.producer[y] = src
        g.consumers.setdefault(y, []).extend((c, i) for c, i in g.consumers.pop(t, []) if c is not n)
        del g.producer[t]
        g.drop(n)
        dropped += 1
    return dropped


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """{tensor name: element type} of every tensor of `model`'s main graph, from ONNX shape inference run on its
    structure only (the initializers' types and shapes, not their data)."""
    g = model.graph
    shell = helper.make_graph(list(g.node), g.name, list(g.input) + [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer],
        list(g.output))
    shell_model = helper.make_model(shell, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(shell_model, strict_mode=False).graph
    return {v.name: v.type.tensor_type.elem_type for v in
            list(inferred.input) + list(inferred.value_info) + list(inferred.output)}


FLOAT_TYPES = (TensorProto.FLOAT16, TensorProto.FLOAT)


def _has_w8a8(g: _Graph) -> bool:
    """Whether some MatMul reads DequantizeLinear(QuantizeLinear(x)): activations quantized by the graph."""
    for n in g.g.node:
        dq = g.producer.get(n.input[0]) if n.op_type == "MatMul" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and \
                getattr(g.producer.get(dq.input[0]), "op_type", None) == "QuantizeLinear":
            return True
    return False


def _upcast_fp16(model: onnx.ModelProto) -> int:
    """An fp16 graph computed in fp32, in place: fp16 initializers and constants widened (exactly), Casts to fp16
    turned into Casts to fp32 and the ones that now change nothing (float to float) dropped, the graph's fp16 inputs
    and outputs kept as they are with a Cast at each. ONNX Runtime's CPU provider has fp32 kernels for everything
    (MatMulNBits, MatMulIntegerToFloat, SimplifiedLayerNormalization) and few for fp16: without this an fp16 export
    runs as Casts around each fp32 kernel (554 of them on Gemma 3 270M W8A8). Returns how many tensors were
    widened (initializers, constants, inputs, outputs); 0 = nothing to do (no fp16, or a subgraph inside)."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return 0
    if not any(t.data_type == TensorProto.FLOAT16 for t in g.initializer) and not any(
            v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in list(g.input) + list(g.output)):
        return 0
    types = _elem_types(model)
    widened = 0
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT16:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
            widened += 1
    alias: dict[str, str] = {}  # output of a dropped float-to-float Cast -> its input
    nodes = []
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
                widened += 1
            elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
        if n.op_type == "Cast" and n.domain in ("", "ai.onnx") and _attr(n, "to", 0) == TensorProto.FLOAT \
                and types.get(n.input[0]) in FLOAT_TYPES:
            alias[n.output[0]] = n.input[0]
            continue
        nodes.append(n)
    head, tail = [], []
    names = {x for n in nodes for x in list(n.input) + list(n.output)} | {t.name for t in g.initializer}
    for v in g.input:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            wide = unique_name(names, f"{v.name}/fp32")
            head.append(helper.make_node("Cast", [v.name], [wide], name=unique_name(names, f"{v.name}/Cast_fp32"),
                                         to=TensorProto.FLOAT))
            alias[v.name] = wide
            widened += 1

    def resolve(x: str) -> str:
        while x in alias:
            x = alias[x]
        return x

    for n in nodes:
        for i, x in enumerate(n.input):
            n.input[i] = resolve(x)
    for v in g.output:
        src = resolve(v.name)
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            tail.append(helper.make_node("Cast", [src], [v.name], name=unique_name(names, f"{v.name}/Cast_fp16"),
                                         to=TensorProto.FLOAT16))
            widened += 1
        elif src != v.name:
            tail.append(helper.make_node("Identity", [src], [v.name], name=unique_name(names, f"{v.name}/Identity")))
    # A graph output whose producer now also feeds it internally keeps its name: rename the producer's output.
    produced = {o for n in nodes for o in n.output}
    for c in tail:
        if c.op_type == "Cast" and c.input[0] == c.output[0] and c.output[0] in produced:
            wide = unique_name(names, f"{c.output[0]}/fp32")
            for n in nodes:
                n.output[:] = [wide if o == c.output[0] else o for o in n.output]
                n.input[:] = [wide if x == c.output[0] else x for x in n.input]
            c.input[0] = wide
    del g.node[:]
    g.node.extend(head + nodes + tail)
    for v in g.value_info:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    return widened


def _only_reader(g: _Graph, name: str, op_type: str):
    """The single node reading `name` when it is an `op_type` (and `name` is no graph output), else None."""
    uses = g.consumers.get(name, [])
    if len(uses) != 1 or name in g.graph_outputs or uses[0][0].op_type != op_type:
        return None
    return uses[0][0]


def _const(g: _Graph, name: str) -> np.ndarray | None:
    return g.array(name) if name in g.inits else None


def _fuse_rms_norms(g: _Graph) -> int:
    """RMSNorm as the exporter writes it in an fp32 graph, Mul(Mul(x, Reciprocal(Sqrt(ReduceMean(x * x) + eps))),
    w), -> SimplifiedLayerNormalization(x, w) (ONNX Runtime's fused kernel; it matches only the Pow/Div spelling
    by itself). The same arithmetic in fp32: 1 kernel for 7. (Folding the residual Add in as well,
    SkipSimplifiedLayerNormalization, measured no faster per token and rounds unlike PyTorch, which flips INT8
    steps of a W8A8 export's activations: not done.) Returns how many were fused."""
    fused = 0
    for sq in list(g.g.node):
        if sq.op_type != "Mul" or sq.input[0] != sq.input[1]:
            continue
        x = sq.input[0]
        mean = _only_reader(g, sq.output[0], "ReduceMean")
        if mean is None or _attr(mean, "keepdims", 1) != 1 or len(mean.input) < 2:
            continue
        axes = _const(g, mean.input[1])
        if axes is None or axes.reshape(-1).tolist() != [-1]:
            continue
        add = _only_reader(g, mean.output[0], "Add")
        eps = None if add is None else _const(g, add.input[1])
        sqrt = None if add is None else _only_reader(g, add.output[0], "Sqrt")
        inv = None if sqrt is None else _only_reader(g, sqrt.output[0], "Reciprocal")
        norm = None if inv is None else _only_reader(g, inv.output[0], "Mul")
        scale = None if norm is None or x not in norm.input else _only_reader(g, norm.output[0], "Mul")
        if eps is None or eps.size != 1 or scale is None:
            continue
        w = next((i for i in scale.input if i != norm.output[0]), None)
        weight = None if w is None else _const(g, w)
        if weight is None or weight.ndim != 1 or weight.dtype != np.float32:
            continue
        g.replace(scale, [helper.make_node("SimplifiedLayerNormalization", [x, w], [scale.output[0]],
                                           name=g.unique(f"{scale.name}/SimplifiedLayerNormalization"), axis=-1,
                                           epsilon=float(eps.reshape(-1)[0]), stash_type=1)])
        for n in (sq, mean, add, sqrt, inv, norm):
            g.dropped.add(id(n))
        fused += 1
    return fused


def _expand_lowrank(g: _Graph, n) -> None:
    y, x, r, l_ = n.input
    new: list = []
    rt, lt = _transposed_factor(g, r, new), _transposed_factor(g, l_, new)
    t, u = g.unique(f"{n.name}/xr"), g.unique(f"{n.name}/xrl")
    new += [helper.make_node("MatMul", [x, rt], [t], name=g.unique(f"{n.name}/MatMul_R")),
            helper.make_node("MatMul", [t, lt], [u], name=g.unique(f"{n.name}/MatMul_L")),
            helper.make_node("Add", [y, u], [n.output[0]], name=g.unique(f"{n.name}/Add"))]
    g.replace(n, new)


def _attr(n, name, default):
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def needs_rewrite(model: onnx.ModelProto) -> bool:
    """Whether the graph has a node ONNX Runtime cannot run or fuse as it is, or quantized linears this rewrite
    fuses (weights need not be loaded)."""
    for n in model.graph.node:
        if (n.domain, n.op_type) == LOWRANK_OP:
            return True
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("Gather", "MatMul") and n.input[n.op_type == "MatMul"] in producer:
            dq = producer[n.input[n.op_type == "MatMul"]]
            if dq.op_type == "DequantizeLinear" and dq.input[0] in inits \
                    and inits[dq.input[0]].data_type in INT_TYPES:
                return True
    return False


def for_onnxruntime(model: onnx.ModelProto, *, fuse: bool = True, accuracy_level: int = 4,
                    share_inputs: bool = True, w8a8_form: str = "u8u8",
                    upcast_fp16: bool | None = None) -> tuple[onnx.ModelProto, dict]:
    """A rewritten copy of `model` (see the module doc) and counts of what changed. accuracy_level: the session's
    `session.qdq_matmulnbits_accuracy_level`, which the MatMulNBits nodes built here follow too. share_inputs=False:
    one MatMulNBits per quantized linear, none shared (for comparison). w8a8_form: the integer GEMM's operand types
    for W8A8 linears (W8A8_FORMS; the caller picks it from the CPU, runtime.cpu_choice). upcast_fp16: compute an
    fp16 graph in fp32 (_upcast_fp16); None = when it has W8A8 linears (weight-only fp16 graphs keep ONNX Runtime's
    own fp16 Q/DQ fusion)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    counts = {"lowrank_expanded": 0, "gather_block_quantized": 0, "matmul_nbits_head": 0,
              "matmul_nbits_linear": 0, "linears_fused": 0, "rms_norms": 0, "w8a8_gemms": 0, "w8a8_linears": 0,
              "fp16_widened": 0, "output_identities": 0}
    if w8a8_form not in W8A8_FORMS:
        raise ValueError(f"unknown W8A8 form {w8a8_form!r}: choose one of {', '.join(W8A8_FORMS)}")
    g = _Graph(m)
    for n in list(m.graph.node):
        if (n.domain, n.op_type) == LOWRANK_OP:
            _expand_lowrank(g, n)
            counts["lowrank_expanded"] += 1
    if fuse:
        g.finish()
        g = _Graph(m)
        if _compute_type(g) == TensorProto.FLOAT16 and (upcast_fp16 if upcast_fp16 is not None else _has_w8a8(g)):
            counts["fp16_widened"] = _upcast_fp16(m)
        g = _Graph(m)  # the expanded low-rank factors are ordinary linears from here on
        counts.update(_fuse_w8a8(g, w8a8_form))
        g.finish()
        g = _Graph(m)
        compute = TensorProto.FLOAT if counts["fp16_widened"] else _compute_type(g)
        for n in list(m.graph.node):
            if n.op_type == "DequantizeLinear" and g.dq_of(n.output[0]) is not None:
                for k, v in _fuse_quantized_table(g, n, compute, accuracy_level).items():
                    counts[k] += v
        if compute == TensorProto.FLOAT:
            g.finish()
            g = _Graph(m)  # the linears as the passes above left them (expanded low-rank factors included)
            counts.update(_fuse_linears(g, accuracy_level, share_inputs))
            counts["rms_norms"] = _fuse_rms_norms(g)
        g.finish()
        g = _Graph(m)
        counts["output_identities"] = _output_identities(g)
    g.finish()
    opsets = [o for o in m.opset_import if o.domain != LOWRANK_OP[0]]
    if any(n.domain == MS_DOMAIN for n in m.graph.node) and not any(o.domain == MS_DOMAIN for o in opsets):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    del m.opset_import[:]
    m.opset_import.extend(opsets)
    return m, counts
