"""Dataclass configs, validated on construction.

The defaults are the W8A8 2:4 recipe (issue 23; PRESETS["trt-int8-sparse"], bench row 31): 2:4-sparse INT8 weights
with INT8 activations and low-rank adapters, the math TensorRT's sparse INT8 tensor cores run on every NVIDIA GPU
since Ampere and on Jetson Orin. INT4 is weight-only in TensorRT (no sparse kernel reads it), so dense INT4 is a
preset, PRESETS["int4-dense"] (bench row 42, the defaults of issues 14-22); the best W4A16 2:4 recipe is
PRESETS["slim-2to4"] (row 24), the SLiM paper's exact recipe PRESETS["slim-paper"].
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from .errors import SlimError

QUANTIZERS = ("slim", "absmax", "gptq", "spqr")
PRUNERS = ("wanda", "sparsegpt", "magnitude")
LOWRANKS = ("slim", "hessian", "svd", "lrc", "none")
RANK_ALLOCATIONS = ("uniform", "sensitivity")
ADAPTER_QUANTIZERS = ("gptq", "rtn")
REFIT_ROUNDINGS = ("last", "every")  # see CompressConfig.refit_rounding
REFIT_SCALES = ("first", "every")  # see CompressConfig.refit_scales
REFIT_MASKS = ("keep", "reselect")  # see CompressConfig.refit_mask
DENSE_TARGET_FRAMES = ("layer", "source")  # see CompressConfig.dense_target_frame
BLOCK_TUNE_TARGETS = ("layer", "dense")  # see CompressConfig.block_tune_target
BLOCK_TUNE_LOSSES = ("mse", "channel")  # see CompressConfig.block_tune_loss
# see CompressConfig.channel_permutation: "none" or a comma list of these parts
CHANNEL_PERMUTATION_PARTS = ("mlp", "attn", "residual")
CHANNEL_PERMUTATIONS = ("none", *CHANNEL_PERMUTATION_PARTS)
BITS = (2, 3, 4, 8, 16)  # 16 means "no weight quantization" (the weights keep their float values)
SPQR_BITS = (2, 3, 4)  # SpQR's asymmetric codes (zero points) in INT4 containers (algorithms/spqr.py)
# Per-group bit widths (issue 14): uniform, or SliM-LLM's salience-driven N-1 / N / N+1 around --bits N.
BIT_ALLOCATIONS = ("uniform", "slim-llm")
SPQR_GROUP_SIZE = 16  # SpQR's groups along K (the paper's), what --quantizer spqr picks unless --group-size says
ACT_BITS = (None, 8)  # None: weight-only (activations stay float); 8: static per-tensor INT8 activations
ACT_SCALE_METHODS = ("max", "percentile", "mse")  # see algorithms/actquant.py
# Number formats of the 8-bit weights and activations (issue 24): "int" = INT8 (every NVIDIA GPU since Ampere),
# "fp8" = FP8 E4M3 (Hopper, Ada, Jetson Thor; algorithms/fp8.py).
FORMATS = ("int", "fp8")


def permutation_parts(value: str) -> tuple[str, ...]:
    """--channel-permutation's value as its parts in CHANNEL_PERMUTATION_PARTS order: "none" -> (), "attn,mlp"
    -> ("mlp", "attn"); SlimError on anything else."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else [value]
    if parts == ["none"]:
        return ()
    if any(p not in CHANNEL_PERMUTATION_PARTS for p in parts) or len(set(parts)) != len(parts):
        raise SlimError(f"bad --channel-permutation {value!r}: give none or a comma list of distinct parts from "
                        f"{', '.join(CHANNEL_PERMUTATION_PARTS)} (e.g. mlp,attn)")
    return tuple(p for p in CHANNEL_PERMUTATION_PARTS if p in parts)


