#!/usr/bin/env python
"""Accuracy benchmark: every compression recipe (ours and two peer libraries) on one model, one data set.

    python bench/accuracy.py [--rows 1,7,8|all] [--windows N|all] [--nsamples 128] --out bench/results/

Perplexity on non-overlapping WikiText-2 test windows (the same windows for every row) and the top-1 next-token
agreement with the dense model. Each row is written to the JSON as soon as it finishes, so an interrupted run
resumes: rows already in the JSON with the same config and settings are skipped unless --redo.

Peer rows (NVIDIA ModelOpt, llm-compressor) run their libraries' own APIs in their own venvs
(bench/.venv-<peer>, made from bench/peers/requirements-<peer>.txt) through bench/peers/run_<peer>.py; the peer
saves a plain HF folder with fake-quantized dense weights, and this harness checks the pattern (2:4 count, 4-bit
levels per group) and evaluates it with the same code as our rows.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/harness.py, when run as a script
import harness
from harness import (BENCH, DEFAULT_CALIB, DEFAULT_DATA, fmt as _fmt, model_tag, peak_rss_gb, portable_path,
                     reset_peak_rss, versions)

from slim_trt.data.windows import parse_window_count
from slim_trt.errors import SlimError

DENSE_BITS = 16.0  # the dense reference is deployed in fp16/bf16


@dataclass(frozen=True)
class Row:
    number: int
    name: str
    label: str
    compress: dict | None = None  # CompressConfig keyword arguments (our rows)
    peer: str | None = None  # peer library key (peer rows)
    # Adapter fine-tuning after compression: FinetuneConfig keyword arguments plus "windows", the number of
    # training windows drawn from the calibration text (seed + 1, so not the compression windows).
    finetune: dict | None = None

    @property
    def key(self) -> str:
        return f"{self.number}-{self.name}"


def paper(**changes) -> dict:
    """The SLiM paper's recipe (every knob spelled out, so the rows keep their meaning when the defaults of
    CompressConfig move) with some knobs changed."""
    from slim_trt.config import PRESETS

    return {**PRESETS["slim-paper"], **changes}


# The SparseGPT + GPTQ (group 128) base with 4-bit adapters: what issue 7's rows vary.
SGPT = dict(pruner="sparsegpt", quantizer="gptq", group_size=128, quantize_adapters=True)
# Row 18: H-LoRA r0.2 with GPTQ-rounded adapters; row 24: the best one-shot 2:4 recipe (the CompressConfig
# defaults until issue 14; `--preset slim-2to4` since). Row 31 is the defaults since issue 23, row 42 those of
# issues 14-22 (`--preset int4-dense`).
HLORA = paper(**SGPT, rank_ratio=0.2, lowrank="hessian", adapter_quantizer="gptq")
# max_bits came after rows 24-26 were measured; it does not bind on this model's shapes (the ranks are the same:
# tests/algorithms/test_rank_plan.py), so their stored configs carry it.
SLIM_2TO4 = {**HLORA, "quantizer": "slim", "rank_ratio": 0.23, "refit_rounds": 3, "max_bits": 4.5}
FINETUNE = {"loss": "kd", "steps": 50, "minutes": 25.0, "batch_size": 4, "lr": 1e-4, "windows": 128}
# Issue 13, W8A8 for TensorRT's sparse INT8 tensor cores: SparseGPT 2:4 with per-channel INT8 weights (SLiM-Quant
# clip per output channel in the OBS sweep), H-LoRA adapters rank 0.23 rounded to 4 bits by GPTQ, 3 refit rounds:
# the W8A16 reference. The W8A8 rows add static per-tensor INT8 activation scales (MSE estimator) and change how
# the adapters are fitted (weight-only H-LoRA or LRC) or smooth; the dense rows drop the 2:4 mask (GPTQ INT8).
W8A16 = paper(**{**SGPT, "bits": 8, "quantizer": "slim", "group_size": -1}, lowrank="hessian", rank_ratio=0.23,
              adapter_quantizer="gptq", refit_rounds=3)
W8A8 = {**W8A16, "act_bits": 8, "act_scale_method": "mse", "act_percentile": 99.99}
W8_DENSE = {**W8A16, "sparsity": "none", "quantizer": "gptq", "lowrank": "none", "rank_ratio": 0.1}
GPTQ_DENSE = paper(**SGPT, sparsity="none", lowrank="none", refit_rounds=0, max_bits=4.5)
SPQR_DENSE = paper(**{**SGPT, "quantizer": "spqr", "group_size": 16}, sparsity="none", lowrank="none",
                   refit_rounds=0, max_bits=None, outlier_share=0.01)
SLIMLLM = {**GPTQ_DENSE, "bits": 3, "bit_allocation": "slim-llm"}  # issue 14: row 49, the SliM-LLM rows' base

# 2:4 sparsity and 4-bit weights unless named.
ROWS: tuple[Row, ...] = (
    Row(1, "dense", "dense"),
    Row(2, "magnitude-absmax", "magnitude + group-128 AbsMax",
        paper(pruner="magnitude", quantizer="absmax", group_size=128, lowrank="none")),
    Row(3, "wanda-absmax", "Wanda + group-128 AbsMax",
        paper(pruner="wanda", quantizer="absmax", group_size=128, lowrank="none")),
    Row(4, "sparsegpt-gptq", "SparseGPT + GPTQ (group 128)",
        paper(pruner="sparsegpt", quantizer="gptq", group_size=128, lowrank="none")),
    Row(5, "wanda-slimquant", "Wanda + SLiM-Quant, no adapters", paper(lowrank="none")),
    Row(6, "naive-lora", "Naive-LoRA (SVD) + SLiM-Quant", paper(lowrank="svd")),
    Row(7, "slim-lora", "SLiM-LoRA + SLiM-Quant (the paper's recipe, --preset slim-paper)", paper()),
    Row(8, "slim-lora-q4-adapters", "SLiM-LoRA, 4-bit adapters", paper(quantize_adapters=True)),
    Row(9, "slim-lora-8bit", "SLiM-LoRA, 8-bit weights", paper(bits=8)),
    Row(10, "slim-lora-unstructured", "SLiM-LoRA, 50% unstructured", paper(sparsity="unstructured:0.5")),
    Row(11, "modelopt", "NVIDIA ModelOpt: SparseGPT 2:4 + INT4 AWQ", peer="modelopt"),
    Row(12, "llmcompressor", "llm-compressor: SparseGPT 2:4 + GPTQ W4A16", peer="llmcompressor"),
    # Issue 7: beyond the paper. Adapters on the SparseGPT + GPTQ base, then one change at a time.
    Row(13, "sgpt-gptq-lora", "SparseGPT+GPTQ g128 + SLiM-LoRA r0.1, fp16 adapters",
        paper(**{**SGPT, "quantize_adapters": False})),
    Row(14, "sgpt-gptq-lora-q4", "SparseGPT+GPTQ g128 + SLiM-LoRA r0.1, 4-bit adapters", paper(**SGPT)),
    Row(15, "sgpt-gptq-lora-q4-r02", "SparseGPT+GPTQ g128 + SLiM-LoRA r0.2, 4-bit adapters",
        paper(**SGPT, rank_ratio=0.2)),
    Row(16, "sgpt-gptq-hlora-q4-r02", "SparseGPT+GPTQ g128 + H-LoRA (full H) r0.2, 4-bit adapters",
        paper(**SGPT, rank_ratio=0.2, lowrank="hessian")),
    Row(17, "sgpt-gptq-hlora-q4-r01", "SparseGPT+GPTQ g128 + H-LoRA (full H) r0.1, 4-bit adapters",
        paper(**SGPT, lowrank="hessian")),
    Row(18, "sgpt-gptq-hlora-gq4-r02", "row 16 with GPTQ-quantized adapters (R by H, then L refit and by R H R^T)",
        HLORA),
    Row(19, "wanda-slimquant-g128-lora", "Wanda + group-128 SLiM-Quant + SLiM-LoRA r0.1", paper(group_size=128)),
    Row(20, "sgpt-slimq-hlora-gq4-r02", "row 18 with group-128 SLiM-Quant (OBS) instead of GPTQ's AbsMax scales",
        {**HLORA, "quantizer": "slim"}),
    Row(21, "sgpt-gptq-hlora-gq4-r02-refit2", "row 18 + 2 base/adapter refit rounds", {**HLORA, "refit_rounds": 2}),
    Row(22, "sgpt-gptq-hlora-gq4-r02-sens", "row 18 + ranks by sensitivity (same budget)",
        {**HLORA, "rank_allocation": "sensitivity"}),
    Row(23, "sgpt-gptq-hlora-gq4-r02-ft", "row 18 + adapter fine-tuning (KD from dense, <= 25 min)", HLORA,
        finetune=FINETUNE),
    Row(24, "sgpt-slimq-hlora-gq4-r023-refit3", "rows 20 + 21 combined, 3 refit rounds, rank 0.23 (4.5-bit budget)",
        SLIM_2TO4),
    Row(25, "sgpt-slimq-hlora-gq4-r023-refit3-ft", "row 24 + adapter fine-tuning (KD from dense, <= 25 min)", SLIM_2TO4,
        finetune=FINETUNE),
    Row(26, "sgpt-slimq-hlora-gq4-r017-refit3", "row 24 at rank 0.17 (4.107 bits, below llm-compressor's 4.125)",
        {**SLIM_2TO4, "rank_ratio": 0.17}),
    # Issue 13: W8A8 (INT8 weights per output channel, static per-tensor INT8 activations).
    Row(27, "w8a16-sgpt-hlora", "W8A16 2:4: SparseGPT INT8 per-channel + H-LoRA r0.23, 3 refits (reference)", W8A16),
    Row(28, "w8a8-sgpt-none", "W8A8 2:4, no adapters", {**W8A8, "lowrank": "none"}),
    Row(29, "w8a8-sgpt-hlora", "W8A8 2:4 + weight-only H-LoRA (row 27's recipe with INT8 activations)", W8A8),
    Row(30, "w8a8-sgpt-lrc", "W8A8 2:4 + LRC adapters", {**W8A8, "lowrank": "lrc"}),
    Row(31, "w8a8-sgpt-lrc-smooth", "row 30 + SmoothQuant alpha 0.5 (the defaults, --preset trt-int8-sparse)",
        {**W8A8, "lowrank": "lrc", "smooth_alpha": 0.5}),
    Row(32, "w8a16-dense", "W8A16 dense: GPTQ INT8 per-channel, no adapters", W8_DENSE),
    Row(33, "w8a8-dense-none", "W8A8 dense, no adapters (MSE activation scales)", {**W8_DENSE, "act_bits": 8}),
    Row(34, "w8a8-dense-none-max", "row 33 with max activation scales", {**W8_DENSE, "act_bits": 8,
                                                                           "act_scale_method": "max"}),
    Row(35, "w8a8-dense-none-pct", "row 33 with 99.99th-percentile activation scales",
        {**W8_DENSE, "act_bits": 8, "act_scale_method": "percentile"}),
    Row(36, "w8a8-dense-hlora-r01", "W8A8 dense + weight-only H-LoRA r0.1",
        {**W8_DENSE, "act_bits": 8, "lowrank": "hessian"}),
    Row(37, "w8a8-dense-lrc-r01", "W8A8 dense + LRC r0.1 (the LRC paper's rank)",
        {**W8_DENSE, "act_bits": 8, "lowrank": "lrc"}),
    Row(38, "w8a8-dense-none-smooth", "row 33 + SmoothQuant alpha 0.5", {**W8_DENSE, "act_bits": 8, "smooth_alpha": 0.5}),
    # FP16 2:4 (no quantization) for the recipe table: what the sparsity alone costs.
    Row(39, "fp16-sgpt", "FP16 2:4: SparseGPT, no quantization, no adapters", {**W8A16, "bits": 16, "lowrank": "none"}),
    Row(40, "fp16-sgpt-hlora", "FP16 2:4 + H-LoRA r0.23 (4-bit), 3 refits", {**W8A16, "bits": 16}),
    # Issue 14: the reference a user would pick instead of any 2:4 recipe, dense INT4 GPTQ group 128 (4.125 bits),
    # and the best adapters on it within the 4.5-bit budget (max_bits lowers the rank until it fits).
    Row(41, "gptq-dense-g128", "dense INT4 GPTQ group 128, no sparsity, no adapters (4.125 bits)", GPTQ_DENSE),
    Row(42, "gptq-dense-g128-hlora", "row 41 + H-LoRA 4-bit adapters, 3 refits, within 4.5 bits (--preset int4-dense)",
        {**GPTQ_DENSE, "lowrank": "hessian", "rank_ratio": 0.23, "refit_rounds": 3}),
    # Issue 14, SpQR: groups of 16 with 3-bit bilevel statistics and zero points, fp16 outliers up to 1% of the
    # weights (32 bits each); dense unless named. Row 46 spends row 43's bits on adapters over row 41 instead.
    Row(43, "spqr-dense-4bit", "SpQR 4-bit, group 16, <= 1% outliers, dense, no adapters (the near-lossless point)",
        SPQR_DENSE),
    Row(44, "spqr-dense-3bit", "SpQR 3-bit, group 16, <= 1% outliers, dense, no adapters", {**SPQR_DENSE, "bits": 3}),
    Row(45, "spqr-2to4-hlora", "SpQR 4-bit on a SparseGPT 2:4 mask (outliers at kept weights) + H-LoRA 4-bit "
        "adapters, 3 refits, within 4.5 bits",
        {**SPQR_DENSE, "sparsity": "2:4", "lowrank": "hessian", "rank_ratio": 0.23, "refit_rounds": 3,
         "max_bits": 4.5}),
    Row(46, "gptq-dense-g128-hlora-eq43", "outliers vs adapters: row 41 + H-LoRA 4-bit adapters up to row 43's "
        "bits (4.921, measured)", {**GPTQ_DENSE, "lowrank": "hessian", "rank_ratio": 0.5, "refit_rounds": 3,
                                   "max_bits": 4.921}),
    Row(47, "spqr-dense-3bit-hlora", "row 44 + H-LoRA 4-bit adapters, 3 refits, within 4.5 bits (outliers and "
        "adapters together)", {**SPQR_DENSE, "bits": 3, "lowrank": "hessian", "rank_ratio": 0.23,
                               "refit_rounds": 3, "max_bits": 4.5}),
    # Issue 14, SliM-LLM: salience-driven N-1 / N / N+1 bits per group of 128 around an average N, against GPTQ at
    # the same bits (min-max zero-point grids at 2 and 3 bits, INT4 containers), then with adapters and 2:4.
    Row(48, "gptq-dense-g128-3bit", "dense 3-bit GPTQ group 128 (zero points), no adapters", {**GPTQ_DENSE, "bits": 3}),
    Row(49, "slimllm-dense-3bit", "SliM-LLM 3-bit average (2/3/4-bit groups of 128), GPTQ sweep, no adapters",
        SLIMLLM),
    Row(50, "gptq-dense-g128-2bit", "dense 2-bit GPTQ group 128 (zero points), no adapters", {**GPTQ_DENSE, "bits": 2}),
    Row(51, "slimllm-dense-2bit", "SliM-LLM 2-bit average (1/2/3-bit groups), no adapters", {**SLIMLLM, "bits": 2}),
    Row(52, "slimllm-dense-4bit", "SliM-LLM 4-bit average (3/4/5-bit groups), no adapters (vs row 41)",
        {**SLIMLLM, "bits": 4}),
    Row(53, "slimllm-dense-3bit-hlora", "row 49 + H-LoRA 4-bit adapters, 3 refits, within 4.5 bits",
        {**SLIMLLM, "lowrank": "hessian", "rank_ratio": 0.23, "refit_rounds": 3}),
    Row(54, "slimllm-dense-2bit-hlora", "row 51 + H-LoRA 4-bit adapters r0.4, 3 refits, within 4.5 bits",
        {**SLIMLLM, "bits": 2, "lowrank": "hessian", "rank_ratio": 0.4, "refit_rounds": 3}),
    Row(55, "sgpt-slimllm-4bit-hlora", "the best 2:4 recipe (row 24) with SliM-LLM 4-bit groups in the sweep",
        {**SLIM_2TO4, "quantizer": "gptq", "bit_allocation": "slim-llm"}),
    # Issue 15, compression time: row 24 with cheaper refit rounds (float adapters between rounds, rounded once at
    # the end; the first sweep's group scales in every refit sweep), and each half. Row 56 lost to row 24, so the
    # defaults stayed.
    Row(56, "sgpt-slimq-hlora-gq4-r023-refit3-fast",
        "row 24 with issue 15's cheaper refit rounds (--refit-rounding last --refit-scales first)",
        {**SLIM_2TO4, "refit_rounding": "last", "refit_scales": "first"}),
    Row(57, "sgpt-slimq-hlora-gq4-r023-refit3-lastround", "row 24, adapters rounded after the last refit round only",
        {**SLIM_2TO4, "refit_rounding": "last"}),
    Row(58, "sgpt-slimq-hlora-gq4-r023-refit3-firstscales", "row 24, refit sweeps on the first sweep's scales",
        {**SLIM_2TO4, "refit_scales": "first"}),
    # Issue 13 with SmoothQuant alpha 0.5 on every W8A8 variant (row 38 showed smoothing removes most of the
    # activation error: 1.184x -> 1.051x dense without adapters), so each correction is measured with and without.
    Row(59, "w8a8-dense-lrc-r01-smooth", "row 37 + SmoothQuant alpha 0.5 (W8A8 dense + LRC r0.1)",
        {**W8_DENSE, "act_bits": 8, "lowrank": "lrc", "smooth_alpha": 0.5}),
    Row(60, "w8a8-dense-hlora-r01-smooth", "row 36 + SmoothQuant alpha 0.5 (W8A8 dense + weight-only H-LoRA r0.1)",
        {**W8_DENSE, "act_bits": 8, "lowrank": "hessian", "smooth_alpha": 0.5}),
    Row(61, "w8a8-sgpt-none-smooth", "row 28 + SmoothQuant alpha 0.5 (W8A8 2:4, no adapters)",
        {**W8A8, "lowrank": "none", "smooth_alpha": 0.5}),
    Row(62, "w8a8-sgpt-hlora-smooth", "row 29 + SmoothQuant alpha 0.5 (W8A8 2:4 + weight-only H-LoRA)",
        {**W8A8, "smooth_alpha": 0.5}),
    # Issue 23, one-shot 2:4 accuracy: each idea on the W8A8 preset (row 31's recipe) and on slim-2to4 (row 24's).
    Row(63, "sgpt-slimq-hlora-gq4-r023-refit3-remask", "row 24, refit sweeps choose the 2:4 mask again on W - L R "
        "(--refit-mask reselect)", {**SLIM_2TO4, "refit_mask": "reselect"}),
    Row(64, "w8a8-sgpt-lrc-smooth-remask", "row 31, refit sweeps choose the 2:4 mask again on LRC's target "
        "(--refit-mask reselect)", {**W8A8, "lowrank": "lrc", "smooth_alpha": 0.5, "refit_mask": "reselect"}),
    Row(65, "sgpt-slimq-hlora-gq4-r023-refit3-permmlp", "row 24, MLP channels permuted for down_proj's 2:4 groups "
        "(--channel-permutation mlp)", {**SLIM_2TO4, "channel_permutation": "mlp"}),
    Row(66, "w8a8-sgpt-lrc-smooth-permmlp", "row 31, MLP channels permuted for down_proj's 2:4 groups "
        "(--channel-permutation mlp)", {**W8A8, "lowrank": "lrc", "smooth_alpha": 0.5, "channel_permutation": "mlp"}),
    Row(67, "w8a8-sgpt-lrc-smooth-remask-permmlp", "row 64 + MLP channels permuted for down_proj's 2:4 groups "
        "(--refit-mask reselect --channel-permutation mlp)",
        {**W8A8, "lowrank": "lrc", "smooth_alpha": 0.5, "refit_mask": "reselect", "channel_permutation": "mlp"}),
    # --- issue 24: FP8 E4M3 (Hopper, Ada, Jetson Thor) -------------------------------------------------------------
    # Row 68 is --preset trt-fp8-sparse (row 67's recipe with FP8 weights, absmax/448 per output channel, and static
    # per-tensor FP8 activations); row 69 the same without adapters; row 70 FP8 dense (round to nearest, no
    # adapters), the FP8 reference.
    Row(68, "fp8-sgpt-lrc-smooth-remask-permmlp", "row 67 in FP8 E4M3: weights and activations (--preset "
        "trt-fp8-sparse)", {**W8A8, "lowrank": "lrc", "smooth_alpha": 0.5, "refit_mask": "reselect",
                           "channel_permutation": "mlp", "weight_format": "fp8", "act_format": "fp8"}),
    Row(69, "fp8-sgpt-none-smooth-remask-permmlp", "row 68 without adapters (FP8 2:4 alone)",
        {**W8A8, "lowrank": "none", "smooth_alpha": 0.5, "refit_mask": "reselect", "channel_permutation": "mlp",
         "weight_format": "fp8", "act_format": "fp8"}),
    Row(70, "fp8-dense-smooth", "FP8 E4M3 dense W8A8 (round to nearest, SmoothQuant alpha 0.5, no adapters): the "
        "FP8 reference", {**W8A8, "sparsity": "none", "lowrank": "none", "smooth_alpha": 0.5,
                          "weight_format": "fp8", "act_format": "fp8"}),
    # --- end of issue 24 -----------------------------------------------------------------------------------------
)

PEERS = {
    "modelopt": {"package": "nvidia-modelopt",
                 "recipe": {"library": "nvidia-modelopt", "steps": [
                     {"api": "modelopt.torch.sparsity.sparsify", "mode": "sparsegpt", "pattern": "2:4 sparsity"},
                     {"api": "modelopt.torch.sparsity.export"},
                     {"api": "modelopt.torch.quantization.quantize", "config": "INT4_AWQ_CFG",
                      "weights": "INT4 symmetric, block 128 along K", "activations": "not quantized"}]}},
    "llmcompressor": {"package": "llmcompressor",
                      "recipe": {"library": "llmcompressor", "steps": [
                          {"api": "llmcompressor.oneshot", "modifier": "SparseGPTModifier", "sparsity": 0.5,
                           "mask_structure": "2:4"},
                          {"api": "llmcompressor.oneshot", "modifier": "GPTQModifier", "scheme": "W4A16",
                           "weights": "INT4 symmetric, group 128 along K"}]}},
}
PEER_BITS_NOTE = ("peer bits: the same storage formula as our rows (slim_trt.algorithms.pipeline.storage_bits) for "
                  "the pattern found in the saved weights: 2:4 with a 2-bit index per kept value when every group of "
                  "4 holds <= 2 non-zeros, else dense; 4-bit values; one 16-bit scale per 128 input columns; plus "
                  "16 bits per input channel for AWQ's pre-quant scale when the peer has one")


# ----------------------------------------------------------------------------------------------------------------
# Settings, selection


@dataclass(frozen=True)
class Settings:
    model: str
    calib: str
    data: str
    nsamples: int
    seqlen: int
    seed: int
    windows: int | None  # None = the whole split

    def to_dict(self) -> dict:
        return {"model": self.model, "calib": self.calib, "data": self.data, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed, "windows": "all" if self.windows is None else self.windows}


def select_rows(spec: str) -> list[Row]:
    return harness.select_rows(spec, ROWS)


def row_config(row: Row) -> dict:
    from slim_trt.config import CompressConfig

    if row.compress is not None:
        out = {"method": "slim_trt.compression.compressor", **CompressConfig(**row.compress).to_dict()}
        if row.finetune is not None:
            out["finetune"] = finetune_settings(row)
        return out
    if row.peer is not None:
        return PEERS[row.peer]["recipe"]
    return {"method": "dense"}


def same_config(stored: dict, row: Row) -> bool:
    """Whether a stored row was made with this row's recipe. Our rows compare as CompressConfig objects, so a
    field added to CompressConfig later (whose default keeps the old behaviour) does not invalidate results."""
    from slim_trt.config import CompressConfig

    if row.compress is None:
        return stored == row_config(row)
    stored = {**LEGACY, **stored}
    if stored.get("finetune") != (finetune_settings(row) if row.finetune is not None else None):
        return False

    def normal(c: CompressConfig) -> CompressConfig:  # group_size None means the quantizer's default
        return dataclasses.replace(c, group_size=c.effective_group_size)

    try:
        return normal(CompressConfig.from_dict(stored)) == normal(CompressConfig(**row.compress))
    except (TypeError, SlimError):
        return False


# CompressConfig fields added after results were stored, with the behaviour those results had (a stored config
# without the field was made that way, whatever the field's default is today).
LEGACY = {"adapter_quantizer": "rtn", "refit_rounds": 0, "rank_allocation": "uniform", "max_bits": None,
          "refit_rounding": "every", "refit_scales": "every", "act_bits": None, "smooth_alpha": None,
          "refit_mask": "keep", "channel_permutation": "none"}


def finetune_settings(row: Row) -> dict:
    """The row's fine-tuning as recorded: every FinetuneConfig field (defaults filled in) plus "windows"."""
    from slim_trt.compression.finetune import FinetuneConfig

    kw = {k: v for k, v in row.finetune.items() if k != "windows"}
    return {**FinetuneConfig(**kw).to_dict(), "windows": row.finetune.get("windows", 32)}


