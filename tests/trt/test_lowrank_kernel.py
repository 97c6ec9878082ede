"""The LowRankAdd CUDA kernel: compiles without TensorRT for sm_80/87/90, and its math (run on the CPU through
lowrank_add_reference.h, the same operand conversions and fmaf order as the kernels) equals the NumPy model bit
for bit, stays within the error bound of the float64 formula, and agrees with the ONNX Runtime reference op."""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from slim_trt.exporter.linear import LOWRANK_PLUGIN
from slim_trt.runtime.export_session import low_rank_add
from slim_trt.trt import lowrank_ref as ref
from tests.trt.conftest import PLUGIN_DIR


@pytest.mark.parametrize("arch", ["sm_80", "sm_87", "sm_90"])
def test_kernel_compiles_without_tensorrt(nvcc, arch, tmp_path):
    obj = tmp_path / f"lowrank_add_{arch}.o"
    proc = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-c", str(PLUGIN_DIR / "lowrank_add_kernel.cu"),
                           "-o", str(obj)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert obj.stat().st_size > 10_000


def test_kernel_sources_do_not_include_tensorrt():
    for name in ("lowrank_add_kernel.cu", "lowrank_add_kernel.h", "lowrank_add_math.cuh", "lowrank_add_reference.h"):
        assert "NvInfer" not in (PLUGIN_DIR / name).read_text(), name


def test_plugin_identity_matches_the_exporter():
    header = (PLUGIN_DIR / "lowrank_add_plugin.h").read_text()
    consts = dict(re.findall(r'constexpr char const\* kPLUGIN_(\w+) = "([^"]*)";', header))
    assert consts == {"NAME": LOWRANK_PLUGIN["op_type"], "VERSION": LOWRANK_PLUGIN["plugin_version"],
                      "NAMESPACE": LOWRANK_PLUGIN["plugin_namespace"]}


def run_host_check(binary, tmp_path, dtype, mode, m, n, k, r, group, seed):
    rng = np.random.default_rng(seed)
    y, x = (ref.round_to(rng.standard_normal(s), dtype) for s in ((m, n), (m, k)))
    if mode == "dense":
        rf, lf = (ref.round_to(rng.standard_normal(s) * 0.1, dtype) for s in ((r, k), (n, r)))
        payload = b"".join(ref.to_bytes(v, dtype) for v in (y, x, rf, lf))
    else:
        rq, lq = rng.integers(-8, 8, (r, k)), rng.integers(-8, 8, (n, r))
        rs = (rng.random((r, -(-k // group))) * 0.02 + 1e-3).astype(np.float16)
        ls = (rng.random((n, -(-r // group))) * 0.02 + 1e-3).astype(np.float16)
        rp, lp = ref.pack_int4(rq), ref.pack_int4(lq)
        payload = (ref.to_bytes(y, dtype) + ref.to_bytes(x, dtype) + rp.tobytes() + rs.astype("<f2").tobytes()
                   + lp.tobytes() + ls.astype("<f2").tobytes())
        rf, lf = ref.dequantize_int4(rp, rs, r, k, group), ref.dequantize_int4(lp, ls, n, r, group)
    src, dst = tmp_path / f"{dtype}_{mode}.in", tmp_path / f"{dtype}_{mode}.out"
    src.write_bytes(payload)
    subprocess.run([str(binary), dtype, mode, str(m), str(n), str(k), str(r), str(group), str(src), str(dst)],
                   check=True, timeout=60)
    out = ref.from_bytes(dst.read_bytes(), dtype).reshape(m, n)
    return out, (y, x, rf, lf)


# odd sizes on purpose: partial tiles in every dimension, rows of packed INT4 that straddle bytes
@pytest.mark.parametrize("mode,m,n,k,r,group", [("dense", 5, 24, 70, 9, 128), ("int4", 5, 24, 70, 9, 32),
                                                ("int4", 3, 17, 200, 5, 128)])
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_kernel_math_on_cpu(host_check, tmp_path, dtype, mode, m, n, k, r, group):
    out, (y, x, rf, lf) = run_host_check(host_check, tmp_path, dtype, mode, m, n, k, r, group, seed=k + r)
    expected = ref.lowrank_add_kernel_order(y, x, rf, lf, dtype)
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))  # bit for bit
    err = np.abs(out - ref.lowrank_add_float64(y, x, rf, lf))
    assert (err <= ref.error_bound(y, x, rf, lf, dtype)).all()
    if dtype == "fp32":  # the ONNX Runtime op of the `plugin` export (fp32 numpy matmuls, another summation order)
        cpu_op = low_rank_add(y, x, rf, lf)
        assert np.abs(out - cpu_op).max() <= 1e-5 * (1 + np.abs(cpu_op).max())
