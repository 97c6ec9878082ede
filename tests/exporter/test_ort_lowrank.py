"""The ONNX Runtime LowRankAdd kernel and the in-memory domain mapping; the file keeps the TensorRT contract."""
from __future__ import annotations

import numpy as np
import onnx
import torch

from slim_trt.exporter import ExportOptions, export_model
from slim_trt.exporter.ort_runtime import ORT_CONTRIB_DOMAIN, for_onnxruntime, low_rank_add, session
from tests.exporter.conftest import compressed_model


def test_kernel_matches_torch():
    g = np.random.default_rng(0)
    y, x = g.standard_normal((2, 3, 8)).astype(np.float32), g.standard_normal((2, 3, 12)).astype(np.float32)
    r, l_ = g.standard_normal((4, 12)).astype(np.float32), g.standard_normal((8, 4)).astype(np.float32)
    want = torch.from_numpy(y) + torch.nn.functional.linear(torch.nn.functional.linear(torch.from_numpy(x),
                                                                                       torch.from_numpy(r)),
                                                            torch.from_numpy(l_))
    np.testing.assert_allclose(low_rank_add(y, x, r, l_), want.numpy(), rtol=1e-5, atol=1e-5)


def test_domain_mapping_leaves_the_file_alone(tmp_path):
    for dtype in ("fp32", "fp16"):
        export_model(compressed_model("llama"), tmp_path / dtype, options=ExportOptions(dtype=dtype, lowrank="plugin"))
        path = tmp_path / dtype / "model.onnx"
        model = onnx.load(str(path))
        mapped, count = for_onnxruntime(model)
        assert count == 14
        assert not any(n.domain == "slim_trt" for n in mapped.graph.node)
        assert sum(n.domain == ORT_CONTRIB_DOMAIN for n in mapped.graph.node) == 14
        casts = sum(n.op_type == "Cast" and "/ort_f" in n.name for n in mapped.graph.node)
        assert casts == (14 * 5 if dtype == "fp16" else 0)  # fp16: 4 inputs + 1 output cast per node
        assert sum(n.domain == "slim_trt" for n in onnx.load(str(path)).graph.node) == 14
        assert session(path).get_outputs()[0].name == "logits"