@dataclass(frozen=True)
class Sparsity:
    """A sparsity pattern along the input dimension K.

    kind "nm": in each row, every group of `m` consecutive input columns keeps at most `n` weights.
    kind "unstructured": a fraction `ratio` of each row's weights is pruned.
    kind "none": dense.
    """

    kind: str = "nm"
    n: int = 2
    m: int = 4
    ratio: float = 0.5

    @staticmethod
    def parse(text: str) -> "Sparsity":
        t = str(text).strip().lower()
        if t in ("none", "dense", "0"):
            return Sparsity(kind="none", n=0, m=0, ratio=0.0)
        if t.startswith("unstructured:"):
            try:
                r = float(t.split(":", 1)[1])
            except ValueError:
                raise SlimError(f"bad sparsity {text!r}: use unstructured:RATIO with RATIO in (0, 1), e.g. unstructured:0.5")
            if not 0.0 < r < 1.0:
                raise SlimError(f"bad sparsity {text!r}: the unstructured ratio must be in (0, 1)")
            return Sparsity(kind="unstructured", n=0, m=0, ratio=r)
        if ":" in t:
            a, b = t.split(":", 1)
            try:
                n, m = int(a), int(b)
            except ValueError:
                raise SlimError(f"bad sparsity {text!r}: use N:M (e.g. 2:4), unstructured:RATIO or none")
            if not (0 < n < m):
                raise SlimError(f"bad sparsity {text!r}: N:M needs 0 < N < M (e.g. 2:4)")
            return Sparsity(kind="nm", n=n, m=m, ratio=1.0 - n / m)
        raise SlimError(f"bad sparsity {text!r}: use N:M (e.g. 2:4), unstructured:RATIO or none")

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "unstructured":
            return f"unstructured:{self.ratio:g}"
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class CompressConfig:
    """What to do to every compressed linear layer.

    group_size: 0 = one scale per tensor, -1 = one per output channel, G > 0 = one per G input columns.
    None picks the quantizer's default (per tensor for SLiM-Quant, 128 for AbsMax and GPTQ).

    The defaults are DEFAULT_PRESET (issue 23), spelled out field by field below and equal to
    PRESETS["trt-int8-sparse"] (a test holds them equal, and equal to bench row 86): SparseGPT 2:4 with per-channel
    INT8 weights (SLiM-Quant clip per output channel in the OBS sweep), static per-tensor INT8 activations (MSE
    scales) after SmoothQuant alpha 0.5, LRC adapters of rank 0.23 (fitted to the error of both quantizations, they
    read the float activation) rounded to 4 bits by GPTQ, 3 base/adapter refit rounds whose sweeps choose the 2:4
    mask again, MLP channels permuted exactly so down_proj's 2:4 groups keep more saliency, every layer fitted a
    step 0.25 toward the dense model's output (asymmetric calibration): 1.202x dense perplexity on Gemma 3 270M at
    6.363 bits/param with adapters (bench row 86; 1.232x without the dense target, row 67). Why this recipe: 2:4 x INT8 is what TensorRT's sparse INT8
    tensor cores run (every NVIDIA GPU since Ampere, Jetson Orin); INT4 is weight-only in TensorRT, so 2:4 INT4 buys
    no sparse math and dense INT4 + adapters (1.144x at 4.498 bits, row 42) is PRESETS["int4-dense"]. INT8 2:4 alone
    stores 5 bits/param, so the defaults have no bits budget (max_bits None). Issue 15's cheaper refit rounds
    (refit_rounding "last", refit_scales "first") gave 1.341x against 1.320x on row 24's recipe (row 56): options.
    """

    sparsity: str = "2:4"
    bits: int = 8
    quantizer: str = "slim"  # SLiM-Quant: the histogram-optimal clip, per output channel here
    group_size: int | None = -1  # one INT8 scale per output channel: TensorRT's INT8 GEMMs take no groups
    pruner: str = "sparsegpt"  # with --sparsity N:M: SparseGPT's joint prune + quantize sweep
    lowrank: str = "lrc"  # adapters fitted to the error of both quantizations (algorithms/lrc.py)
    rank_ratio: float = 0.23
    rank_multiple: int = 1
    quantize_adapters: bool = True
    adapter_bits: int = 4
    adapter_group_size: int = 128
    adapter_quantizer: str = "gptq"  # 4-bit adapters: "gptq" (output-aware, with H) or "rtn" (round to nearest)
    skip_layers: tuple[str, ...] = ()
    percdamp: float = 0.01  # Hessian dampening for GPTQ / SparseGPT, as in the reference code
    blocksize: int = 128
    refit_rounds: int = 3  # after the adapters: re-quantize the base from W - L R, re-fit the adapters, k rounds
    # How the refit rounds run (issue 15; measured on Gemma 3 270M blocks 0/5/11/17, algorithms/refit.py):
    # refit_rounding "last" keeps the adapters in float between rounds and rounds them (4-bit GPTQ) once at the
    # end, "every" rounds them in every round (before issue 15: 3 more adapter GPTQs per layer); refit_scales
    # "first" re-uses the group scales the first SparseGPT sweep chose in every refit sweep, "every" searches them
    # again on W - L R (the other pruners' bases always search again).
    refit_rounding: str = "every"
    refit_scales: str = "every"
    # refit_mask (issue 23): "keep" = every refit sweep keeps the first sweep's 2:4 mask; "reselect" = each refit
    # sweep chooses the mask again by SparseGPT's OBS criterion on its own target W - L R (for LRC the target
    # (W - L R) H_xq H_qq^-1 with H_qq, so the activation error is in view); a round is still kept only if the
    # layer's objective drops (algorithms/refit.py). SparseGPT 2:4 / unstructured only.
    refit_mask: str = "reselect"
    # channel_permutation (issue 23): "none" keeps the model's order, else a comma list of exact permutations
    # (calibration/permutation.py), each chosen so some layers' N:M groups keep more Wanda saliency: "mlp" each
    # block's MLP intermediate channels (gate/up output rows with down input columns; down_proj's groups), "attn"
    # each block's value channels within a KV head (v output rows with o input columns; o_proj's groups),
    # "residual" the hidden channels of the whole model (q/k/v/gate/up's groups), e.g. "mlp,attn".
    channel_permutation: str = "mlp"
    # dense_target (asymmetric calibration, GPTAQ 2025; algorithms/asymmetric.py): how far each layer's target
    # moves from its own dense output on the inputs the compressed layers before it give it (0: SparseGPT / GPTQ /
    # SLiM's sequential calibration) toward the dense model's output on the dense model's inputs (1: the least-
    # squares fit GPTAQ derives; GPTAQ's code scales that step by 0.25), so a layer also corrects some of the
    # error of the layers before it. Above 0 it costs one more dense forward per block and a product per input.
    # Measured on Gemma 3 270M at 0.25: --preset slim-2to4 1.261x -> 1.202x dense (bench row 79), these W8A8
    # defaults 1.232x -> 1.202x (row 86, with the ridge in the source frame below; 1.235x in the layer's, row 78).
    dense_target: float = 0.25
    # The ridge of that step's solve, x mean(diag H) (GPTQ's damping is 0.01): larger keeps the step to the input
    # directions with energy, where the drift is signal rather than noise.
    dense_target_damp: float = 0.01
    # ... relative to the H of the source model's inputs ("source": the same step whether SmoothQuant ran or not,
    # algorithms.asymmetric.source_ridge) or of the layer's inputs after SmoothQuant ("layer": a weaker ridge on
    # most channels, as SmoothQuant evens H's diagonal out; rows 78, 83, 84: 1.235x, 1.215x at a ridge of 0.1,
    # 1.232x at 1). Without SmoothQuant (or without a dense target) the two are one: it reads "source" then.
    dense_target_frame: str = "source"
    # block_tune_epochs (issue 23): after each block is compressed, train its adapters (nothing else) for this many
    # passes over the calibration windows so the block's output matches block_tune_target: "layer" the dense
    # block's output on the same inputs, "dense" the dense model's hidden states after the block
    # (compression/calibration/block_tuning.py). Adam at block_tune_lr, cosine decay, 2 windows a step. Off (0): on
    # Gemma 3 270M it raised top-1 agreement with the dense model but not perplexity (bench rows 88-93).
    block_tune_epochs: int = 0
    block_tune_lr: float = 3e-4
    block_tune_target: str = "layer"
    # "mse": squared error over all hidden units; "channel": each unit's relative to its own mean square, so the few
    # units with massive activations (Gemma, LLaMA) do not decide the fit alone
    block_tune_loss: str = "mse"
    rank_allocation: str = "uniform"  # or "sensitivity": each block's uniform budget shared by error spectra
    # The model-wide budget of the compressed layers, adapters included (docs/recipes.md, "Bits per parameter"): when the
    # ranks from rank_ratio would exceed it, the ratio is lowered until they fit (algorithms.pipeline.plan_ranks).
    max_bits: float | None = None  # INT8 2:4 stores 5 bits/param before adapters
    # W8A8 (issue 13): static symmetric per-tensor INT8 scales for every compressed linear's input, calibrated on
    # the calibration windows by act_scale_method; optional SmoothQuant migration (alpha) into the previous norm
    # or linear; lowrank "lrc" fits the adapters to the error of both quantizations (algorithms/lrc.py).
    act_bits: int | None = 8
    act_scale_method: str = "mse"
    act_percentile: float = 99.99
    smooth_alpha: float | None = 0.5
    # SpQR (quantizer "spqr", issue 14): the largest share of each layer's kept weights stored as fp16 outliers.
    outlier_share: float = 0.01
    # Zero points (asymmetric min-max grids, algorithms/zeropoint.py): None = on at <= 3 bits, off above. A
    # symmetric 2-bit grid has one positive level; at 4 bits the symmetric grid is what TensorRT runs. SpQR
    # always has zero points of its own (algorithms/spqr.py) and ignores this.
    zero_point: bool | None = None
    bit_allocation: str = "uniform"
    # FP8 (issue 24): weight_format "fp8" rounds the 8-bit weights on the E4M3 grid with absmax / 448 scales (per
    # output channel or tensor; the quantizer's clip search does not apply), act_format "fp8" quantizes the
    # activations to E4M3 with their static per-tensor scale. TensorRT's FP8 GEMMs read both in FP8.
    weight_format: str = "int"
    act_format: str = "int"

    def __post_init__(self) -> None:
        Sparsity.parse(self.sparsity)  # raises on bad text
        if self.quantizer == "spqr":
            self._check_spqr()
        elif self.bits not in BITS:
            raise SlimError(f"bad --bits {self.bits}: choose 2, 3, 4 or 8 (or 16 for no quantization)")
        if self.quantizer not in QUANTIZERS:
            raise SlimError(f"bad --quantizer {self.quantizer!r}: choose one of {', '.join(QUANTIZERS)}")
        if self.pruner not in PRUNERS:
            raise SlimError(f"bad --pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")
        if self.lowrank not in LOWRANKS:
            raise SlimError(f"bad --lowrank {self.lowrank!r}: choose one of {', '.join(LOWRANKS)}")
        if not (0.0 < self.rank_ratio < 1.0):
            raise SlimError(f"bad --rank-ratio {self.rank_ratio}: it must be in (0, 1), e.g. 0.1")
        if self.rank_multiple < 1:
            raise SlimError(f"bad --rank-multiple {self.rank_multiple}: it must be >= 1")
        if self.group_size is not None and self.group_size < -1:
            raise SlimError(f"bad --group-size {self.group_size}: use 0 (per tensor), -1 (per channel) or a positive group")
        if self.adapter_bits not in (4, 8):
            raise SlimError(f"bad adapter bits {self.adapter_bits}: choose 4 or 8")
        if self.adapter_quantizer not in ADAPTER_QUANTIZERS:
            raise SlimError(f"bad --adapter-quantizer {self.adapter_quantizer!r}: choose one of "
                            f"{', '.join(ADAPTER_QUANTIZERS)}")
        if self.adapter_group_size < 1:
            raise SlimError(f"bad adapter group size {self.adapter_group_size}: it must be >= 1")
        if not (0.0 <= self.percdamp < 1.0):
            raise SlimError(f"bad percdamp {self.percdamp}: it must be in [0, 1)")
        if isinstance(self.refit_rounds, bool) or not isinstance(self.refit_rounds, int) or self.refit_rounds < 0:
            raise SlimError(f"bad --refit-rounds {self.refit_rounds!r}: give a whole number >= 0 (0 = no refit)")
        if self.refit_rounding not in REFIT_ROUNDINGS:
            raise SlimError(f"bad --refit-rounding {self.refit_rounding!r}: choose one of {', '.join(REFIT_ROUNDINGS)}")
        if self.refit_scales not in REFIT_SCALES:
            raise SlimError(f"bad --refit-scales {self.refit_scales!r}: choose one of {', '.join(REFIT_SCALES)}")
        if self.refit_mask not in REFIT_MASKS:
            raise SlimError(f"bad --refit-mask {self.refit_mask!r}: choose one of {', '.join(REFIT_MASKS)}")
        if isinstance(self.dense_target, bool) or not isinstance(self.dense_target, (int, float)) \
                or not 0.0 <= self.dense_target <= 1.0:
            raise SlimError(f"bad --dense-target {self.dense_target!r}: give a fraction in [0, 1] (0 = fit each layer "
                            f"to its own output, 1 = to the dense model's; GPTAQ uses 0.25)")
        if isinstance(self.dense_target_damp, bool) or not isinstance(self.dense_target_damp, (int, float)) \
                or not 0.0 < self.dense_target_damp <= 100.0:
            raise SlimError(f"bad dense_target_damp {self.dense_target_damp!r}: give a ridge > 0 relative to mean(diag H), "
                            f"e.g. 0.01 (GPTQ's) or 0.1")
        if isinstance(self.block_tune_epochs, bool) or not isinstance(self.block_tune_epochs, int) \
                or self.block_tune_epochs < 0:
            raise SlimError(f"bad --block-tune-epochs {self.block_tune_epochs!r}: give a whole number >= 0 (0 = off)")
        if isinstance(self.block_tune_lr, bool) or not isinstance(self.block_tune_lr, (int, float)) \
                or not 0.0 < self.block_tune_lr < 1.0:
            raise SlimError(f"bad --block-tune-lr {self.block_tune_lr!r}: give a learning rate in (0, 1), e.g. 3e-4")
        if self.block_tune_target not in BLOCK_TUNE_TARGETS:
            raise SlimError(f"bad --block-tune-target {self.block_tune_target!r}: choose one of "
                            f"{', '.join(BLOCK_TUNE_TARGETS)}")
        if self.block_tune_loss not in BLOCK_TUNE_LOSSES:
            raise SlimError(f"bad --block-tune-loss {self.block_tune_loss!r}: choose one of "
                            f"{', '.join(BLOCK_TUNE_LOSSES)}")
        if self.dense_target_frame not in DENSE_TARGET_FRAMES:
            raise SlimError(f"bad dense_target_frame {self.dense_target_frame!r}: choose one of "
                            f"{', '.join(DENSE_TARGET_FRAMES)}")
        if self.smooth_alpha is None or not self.dense_target:  # the frames differ only by SmoothQuant's divisors
            object.__setattr__(self, "dense_target_frame", "source")
        # one spelling per meaning ("attn,mlp" -> "mlp,attn"), so equal recipes compare and fingerprint equal
        object.__setattr__(self, "channel_permutation", ",".join(self.permutation_parts) or "none")
        if self.max_bits is not None and (isinstance(self.max_bits, bool) or not self.max_bits > 0):
            raise SlimError(f"bad --max-bits {self.max_bits!r}: give bits per parameter > 0 (e.g. 4.5), or none")
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise SlimError(f"bad --rank-allocation {self.rank_allocation!r}: choose one of {', '.join(RANK_ALLOCATIONS)}")
        if self.lowrank == "none" and self.rank_allocation != "uniform":
            raise SlimError("--rank-allocation sensitivity shares out adapter ranks, but --lowrank none makes no "
                            "adapters: drop it or choose --lowrank hessian (or slim, svd)")
        self._check_act()
        self._check_formats()
        self._check_low_bits()
        if self.lowrank == "none":
            # Refit rounds alternate base and adapters; without adapters the one-shot base is already final.
            object.__setattr__(self, "refit_rounds", 0)
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))

    def _check_spqr(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SPQR_BITS:
            raise SlimError(f"bad --bits {self.bits} for --quantizer spqr: choose 2, 3 or 4 (SpQR stores unsigned "
                            f"codes with zero points in INT4 containers)")
        if isinstance(self.outlier_share, bool) or not (0.0 <= self.outlier_share <= 0.1):
            raise SlimError(f"bad --outlier-share {self.outlier_share!r}: give a fraction in [0, 0.1] (SpQR keeps "
                            f"about 0.01; each outlier costs 32 bits)")
        g = self.effective_group_size
        if g < 1 or self.blocksize % g:
            raise SlimError(f"bad --group-size {g} for --quantizer spqr: give groups along K that divide "
                            f"{self.blocksize}, e.g. {SPQR_GROUP_SIZE} (the paper's)")
        if self.act_bits is not None:
            raise SlimError(f"--quantizer spqr is weight-only: its groups of {g} with zero points and its fp16 outliers "
                            "have no INT8 GEMM form; drop --act-bits 8 (in Python: act_bits=None, or start from "
                            "PRESETS['int4-dense'])")

    def _check_act(self) -> None:
        if isinstance(self.act_bits, bool) or self.act_bits not in ACT_BITS:
            raise SlimError(f"bad --act-bits {self.act_bits!r}: only 8 is supported (static per-tensor INT8 "
                            f"activations for TensorRT's INT8 tensor cores); leave it out for weight-only")
        if self.act_scale_method not in ACT_SCALE_METHODS:
            raise SlimError(f"bad --act-scale {self.act_scale_method!r}: choose one of {', '.join(ACT_SCALE_METHODS)}")
        if not (0.0 < self.act_percentile <= 100.0):
            raise SlimError(f"bad activation percentile {self.act_percentile}: it must be in (0, 100], e.g. 99.99")
        if self.smooth_alpha is not None and not (0.0 <= self.smooth_alpha <= 1.0):
            raise SlimError(f"bad --smooth-alpha {self.smooth_alpha}: it must be in [0, 1] (SmoothQuant uses 0.5)")
        if self.act_bits is None:
            if self.lowrank == "lrc":
                raise SlimError("--lowrank lrc corrects the error of quantized activations: add --act-bits 8, or "
                                "choose --lowrank hessian for weight-only quantization")
            if self.smooth_alpha is not None:
                raise SlimError("--smooth-alpha moves activation outliers into the weights for INT8 activations: "
                                "add --act-bits 8 or drop it")
            return
        if self.bits != 8:
            raise SlimError(f"--act-bits 8 needs --bits 8: TensorRT runs INT8 x INT8 GEMMs; INT4 weights are "
                            f"weight-only there and float weights take no INT8 input (got --bits {self.bits}); for "
                            f"weight-only recipes start from --preset slim-2to4 or int4-dense (PRESETS in Python)")
        if self.effective_group_size not in (0, -1):
            raise SlimError(f"--act-bits 8 needs one weight scale per output channel (--group-size -1) or per "
                            f"tensor (0): TensorRT's INT8 and FP8 GEMMs take no group-wise weight scales (got "
                            f"--group-size {self.effective_group_size})")
        if self.lowrank == "lrc" and self.rank_allocation != "uniform":
            raise SlimError("--rank-allocation sensitivity does not support --lowrank lrc: use uniform ranks")

    def _check_formats(self) -> None:
        for flag, value in (("--weight-format", self.weight_format), ("--act-format", self.act_format)):
            if value not in FORMATS:
                raise SlimError(f"bad {flag} {value!r}: choose one of {', '.join(FORMATS)}")
        if "fp8" not in (self.weight_format, self.act_format):
            return
        if self.weight_format != self.act_format or self.act_bits != 8 or self.bits != 8:
            raise SlimError("FP8 needs FP8 weights and FP8 activations together (--bits 8 --act-bits 8 "
                            "--weight-format fp8 --act-format fp8; TensorRT's FP8 GEMMs read both in FP8): start "
                            "from --preset trt-fp8-sparse")
        if self.quantizer == "spqr" or self.effective_group_size not in (0, -1):
            raise SlimError(f"FP8 weights take one scale per output channel (--group-size -1) or per tensor (0), "
                            f"got --quantizer {self.quantizer} --group-size {self.effective_group_size}")
        if self.sparsity_spec.kind != "none" and self.pruner != "sparsegpt":
            raise SlimError(f"FP8 weights with a sparsity are rounded in SparseGPT's sweep: use --pruner sparsegpt "
                            f"(got --pruner {self.pruner})")

    @property
    def scale_method(self) -> str:
        """How the sweeps choose weight scales: "fp8" (absmax / 448 on the E4M3 grid), "slim" or "absmax"."""
        if self.weight_format == "fp8":
            return "fp8"
        return "slim" if self.quantizer == "slim" else "absmax"

    def _check_low_bits(self) -> None:
        if self.quantizer == "spqr":
            if self.bit_allocation != "uniform" or self.zero_point is not None:
                raise SlimError("--quantizer spqr has its own zero points and one width per layer: drop "
                                "--bit-allocation slim-llm and --zero-point/--no-zero-point (or use --quantizer gptq)")
            return
        if self.bit_allocation not in BIT_ALLOCATIONS:
            raise SlimError(f"bad --bit-allocation {self.bit_allocation!r}: choose one of {', '.join(BIT_ALLOCATIONS)}")
        if self.zero_point not in (None, True, False):
            raise SlimError(f"bad zero_point {self.zero_point!r}: give true, false or leave it out (auto)")
        slim = self.bit_allocation == "slim-llm"
        if slim and self.bits not in (2, 3, 4):
            raise SlimError(f"--bit-allocation slim-llm gives groups N-1, N or N+1 bits around --bits N in 2, 3 or 4 "
                            f"(got --bits {self.bits})")
        if self.zero_point is False and (self.bits <= 3 or slim):
            raise SlimError(f"--no-zero-point: {'SliM-LLM' if slim else f'{self.bits}-bit'} grids need zero points "
                            f"(a symmetric 2-bit grid has a single positive level); drop --no-zero-point")
        if self.zero_point and self.bits not in (2, 3, 4):
            raise SlimError(f"--zero-point works with --bits 2, 3 or 4 (got --bits {self.bits})")
        if not self.zero_points:
            return
        what = "--bit-allocation slim-llm" if slim else f"zero points (--bits {self.bits})"
        if self.quantizer != "gptq" and not (self.pruner == "sparsegpt" and self.sparsity_spec.kind != "none"):
            raise SlimError(f"{what} rounds in the GPTQ sweep, which --quantizer {self.quantizer} does not run: add "
                            f"--quantizer gptq (or --pruner sparsegpt with a sparsity)")
        if self.effective_group_size <= 0:
            raise SlimError(f"{what} needs groups of input columns: give --group-size 128 (got "
                            f"{self.effective_group_size})")

    @property
    def zero_points(self) -> bool:
        """Whether the base weights carry zero points (zero_point, or its automatic choice)."""
        if self.quantizer == "spqr":  # SpQR's own grid (algorithms/spqr.py), not the GPTQ sweep's zero points
            return False
        if self.zero_point is not None:
            return self.zero_point
        return self.bits <= 3 or self.bit_allocation == "slim-llm"

    @property
    def sparsity_spec(self) -> Sparsity:
        return Sparsity.parse(self.sparsity)

    @property
    def effective_group_size(self) -> int:
        if self.group_size is not None:
            return self.group_size
        return 0 if self.quantizer == "slim" else SPQR_GROUP_SIZE if self.quantizer == "spqr" else 128

    @property
    def reselects_mask(self) -> bool:
        """refit_mask "reselect" where there is a SparseGPT N:M / unstructured sweep to choose the mask again in
        (not SpQR, not Wanda/magnitude masks, not dense): elsewhere the refit rounds keep the mask they have, so
        the 2:4 presets' "reselect" stays harmless when a knob leaves SparseGPT (the CLI refuses an explicit
        --refit-mask reselect there)."""
        return (self.refit_mask == "reselect" and self.pruner == "sparsegpt" and self.quantizer != "spqr"
                and self.sparsity_spec.kind != "none")

    @property
    def permutation_parts(self) -> tuple[str, ...]:
        """The parts of channel_permutation in CHANNEL_PERMUTATION_PARTS order (() for "none")."""
        return permutation_parts(self.channel_permutation)

    @property
    def permutes_channels(self) -> bool:
        """channel_permutation other than "none" where there are N:M groups to arrange channels for; dense and
        unstructured recipes keep the model's order (the CLI refuses an explicit --channel-permutation there)."""
        return bool(self.permutation_parts) and self.sparsity_spec.kind == "nm"

    @property
    def tunes_blocks(self) -> bool:
        """Block-wise adapter tuning is on and there are adapters to tune."""
        return self.block_tune_epochs > 0 and self.lowrank != "none" and self.rank_ratio > 0

    @property
    def dense_stream(self) -> bool:
        """The compression carries the dense model's hidden states beside the compressed ones: for the asymmetric
        targets, or as the block tuning's target."""
        return self.dense_target > 0 or (self.tunes_blocks and self.block_tune_target == "dense")

    @property
    def permutes_residual(self) -> bool:
        """The "residual" part is on: the whole model is permuted before its first block (so it is loaded whole)."""
        return self.permutes_channels and "residual" in self.permutation_parts

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip_layers"] = list(self.skip_layers)
        d["effective_group_size"] = self.effective_group_size
        return d

    @staticmethod
    def from_dict(d: dict) -> "CompressConfig":
        names = {f.name for f in dataclasses.fields(CompressConfig)}
        # Fields added later, with the behaviour a stored config without them had.
        d = {"refit_mask": "keep", "channel_permutation": "none", "weight_format": "int", "act_format": "int",
             "dense_target": 0.0, "dense_target_damp": 0.01,
             "dense_target_frame": "layer", **d}
        return CompressConfig(**{k: (tuple(v) if k == "skip_layers" else v) for k, v in d.items() if k in names})

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration text comes from and how it is cut into token windows."""

    source: str | None = None  # a local text file, a HF dataset name, or None for the shipped sample
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8  # windows per forward pass through one block

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise SlimError(f"bad --nsamples {self.nsamples}: it must be >= 1")
        if self.seqlen < 8:
            raise SlimError(f"bad --seqlen {self.seqlen}: it must be >= 8")
        if self.batch_size < 1:
            raise SlimError(f"bad batch size {self.batch_size}: it must be >= 1")


FINETUNE_SCHEDULES = ("cosine", "constant")
FINETUNE_LOSSES = ("ce", "kd")


@dataclass(frozen=True)
class FinetuneConfig:
    """How `slim-trt finetune` (compression/finetune.py) trains the adapters; the CLI's defaults are these."""

    steps: int = 100  # optimizer steps (the schedule's length)
    minutes: float | None = None  # stop earlier when this much wall time has passed in this run
    lr: float = 1e-4
    schedule: str = "cosine"  # after the warmup: cosine decay to 0 at `steps`, or constant
    warmup_steps: int = 5
    batch_size: int = 8  # windows per optimizer step
    micro_batch_size: int = 1  # windows per forward/backward (gradient accumulation up to batch_size)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0
    save_every: int = 10  # steps between resumable states
    # "ce": next-token cross-entropy on the text (SLiM's recipe). "kd": KL divergence from the dense model's
    # next-token distribution (distillation): every position gives a full 262k-way target instead of one token,
    # which is what a CPU budget of a few hundred windows needs.
    loss: str = "ce"

    def __post_init__(self) -> None:
        def whole(name: str, v, lo: int) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SlimError(f"bad --{name.replace('_', '-')} {v!r}: give a whole number >= {lo}")

        whole("steps", self.steps, 1)
        whole("warmup_steps", self.warmup_steps, 0)
        whole("batch_size", self.batch_size, 1)
        whole("micro_batch_size", self.micro_batch_size, 1)
        whole("save_every", self.save_every, 1)
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise SlimError(f"bad --minutes {self.minutes}: give a positive number of minutes")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SlimError(f"bad --lr {self.lr}: give a positive learning rate, e.g. 1e-4")
        if self.loss not in FINETUNE_LOSSES:
            raise SlimError(f"bad --loss {self.loss!r}: choose one of {', '.join(FINETUNE_LOSSES)}")
        if self.schedule not in FINETUNE_SCHEDULES:
            raise SlimError(f"bad --schedule {self.schedule!r}: choose one of {', '.join(FINETUNE_SCHEDULES)}")
        if not (self.weight_decay >= 0 and self.max_grad_norm >= 0):
            raise SlimError("bad weight decay or gradient clipping: both must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def trajectory_fingerprint(self) -> str:
        """What decides the adapters a run ends with: everything but the time budget and the save interval."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("minutes", "save_every")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, dict] = {
    # The SLiM paper's recipe: per-tensor SLiM-Quant, Wanda 2:4, SLiM-LoRA at rank 0.1 with fp16 adapters. Every
    # knob is spelled out so the preset keeps its meaning whatever the defaults become.
    "slim-paper": dict(sparsity="2:4", bits=4, quantizer="slim", group_size=0, pruner="wanda",
                       lowrank="slim", rank_ratio=0.1, rank_multiple=1, quantize_adapters=False, adapter_bits=4,
                       adapter_group_size=128, adapter_quantizer="rtn", percdamp=0.01, blocksize=128, refit_rounds=0,
                       refit_rounding="every", refit_scales="every", refit_mask="keep", channel_permutation="none",
                       dense_target=0.0, dense_target_damp=0.01, dense_target_frame="source", block_tune_epochs=0, block_tune_lr=3e-4,
                       block_tune_target="layer", block_tune_loss="mse", rank_allocation="uniform", max_bits=None, act_bits=None, act_scale_method="mse",
                       act_percentile=99.99, smooth_alpha=None, outlier_share=0.01,
                       zero_point=None, bit_allocation="uniform", weight_format="int", act_format="int"),
    # The best one-shot 2:4 W4A16 recipe (bench row 24, the defaults until issue 14): SparseGPT 2:4 with group-128
    # SLiM-Quant scales chosen in the OBS sweep, H-LoRA rank 0.23 rounded to 4 bits by GPTQ, 3 refit rounds, within
    # 4.5 bits/param: 1.320x dense on Gemma 3 270M; with the refit sweeps choosing the 2:4 mask again (issue 23)
    # 1.298x (row 63); with the MLP channels permuted for down_proj's 2:4 groups as well 1.261x (row 65); with each
    # layer fitted a step 0.25 toward the dense model's output (asymmetric calibration, GPTAQ's step) 1.202x (row
    # 79; steps 0.15 / 0.5 / 1: 1.221x / 1.252x / 2.935x); with 6 refit rounds instead of 3 1.165x (row 94: every
    # round still lowered each layer's error; the W8A8 defaults measured 1.211x with 6 against 1.202x with 3, row
    # 95, so they keep 3). 2:4 INT4 runs weight-only in TensorRT (no sparse kernel).
    "slim-2to4": dict(sparsity="2:4", bits=4, quantizer="slim", group_size=128, pruner="sparsegpt",
                      lowrank="hessian", rank_ratio=0.23, rank_multiple=1, quantize_adapters=True, adapter_bits=4,
                      adapter_group_size=128, adapter_quantizer="gptq", percdamp=0.01, blocksize=128, refit_rounds=6,
                      refit_rounding="every", refit_scales="every", refit_mask="reselect", channel_permutation="mlp",
                      dense_target=0.25, dense_target_damp=0.01, dense_target_frame="source", block_tune_epochs=0, block_tune_lr=3e-4,
                      block_tune_target="layer", block_tune_loss="mse", rank_allocation="uniform", max_bits=4.5, act_bits=None, act_scale_method="mse", act_percentile=99.99, smooth_alpha=None,
                      outlier_share=0.01, zero_point=None, bit_allocation="uniform", weight_format="int",
                      act_format="int"),
    # The defaults (issue 23; CompressConfig() equals it). W8A8 2:4 for TensorRT's sparse INT8 tensor cores (issue
    # 13): SparseGPT 2:4 with per-channel INT8 weights, static per-tensor INT8 activations after SmoothQuant alpha
    # 0.5, LRC adapters (they read the float activation) rounded to 4 bits, the refit sweeps choosing the 2:4 mask
    # again on LRC's target and the MLP channels permuted (exactly) for down_proj's 2:4 groups (issue 23), each
    # layer fitted a step 0.25 toward the dense model's output (asymmetric calibration, GPTAQ's step, GPTQ's ridge in
    # the source model's frame): bench row 86, 1.202x dense on Gemma 3 270M (row 67 without the dense target
    # 1.232x, row 64 without the permutation too 1.287x, row 31 without either 1.298x, row 30 without smoothing
    # 1.409x). INT8 2:4 alone stores 5 bits/param, so no bits budget.
    "trt-int8-sparse": dict(sparsity="2:4", bits=8, quantizer="slim", group_size=-1, pruner="sparsegpt",
                            lowrank="lrc", rank_ratio=0.23, rank_multiple=1, quantize_adapters=True, adapter_bits=4,
                            adapter_group_size=128, adapter_quantizer="gptq", percdamp=0.01, blocksize=128,
                            refit_rounds=3, refit_rounding="every", refit_scales="every", refit_mask="reselect",
                            channel_permutation="mlp", dense_target=0.25, dense_target_damp=0.01,
                            dense_target_frame="source", block_tune_epochs=0, block_tune_lr=3e-4,
                            block_tune_target="layer", block_tune_loss="mse", rank_allocation="uniform",
                            act_bits=8, act_scale_method="mse", act_percentile=99.99, smooth_alpha=0.5, max_bits=None,
                            outlier_share=0.01, zero_point=None, bit_allocation="uniform", weight_format="int",
                            act_format="int"),
    # FP8 2:4 for Hopper, Ada and Jetson Thor (issue 24): the trt-int8-sparse recipe (SparseGPT 2:4 with the refit
    # sweeps choosing the mask again, MLP channels permuted, SmoothQuant 0.5, LRC adapters rank 0.23 in 4 bits)
    # with FP8 E4M3 weights (absmax / 448 per output channel, rounded in the OBS sweep) and static per-tensor FP8
    # E4M3 activations (MSE scales on the E4M3 grid). Accuracy: docs/fp8.md.
    "trt-fp8-sparse": None,  # filled in below from trt-int8-sparse (its place here sets the presets' order)
    # Dense INT4 for TensorRT's weight-only INT4 GEMMs (the defaults of issues 14-22, bench row 42): GPTQ with
    # group-128 scales, H-LoRA adapters of rank 0.23 rounded to nearest in 4 bits, 3 refit rounds, within 4.5
    # bits/param (the ranks are lowered until they fit: 40 of 640 on Gemma 3 270M): 1.144x dense at 4.498 bits.
    # No sparsity: TensorRT has no sparse kernel for INT4 weights.
    "int4-dense": dict(sparsity="none", bits=4, quantizer="gptq", group_size=128, pruner="sparsegpt",
                       lowrank="hessian", rank_ratio=0.23, rank_multiple=1, quantize_adapters=True, adapter_bits=4,
                       adapter_group_size=128, adapter_quantizer="rtn", percdamp=0.01, blocksize=128, refit_rounds=3,
                       refit_rounding="every", refit_scales="every", refit_mask="keep",
                       channel_permutation="none", dense_target=0.0, dense_target_damp=0.01, dense_target_frame="source", block_tune_epochs=0, block_tune_lr=3e-4,
                       block_tune_target="layer", block_tune_loss="mse", rank_allocation="uniform",
                       max_bits=4.5,
                       act_bits=None, act_scale_method="mse", act_percentile=99.99, smooth_alpha=None,
                       outlier_share=0.01, zero_point=None, bit_allocation="uniform", weight_format="int",
                       act_format="int"),
}
# FP8 keeps the INT8 recipe as bench row 68 measured it, before the INT8 defaults took the dense target (row 86):
# FP8 with it is not measured.
PRESETS["trt-fp8-sparse"] = {**PRESETS["trt-int8-sparse"], "weight_format": "fp8", "act_format": "fp8",
                             "dense_target": 0.0}

# What CompressConfig() makes, and why (README "Which recipe", `compress --help`, `info`, demo.json say the same).
DEFAULT_PRESET = "trt-int8-sparse"
DEFAULT_REASON = ("2:4-sparse INT8 weights x INT8 activations is the math TensorRT's sparse INT8 tensor cores run "
                  "on every NVIDIA GPU since Ampere and on Jetson Orin; INT4 is weight-only in TensorRT (no sparse "
                  "kernel reads it), so dense INT4 is --preset int4-dense")

# What each preset measured (bench/accuracy.py on Gemma 3 270M, WikiText-2 test, 32 x 512 windows): the bench row,
# perplexity x dense and bits/param with adapters. `compress --help` quotes them; tests/test_config.py holds them
# equal to bench/results/accuracy_gemma3-270m.json.
PRESET_RESULTS: dict[str, tuple[int, float, float]] = {
    "slim-paper": (7, 5.836, 5.228),
    "slim-2to4": (94, 1.165, 4.468),
    "trt-int8-sparse": (86, 1.202, 6.363),
    "int4-dense": (42, 1.144, 4.498),
    "trt-fp8-sparse": (68, 1.198, 6.363),
}


def measured(preset: str) -> str:
    """'1.232x dense perplexity at 6.363 bits/param on Gemma 3 270M (bench row 67)', from PRESET_RESULTS."""
    row, ratio, bits = PRESET_RESULTS[preset]
    return f"{ratio:.3f}x dense perplexity at {bits:.3f} bits/param on Gemma 3 270M (bench row {row})"


def recipe_label(config: CompressConfig) -> str:
    """The short name of a recipe's math, read from the config: 'W8A8 2:4', 'W4A16 dense', 'W4A16 unstructured:0.5'."""
    s = config.sparsity_spec
    math = "FP8" if config.weight_format == "fp8" else f"W{config.bits}A{config.act_bits or 16}"
    return f"{math} {'dense' if s.kind == 'none' else s}"


def preset_name(config: CompressConfig) -> str | None:
    """The preset whose recipe `config` is exactly (skip_layers aside), or None for a custom recipe."""
    plain = dataclasses.replace(config, skip_layers=())
    return next((name for name, kw in PRESETS.items() if CompressConfig(**kw) == plain), None)


def describe(config: CompressConfig) -> str:
    """One line naming what the recipe does, read from the config itself (the demo and `info` print it)."""
    c = config
    names = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude", "slim": "SLiM-Quant",
             "gptq": "GPTQ", "absmax": "AbsMax", "spqr": "SpQR"}
    adapters = {"slim": "SLiM-LoRA", "hessian": "H-LoRA", "svd": "SVD", "lrc": "LRC"}
    sparsity = "dense" if c.sparsity_spec.kind == "none" else f"{names[c.pruner]} {c.sparsity}"
    g = c.effective_group_size
    scales = "per output channel" if g == -1 else "per tensor" if g == 0 else f"groups of {g}"
    weights = "float weights" if c.bits == 16 else f"INT{c.bits} {names[c.quantizer]} weights ({scales})"
    if c.weight_format == "fp8":
        weights = f"FP8 E4M3 weights (absmax/448 {scales})"
    parts = [sparsity, weights]
    if c.act_bits:
        kind = "FP8 E4M3" if c.act_format == "fp8" else f"INT{c.act_bits}"
        acts = f"static per-tensor {kind} activations ({c.act_scale_method.upper()} scales)"
        if c.smooth_alpha is not None:
            acts += f" after SmoothQuant alpha {c.smooth_alpha:g}"
        parts.append(acts)
    if c.lowrank != "none":
        rounding = f"rounded to {c.adapter_bits} bits by {c.adapter_quantizer.upper()}" if c.quantize_adapters \
            else "in fp16"
        parts.append(f"{adapters[c.lowrank]} adapters rank {c.rank_ratio:g} {rounding}")
        if c.refit_rounds:
            parts.append(f"{c.refit_rounds} refit rounds" + (" choosing the mask again" if c.reselects_mask else ""))
        if c.block_tune_epochs:
            toward = "the dense model's hidden states" if c.block_tune_target == "dense" else "the dense block's output"
            parts.append(f"adapters tuned block by block toward {toward} ({c.block_tune_epochs} epochs)")
    if c.permutes_channels:
        names = {"mlp": "MLP", "attn": "attention value", "residual": "residual-stream"}
        named = [names[p] for p in c.permutation_parts]
        listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
        parts.append(f"{listed} channels permuted for the N:M groups")
    if c.dense_target:
        ridge = "" if c.dense_target_damp == 0.01 else f", ridge {c.dense_target_damp:g}"
        parts.append(f"layers fitted toward the dense model's outputs (asymmetric calibration, step {c.dense_target:g}"
                     f"{ridge})")
    if c.max_bits is not None:
        parts.append(f"within {c.max_bits:g} bits/param")
    return ", ".join(parts)