# ----------------------------------------------------------------------------------------------------------------
# Pure evaluation helpers


def score(model, windows, reference_top1, batch_size: int = 4) -> dict:
    """Perplexity of `model` over every predicted token, and its top-1 agreement with precomputed reference
    top-1 predictions [n, seqlen - 1]. The same numbers as slim_trt.verification.perplexity.compare, without re-running the
    dense model for every row (its logits over a 262k vocabulary are half the cost of each evaluation)."""
    import torch

    from slim_trt.verification.perplexity import window_logits

    nll, agree, count, offset = 0.0, 0, 0, 0
    for batch, logits in window_logits(model, windows, batch_size):
        a = logits[:, :-1]
        target = batch[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(a.reshape(-1, a.shape[-1]), target.reshape(-1), reduction="sum"))
        if reference_top1 is not None:
            agree += int((a.argmax(-1) == reference_top1[offset:offset + len(batch)]).sum())
        count += target.numel()
        offset += len(batch)
    return {"perplexity": math.exp(nll / count), "top1_agreement": agree / count if reference_top1 is not None else None,
            "tokens": count}


def reference_pass(model, windows, batch_size: int = 4):
    """(perplexity, top-1 predictions [n, seqlen - 1]) of the dense model."""
    import torch

    from slim_trt.verification.perplexity import window_logits

    nll, count, tops = 0.0, 0, []
    for batch, logits in window_logits(model, windows, batch_size):
        a = logits[:, :-1]
        nll += float(torch.nn.functional.cross_entropy(a.reshape(-1, a.shape[-1]), batch[:, 1:].reshape(-1),
                                                       reduction="sum"))
        count += batch[:, 1:].numel()
        tops.append(a.argmax(-1))
    return math.exp(nll / count), torch.cat(tops)


