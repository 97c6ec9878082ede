"""The build's checks of an export against the target's features (CPU only: no TensorRT needed)."""
import pytest

from slim_trt.errors import SlimError
from slim_trt.targets.profile import load_target
from slim_trt.trt.builder import feature_warnings

FP8_EXPORT = {"dtype": "fp16", "act_quant": "int8", "act_format": "fp8", "compressed_layers": [{"bits": 8}]}


@pytest.mark.parametrize("target", ["hopper", "ada", "jetson-thor"])
def test_an_fp8_export_builds_for_the_fp8_gpus(target):
    assert feature_warnings(FP8_EXPORT, load_target(target), sparsity=True) == []


@pytest.mark.parametrize("target", ["ampere", "jetson-orin"])
def test_an_fp8_export_is_refused_where_there_is_no_fp8(target):
    with pytest.raises(SlimError, match="no FP8 tensor cores.*--preset trt-int8-sparse"):
        feature_warnings(FP8_EXPORT, load_target(target), sparsity=True)
