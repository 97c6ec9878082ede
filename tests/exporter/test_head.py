"""`--head int8|int4`: the embedding and LM head quantized weight-only, one tensor when tied; ONNX Runtime reads it
packed (GatherBlockQuantized + MatMulNBits), and the logits match the reference given the same quantized head."""
from __future__ import annotations

import copy

import onnx
import pytest
import torch
from onnx import TensorProto

from slim_trt.exporter import ExportOptions, export_model
from slim_trt.exporter.head import apply_head_quantization, quantize_table
from slim_trt.runtime.export_session import session
from slim_trt.runtime.decoder import kernel_counts
from slim_trt.verification.compare import run_onnx
from tests.exporter.conftest import compressed_model

FP32_TOL = 2e-4


def _tied(family: str):
    model = compressed_model(family)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    return model


def _ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("head", ["int8", "int4"])
@pytest.mark.parametrize("family,tied", [("gemma3", True), ("llama", False), ("opt", True)])
def test_quantized_head_runs_packed_and_matches_its_reference(family, tied, head, tmp_path):
    model = _tied(family) if tied else compressed_model(family)
    meta = export_model(model, tmp_path / "e", options=ExportOptions(dtype="fp32", head=head, ort_accuracy_level=1))
    rec = meta["head"]
    assert rec["quantization"] == head and rec["tied"] == tied and rec["bits"] == int(head[-1])
    assert rec["group_size"] == (128 if head == "int4" else -1)
    path = tmp_path / "e" / "model.onnx"
    proto = onnx.load(str(path))
    qtype = TensorProto.INT4 if head == "int4" else TensorProto.INT8
    tables = [t for t in proto.graph.initializer if t.name in (rec["embedding_weight"], rec["head_weight"])]
    assert len(tables) == (1 if tied else 2) and all(t.data_type == qtype for t in tables)
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [256, 64] for t in proto.graph.initializer)

    logits, _, _ = run_onnx(session(path, optimized_model_path=tmp_path / "opt.onnx"), _ids(), decode_steps=2)
    kernels = kernel_counts(tmp_path / "opt.onnx")
    # the head, and per layer one kernel per input the quantized base weights read (ort_rewrite): q/k/v, o, the
    # two MLP inputs (gate/up share one); the float adapters stay float MatMuls
    assert len(meta["compressed_layers"]) == 2 * (7 if family != "opt" else 6)
    assert kernels["gather_block_quantized"] == 1 and kernels["matmul_nbits"] == 2 * 4 + 1
    assert kernels["unfused_dequantize"] == {}
    reference = copy.deepcopy(model)
    apply_head_quantization(reference, head)
    with torch.no_grad():
        want = reference(input_ids=_ids(), use_cache=False).logits
        original = model(input_ids=_ids(), use_cache=False).logits
    # An 8-bit table's head runs int8 activations in ONNX Runtime (ort_rewrite: its only fast CPU kernel).
    tol = FP32_TOL if head == "int4" else 1e-2
    assert float((logits - want).abs().max()) < tol
    assert float((want - original).abs().max()) > 10 * FP32_TOL  # the quantization itself moves the logits


def test_quantization_error_int8_below_int4():
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    err = {m: float((quantize_table(w, m).dequantize() - w).norm() / w.norm()) for m in ("int8", "int4")}
    assert err["int8"] < 0.01 < err["int4"] < 0.15
