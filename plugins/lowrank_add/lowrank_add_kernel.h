// LowRankAdd CUDA launchers: out = Y + (X R^T) L^T.
//
// Plain C++ interface (no TensorRT, no CUDA half types) so that the TensorRT plugin glue and any other
// host code can call it. Shapes: Y, out [M, N]; X [M, K]; R [r, K]; L [N, r] (torch orientation), all
// row-major and contiguous, M = product of the leading dimensions of X (and Y).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace slim_trt
{
namespace lowrank_add
{

// Group size of 4-bit adapters (AbsMax groups of consecutive columns), the exporter's default.
constexpr int32_t kDefaultGroupSize = 128;

enum class DType : int32_t
{
    kFLOAT = 0,
    kHALF = 1,
    kBF16 = 2,
};

struct Shape
{
    int64_t M; // tokens (batch * sequence)
    int64_t N; // output features
    int64_t K; // input features
    int64_t r; // adapter rank
};

// Bytes of device workspace both launchers need: the fp32 intermediate X R^T [M, r], 256-byte aligned.
size_t workspaceBytes(int64_t M, int64_t r);

// Dense adapters: Y, X, R, L and out all have type `dtype`.
cudaError_t launchDense(DType dtype, Shape shape, void const* Y, void const* X, void const* R, void const* L,
    void* out, void* workspace, cudaStream_t stream);

// 4-bit adapters consumed directly: R and L as ONNX-packed INT4 bytes (flattened row-major, low nibble
// first) with fp16 scales, one per `groupSize` consecutive columns: Rscale [r, ceil(K/G)], Lscale
// [N, ceil(r/G)]. Y, X and out have type `dtype`.
cudaError_t launchInt4(DType dtype, Shape shape, int32_t groupSize, void const* Y, void const* X,
    uint8_t const* Rpacked, void const* Rscale, uint8_t const* Lpacked, void const* Lscale, void* out,
    void* workspace, cudaStream_t stream);

} // namespace lowrank_add
} // namespace slim_trt
