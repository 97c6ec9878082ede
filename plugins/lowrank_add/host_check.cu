// CPU check of the LowRankAdd kernel math, no GPU needed: runs lowrank_add_reference.h (the kernels' exact
// operand conversions and fmaf order) on raw inputs written by the test suite, writes the raw output.
//
//   host_check DTYPE MODE M N K R GROUP INPUT OUTPUT
//     DTYPE  fp32 | fp16 | bf16 (type of Y, X, out and of dense R, L)
//     MODE   dense: INPUT = Y[M,N] X[M,K] R[R,K] L[N,R]                        (all DTYPE)
//            int4:  INPUT = Y[M,N] X[M,K] Rq Rs[R,ceil(K/G)] Lq Ls[N,ceil(R/G)]
//                   (Rq, Lq: ONNX-packed INT4 bytes, ceil(R*K/2) and ceil(N*R/2); scales fp16)
//     OUTPUT = out[M,N] (DTYPE)
// Built by tests/trt/test_lowrank_kernel.py with: nvcc -std=c++17 host_check.cu -o host_check
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "lowrank_add_reference.h"

using namespace slim_trt::lowrank_add;

namespace
{

struct Reader
{
    std::vector<unsigned char> bytes;
    size_t pos{0};

    template <typename T>
    std::vector<T> take(int64_t count)
    {
        size_t const n = static_cast<size_t>(count) * sizeof(T);
        if (pos + n > bytes.size())
        {
            std::fprintf(stderr, "input file too short\n");
            std::exit(2);
        }
        std::vector<T> out(static_cast<size_t>(count));
        std::memcpy(static_cast<void*>(out.data()), bytes.data() + pos, n);
        pos += n;
        return out;
    }
};

template <typename T>
int run(std::string const& mode, int64_t M, int64_t N, int64_t K, int64_t r, int32_t group, Reader& in, FILE* outFile)
{
    std::vector<T> const Y = in.take<T>(M * N);
    std::vector<T> const X = in.take<T>(M * K);
    std::vector<T> out(static_cast<size_t>(M * N));
    if (mode == "dense")
    {
        std::vector<T> const R = in.take<T>(r * K);
        std::vector<T> const L = in.take<T>(N * r);
        referenceHost<T>(M, N, K, r, Y.data(), X.data(), DenseOperand<T>{R.data(), K}, DenseOperand<T>{L.data(), r},
            out.data());
    }
    else if (mode == "int4")
    {
        std::vector<uint8_t> const Rq = in.take<uint8_t>((r * K + 1) / 2);
        std::vector<__half> const Rs = in.take<__half>(r * ((K + group - 1) / group));
        std::vector<uint8_t> const Lq = in.take<uint8_t>((N * r + 1) / 2);
        std::vector<__half> const Ls = in.take<__half>(N * ((r + group - 1) / group));
        referenceHost<T>(M, N, K, r, Y.data(), X.data(), Int4Operand{Rq.data(), Rs.data(), K, group},
            Int4Operand{Lq.data(), Ls.data(), r, group}, out.data());
    }
    else
    {
        std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
        return 2;
    }
    if (in.pos != in.bytes.size())
    {
        std::fprintf(stderr, "input file has %zu unread bytes\n", in.bytes.size() - in.pos);
        return 2;
    }
    return std::fwrite(out.data(), sizeof(T), out.size(), outFile) == out.size() ? 0 : 2;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 10)
    {
        std::fprintf(stderr, "usage: host_check DTYPE MODE M N K R GROUP INPUT OUTPUT\n");
        return 2;
    }
    std::string const dtype = argv[1];
    std::string const mode = argv[2];
    int64_t const M = std::atoll(argv[3]);
    int64_t const N = std::atoll(argv[4]);
    int64_t const K = std::atoll(argv[5]);
    int64_t const r = std::atoll(argv[6]);
    int32_t const group = std::atoi(argv[7]);
    if (M < 0 || N <= 0 || K <= 0 || r <= 0 || group <= 0)
    {
        std::fprintf(stderr, "bad sizes\n");
        return 2;
    }

    Reader in;
    FILE* f = std::fopen(argv[8], "rb");
    if (f == nullptr)
    {
        std::fprintf(stderr, "cannot open %s\n", argv[8]);
        return 2;
    }
    unsigned char buf[1 << 16];
    size_t n = 0;
    while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0)
    {
        in.bytes.insert(in.bytes.end(), buf, buf + n);
    }
    std::fclose(f);

    FILE* out = std::fopen(argv[9], "wb");
    if (out == nullptr)
    {
        std::fprintf(stderr, "cannot open %s\n", argv[9]);
        return 2;
    }
    int rc = 2;
    if (dtype == "fp32")
    {
        rc = run<float>(mode, M, N, K, r, group, in, out);
    }
    else if (dtype == "fp16")
    {
        rc = run<__half>(mode, M, N, K, r, group, in, out);
    }
    else if (dtype == "bf16")
    {
        rc = run<__nv_bfloat16>(mode, M, N, K, r, group, in, out);
    }
    else
    {
        std::fprintf(stderr, "unknown dtype %s\n", dtype.c_str());
    }
    std::fclose(out);
    return rc;
}