def check_weight_pattern(W, n: int = 2, m: int = 4, group_size: int = 128, bits: int = 4, prescale=None) -> dict:
    """Count what a saved weight really is: N:M violations along K and distinct values per quantization group.

    `prescale` [K] undoes a per-input-channel factor folded into the weight (AWQ's pre-quant scale), so the
    levels are counted on the quantizer's own grid.
    """
    import torch

    W = W.detach().to(torch.float32)
    if prescale is not None:
        W = W / prescale.to(torch.float32).reshape(1, -1)
    N, K = W.shape
    nz = W != 0
    violations = int((nz[:, : K - K % m].reshape(N, -1, m).sum(-1) > n).sum()) if K >= m else 0
    max_levels, over = 0, 0
    for g0 in range(0, K, group_size):
        blk = W[:, g0:g0 + group_size]
        # Distinct values per row of the group (zero counts as a level of the symmetric grid), compared on a
        # grid of 2^-14 of the group's max |w|: on a 4-bit grid the levels are q / q_max apart by >= 1/8, while
        # a folded-back pre-quant scale leaves float round-off of ~1e-7 that must not count as a new level.
        amax = blk.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        srt = torch.round(blk / amax * 2 ** 14).sort(dim=1).values
        levels = 1 + (srt[:, 1:] != srt[:, :-1]).sum(1)
        max_levels = max(max_levels, int(levels.max()))
        over += int((levels > 2 ** bits).sum())
    return {"nm_violations": violations, "zero_fraction": float(1 - nz.float().mean()),
            "max_levels_per_group": max_levels, "groups_over_levels": over, "groups": N * math.ceil(K / group_size)}


