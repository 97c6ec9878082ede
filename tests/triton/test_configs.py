"""config.pbtxt generation: read the text back with Triton's own schema and check the fields."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("tritonclient.grpc", reason="configs are built with tritonclient's model_config_pb2")

from slim_trt.triton import configs, read_export  # noqa: E402
from slim_trt.runtime.decoder import DecoderSpec  # noqa: E402
from tests.triton.toy_export import HEAD_DIM, KV_HEADS, VOCAB, build_toy_export  # noqa: E402


def roundtrip(message):
    return configs.parse(configs.render(message))


def io(config, direction="input"):
    pb = configs._pb()
    return {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in getattr(config, direction)}


def test_onnxruntime_config_batches_on_axis_0(toy_export):
    info = read_export(toy_export)
    c = roundtrip(configs.onnxruntime_config("m_ort", info.spec, "fp32", configs.ModelOptions(max_batch_size=4)))
    assert (c.name, c.platform, c.backend, c.max_batch_size) == ("m_ort", "onnxruntime_onnx", "onnxruntime", 4)
    assert c.dynamic_batching.max_queue_delay_microseconds == configs.QUEUE_DELAY_US
    assert io(c) == {"input_ids": ("TYPE_INT64", [-1]), "attention_mask": ("TYPE_INT64", [-1]),
                     "position_ids": ("TYPE_INT64", [-1]),
                     **{f"past_key_values.{i}.{kv}": ("TYPE_FP32", [KV_HEADS, -1, HEAD_DIM])
                        for i in range(2) for kv in ("key", "value")}}
    assert io(c, "output")["logits"] == ("TYPE_FP32", [-1, len(VOCAB)])
    assert [(g.kind, g.count) for g in c.instance_group] == [(c.instance_group[0].KIND_CPU, 1)]
    assert not c.HasField("optimization") and not c.model_operations.op_library_filename


def test_fp16_gpu_with_tensorrt_accelerator_and_op_library(tmp_path):
    info = read_export(build_toy_export(tmp_path / "e", dtype="float16", tokenizer=False))
    options = configs.ModelOptions(device="gpu", instances=2, trt_accelerator=True, ort_op_library="/x/libslim.so")
    c = roundtrip(configs.onnxruntime_config("m", info.spec, "fp16", options))
    assert io(c)["past_key_values.0.key"] == ("TYPE_FP16", [KV_HEADS, -1, HEAD_DIM])
    assert [(g.kind, g.count) for g in c.instance_group] == [(c.instance_group[0].KIND_GPU, 2)]
    (accelerator,) = c.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": "FP16", "trt_sparsity_enable": "1",
                                            "trt_engine_cache_enable": "1", "max_workspace_size_bytes": str(1 << 30)}
    assert list(c.model_operations.op_library_filename) == ["/x/libslim.so"]


def test_tensorrt_config_is_on_the_gpu(toy_export):
    info = read_export(toy_export)
    c = roundtrip(configs.tensorrt_config("m_trt", info.spec, configs.ModelOptions(max_batch_size=2)))
    assert (c.platform, c.backend, c.default_model_filename, c.max_batch_size) == \
        ("tensorrt_plan", "tensorrt", "model.plan", 2)
    assert c.instance_group[0].kind == c.instance_group[0].KIND_GPU
    assert io(c) == io(roundtrip(configs.onnxruntime_config("x", info.spec, "fp32", configs.ModelOptions())))


def test_no_batching_when_axis_0_is_not_shared_or_turned_off(toy_export):
    raw = json.loads((toy_export / "slim_export.json").read_text())
    spec = DecoderSpec.from_manifest(raw)
    assert configs.batch_axis(spec) == "batch"
    off = roundtrip(configs.python_onnx_config("m", spec, configs.ModelOptions(max_batch_size=0)))
    assert off.max_batch_size == 0 and not off.HasField("dynamic_batching")
    assert io(off)["input_ids"] == ("TYPE_INT64", [-1, -1])  # the batch axis stays part of the dims
    raw["inputs"][0]["shape"] = [1, "sequence"]  # a fixed batch of 1: Triton must not batch
    fixed = DecoderSpec.from_manifest(raw)
    assert configs.batch_axis(fixed) is None
    c = roundtrip(configs.python_onnx_config("m", fixed, configs.ModelOptions(max_batch_size=8)))
    assert c.max_batch_size == 0 and io(c)["input_ids"] == ("TYPE_INT64", [1, -1])


def test_generate_config(toy_export):
    c = roundtrip(configs.python_generate_config("g", configs.ModelOptions(default_max_new_tokens=7,
                                                                          generate_via="m_trt")))
    assert (c.backend, c.max_batch_size) == ("python", 0) and not c.HasField("dynamic_batching")
    assert io(c) == {"prompt": ("TYPE_STRING", [1]), "max_new_tokens": ("TYPE_INT32", [1]),
                     "temperature": ("TYPE_FP32", [1]), "top_k": ("TYPE_INT32", [1]), "top_p": ("TYPE_FP32", [1]),
                     "seed": ("TYPE_INT64", [1])}
    assert [t.name for t in c.input if not t.optional] == ["prompt"]
    assert io(c, "output") == {"text": ("TYPE_STRING", [1]), "token_ids": ("TYPE_INT64", [-1]),
                               "prompt_tokens": ("TYPE_INT32", [1])}
    assert c.parameters["default_max_new_tokens"].string_value == "7"
    assert c.parameters["decoder_model"].string_value == "m_trt"
