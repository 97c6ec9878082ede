// LowRankAdd CUDA kernels: out = Y + (X R^T) L^T with fp32 accumulation (fp16, bf16 and fp32 I/O;
// dense or 4-bit group-quantized adapters). Compiles with nvcc alone, without TensorRT headers.
//
// This is a correctness-first implementation: a shared-memory tiled "NT" product on CUDA cores, one output
// per thread. The rank r is small (about a tenth of the layer width), so the two products move far fewer
// bytes than the base GEMM they ride along; a tensor-core version is future work and must keep the
// accumulation order documented in lowrank_add_math.cuh, or update the host reference with it.
#include "lowrank_add_kernel.h"
#include "lowrank_add_math.cuh"

namespace slim_trt
{
namespace lowrank_add
{
namespace
{

// Writes the fp32 intermediate T = X R^T.
struct StoreFloat
{
    float* t;
    int64_t ld;
    __device__ void operator()(int64_t m, int64_t n, float acc) const
    {
        t[m * ld + n] = acc;
    }
};

// out = round(acc + Y).
template <typename T>
struct AddResidual
{
    T const* y;
    T* out;
    int64_t ld;
    __device__ void operator()(int64_t m, int64_t n, float acc) const
    {
        out[m * ld + n] = addResidual<T>(acc, y[m * ld + n]);
    }
};

// C[m, n] = sum_k A(m, k) * B(n, k), handed to `epilogue`. Grid: x over tiles of M, y over tiles of N.
template <typename OperandA, typename OperandB, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    gemmNT(OperandA a, OperandB b, int64_t M, int64_t N, int64_t K, Epilogue epilogue)
{
    // +1 column: threads of a warp read sB[tx][kk] with different tx; the pad avoids bank conflicts.
    __shared__ float sA[kTile][kTileK + 1];
    __shared__ float sB[kTile][kTileK + 1];

    int const tx = threadIdx.x % kTile;
    int const ty = threadIdx.x / kTile;
    int64_t const m0 = static_cast<int64_t>(blockIdx.x) * kTile;
    int64_t const n0 = static_cast<int64_t>(blockIdx.y) * kTile;

    float acc = 0.F;
    for (int64_t k0 = 0; k0 < K; k0 += kTileK)
    {
        for (int i = threadIdx.x; i < kTile * kTileK; i += kThreads)
        {
            int const row = i / kTileK;
            int const col = i % kTileK;
            int64_t const k = k0 + col;
            sA[row][col] = (m0 + row < M && k < K) ? a(m0 + row, k) : 0.F;
            sB[row][col] = (n0 + row < N && k < K) ? b(n0 + row, k) : 0.F;
        }
        __syncthreads();
        // Only the real part of the last slice: the order and count of fmaf steps equal the host reference.
        int const kEnd = static_cast<int>(K - k0 < kTileK ? K - k0 : kTileK);
        for (int kk = 0; kk < kEnd; ++kk)
        {
            acc = fmaStep(acc, sA[ty][kk], sB[tx][kk]);
        }
        __syncthreads();
    }

    int64_t const m = m0 + ty;
    int64_t const n = n0 + tx;
    if (m < M && n < N)
    {
        epilogue(m, n, acc);
    }
}

dim3 gridFor(int64_t M, int64_t N)
{
    return dim3(static_cast<unsigned>((M + kTile - 1) / kTile), static_cast<unsigned>((N + kTile - 1) / kTile), 1);
}

cudaError_t checkShape(Shape const& s)
{
    // gridDim.y is limited to 65535 tiles; gridDim.x to 2^31 - 1.
    if (s.M < 0 || s.N <= 0 || s.K <= 0 || s.r <= 0 || (s.N + kTile - 1) / kTile > 65535
        || (s.r + kTile - 1) / kTile > 65535 || (s.M + kTile - 1) / kTile > 2147483647LL)
    {
        return cudaErrorInvalidValue;
    }
    return cudaSuccess;
}

template <typename T, typename FactorR, typename FactorL>
cudaError_t launchTyped(Shape s, T const* Y, T const* X, FactorR R, FactorL L, T* out, void* workspace,
    cudaStream_t stream)
{
    if (cudaError_t const e = checkShape(s); e != cudaSuccess)
    {
        return e;
    }
    if (s.M == 0)
    {
        return cudaSuccess; // empty batch: nothing to do
    }
    auto* t = static_cast<float*>(workspace);
    gemmNT<<<gridFor(s.M, s.r), kThreads, 0, stream>>>(
        DenseOperand<T>{X, s.K}, R, s.M, s.r, s.K, StoreFloat{t, s.r});
    gemmNT<<<gridFor(s.M, s.N), kThreads, 0, stream>>>(
        DenseOperand<float>{t, s.r}, L, s.M, s.N, s.r, AddResidual<T>{Y, out, s.N});
    return cudaGetLastError();
}

template <typename T>
cudaError_t denseTyped(Shape s, void const* Y, void const* X, void const* R, void const* L, void* out, void* ws,
    cudaStream_t stream)
{
    return launchTyped<T>(s, static_cast<T const*>(Y), static_cast<T const*>(X),
        DenseOperand<T>{static_cast<T const*>(R), s.K}, DenseOperand<T>{static_cast<T const*>(L), s.r},
        static_cast<T*>(out), ws, stream);
}

template <typename T>
cudaError_t int4Typed(Shape s, int32_t group, void const* Y, void const* X, uint8_t const* Rq, void const* Rs,
    uint8_t const* Lq, void const* Ls, void* out, void* ws, cudaStream_t stream)
{
    return launchTyped<T>(s, static_cast<T const*>(Y), static_cast<T const*>(X),
        Int4Operand{Rq, static_cast<__half const*>(Rs), s.K, group},
        Int4Operand{Lq, static_cast<__half const*>(Ls), s.r, group}, static_cast<T*>(out), ws, stream);
}

} // namespace

size_t workspaceBytes(int64_t M, int64_t r)
{
    size_t const bytes = static_cast<size_t>(M > 0 ? M : 0) * static_cast<size_t>(r > 0 ? r : 0) * sizeof(float);
    return (bytes + 255) / 256 * 256;
}

cudaError_t launchDense(DType dtype, Shape shape, void const* Y, void const* X, void const* R, void const* L,
    void* out, void* workspace, cudaStream_t stream)
{
    switch (dtype)
    {
    case DType::kFLOAT: return denseTyped<float>(shape, Y, X, R, L, out, workspace, stream);
    case DType::kHALF: return denseTyped<__half>(shape, Y, X, R, L, out, workspace, stream);
    case DType::kBF16: return denseTyped<__nv_bfloat16>(shape, Y, X, R, L, out, workspace, stream);
    }
    return cudaErrorInvalidValue;
}

cudaError_t launchInt4(DType dtype, Shape shape, int32_t groupSize, void const* Y, void const* X,
    uint8_t const* Rpacked, void const* Rscale, uint8_t const* Lpacked, void const* Lscale, void* out,
    void* workspace, cudaStream_t stream)
{
    if (groupSize <= 0)
    {
        return cudaErrorInvalidValue;
    }
    switch (dtype)
    {
    case DType::kFLOAT:
        return int4Typed<float>(shape, groupSize, Y, X, Rpacked, Rscale, Lpacked, Lscale, out, workspace, stream);
    case DType::kHALF:
        return int4Typed<__half>(shape, groupSize, Y, X, Rpacked, Rscale, Lpacked, Lscale, out, workspace, stream);
    case DType::kBF16:
        return int4Typed<__nv_bfloat16>(shape, groupSize, Y, X, Rpacked, Rscale, Lpacked, Lscale, out, workspace, stream);
    }
    return cudaErrorInvalidValue;
}

} // namespace lowrank_add
} // namespace slim_trt