def peer_storage_bits(N: int, K: int, is_nm: bool, prescale: bool) -> dict:
    """Storage bits of a peer layer with our formula: 4-bit values, 16-bit scale per 128 columns, 2:4 metadata."""
    import torch

    from slim_trt.algorithms.pipeline import CompressedWeight, storage_bits
    from slim_trt.algorithms.qtensor import QuantizedTensor

    qt = QuantizedTensor(q=torch.zeros(N, K, dtype=torch.int8), scale=torch.zeros(N, math.ceil(K / 128)), bits=4,
                         group_size=128)
    cw = CompressedWeight(weight=qt, mask=None, lora_L=None, lora_R=None, rel_error_base=0.0, rel_error=0.0)
    out = storage_bits(cw, "nm" if is_nm else "none", 2, 4)
    if prescale:
        out["base_bits"] += 16 * K
    return out


# ----------------------------------------------------------------------------------------------------------------
# Results file


def gap_closed(rows: dict) -> dict:
    """(ppl_sparsegpt_gptq - ppl_slim) / (ppl_sparsegpt_gptq - ppl_dense), for each SLiM-LoRA 2:4 4-bit row."""
    def ppl(key):
        r = rows.get(key)
        return r["perplexity"] if r and r.get("status") == "ok" else None

    dense, sgpt = ppl("1-dense"), ppl("4-sparsegpt-gptq")
    out = {"formula": "(ppl_sparsegpt_gptq - ppl_slim) / (ppl_sparsegpt_gptq - ppl_dense)",
           "dense_perplexity": dense, "sparsegpt_gptq_perplexity": sgpt}
    for key in ("7-slim-lora", "8-slim-lora-q4-adapters"):
        p = ppl(key)
        out[key] = (None if None in (dense, sgpt, p) or sgpt == dense else round((sgpt - p) / (sgpt - dense), 4))
    slim = ppl("7-slim-lora")
    out["slim_lora_beats"] = {k: (None if slim is None or ppl(k) is None else slim < ppl(k))
                              for k in ("4-sparsegpt-gptq", "11-modelopt", "12-llmcompressor")}
    return out


