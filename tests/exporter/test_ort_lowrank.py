"""LowRankAdd in ONNX Runtime: the plugin node's arithmetic, expanded in memory; the file keeps the TensorRT contract."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from slim_trt.exporter import ExportOptions, export_model
from slim_trt.runtime.export_session import low_rank_add, session
from slim_trt.runtime.ort_rewrite import for_onnxruntime
from slim_trt.verification.compare import run_onnx
from tests.exporter.conftest import compressed_model


def test_kernel_matches_torch():
    g = np.random.default_rng(0)
    y, x = g.standard_normal((2, 3, 8)).astype(np.float32), g.standard_normal((2, 3, 12)).astype(np.float32)
    r, l_ = g.standard_normal((4, 12)).astype(np.float32), g.standard_normal((8, 4)).astype(np.float32)
    want = torch.from_numpy(y) + torch.nn.functional.linear(torch.nn.functional.linear(torch.from_numpy(x),
                                                                                       torch.from_numpy(r)),
                                                            torch.from_numpy(l_))
    np.testing.assert_allclose(low_rank_add(y, x, r, l_), want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize_adapters", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_plugin_runs_as_the_decomposed_arithmetic(dtype, quantize_adapters, tmp_path):
    model = compressed_model("llama", quantize_adapters=quantize_adapters)
    for lowrank in ("plugin", "decomposed"):
        export_model(model, tmp_path / lowrank, options=ExportOptions(dtype=dtype, lowrank=lowrank))
    path = tmp_path / "plugin" / "model.onnx"
    proto = onnx.load(str(path))
    expanded, counts = for_onnxruntime(proto)
    assert counts["lowrank_expanded"] == 14
    assert not any(n.domain == "slim_trt" for n in expanded.graph.node)
    assert sum(n.domain == "slim_trt" for n in onnx.load(str(path)).graph.node) == 14  # the file is untouched
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    plugin, _, _ = run_onnx(session(path), ids, decode_steps=2)
    decomposed, _, _ = run_onnx(session(tmp_path / "decomposed" / "model.onnx"), ids, decode_steps=2)
    tol = 1e-4 if dtype == "fp32" else 2e-2
    assert float((plugin - decomposed).abs().max()) < tol
