// The arithmetic of LowRankAdd, shared by the CUDA kernels and the host reference.
//
// out = Y + (X R^T) L^T, computed in two "NT" products with fp32 accumulation:
//   T   [M, r] = X [M, K] . R [r, K]^T      (kept in fp32, never rounded to the I/O type)
//   out [M, N] = round(T . L [N, r]^T + Y)  (one rounding, to the type of Y)
// Every output element is a sequential chain of fmaf() over the reduction index, in increasing order.
// The kernels stage tiles in shared memory but keep that order, so the host reference in
// lowrank_add_reference.h reproduces them bit for bit (fmaf is correctly rounded on both sides).
//
// No TensorRT header is needed here: this file compiles with nvcc alone.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lowrank_add_kernel.h"

#if defined(__CUDACC__)
#define LRA_HD __host__ __device__ __forceinline__
#else
#define LRA_HD inline
#endif

namespace slim_trt
{
namespace lowrank_add
{

// A block computes a kTile x kTile patch of outputs, one output per thread, and walks the reduction
// dimension in slices of kTileK staged in shared memory.
constexpr int kTile = 16;
constexpr int kTileK = 32;
constexpr int kThreads = kTile * kTile;

LRA_HD float toFloat(float v)
{
    return v;
}
LRA_HD float toFloat(__half v)
{
    return __half2float(v);
}
LRA_HD float toFloat(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

template <typename T>
LRA_HD T fromFloat(float v);
template <>
LRA_HD float fromFloat<float>(float v)
{
    return v;
}
template <>
LRA_HD __half fromFloat<__half>(float v)
{
    return __float2half_rn(v); // round to nearest even, like a numpy float32 -> float16 cast
}
template <>
LRA_HD __nv_bfloat16 fromFloat<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

// ONNX INT4 packing: element i of the flattened (row-major) tensor is in byte i / 2, the even element in
// the low nibble, two's complement. Rows are not padded, so an odd row length straddles bytes.
LRA_HD int int4At(uint8_t const* packed, int64_t flatIndex)
{
    int const byte = packed[flatIndex >> 1];
    int const nibble = (flatIndex & 1) ? (byte >> 4) : (byte & 0xF);
    return nibble >= 8 ? nibble - 16 : nibble;
}

// A dense factor (or activation) element, row-major [rows, cols].
template <typename T>
struct DenseOperand
{
    T const* data;
    int64_t cols;
    LRA_HD float operator()(int64_t row, int64_t col) const
    {
        return toFloat(data[row * cols + col]);
    }
};

// A 4-bit factor element: q * scale, with fp16 scales [rows, ceil(cols / groupSize)] (one per group of
// groupSize consecutive columns, as ONNX blocked DequantizeLinear with axis = 1).
struct Int4Operand
{
    uint8_t const* packed;
    __half const* scales;
    int64_t cols;
    int32_t groupSize;
    LRA_HD float operator()(int64_t row, int64_t col) const
    {
        int64_t const groups = (cols + groupSize - 1) / groupSize;
        float const scale = __half2float(scales[row * groups + col / groupSize]);
        return static_cast<float>(int4At(packed, row * cols + col)) * scale;
    }
};

// The only accumulation step: fused multiply-add in fp32 (one rounding per step).
LRA_HD float fmaStep(float acc, float a, float b)
{
    return fmaf(a, b, acc);
}

// Stage 2 epilogue: the low-rank product is added to Y in fp32, then rounded once.
template <typename T>
LRA_HD T addResidual(float lowRank, T y)
{
    return fromFloat<T>(lowRank + toFloat(y));
}

} // namespace lowrank_add
} // namespace slim_trt
