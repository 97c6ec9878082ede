"""NumPy model of the LowRankAdd CUDA kernel (plugins/lowrank_add/), for checking its math on a CPU.

out = Y + (X R^T) L^T with R [r, K], L [N, r] (torch orientation). The kernel accumulates every output in
fp32 as a chain of fused multiply-adds over the reduction index in increasing order, keeps X R^T in fp32,
adds Y in fp32 and rounds once to Y's dtype (see lowrank_add_math.cuh). `lowrank_add_kernel_order`
reproduces that chain exactly (an exact vectorised fp32 FMA), so it must equal the kernel's host reference
(host_check.cu) bit for bit; `lowrank_add_float64` is the formula in float64, the yardstick for accuracy.

4-bit factors use ONNX's INT4 packing: the tensor is flattened row-major, element 2i goes to the low nibble
of byte i and element 2i+1 to the high nibble, two's complement; scales are one per `group` consecutive
columns ([rows, ceil(cols / group)]), as ONNX blocked DequantizeLinear with axis=1.

Pure functions, no I/O, no TensorRT.
"""
from __future__ import annotations

import numpy as np

DTYPES = ("fp32", "fp16", "bf16")


# --- bfloat16 without a bfloat16 dtype: values travel as float32 holding exact bf16 numbers ---------------

def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32. NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    out = (rounded & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """Exact-bf16 float32 values -> their 16-bit patterns (uint16), the kernel's storage format."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def bf16_from_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to `dtype` ("fp32", "fp16", "bf16"); result as float32 holding exact values."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "fp32":
        return x
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return round_to_bf16(x)
    raise ValueError(f"unknown dtype {dtype!r}: choose one of {DTYPES}")


def to_bytes(x: np.ndarray, dtype: str) -> bytes:
    """Exact `dtype` values (as float32) -> raw little-endian storage of that dtype."""
    if dtype == "fp32":
        return np.asarray(x, dtype="<f4").tobytes()
    if dtype == "fp16":
        return np.asarray(x, dtype=np.float32).astype("<f2").tobytes()
    if dtype == "bf16":
        return bf16_bits(x).astype("<u2").tobytes()
    raise ValueError(f"unknown dtype {dtype!r}")


def from_bytes(raw: bytes, dtype: str) -> np.ndarray:
    if dtype == "fp32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dtype == "fp16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if dtype == "bf16":
        return bf16_from_bits(np.frombuffer(raw, dtype="<u2"))
    raise ValueError(f"unknown dtype {dtype!r}")


# --- INT4 packing (ONNX order) and group dequantization -----------------------------------------------------

def pack_int4(q: np.ndarray) -> np.ndarray:
    """int values in [-8, 7], any shape -> uint8 [ceil(size / 2)], ONNX order (low nibble first, no row padding)."""
    flat = np.asarray(q).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("INT4 values must be in [-8, 7]")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 bytes in ONNX order -> int8 [count] in [-8, 7]."""
    b = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if b.size != (count + 1) // 2:
        raise ValueError(f"{count} INT4 values need {(count + 1) // 2} bytes, got {b.size}")
    nibbles = np.stack([b & 0xF, b >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, rows: int, cols: int, group: int) -> np.ndarray:
    """q * scale as float32 [rows, cols]; `scales` fp16 [rows, ceil(cols / group)], converted exactly."""
    q = unpack_int4(packed, rows * cols).reshape(rows, cols).astype(np.float32)
    s = np.asarray(scales, dtype=np.float16).astype(np.float32).reshape(rows, -1)
    if s.shape[1] != -(-cols // group):
        raise ValueError(f"scales of shape {s.shape} do not fit [{rows}, ceil({cols}/{group})]")
    return q * np.repeat(s, group, axis=1)[:, :cols]


# --- exact fp32 fused multiply-add --------------------------------------------------------------------------

def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 a*b + c (what fmaf() returns), vectorised.

    a*b of two float32 is exact in float64 (48 significant bits). s = fl64(a*b + c) may carry a rounding
    error e, recovered exactly with TwoSum. Rounding s to float32 is then correct unless s sits exactly on
    a float32 midpoint (any other s is farther than |e| from every midpoint); there the sign of e decides.
    """
    a64, b64, c64 = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (a, b, c))
    p = a64 * b64
    s = p + c64
    bp = s - c64
    e = (p - bp) + (c64 - (s - bp))  # TwoSum: s + e == p + c exactly
    r = s.astype(np.float32)
    d = s - r.astype(np.float64)  # exact: r and s are within a factor of 2
    neighbor = np.nextafter(r, np.where(d > 0, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    midpoint = (d != 0) & (s == (r.astype(np.float64) + neighbor.astype(np.float64)) / 2)
    # On a midpoint float32(s) took the even side; the exact value s + e lies beyond it when e and d agree.
    return np.where(midpoint & (e * d > 0), neighbor, r).astype(np.float32)


# --- the kernel and the formula -----------------------------------------------------------------------------

def _nt_chain(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """acc[m, n] = fmaf chain over k of a[m, k] * b[n, k], k increasing, starting from 0 (float32)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    acc = np.zeros((a.shape[0], b.shape[0]), dtype=np.float32)
    for k in range(a.shape[1]):
        acc = fma32(a[:, k][:, None], b[:, k][None, :], acc)
    return acc


def lowrank_add_kernel_order(y: np.ndarray, x: np.ndarray, r: np.ndarray, l: np.ndarray, dtype: str) -> np.ndarray:
    """The kernel's result, bit-exact: inputs are exact `dtype` values (float32 arrays), factors are already
    dequantized to float32 (as the kernel does in registers). Leading dims of x/y are flattened to M."""
    n = y.shape[-1]
    k = x.shape[-1]
    x2 = np.asarray(x, np.float32).reshape(-1, k)
    y2 = np.asarray(y, np.float32).reshape(-1, n)
    t = _nt_chain(x2, r)
    low = _nt_chain(t, l)
    return round_to(low + y2, dtype).reshape(y.shape)  # fp32 add, then one rounding


def lowrank_add_float64(y: np.ndarray, x: np.ndarray, r: np.ndarray, l: np.ndarray) -> np.ndarray:
    """Y + (X R^T) L^T in float64."""
    y64, x64, r64, l64 = (np.asarray(v, dtype=np.float64) for v in (y, x, r, l))
    return y64 + (x64 @ r64.T) @ l64.T


def error_bound(y: np.ndarray, x: np.ndarray, r: np.ndarray, l: np.ndarray, dtype: str) -> np.ndarray:
    """A worst-case bound on |kernel - float64 formula| per element (standard dot-product error analysis):
    fp32 chains of length K and r, the fp32 add of Y, then one rounding to `dtype`."""
    u32 = 2.0 ** -24
    u_out = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}[dtype]
    kdim, rank = x.shape[-1], r.shape[0]
    ax, ar, al, ay = (np.abs(np.asarray(v, dtype=np.float64)) for v in (x, r, l, y))
    magnitude = (ax @ ar.T) @ al.T
    exact = lowrank_add_float64(y, x, r, l)
    chain = 1.01 * (kdim + rank + 2) * u32 * (magnitude + ay)
    return u_out * (np.abs(exact) + chain) + chain + np.finfo(np.float32).tiny
