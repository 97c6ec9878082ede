// Host reference of the LowRankAdd kernels: the same operands, the same fmaf chain in the same order,
// so its results equal the GPU kernels' bit for bit. Used by host_check.cu (the CPU test of the kernel
// math) and available to a GPU test as an exact expectation. Host only; no TensorRT.
#pragma once

#include <cstdint>
#include <vector>

#include "lowrank_add_math.cuh"

namespace slim_trt
{
namespace lowrank_add
{

// out [M, N] = round(Y + (X R^T) L^T). `R(j, k)` and `L(n, j)` return factor elements as float
// (DenseOperand or Int4Operand).
template <typename T, typename FactorR, typename FactorL>
void referenceHost(int64_t M, int64_t N, int64_t K, int64_t r, T const* Y, T const* X, FactorR R, FactorL L, T* out)
{
    DenseOperand<T> const x{X, K};
    std::vector<float> t(static_cast<size_t>(M * r));
    for (int64_t m = 0; m < M; ++m)
    {
        for (int64_t j = 0; j < r; ++j)
        {
            float acc = 0.F;
            for (int64_t k = 0; k < K; ++k)
            {
                acc = fmaStep(acc, x(m, k), R(j, k));
            }
            t[static_cast<size_t>(m * r + j)] = acc;
        }
    }
    DenseOperand<float> const tt{t.data(), r};
    for (int64_t m = 0; m < M; ++m)
    {
        for (int64_t n = 0; n < N; ++n)
        {
            float acc = 0.F;
            for (int64_t j = 0; j < r; ++j)
            {
                acc = fmaStep(acc, tt(m, j), L(n, j));
            }
            out[m * N + n] = addResidual<T>(acc, Y[m * N + n]);
        }
    }
}

} // namespace lowrank_add
} // namespace slim_trt
