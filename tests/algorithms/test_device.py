"""The algorithms make every tensor on the device of their inputs (--device cuda runs them on the GPU).

No GPU here, so the check runs on the CPU with torch's default device set to "meta": a tensor made without
an explicit device would land on "meta", and the first operation mixing it with the CPU inputs would fail."""
import pytest

from tests.conftest import slim_2to4
import torch

from slim_trt.algorithms.pipeline import compress_weight
from slim_trt.config import PRESETS, CompressConfig


@pytest.mark.parametrize("cfg", [CompressConfig(**PRESETS["int4-dense"]), slim_2to4(), CompressConfig(**PRESETS["slim-paper"]),
                                 slim_2to4(quantizer="gptq", pruner="wanda", sparsity="unstructured:0.5"),
                                 slim_2to4(group_size=0, refit_rounds=1)],
                         ids=["int4-dense", "slim-2to4", "slim-paper", "gptq-wanda-unstructured", "per-tensor"])
def test_compress_weight_creates_nothing_off_the_input_device(cfg, correlated_inputs):
    X = correlated_inputs(k=64)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    H = 2 * X.T @ X / X.shape[0]
    act_norm = X.norm(dim=0)
    with torch.device("meta"):
        cw = compress_weight(W, H, act_norm, act_norm, cfg)
    assert cw.base_float().device.type == "cpu" and cw.rel_error < cw.rel_error_base < 1.0