# Issue 13's goals are judged on the trt-int8-sparse preset's recipe, which smooths (row 31; row 59 is the same
# without 2:4 at the LRC paper's rank 0.1); rows 30 and 37 are those recipes without SmoothQuant.
W8A8_GOAL_ROWS = (1, 27, 31, 38, 59)


def w8a8_analysis(rows: dict) -> dict:
    """Issue 13's goals and the LRC paper's claim, from the W8A8 rows (None where a row is missing).

    *_over_*: perplexity ratios; *_smooth: the same recipe with SmoothQuant alpha 0.5. lrc_gap_closed_*: the
    fraction of the W8A8-without-correction-to-reference gap that LRC adapters close (the paper: > 50% at rank
    0.1), hlora_*: the same for weight-only adapters. The goals use the smoothed rows (the preset's recipe)."""
    def ppl(number):
        key = next((k for k in rows if k.split("-", 1)[0] == str(number)), None)
        r = rows.get(key)
        return r["perplexity"] if r and r.get("status") == "ok" else None

    def ratio(a, b):
        return None if a is None or b is None else round(a / b, 4)

    def closed(none, corrected, ref):
        if None in (none, corrected, ref) or none == ref:
            return None
        return round((none - corrected) / (none - ref), 4)

    dense, w8a16, d_w8 = ppl(1), ppl(27), ppl(32)
    out = {"dense_w8a16_over_dense": ratio(d_w8, dense)}
    # (suffix, 2:4 none / weight-only / LRC rows, dense none / weight-only / LRC rows)
    for sfx, (s_none, s_hl, s_lrc), (d_none, d_hl, d_lrc) in (("", (28, 29, 30), (33, 36, 37)),
                                                              ("_smooth", (61, 62, 31), (38, 60, 59))):
        out.update({
            f"sparse_none_over_w8a16{sfx}": ratio(ppl(s_none), w8a16),
            f"sparse_hlora_over_w8a16{sfx}": ratio(ppl(s_hl), w8a16),
            f"sparse_lrc_over_w8a16{sfx}": ratio(ppl(s_lrc), w8a16),
            f"sparse_lrc_over_dense{sfx}": ratio(ppl(s_lrc), dense),
            f"sparse_lrc_gap_closed_vs_w8a16{sfx}": closed(ppl(s_none), ppl(s_lrc), w8a16),
            f"dense_none_over_dense{sfx}": ratio(ppl(d_none), dense),
            f"dense_hlora_over_dense{sfx}": ratio(ppl(d_hl), dense),
            f"dense_lrc_over_dense{sfx}": ratio(ppl(d_lrc), dense),
            # the paper's claim at rank 0.1: gap to the float model, and to the W8A16 model (the activation part)
            f"lrc_gap_closed_vs_dense{sfx}": closed(ppl(d_none), ppl(d_lrc), dense),
            f"lrc_gap_closed_vs_w8a16{sfx}": closed(ppl(d_none), ppl(d_lrc), d_w8),
            f"hlora_gap_closed_vs_dense{sfx}": closed(ppl(d_none), ppl(d_hl), dense),
        })

    def judged(a, b, ok):  # on the unrounded ratio (row 31 is 4.998% over row 27: 1.0500 once rounded)
        return None if a is None or b is None else ok(a / b)

    goals = {"sparse_lrc_within_5pct_of_w8a16": judged(ppl(31), w8a16, lambda v: v <= 1.05),
             "sparse_lrc_at_most_1.35x_dense": judged(ppl(31), dense, lambda v: v <= 1.35),
             "dense_lrc_within_3pct_of_dense": judged(ppl(59), dense, lambda v: v <= 1.03),
             "lrc_closes_over_half_at_rank_0.1": (None if out["lrc_gap_closed_vs_dense_smooth"] is None
                                                  else out["lrc_gap_closed_vs_dense_smooth"] > 0.5)}
    return {**out, "goals": goals}


BUDGET_BITS = 4.5  # issue 7: bits per parameter with adapters, averaged over the compressed linears
# Issue 23: the reference a user who does not need 2:4 would pick (dense INT4 GPTQ g128, and with adapters within
# 4.5 bits: `--preset int4-dense`), printed beside best_one_shot.
DENSE_INT4_REFERENCE_ROWS = (41, 42)


