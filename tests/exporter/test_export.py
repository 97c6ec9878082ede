"""Export tiny compressed models and check the graph against PyTorch, the sidecar and the stored weights."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from slim_trt.checkpoint.compressed_linear import compressed_layers
from slim_trt.errors import SlimError
from slim_trt.exporter import LOWRANK_PLUGIN, ExportOptions, export_model
from slim_trt.runtime.export_session import session
from slim_trt.runtime.decoder import kernel_counts
from slim_trt.verification.compare import run_onnx
from tests.conftest import tiny_model, tiny_tokenizer
from tests.exporter.conftest import EXACT, compressed_model

FP32_TOL = 2e-4  # logits are O(1); fp32 graph vs eager PyTorch differ by summation order only


def _ids(n=2, length=24, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _max_err(onnx_path, model, ids, decode_steps):
    logits, _, _ = run_onnx(session(onnx_path), ids, decode_steps)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    return float((logits - ref).abs().max())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("lowrank", ["decomposed", "plugin"])
@pytest.mark.parametrize("with_cache", [True, False])
def test_export_matches_pytorch(family, lowrank, with_cache, tmp_path):
    model = compressed_model(family)
    meta = export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32", lowrank=lowrank,
                                                                     with_cache=with_cache))
    path = tmp_path / "e" / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert proto.ir_version == 10 and {o.domain: o.version for o in proto.opset_import}[""] == 21
    # 24 tokens: 20 prefill + 4 cached steps; Gemma's sliding window is 16, so the cache outgrows it.
    assert _max_err(path, model, _ids(), decode_steps=4) < FP32_TOL
    plugin_nodes = [n for n in proto.graph.node if n.op_type == "LowRankAdd"]
    assert len(plugin_nodes) == (14 if lowrank == "plugin" else 0)
    for n in plugin_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a).decode() for a in n.attribute}
        assert n.domain == "slim_trt" and attrs == {"plugin_version": "1", "plugin_namespace": "slim_trt"}
    names = [i.name for i in proto.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ("past_key_values.1.value" in names) == with_cache
    assert [o.name for o in proto.graph.output][:1] == ["logits"]
    assert len(meta["compressed_layers"]) == 14


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_other_families(family, tmp_path):
    model = compressed_model(family)
    meta = export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32"))
    assert _max_err(tmp_path / "e" / "model.onnx", model, _ids(), decode_steps=3) < FP32_TOL
    assert ("position_ids" in [i["name"] for i in meta["inputs"]]) == (family != "opt")


def test_sliding_window_with_long_cache(tmp_path):
    """Gemma 3 local layers (window 16) stay exact through 24 cached steps past a 16-token prefill."""
    model = compressed_model("gemma3")
    export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32"))
    assert _max_err(tmp_path / "e" / "model.onnx", model, _ids(n=1, length=40), decode_steps=24) < FP32_TOL


def test_padding_mask(tmp_path):
    """Left padding: the padded row's real-token logits equal the unpadded run's."""
    model = compressed_model("llama")
    export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32", with_cache=False))
    sess = session(tmp_path / "e" / "model.onnx")
    ids = _ids(n=1, length=10).numpy()
    feed = lambda x, m, p: {"input_ids": x, "attention_mask": m, "position_ids": p}  # noqa: E731
    plain = sess.run(["logits"], feed(ids, np.ones_like(ids), np.arange(10)[None]))[0]
    padded_ids = np.concatenate([np.zeros((1, 3), np.int64), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), np.int64), np.ones_like(ids)], axis=1)
    pos = np.concatenate([np.zeros((1, 3), np.int64), np.arange(10)[None]], axis=1)
    padded = sess.run(["logits"], feed(padded_ids, mask, pos))[0]
    np.testing.assert_allclose(padded[:, 3:], plain, atol=FP32_TOL)


@pytest.mark.parametrize("bits,group_size", [(4, 0), (4, 16), (8, -1)])
def test_2to4_pattern_read_back_exact(bits, group_size, tmp_path):
    model = compressed_model("llama", bits=bits, group_size=group_size, quantize_adapters=True)
    meta = export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32"))
    proto = onnx.load(str(tmp_path / "e" / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    layers = dict(compressed_layers(model))
    for rec in meta["compressed_layers"]:
        t = inits[rec["onnx_weight"]]
        assert t.data_type == (TensorProto.INT4 if bits == 4 else TensorProto.INT8)
        q = numpy_helper.to_array(t).astype(np.int8)                       # [K, N]
        assert list(q.shape) == [rec["K"], rec["N"]]
        np.testing.assert_array_equal(q.T, layers[rec["name"]].qweight.q.numpy())
        nonzero_per_group = (q != 0).reshape(rec["K"] // 4, 4, rec["N"]).sum(axis=1)
        assert nonzero_per_group.max() <= 2
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 14 * 3  # weight + two quantized adapters per layer
    assert all(len(n.input) == 2 for n in dq)  # no zero points
    assert _max_err(tmp_path / "e" / "model.onnx", model, _ids(), decode_steps=2) < FP32_TOL


def test_fp16_export(tmp_path):
    model = compressed_model("gemma3")
    export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp16", lowrank="plugin"))
    proto = onnx.load(str(tmp_path / "e" / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    scales = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert scales and all(s.data_type == TensorProto.FLOAT16 for s in scales)
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert _max_err(tmp_path / "e" / "model.onnx", model, _ids(), decode_steps=4) < 0.05


def test_bf16_export_is_typed(tmp_path):
    meta = export_model(compressed_model("llama"), tmp_path / "e", options=ExportOptions(dtype="bf16"))
    proto = onnx.load(str(tmp_path / "e" / "model.onnx"))
    assert meta["inputs"][3]["dtype"] == "bfloat16"
    assert {t.data_type for t in proto.graph.initializer if t.name.endswith(".scale")} == {TensorProto.BFLOAT16}


def test_act_quant_int8_matches_fake_quant(tmp_path):
    model = compressed_model("llama")
    calib = _ids(n=4, length=16, seed=3)
    export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32", act_quant="int8"), calib_windows=calib)
    proto = onnx.load(str(tmp_path / "e" / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == 14
    for n in q_nodes:
        zp = inits[n.input[2]]
        assert zp.data_type == TensorProto.INT8 and numpy_helper.to_array(zp) == 0
    # PyTorch with the same fake quantization on the base path of each compressed layer (the adapters see the
    # unquantized input, as in the graph).
    scales = {n.name.split("/")[0]: float(numpy_helper.to_array(inits[n.input[1]])) for n in q_nodes}
    for name, m in compressed_layers(model):
        s = scales[name]

        def fwd(x, m=m, s=s):
            xq = torch.clamp(torch.round(x / s), -128, 127) * s
            y = torch.nn.functional.linear(xq, m.weight, m.bias)
            return y + torch.nn.functional.linear(torch.nn.functional.linear(x, m.lora_R), m.lora_L)
        m.forward = fwd
    assert _max_err(tmp_path / "e" / "model.onnx", model, _ids(), decode_steps=2) < 1e-3


def test_sidecar_contract(tmp_path):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    meta = export_model(compressed_model("llama"), tmp_path / "e", options=ExportOptions(lowrank="plugin"),
                        tokenizer_dir=tok_dir, checkpoint_path="ckpt", manifest_sha256="ab" * 32)
    on_disk = json.loads((tmp_path / "e" / "slim_export.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    for key in ("schema_version", "model_file", "opset", "ir_version", "dtype", "with_cache", "lowrank", "act_quant",
                "architecture", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "inputs", "outputs", "dynamic_axes", "checkpoint", "tokenizer", "custom_ops", "options",
                "compressed_layers"):
        assert key in meta, key
    assert (meta["dtype"], meta["opset"], meta["ir_version"], meta["num_layers"]) == ("fp16", 21, 10, 2)
    assert meta["custom_ops"] == [LOWRANK_PLUGIN]
    assert meta["dynamic_axes"]["past_key_values.0.key"] == {"0": "batch", "2": "past_sequence"}
    assert meta["dynamic_axes"]["present.1.value"] == {"0": "batch", "2": "total_sequence"}
    assert meta["dynamic_axes"]["attention_mask"] == {"0": "batch", "1": "total_sequence"}
    assert meta["outputs"][0] == {"name": "logits", "dtype": "float16", "shape": ["batch", "sequence", 256]}
    assert meta["checkpoint"] == {"path": "ckpt", "manifest_sha256": "ab" * 32}
    from transformers import AutoTokenizer

    copied = AutoTokenizer.from_pretrained(tmp_path / "e" / meta["tokenizer"])
    text = "the first of the new year"
    assert copied(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]


def test_tied_embedding_stored_once(tmp_path):
    model = tiny_model("gemma3")
    model.lm_head.weight = model.model.embed_tokens.weight
    export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32"))
    proto = onnx.load(str(tmp_path / "e" / "model.onnx"))
    big = [t.name for t in proto.graph.initializer if list(t.dims) == [256, 64]]
    assert big == ["model.embed_tokens.weight"]
    assert _max_err(tmp_path / "e" / "model.onnx", model, _ids(), decode_steps=2) < FP32_TOL


def test_external_data(tmp_path):
    model = compressed_model("llama")
    meta = export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32", external_data=True))
    assert meta["external_data"] == "model.onnx.data" and (tmp_path / "e" / "model.onnx.data").stat().st_size > 0
    assert _max_err(tmp_path / "e" / "model.onnx", model, _ids(), decode_steps=2) < FP32_TOL


def test_output_is_not_overwritten_without_force(tmp_path):
    model = compressed_model("llama")
    export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32"))
    with pytest.raises(SlimError, match="--force"):
        export_model(model, tmp_path / "e")
    export_model(model, tmp_path / "e", options=ExportOptions(dtype="fp16"), force=True)
    assert json.loads((tmp_path / "e" / "slim_export.json").read_text())["dtype"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no temporary folders left behind


def test_bad_options_and_models(tmp_path):
    with pytest.raises(SlimError, match="--dtype"):
        ExportOptions(dtype="int4")
    with pytest.raises(SlimError, match="--lowrank"):
        ExportOptions(lowrank="fused")
    with pytest.raises(SlimError, match="calibration"):
        export_model(compressed_model("llama"), tmp_path / "e", options=ExportOptions(act_quant="int8"))
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(SlimError, match="architecture 'gpt2'"):
        export_model(gpt2, tmp_path / "g")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("lowrank", ["decomposed", "plugin"])
@pytest.mark.parametrize("group_size", [0, -1, 16])
def test_quantized_weights_run_as_packed_integers(lowrank, group_size, tmp_path):
    """The session config the sidecar declares is what ONNX Runtime runs: every INT4 weight (base and 4-bit
    adapters, any scale granularity, either low-rank form) as a MatMulNBits kernel, none as a float copy."""
    model = compressed_model("llama", group_size=group_size, quantize_adapters=True)
    meta = export_model(model, tmp_path / "e", options=ExportOptions(**EXACT, dtype="fp32", lowrank=lowrank))
    assert meta["onnxruntime"] == {"session_config": {"session.disable_quant_qdq": "0",
                                                      "session.qdq_matmulnbits_accuracy_level": "1"}}
    path = tmp_path / "e" / "model.onnx"
    logits, _, _ = run_onnx(session(path, optimized_model_path=tmp_path / "fused.onnx"), _ids(), decode_steps=2)
    fused = kernel_counts(tmp_path / "fused.onnx")
    # per layer: q/k/v + their R share one kernel, o + R, gate/up + R, down + R, and the 7 L factors (ort_rewrite)
    assert fused["matmul_nbits"] == 2 * 11 and fused["unfused_dequantize"] == {}
    with torch.no_grad():
        assert float((logits - model(input_ids=_ids(), use_cache=False).logits).abs().max()) < FP32_TOL
    session(path, fuse=False, optimized_model_path=tmp_path / "plain.onnx")
    plain = kernel_counts(tmp_path / "plain.onnx")
    assert plain["matmul_nbits"] == 0 and "DequantizeLinear" not in plain["ops"]  # folded to float at load


def test_dense_model_exports_as_the_baseline(tmp_path):
    model = tiny_model("gemma3")
    meta = export_model(model, tmp_path / "e", options=ExportOptions(dtype="fp32", head="int8",
                                                                               ort_accuracy_level=1),
                        source_model="tiny")
    assert meta["compressed_layers"] == [] and meta["source_model"] == "tiny" and meta["head"]["quantization"] == "int8"
    assert _max_err(tmp_path / "e" / "model.onnx", _head_quantized(model, "int8"), _ids(), decode_steps=3) < FP32_TOL


def _head_quantized(model, head):
    import copy

    from slim_trt.exporter.head import apply_head_quantization

    model = copy.deepcopy(model)
    apply_head_quantization(model, head)
    return model


def test_default_options_are_the_measured_ones():
    level = "session.qdq_matmulnbits_accuracy_level"
    assert ExportOptions().head == "int8" and ExportOptions().session_config()[level] == "4"
    # a graph that quantizes its activations itself is not rounded to int8 a second time, unless asked
    assert ExportOptions(act_quant="int8").session_config()[level] == "1"
    assert ExportOptions(act_quant="int8", ort_accuracy_level=4).session_config()[level] == "4"
    with pytest.raises(SlimError, match="--ort-accuracy-level"):
        ExportOptions(ort_accuracy_level=2)
