"""Optimization-profile shapes: flag syntax, defaults from the target, mapping onto the export's inputs."""
from __future__ import annotations

import pytest

from slim_trt.cli import main
from slim_trt.errors import SlimError
from slim_trt.trt.shapes import Range, ShapeRanges, input_profiles, kv_cache_bytes, shape_ranges
from slim_trt.targets.profile import load_target

META = {  # the relevant part of a slim_export.json (2 layers, 2 KV heads of 16)
    "with_cache": True, "max_position_embeddings": 4096,
    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
               {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
               {"name": "past_key_values.0.key", "dtype": "float16", "shape": ["batch", 2, "past_sequence", 16]}],
    "outputs": [{"name": "logits", "dtype": "float16", "shape": ["batch", "sequence", 256]}]
    + [{"name": f"present.{i}.{kv}", "dtype": "float16", "shape": ["batch", 2, "total_sequence", 16]}
       for i in range(2) for kv in ("key", "value")],
}


def test_range_syntax():
    assert Range.parse("1,128,2048") == Range(1, 128, 2048)
    assert Range.parse(" 64 ") == Range(64, 64, 64)
    assert Range.parse("0,0,512", floor=0) == Range(0, 0, 512)
    for bad, msg in [("a,b,c", "give MIN,OPT,MAX integers"), ("1,2", "three integers"),
                     ("8,4,2", "need 1 <= MIN <= OPT <= MAX"), ("0,1,2", "need 1 <= MIN")]:
        with pytest.raises(SlimError, match=msg):
            Range.parse(bad, flag="--seq")


def test_flags_override_target_defaults():
    hopper = load_target("hopper").default_shapes  # batch 1,1,16  sequence 1,256,4096  past 0,1024,8192
    r = shape_ranges(META, hopper, seq="1,64,512")
    assert r == ShapeRanges(Range(1, 1, 16), Range(1, 64, 512), Range(0, 1024, 3584))  # past fills 4096 - 512
    assert r.axis("total_sequence") == Range(1, 1088, 4096)
    # no flags: the prompt gets half of the 4096-token context, the past the rest
    assert shape_ranges(META, hopper) == ShapeRanges(Range(1, 1, 16), Range(1, 256, 2048), Range(0, 1024, 2048))


def test_shape_errors():
    with pytest.raises(SlimError, match="exceeds the model's context of 4096 tokens"):
        shape_ranges(META, None, seq="1,128,2048", past="0,512,4096")
    with pytest.raises(SlimError, match="no KV cache"):
        shape_ranges(META | {"with_cache": False}, None, past="0,1,8")
    assert shape_ranges(META | {"with_cache": False}, None).past_sequence == Range(0, 0, 0)
    with pytest.raises(SlimError, match="unknown axis name 'tokens'"):
        input_profiles({"inputs": [{"name": "x", "shape": ["tokens"]}]}, shape_ranges(META, None))


def test_input_profiles_and_cache_size():
    r = ShapeRanges(Range(1, 2, 4), Range(1, 16, 64), Range(0, 32, 128))
    shapes = input_profiles(META, r)
    assert shapes["input_ids"] == ((1, 1), (2, 16), (4, 64))
    assert shapes["attention_mask"] == ((1, 1), (2, 48), (4, 192))
    assert shapes["past_key_values.0.key"] == ((1, 2, 0, 16), (2, 2, 32, 16), (4, 2, 128, 16))
    # 4 present tensors x batch 4 x 2 heads x 192 positions x 16 dims x 2 bytes
    assert kv_cache_bytes(META, r) == 4 * 4 * 2 * 192 * 16 * 2


def test_cli_rejects_bad_range_syntax(capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "model.onnx", "-o", "x.plan", "--past", "9,3,1"])
    assert e.value.code == 2
    assert "argument --past: bad --past 9,3,1: need 0 <= MIN <= OPT <= MAX" in capsys.readouterr().err