def best_rows(rows: dict) -> dict:
    """The best row of each class, None when no row qualifies (our one-shot rows, no outlier tables):

    best_one_shot / best_finetuned (issue 23): the lowest perplexity among the 2:4 rows whose GEMMs TensorRT's
    sparse INT8 tensor cores run (INT8 weights x INT8 activations, the defaults' class), without / with adapter
    fine-tuning. INT8 2:4 stores 5 bits/param, so no bits budget applies.
    best_one_shot_2to4 / best_finetuned_2to4: the same among the 2:4 INT4 weight-only rows within BUDGET_BITS
    (adapters counted; what `--preset slim-2to4` follows).
    dense_int4_reference: rows 41 and 42 (dense INT4, `--preset int4-dense` is row 42), the reference a user would
    otherwise pick, printed beside best_one_shot.
    SpQR rows are never candidates: their fp16 outlier tables cost 1.2-12.9x a layer's time at run time
    (bench/results/spqr_outliers.md)."""
    def kind(c: dict) -> str | None:
        if c.get("sparsity") != "2:4" or c.get("quantizer") == "spqr":
            return None
        if c.get("bits") == 8 and c.get("act_bits") == 8:
            return "w8a8-2to4"
        if c.get("bits") == 4 and not c.get("act_bits"):
            return "w4a16-2to4"
        return None

    def qualifies(r: dict, tuned: bool, cls: str) -> bool:
        c = r.get("config") or {}
        return (r.get("status") == "ok" and c.get("method") == "slim_trt.compression.compressor" and kind(c) == cls
                and ("finetune" in c) == tuned
                and (cls != "w4a16-2to4" or r["bits_per_param_with_adapters"] <= BUDGET_BITS))

    out = {"best_rule": "best_one_shot: lowest perplexity among slim-trt one-shot 2:4 rows that TensorRT's sparse "
                        "INT8 tensor cores run (INT8 weights x INT8 activations: the defaults' class), no outlier "
                        "table; best_finetuned: the same with adapter fine-tuning; *_2to4: among 2:4 INT4 "
                        f"weight-only rows at <= {BUDGET_BITS} bits/param with adapters; dense_int4_reference: "
                        f"rows {', '.join(map(str, DENSE_INT4_REFERENCE_ROWS))}, the dense INT4 recipes a user "
                        f"would otherwise pick"}
    for name, tuned, cls in (("best_one_shot", False, "w8a8-2to4"), ("best_finetuned", True, "w8a8-2to4"),
                             ("best_one_shot_2to4", False, "w4a16-2to4"), ("best_finetuned_2to4", True, "w4a16-2to4")):
        cands = [(r["perplexity"], k) for k, r in rows.items() if qualifies(r, tuned, cls)]
        out[name] = min(cands)[1] if cands else None
    out["dense_int4_reference"] = [k for k in rows if k.split("-", 1)[0] in map(str, DENSE_INT4_REFERENCE_ROWS)
                                   and rows[k].get("status") == "ok"]
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Accuracy: {results['model']}", "",
             (f"WikiText-2 test perplexity over {results.get('eval_windows', '?')} windows x {s['seqlen']} tokens "
             f"({results.get('eval_tokens', '?')} predicted tokens); calibration {s['nsamples']} x {s['seqlen']} "
             f"tokens of WikiText-2 valid, seed {s['seed']}. Top-1 = next-token agreement with the dense model. "
             f"Bits per parameter count the compressed linear layers only (weights + 2:4 index + 16-bit scales; "
             f"'+ad.' adds the adapters). Peak RSS: the benchmark process during that row's compression (peers: "
             f"the peer's own process)."), "",
             "| # | method | PPL | PPL / dense | top-1 | bits/param | + ad. | compress s | load | peak RSS GB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        r = results["rows"].get(row.key)
        if r is None:
            continue
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:120]}"
        if r.get("pattern_check") and r["status"] == "ok":
            pc = r["pattern_check"]
            shape = "2:4" if pc["is_2_4"] else f"NOT 2:4: {pc['nm_violations']} groups of 4 with > 2 non-zeros"
            status += f" ({shape}; max levels per 128-group {pc['max_levels_per_group']})"
        lines.append(f"| {row.number} | {row.label} | {_fmt(r.get('perplexity'))} | {_fmt(r.get('ratio_to_dense'), 3)} "
                     f"| {_fmt(r.get('top1_agreement'), 3)} | {_fmt(r.get('bits_per_param'), 3)} "
                     f"| {_fmt(r.get('bits_per_param_with_adapters'), 3)} | {_fmt(r.get('compress_seconds'), 0)} "
                     f"| {row_load(r)} | {_fmt(r.get('peak_rss_gb'), 2)} | {status.replace('|', '/')} |")
    g = results.get("gap_closed", {})
    if g.get("7-slim-lora") is not None:
        lines += ["", f"Gap closed by SLiM-LoRA between SparseGPT+GPTQ and dense: {g['7-slim-lora']:.1%}"
                      + (f" (4-bit adapters: {g['8-slim-lora-q4-adapters']:.1%})"
                         if g.get("8-slim-lora-q4-adapters") is not None else "") + "."]
    w = results.get("w8a8", {})
    if any(v is not None for k, v in w.items() if k != "goals"):
        shown = {k: v for k, v in w.items() if k != "goals" and v is not None}
        judged = {k: v for k, v in w["goals"].items() if v is not None}
        lines += ["", "W8A8 (issue 13): " + ", ".join(f"{k} {v}" for k, v in shown.items()) + "; goals: "
                  + (", ".join(f"{k} {'met' if v else 'missed'}" for k, v in judged.items()) if judged else
                     "none judged yet (their rows: " + ", ".join(str(n) for n in W8A8_GOAL_ROWS) + ")")
                  + "."]
    def described(key: str) -> str:
        r = results["rows"][key]
        return (f"row {key}, perplexity {r['perplexity']:.2f} (x{r['ratio_to_dense']:.3f} dense) at "
                f"{r['bits_per_param_with_adapters']:.3f} bits/param with adapters")

    if results.get("best_rule"):
        lines += ["", f"Best rows ({results['best_rule']}):"]
    for name in ("best_one_shot", "best_finetuned", "best_one_shot_2to4", "best_finetuned_2to4"):
        key = results.get(name)
        if key and key in results["rows"]:
            lines += ["", f"{name}: {described(key)}."]
        if name == "best_one_shot":
            refs = [k for k in results.get("dense_int4_reference") or [] if k in results["rows"]]
            if refs:
                lines += ["", "beside it, the dense INT4 reference a user would otherwise pick (no 2:4, weight-only "
                              "INT4 in TensorRT; `--preset int4-dense` is row 42): "
                              + "; ".join(described(k) for k in refs) + "."]
    lines += ["", f"Versions: {json.dumps(results.get('versions', {}))}", ""]
    return "\n".join(lines)


