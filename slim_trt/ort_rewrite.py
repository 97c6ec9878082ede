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

The last two only apply when `fuse` is on (the session runs ONNX Runtime's Q/DQ fusion); with the fusion off the
graph's plain arithmetic (dequantize, then float ops) is what runs.

Standalone (numpy + onnx): `slim-trt deploy` copies it beside the Triton models as `slim_ort_rewrite.py`.
"""
from __future__ import annotations

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
    """Whether the graph has a node ONNX Runtime cannot run or fuse as it is (weights need not be loaded)."""
    for n in model.graph.node:
        if (n.domain, n.op_type) == LOWRANK_OP:
            return True
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[0] in producer:
            dq = producer[n.input[0]]
            if dq.op_type == "DequantizeLinear" and dq.input[0] in inits \
                    and inits[dq.input[0]].data_type in INT_TYPES:
                return True
    return False


def for_onnxruntime(model: onnx.ModelProto, *, fuse: bool = True,
                    accuracy_level: int = 4) -> tuple[onnx.ModelProto, dict]:
    """A rewritten copy of `model` (see the module doc) and counts of what changed. accuracy_level: the session's
    `session.qdq_matmulnbits_accuracy_level`, which the MatMulNBits nodes built here follow too."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    counts = {"lowrank_expanded": 0, "gather_block_quantized": 0, "matmul_nbits_head": 0}
    g = _Graph(m)
    for n in list(m.graph.node):
        if (n.domain, n.op_type) == LOWRANK_OP:
            _expand_lowrank(g, n)
            counts["lowrank_expanded"] += 1
    if fuse:
        compute = _compute_type(g)
        for n in list(m.graph.node):
            if n.op_type == "DequantizeLinear" and g.dq_of(n.output[0]) is not None:
                for k, v in _fuse_quantized_table(g, n, compute, accuracy_level).items():
                    counts[k] += v
    g.finish()
    opsets = [o for o in m.opset_import if o.domain != LOWRANK_OP[0]]
    if any(n.domain == MS_DOMAIN for n in m.graph.node) and not any(o.domain == MS_DOMAIN for o in opsets):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    del m.opset_import[:]
    m.opset_import.extend(opsets)
    return m, counts
