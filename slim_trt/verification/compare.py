"""The limits and the arithmetic every comparison shares: pass/fail thresholds, logit metrics, the PyTorch
reference logits and an ONNX Runtime run over token windows (prefill, then decode steps through the KV cache).

Used by verify (ONNX Runtime vs PyTorch), the W8A8 checks and the TensorRT engine comparison alike.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import SlimError


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits. Defaults depend on the export dtype (fp32: numerical noise only; fp16/bf16: rounding)."""

    max_abs: float
    mean_abs: float
    cosine_min: float
    top1_min: float
    ppl_rel_max: float

    @staticmethod
    def for_dtype(dtype: str) -> "Thresholds":
        if dtype == "fp32":
            # Gemma 3 270M measured max 5.3e-5, mean 4.5e-6: summation-order noise only.
            return Thresholds(max_abs=1e-2, mean_abs=1e-3, cosine_min=0.99999, top1_min=0.99, ppl_rel_max=1e-3)
        if dtype == "fp16":
            # Gemma 3 270M (SLiM 2:4 + INT4) measured 0.084 / 0.0036 / 0.999988 / 100% / 2.5e-4: ~5-20x margin.
            return Thresholds(max_abs=0.5, mean_abs=0.05, cosine_min=0.999, top1_min=0.97, ppl_rel_max=0.01)
        return Thresholds(max_abs=2.0, mean_abs=0.25, cosine_min=0.995, top1_min=0.90, ppl_rel_max=0.05)

    @staticmethod
    def for_export(dtype: str, meta: dict) -> "Thresholds":
        """for_dtype, loosened where ONNX Runtime runs int8 activations for the export (slim_export.json `meta`):
        its MatMulNBits at accuracy level 4 quantize every activation block on the fly, which moves logits far more
        than summation noise. Gemma 3 270M at level 4 measured, on verify's default 2 x 64 tokens, max 4.3-4.4 /
        mean 0.25-0.35 / cosine min 0.992-0.996 / top-1 93.8-94.5% / perplexity 1.2-1.75%; on 4 x 128 tokens max
        6.3 / mean 0.30 / cosine min 0.962 / top-1 94.0% / 1.3% (8 x 512: max 15.4, mean 0.21, top-1 93.4%):
        limits with ~2x margin."""
        base = Thresholds.for_dtype(dtype)
        if not int8_activations(meta):
            return base
        return Thresholds(max_abs=max(base.max_abs, 25.0), mean_abs=max(base.mean_abs, 0.75),
                          cosine_min=min(base.cosine_min, 0.9), top1_min=min(base.top1_min, 0.88),
                          ppl_rel_max=max(base.ppl_rel_max, 0.04))

    def replace(self, **kw) -> "Thresholds":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


def int8_activations(meta: dict) -> bool:
    """Whether ONNX Runtime quantizes activations to int8 on the fly for this export (slim_export.json): quantized
    linears or a 4-bit head at MatMulNBits accuracy level 4 (ONNX Runtime's default when none is declared), or an
    8-bit head, which always runs level 4 (ort_rewrite)."""
    config = ((meta.get("onnxruntime") or {}).get("session_config") or {})
    if config.get("session.disable_quant_qdq") == "1":
        return False
    level4 = config.get("session.qdq_matmulnbits_accuracy_level", "4") == "4"
    head = (meta.get("head") or {}).get("quantization", "none")
    quantized = any((r.get("bits") or 16) <= 8 for r in meta.get("compressed_layers") or [])
    return head == "int8" or (level4 and (quantized or head == "int4"))


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of one window (logits [L, V], ids [L]), in float64."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp.gather(-1, ids[1:, None]).sum())


def perplexity_of(logits: torch.Tensor, ids: torch.Tensor) -> float:
    total = sum(_nll_sum(logits[i], ids[i]) for i in range(ids.shape[0]))
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))


def compare_logits(test: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> dict:
    """Error metrics between two [n, L, V] logit tensors for token windows `ids` [n, L] (one window at a time, so a
    262k-word vocabulary needs no float64 copy of every logit at once)."""
    max_abs, sum_abs, cos, top1, nll_test, nll_ref = 0.0, 0.0, [], 0, 0.0, 0.0
    for i in range(ids.shape[0]):
        t, r = test[i].float(), ref[i].float()
        diff = (t - r).abs()
        max_abs, sum_abs = max(max_abs, float(diff.max())), sum_abs + float(diff.double().sum())
        cos.append(torch.nn.functional.cosine_similarity(t.double(), r.double(), dim=-1))
        top1 += int((t.argmax(-1) == r.argmax(-1)).sum())
        nll_test, nll_ref = nll_test + _nll_sum(t, ids[i]), nll_ref + _nll_sum(r, ids[i])
    cos = torch.cat(cos)
    predicted = ids.shape[0] * (ids.shape[1] - 1)
    ppl_test, ppl_ref = math.exp(nll_test / predicted), math.exp(nll_ref / predicted)
    return {"max_abs": max_abs, "mean_abs": sum_abs / test.numel(), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()), "top1": top1 / ids.numel(),
            "ppl_onnx": ppl_test, "ppl_torch": ppl_ref, "ppl_rel": abs(ppl_test - ppl_ref) / ppl_ref,
            "positions": int(ids.numel())}


@torch.no_grad()
def reference_logits(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """The PyTorch model's fp32 logits [n, L, V] for token windows `ids`, `batch_size` windows per forward."""
    return torch.cat([model(input_ids=ids[i:i + batch_size], use_cache=False).logits.float()
                      for i in range(0, ids.shape[0], batch_size)])


def _float_np(elem: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(elem)


def run_onnx(sess, ids: torch.Tensor, decode_steps: int) -> tuple[torch.Tensor, list[dict], list[dict]]:
    """Logits [n, L, V] from prefill + `decode_steps` cached steps; plus every feed dict and output dict."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    inputs = {i.name: i for i in sess.get_inputs()}
    with_cache = "past_key_values.0.key" in inputs
    n, total = ids.shape
    steps = decode_steps if with_cache else 0
    prefill = total - steps
    if prefill < 1:
        raise SlimError(f"windows of {total} tokens are too short for {decode_steps} decode steps: use a longer "
                        f"--seqlen or fewer --decode-steps")
    feeds, outputs, pieces = [], [], []
    with OnnxrtRunner(sess) as runner:
        feed = _feed(inputs, ids[:, :prefill], past=None, start=0)
        for step in range(steps + 1):
            out = dict(runner.infer(feed))
            feeds.append(feed)
            outputs.append(out)
            pieces.append(torch.from_numpy(np.asarray(out["logits"], dtype=np.float32)))
            pos = prefill + step
            if step < steps:
                feed = _feed(inputs, ids[:, pos:pos + 1], past=out, start=pos)
    return torch.cat(pieces, dim=1), feeds, outputs


def _feed(inputs: dict, ids: torch.Tensor, past: dict | None, start: int) -> dict:
    n, s = ids.shape
    feed = {"input_ids": ids.numpy().astype(np.int64),
            "attention_mask": np.ones((n, start + s), dtype=np.int64)}
    if "position_ids" in inputs:
        feed["position_ids"] = np.tile(np.arange(start, start + s, dtype=np.int64), (n, 1))
    for name, meta in inputs.items():
        if name.startswith("past_key_values."):
            if past is None:
                _, heads, _, dim = meta.shape
                feed[name] = np.zeros((n, heads, 0, dim), dtype=_float_np(meta.type))
            else:
                feed[name] = past[name.replace("past_key_values.", "present.")]
    return feed