def plot_png(results: dict) -> bytes | None:
    plt = harness.pyplot()
    pts = [(row, results["rows"][row.key]) for row in ROWS if row.key in results["rows"]
           and results["rows"][row.key]["status"] == "ok"]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    for row, r in pts:
        x, y = r["bits_per_param_with_adapters"], r["ratio_to_dense"]
        color = "tab:gray" if row.compress is None and row.peer is None else ("tab:red" if row.peer else "tab:blue")
        ax.scatter([x], [y], color=color, zorder=3)
        # numbers only beside the points (names collide where rows share a storage cost); the key is on the right
        ax.annotate(str(row.number), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
    key = "\n".join(f"{row.number:>2}  {row.label}" for row, _ in pts)
    fig.text(0.70, 0.5, key, fontsize=7, va="center", family="monospace")
    fig.subplots_adjust(right=0.68)
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter of the linear layers (with adapters)")
    ax.set_ylabel("perplexity / dense perplexity (log)")
    ax.set_title(f"{results['model']}: WikiText-2 perplexity ratio vs storage (blue: slim-trt, red: peers)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    return harness.figure_png(fig)


class Results(harness.ResultsFile):
    """accuracy_<tag>.json/.md/.png; a row is done when it is stored as ok with the same recipe."""

    def __init__(self, out_dir: Path, tag: str, settings: Settings, redo: bool):
        super().__init__(out_dir, "accuracy", tag, settings.to_dict(), redo)

    def done(self, row: Row) -> bool:
        r = self.rows.get(row.key)
        return bool(r) and r.get("status") == "ok" and same_config(r.get("config") or {}, row)

    def order(self) -> list[str]:
        return [row.key for row in ROWS]

    def derive(self) -> None:
        rows = self.rows
        dense = rows.get("1-dense", {}).get("perplexity")
        for r in rows.values():  # the dense row may finish after others on a partial re-run
            if r.get("status") == "ok" and dense:
                r["ratio_to_dense"] = round(r["perplexity"] / dense, 4)
        self.data["gap_closed"] = gap_closed(rows)
        self.data["w8a8"] = w8a8_analysis(rows)
        self.data.update(best_rows(rows))

    def markdown(self) -> str:
        return markdown(self.data)

    def plot(self) -> bytes | None:
        return plot_png(self.data)


# ----------------------------------------------------------------------------------------------------------------
# Running rows


@dataclass
class Context:
    dense: object  # the untouched dense model (copied for every row)
    tokenizer: object
    folder: Path  # the HF folder the peers load
    calib: object  # LongTensor [nsamples, seqlen]
    eval: object  # LongTensor [windows, seqlen]
    ref_top1: object
    dense_ppl: float
    batch_size: int
    eval_batch_size: int
    settings: Settings
    out_dir: Path


def run_ours(row: Row, ctx: Context) -> dict:
    from slim_trt.compression.compressor import compress
    from slim_trt.config import CompressConfig

    model = copy.deepcopy(ctx.dense)  # compress works in place; the dense copy stays in memory
    reset_peak_rss()
    report = compress(model, CompressConfig(**row.compress), ctx.calib, batch_size=ctx.batch_size, progress=True)
    peak = peak_rss_gb()
    summary = report.summary()
    extra = {}
    if row.finetune is not None:
        extra["finetune"] = run_finetune(row, ctx, model)
        peak = peak_rss_gb()
    ev = score(model, ctx.eval, ctx.ref_top1, ctx.eval_batch_size)
    del model
    return {**extra, "perplexity": ev["perplexity"], "top1_agreement": ev["top1_agreement"],
            "bits_per_param": summary["bits_per_param"],
            "bits_per_param_with_adapters": summary["bits_per_param_with_adapters"],
            "compress_seconds": summary["seconds"], "peak_rss_gb": round(peak, 3),
            "mean_rel_error_base": summary["mean_rel_error_base"], "mean_rel_error": summary["mean_rel_error"],
            "layers": {n: {"rel_error_base": v["rel_error_base"], "rel_error": v["rel_error"], "rank": v["rank"],
                           **{k: v[k] for k in ("refit_rounds", "act_scale", "outliers", "outlier_columns",
                                                "group_bits") if k in v}}
                       for n, v in report.layers.items()},
            "block_output_rel_error": [b["output_rel_error"] for b in sorted(report.blocks, key=lambda b: b["index"])]}


def run_finetune(row: Row, ctx: Context, model) -> dict:
    """Fine-tune the compressed model's adapters in place (teacher: the dense model); the loss curve goes next to
    the results as finetune_<row key>.png."""
    from slim_trt.data.windows import calibration_windows, load_text
    from slim_trt.compression.finetune import FinetuneConfig, finetune, save_loss_curve

    st = finetune_settings(row)
    cfg = FinetuneConfig(**{k: v for k, v in st.items() if k != "windows"})
    windows = calibration_windows(ctx.tokenizer, load_text(ctx.settings.calib), st["windows"], ctx.settings.seqlen,
                                  ctx.settings.seed + 1)
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as state:
        rep = finetune(model, windows, cfg, state_dir=state, progress=True, teacher=ctx.dense)
    model.eval()
    png = ctx.out_dir / f"finetune_{row.key}.png"
    with tempfile.TemporaryDirectory(dir=ctx.out_dir) as tmp:
        if save_loss_curve(rep.losses, Path(tmp) / png.name, title=f"row {row.number}: adapter fine-tuning",
                           loss=cfg.loss):
            os.replace(Path(tmp) / png.name, png)
    return {**rep.summary(), "loss_curve": png.name, "losses": [round(x, 5) for x in rep.losses]}


def peer_python(venv_dir: Path, peer: str) -> Path:
    return venv_dir / f".venv-{peer}" / "bin" / "python"


def run_peer(row: Row, ctx: Context, venv_dir: Path, timeout: float) -> dict:
    """Run the peer's script in its venv; load, check and evaluate what it saved. Raises PeerFailed."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slim_trt.compression.calibration.families import block_linears, decoder_blocks

    py = peer_python(venv_dir, row.peer)
    req = BENCH / "peers" / f"requirements-{row.peer}.txt"
    if not py.exists():
        raise PeerFailed(f"no venv for {row.peer} at {py.parent.parent}: create it with `python -m venv "
                         f"{py.parent.parent} && {py} -m pip install -r {req}`", None)
    with tempfile.TemporaryDirectory(prefix=f"peer-{row.peer}-") as tmp:
        tmp = Path(tmp)
        torch.save(ctx.calib, tmp / "calib.pt")
        out = tmp / "model"
        cmd = [str(py), str(BENCH / "peers" / f"run_{row.peer}.py"), "--model", str(ctx.folder),
               "--calib", str(tmp / "calib.pt"), "--out", str(out), "--batch-size", str(ctx.batch_size)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONPATH": ""}
        print(f"  $ {' '.join(cmd)}", flush=True)
        log = tmp / "peer.log"
        try:
            with open(log, "w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                      check=False)
        except subprocess.TimeoutExpired:
            raise PeerFailed(f"timed out after {timeout:.0f} s", _peer_report(out))
        report = _peer_report(out)
        if proc.returncode != 0 or report is None or report.get("status") != "ok":
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            err = (report or {}).get("error") or (tail[-1] if tail else f"exit code {proc.returncode}")
            raise PeerFailed(err, report, "\n".join(tail))
        prescales = load_file(out / "prescale.safetensors") if (out / "prescale.safetensors").exists() else {}
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        bits, params = 0, 0
        blocks = decoder_blocks(model)
        prefix = next(n for n, m in model.named_modules() if m is blocks)
        per_layer = {}
        for i, block in enumerate(blocks):
            for rel, lin in block_linears(block).items():
                name = f"{prefix}.{i}.{rel}"
                pre = prescales.get(f"{name}.weight")
                per_layer[name] = check_weight_pattern(lin.weight, prescale=pre)
        nm_ok_all = all(c["nm_violations"] == 0 for c in per_layer.values())
        for name in per_layer:
            N, K = model.get_submodule(name).weight.shape
            b = peer_storage_bits(N, K, nm_ok_all, f"{name}.weight" in prescales)
            bits += b["base_bits"]
            params += b["params"]
        checks = {"layers_checked": len(per_layer), "is_2_4": nm_ok_all,
                  "nm_violations": sum(c["nm_violations"] for c in per_layer.values()),
                  "zero_fraction": round(sum(c["zero_fraction"] for c in per_layer.values()) / len(per_layer), 4),
                  "max_levels_per_group": max(c["max_levels_per_group"] for c in per_layer.values()),
                  "groups_over_16_levels": sum(c["groups_over_levels"] for c in per_layer.values()),
                  "groups": sum(c["groups"] for c in per_layer.values()),
                  "on_4bit_grid": all(c["groups_over_levels"] == 0 for c in per_layer.values())}
        ev = score(model, ctx.eval, ctx.ref_top1, ctx.eval_batch_size)
        del model
    return {"perplexity": ev["perplexity"], "top1_agreement": ev["top1_agreement"],
            "bits_per_param": round(bits / params, 4), "bits_per_param_with_adapters": round(bits / params, 4),
            "bits_note": PEER_BITS_NOTE, "compress_seconds": report.get("seconds"),
            "peak_rss_gb": report.get("peak_rss_gb"), "pattern_check": checks, "peer_report": report}


class PeerFailed(Exception):
    def __init__(self, error: str, report: dict | None, log_tail: str | None = None):
        super().__init__(error)
        self.error, self.report, self.log_tail = error, report, log_tail


def _peer_report(out: Path) -> dict | None:
    f = out / "peer_report.json"
    if not f.exists():
        f = out.with_name(out.name + ".report.json")  # the peer writes here when it failed before saving
    return json.loads(f.read_text()) if f.exists() else None


def prepare(args, settings: Settings) -> Context:
    import torch

    from slim_trt.data.windows import calibration_windows, load_text
    from slim_trt.models.source import load_model, model_folder

    t0 = time.time()
    dense, tok = load_model(settings.model)
    calib = calibration_windows(tok, load_text(settings.calib), settings.nsamples, settings.seqlen, settings.seed)
    ev = harness.evaluation_windows(tok, settings.data, settings.seqlen, settings.windows)
    print(f"loaded {settings.model}, {len(calib)} calibration and {len(ev)} evaluation windows of {settings.seqlen} "
          f"tokens ({time.time() - t0:.0f} s); dense reference pass ...", flush=True)
    with torch.no_grad():
        dense_ppl, top1 = reference_pass(dense, ev, args.eval_batch_size)
    print(f"dense perplexity {dense_ppl:.3f} ({time.time() - t0:.0f} s)", flush=True)
    return Context(dense=dense, tokenizer=tok, folder=Path(model_folder(settings.model)), calib=calib, eval=ev,
                   ref_top1=top1, dense_ppl=dense_ppl, batch_size=args.batch_size,
                   eval_batch_size=args.eval_batch_size, settings=settings, out_dir=Path(args.out))


def run_row(row: Row, ctx: Context, args, base_versions: dict) -> dict:
    record = {"number": row.number, "name": row.name, "label": row.label, "config": row_config(row),
              "versions": dict(base_versions), "loadavg_start": harness.loadavg()}
    t0 = time.time()
    try:
        if row.compress is None and row.peer is None:
            record.update(status="ok", perplexity=ctx.dense_ppl, top1_agreement=1.0, bits_per_param=DENSE_BITS,
                          bits_per_param_with_adapters=DENSE_BITS, compress_seconds=0.0, peak_rss_gb=None,
                          note="the reference; bits are those of fp16 storage")
        elif row.peer is not None:
            record["versions"][PEERS[row.peer]["package"]] = None
            res = run_peer(row, ctx, Path(args.peer_venvs), args.peer_timeout)
            rep = res["peer_report"]
            record["versions"].update({f"peer_{k}": v for k, v in rep.get("versions", {}).items()})
            record["versions"][PEERS[row.peer]["package"]] = rep.get("versions", {}).get(PEERS[row.peer]["package"])
            record.update(status="ok", **res)
        else:
            record.update(status="ok", **run_ours(row, ctx))
    except PeerFailed as e:
        rep = e.report or {}
        record["versions"].update({f"peer_{k}": v for k, v in rep.get("versions", {}).items()})
        record["versions"][PEERS[row.peer]["package"]] = (rep.get("versions", {}).get(PEERS[row.peer]["package"])
                                                          or _venv_version(Path(args.peer_venvs), row.peer))
        record.update(status="failed", error=e.error, perplexity=None, ratio_to_dense=None, top1_agreement=None,
                      bits_per_param=None, bits_per_param_with_adapters=None,
                      compress_seconds=rep.get("seconds"), peak_rss_gb=rep.get("peak_rss_gb"),
                      traceback=rep.get("traceback"), log_tail=e.log_tail)
    record["ratio_to_dense"] = (round(record["perplexity"] / ctx.dense_ppl, 4)
                                if record.get("perplexity") is not None else None)
    record["wall_seconds"] = round(time.time() - t0, 1)
    record["loadavg_end"] = harness.loadavg()
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return record


def row_load(r: dict) -> str:
    """The 1-minute load average at the row's start and end ('-' for rows measured before it was recorded): the
    compression seconds of rows measured beside other jobs are not comparable with rows run alone."""
    a, b = r.get("loadavg_start"), r.get("loadavg_end")
    return "-" if a is None or b is None else f"{a[0]:.1f}-{b[0]:.1f}"


def _venv_version(venv_dir: Path, peer: str) -> str | None:
    """The peer package version installed in its venv (for failed rows), read without importing it."""
    py = peer_python(venv_dir, peer)
    if not py.exists():
        return None
    try:
        r = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version('{PEERS[peer]['package']}'))"],
                           capture_output=True, text=True, timeout=60, check=False)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = harness.row_parser("bench/accuracy.py", __doc__, ROWS, name_width=24)
    p.add_argument("--model", default="gemma3-270m", help="MODEL as slim-trt compress takes it [default: gemma3-270m]")
    p.add_argument("--calib", default=str(DEFAULT_CALIB), metavar="FILE", help="calibration text")
    p.add_argument("--data", default=str(DEFAULT_DATA), metavar="FILE", help="evaluation text")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows [default: 128]")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window [default: 512]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", default="32", help="evaluation windows: N (the first N) or 'all' [default: 32]")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward [default: 8]")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--out", default=str(BENCH / "results"), help="output folder [default: bench/results]")
    p.add_argument("--redo", action="store_true", help="recompute rows already in the JSON")
    p.add_argument("--peer-venvs", default=str(BENCH), metavar="DIR",
                   help="folder holding .venv-modelopt and .venv-llmcompressor [default: bench/]")
    p.add_argument("--peer-timeout", type=float, default=3 * 3600, help="seconds per peer run [default: 10800]")
    return p


def main(argv: list[str] | None = None) -> int:
    return harness.cli_main(build_parser(), _main, argv)


def _main(args) -> int:
    rows = select_rows(args.rows)
    harness.check_positive(nsamples=args.nsamples, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size)
    harness.check_text_files(calib=args.calib, data=args.data)
    settings = Settings(model=args.model, calib=portable_path(args.calib), data=portable_path(args.data),
                        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        windows=parse_window_count(args.windows))
    results = Results(Path(args.out), model_tag(args.model), settings, args.redo)
    todo = results.todo(rows, args.redo)
    if not todo:
        results.write()
        return 0
    t_run = time.time()
    results.data["machine"] = harness.machine()
    ctx = prepare(args, settings)
    base_versions = versions()
    results.data.update(versions=base_versions, eval_windows=len(ctx.eval), eval_tokens=int(ctx.eval[:, 1:].numel()),
                        calib_windows=len(ctx.calib))
    # Row 1 is the reference pass itself; record it whenever it is selected.
    for row in todo:
        print(f"[{row.number}] {row.name}: {row.label} ...", flush=True)
        record = run_row(row, ctx, args, base_versions)
        results.put(row.key, record)
        if record["status"] == "ok":
            print(f"[{row.number}] {row.name}: ppl {record['perplexity']:.3f} (x{record['ratio_to_dense']:.3f}), top-1 "
                  f"{record['top1_agreement']:.3f}, {record['bits_per_param']:.3f} bits/param "
                  f"({record['bits_per_param_with_adapters']:.3f} with adapters), {record['wall_seconds']:.0f} s",
                  flush=True)
        else:
            print(f"[{row.number}] {row.name}: FAILED: {record['error']}", flush=True)
    results.data["last_run_seconds"] = round(time.time() - t_run, 1)
    results.data["machine"]["loadavg_after"] = harness.loadavg()
    results.write()
    print(f"wrote {results.json_path}, {results.md_path.name}, {results.png_path.name} "
          f"({time.time() - t_run:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
