"""A tiny export folder with exactly the exporter's interface (model.onnx + slim_export.json + tokenizer/), built
with onnx.helper so the deploy tests do not depend on the exporter.

The model is attention-free but has a real cache: each layer appends its keys/values to the past, and a causal
running mean (CumSum along the sequence, masked by attention_mask) of key*value feeds the next hidden state, so the
logits depend on every earlier token through the cache exactly as they would through attention.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WORDS = [f"w{i}" for i in range(60)]
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
VOCAB = SPECIALS + WORDS  # 64 tokens
LAYERS, KV_HEADS, HEAD_DIM, MAX_POS = 2, 2, 4, 48
HIDDEN = KV_HEADS * HEAD_DIM
EOS_ID = VOCAB.index("[EOS]")


def _init(name: str, array: np.ndarray):
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def toy_model(dtype: str = "float32", with_cache: bool = True, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    vocab = len(VOCAB)
    kv_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [_init("E", rng.normal(0, 1.0, (vocab, HIDDEN)).astype(np.float32)),
             _init("P", rng.normal(0, 0.5, (MAX_POS, HIDDEN)).astype(np.float32)),
             _init("W_out", rng.normal(0, 1.0, (HIDDEN, vocab)).astype(np.float32)),
             # Special tokens rarely win, so generations run to max_new_tokens and compare many tokens.
             _init("b_out", np.where(np.arange(vocab) < len(SPECIALS), -8.0, 0.0).astype(np.float32)),
             _init("split_heads", np.array([0, 0, KV_HEADS, HEAD_DIM], dtype=np.int64)),
             _init("merge_heads", np.array([0, 0, HIDDEN], dtype=np.int64)),
             _init("axis_seq", np.array(2, dtype=np.int64)),
             _init("axes_2", np.array([2], dtype=np.int64)),
             _init("axes_1_3", np.array([1, 3], dtype=np.int64)),
             _init("big", np.array([1 << 62], dtype=np.int64)),
             _init("one", np.array([1], dtype=np.int64)),
             _init("one_f", np.array(1.0, dtype=np.float32))]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["tok"]),
             helper.make_node("Gather", ["P", "position_ids"], ["pos"]),
             helper.make_node("Add", ["tok", "pos"], ["h0"]),
             # -S, to slice the last S positions of the running sum (the new tokens)
             helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
             helper.make_node("Gather", ["ids_shape", "one"], ["seq_len"], axis=0),
             helper.make_node("Neg", ["seq_len"], ["neg_seq"]),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask_f", "axes_1_3"], ["mask4"]),
             # how many unmasked positions each new token sees: the running sum becomes a running mean
             helper.make_node("CumSum", ["mask4", "axis_seq"], ["count_all"]),
             helper.make_node("Slice", ["count_all", "neg_seq", "big", "axes_2"], ["count_new"]),
             helper.make_node("Max", ["count_new", "one_f"], ["count"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])]
    h = "h0"
    for i in range(LAYERS):
        for kv in ("k", "v"):
            inits.append(_init(f"W{kv}{i}", rng.normal(0, 0.7, (HIDDEN, HIDDEN)).astype(np.float32)))
            nodes += [helper.make_node("MatMul", [h, f"W{kv}{i}"], [f"{kv}{i}_flat"]),
                      helper.make_node("Reshape", [f"{kv}{i}_flat", "split_heads"], [f"{kv}{i}_bshd"]),
                      helper.make_node("Transpose", [f"{kv}{i}_bshd"], [f"{kv}{i}_new32"], perm=[0, 2, 1, 3]),
                      helper.make_node("Cast", [f"{kv}{i}_new32"], [f"{kv}{i}_new"], to=kv_type)]
        key, value = f"present.{i}.key", f"present.{i}.value"
        if with_cache:
            for kv, full in (("k", key), ("v", value)):
                past = f"past_key_values.{i}.{'key' if kv == 'k' else 'value'}"
                inputs.append(helper.make_tensor_value_info(past, kv_type,
                                                            ["batch", KV_HEADS, "past_sequence", HEAD_DIM]))
                nodes.append(helper.make_node("Concat", [past, f"{kv}{i}_new"], [full], axis=2))
            outputs += [helper.make_tensor_value_info(n, kv_type, ["batch", KV_HEADS, "total_sequence", HEAD_DIM])
                        for n in (key, value)]
        else:
            key, value = f"k{i}_new", f"v{i}_new"
        inits.append(_init(f"Wo{i}", rng.normal(0, 1.0, (HIDDEN, HIDDEN)).astype(np.float32)))
        nodes += [helper.make_node("Cast", [key], [f"k{i}_32"], to=TensorProto.FLOAT),
                  helper.make_node("Cast", [value], [f"v{i}_32"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"k{i}_32", f"v{i}_32"], [f"kv{i}"]),
                  helper.make_node("Mul", [f"kv{i}", "mask4"], [f"kv{i}_masked"]),
                  helper.make_node("CumSum", [f"kv{i}_masked", "axis_seq"], [f"run{i}"]),
                  helper.make_node("Slice", [f"run{i}", "neg_seq", "big", "axes_2"], [f"run{i}_new"]),
                  helper.make_node("Div", [f"run{i}_new", "count"], [f"ctx{i}_bhsd"]),
                  helper.make_node("Transpose", [f"ctx{i}_bhsd"], [f"ctx{i}_bshd"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"ctx{i}_bshd", "merge_heads"], [f"ctx{i}"]),
                  helper.make_node("MatMul", [f"ctx{i}", f"Wo{i}"], [f"o{i}"]),
                  helper.make_node("Add", [h, f"o{i}"], [f"sum{i}"]),
                  helper.make_node("Tanh", [f"sum{i}"], [f"h{i + 1}"])]
        h = f"h{i + 1}"
    # a per-position logit bias keeps greedy decoding from settling on one token
    inits.append(_init("pos_logits", rng.normal(0, 1.0, (MAX_POS, vocab)).astype(np.float32)))
    nodes += [helper.make_node("MatMul", [h, "W_out"], ["logits_raw"]),
              helper.make_node("Gather", ["pos_logits", "position_ids"], ["logits_pos"]),
              helper.make_node("Add", ["logits_raw", "logits_pos"], ["logits_mixed"]),
              helper.make_node("Add", ["logits_mixed", "b_out"], ["logits"])]
    graph = helper.make_graph(nodes, "toy_decoder", inputs, outputs, inits)
    # onnx 1.23 writes IR 14 by default, newer than ONNX Runtime 1.31 reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _shape(value_info) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def toy_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]")


def build_toy_export(folder: str | Path, dtype: str = "float32", with_cache: bool = True,
                     tokenizer: bool = True, lowrank: str = "decomposed") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = toy_model(dtype, with_cache)
    onnx.save(model, str(folder / "model.onnx"))
    np_name = {TensorProto.INT64: "int64", TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
               TensorProto.BFLOAT16: "bfloat16"}

    def io(values):
        return [{"name": v.name, "dtype": np_name[v.type.tensor_type.elem_type], "shape": _shape(v)} for v in values]

    manifest = {
        "schema_version": 1, "model_file": "model.onnx",
        "dtype": {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype],
        "with_cache": with_cache, "lowrank": lowrank, "num_layers": LAYERS, "num_kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "vocab_size": len(VOCAB), "max_position_embeddings": MAX_POS,
        "inputs": io(model.graph.input), "outputs": io(model.graph.output),
        "dynamic_axes": {v.name: {str(i): d for i, d in enumerate(_shape(v)) if isinstance(d, str)}
                         for v in list(model.graph.input) + list(model.graph.output)},
        "tokenizer": "tokenizer" if tokenizer else None,
        "custom_ops": [{"op_type": "LowRankAdd", "domain": "slim_trt", "plugin_version": "1",
                        "plugin_namespace": "slim_trt"}] if lowrank == "plugin" else [],
    }
    (folder / "slim_export.json").write_text(json.dumps(manifest, indent=2))
    if tokenizer:
        toy_tokenizer().save_pretrained(str(folder / "tokenizer"))
    return folder


def prompt_of(n_words: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + 7 * i) % len(WORDS)] for i in range(n_words))
