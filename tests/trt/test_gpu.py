"""End to end on a GPU: build tiny exports with and without sparsity and with the LowRankAdd plugin, compare
with ONNX Runtime, benchmark. Marked `gpu`: skipped (with the reason) without TensorRT and an NVIDIA GPU.
The plugin tests also need the plugin built (plugins/lowrank_add/README.md)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slim_trt.trt import lowrank_ref as ref
from slim_trt.trt.plugins import find_plugin_library
from slim_trt.trt.shapes import Range

pytestmark = pytest.mark.gpu
SHAPES = dict(batch=Range(1, 1, 2), seq=Range(1, 16, 64), past=Range(0, 32, 128))


@pytest.fixture(scope="module")
def engines(tiny_exports, tmp_path_factory):
    from slim_trt.trt import build

    out = tmp_path_factory.mktemp("engines")
    reports = {}
    for name, sparsity in (("sparse", True), ("dense", False)):
        reports[name] = build(tiny_exports["decomposed"], out / f"{name}.plan", sparsity=sparsity, **SHAPES)
    return out, reports


@pytest.fixture(scope="module")
def plugin_library():
    lib = find_plugin_library("liblowrank_add_plugin.so")
    if lib is None:
        pytest.skip("liblowrank_add_plugin.so is not built: see plugins/lowrank_add/README.md")
    return lib


def test_build_reports(engines):
    folder, reports = engines
    sparse, dense = reports["sparse"], reports["dense"]
    for name in ("sparse", "dense"):
        assert (folder / f"{name}.plan").stat().st_size == reports[name].engine_bytes > 0
        assert (folder / f"{name}.build.json").is_file() and (folder / f"{name}.build.log").is_file()
        assert not list(folder.glob("*.partial"))
    assert sparse.options["sparsity"] and not dense.options["sparsity"]
    assert sparse.sparsity["log_found"], "TensorRT printed no (Sparsity) lines with SPARSE_WEIGHTS on"
    assert sparse.summary.startswith("sparse tactics picked for ")
    assert dense.summary == "sparsity disabled (--no-sparsity): dense build"
    assert sum(sparse.layer_types.values()) > 0


@pytest.mark.parametrize("name", ["sparse", "dense"])
def test_engine_matches_onnxruntime(engines, tiny_exports, name):
    from slim_trt.verification.engine import verify_engine

    folder, _ = engines
    result = verify_engine(tiny_exports["decomposed"], folder / f"{name}.plan", windows=1, seqlen=16, decode_steps=3)
    assert result["passed"], result["metrics"]
    assert result["iterations"] == 4 and result["metrics"]["top1"] >= 0.9


def test_bench_side_by_side(engines):
    from slim_trt.trt import bench, format_bench

    folder, _ = engines
    result = bench(folder / "sparse.plan", compare=folder / "dense.plan", iterations=5, warmup=1)
    for e in result["engines"]:
        assert e["prefill"]["tokens_per_s"] > 0 and e["decode"]["tokens_per_s"] > 0
    assert set(result["speedup"]) == {"prefill", "decode"}
    assert "sparse.plan" in format_bench(result) and "dense.plan" in format_bench(result)


def test_plugin_export_builds_and_matches_onnxruntime(tiny_exports, plugin_library, tmp_path):
    from slim_trt.trt import build
    from slim_trt.verification.engine import verify_engine

    report = build(tiny_exports["plugin"], tmp_path / "plugin.plan", plugins=[str(plugin_library)], **SHAPES)
    assert report.options["plugins"] == [str(plugin_library)]
    result = verify_engine(tiny_exports["plugin"], tmp_path / "plugin.plan", windows=1, seqlen=16, decode_steps=3)
    assert result["passed"], result["metrics"]


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_plugin_equals_the_kernel_reference_bit_for_bit(plugin_library, tmp_path, dtype):
    """One LowRankAdd node in TensorRT against the NumPy model of the kernel (the same fmaf chain)."""
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    from slim_trt.trt import build

    m, n, k, r = 7, 48, 96, 8
    elem = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16, "fp32": TensorProto.FLOAT}[dtype]
    rng = np.random.default_rng(0)
    y, x = (ref.round_to(rng.standard_normal(s), dtype) for s in ((m, n), (m, k)))
    rr, ll = (ref.round_to(rng.standard_normal(s) * 0.1, dtype) for s in ((r, k), (n, r)))

    def init(name, v):
        if dtype == "bf16":
            return helper.make_tensor(name, TensorProto.BFLOAT16, v.shape, ref.bf16_bits(v).tobytes(), raw=True)
        return numpy_helper.from_array(v.astype(np.float16 if dtype == "fp16" else np.float32), name)

    node = helper.make_node("LowRankAdd", ["Y", "X", "R", "L"], ["out"], domain="slim_trt",
                            plugin_version="1", plugin_namespace="slim_trt")
    graph = helper.make_graph([node], "lowrank_add", [helper.make_tensor_value_info("Y", elem, [m, n]),
                                                     helper.make_tensor_value_info("X", elem, [m, k])],
                              [helper.make_tensor_value_info("out", elem, [m, n])],
                              initializer=[init("R", rr), init("L", ll)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("slim_trt", 1)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "model.onnx"))
    build(tmp_path / "model.onnx", tmp_path / "op.plan", plugins=[str(plugin_library)], skip_lint=True)
    feed = {"Y": y, "X": x} if dtype == "fp32" else None
    if dtype == "fp16":
        feed = {"Y": y.astype(np.float16), "X": x.astype(np.float16)}
    if dtype == "bf16":
        import torch

        feed = {"Y": torch.from_numpy(y).to(torch.bfloat16), "X": torch.from_numpy(x).to(torch.bfloat16)}
    with TrtRunner(EngineFromPath(str(tmp_path / "op.plan"))) as runner:
        out = runner.infer(feed)["out"]
    out = out.float().numpy() if hasattr(out, "float") else np.asarray(out, dtype=np.float32)
    expected = ref.lowrank_add_kernel_order(y, x, rr, ll, dtype)
    assert np.array_equal(out.astype(np.float32).view(np.uint32), expected.view(np.uint32))
