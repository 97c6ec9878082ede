"""Export options, validated on construction (bad values are user errors)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import SlimError

DTYPES = ("fp16", "bf16", "fp32")
LOWRANK_MODES = ("decomposed", "plugin")
ACT_QUANT = (None, "int8")
HEAD_MODES = ("none", "int8", "int4")
# How SpQR's fp16 outliers run (slim_trt.exporter.linear.emit_outliers; measured in bench/spqr_outliers.py).
# scatter is the default: the only form that stores about what the paper counts (on Gemma 3 270M the outliers of a
# layer sit in 25-85% of its input columns, so "columns" stores nearly a dense fp16 copy); it is the slow one.
OUTLIER_FORMS = ("scatter", "columns", "dense")
DEFAULT_OUTLIER_FORM = "scatter"
# Weights with zero points (SpQR): "dq" = DequantizeLinear with a UINT4 zero point (ONNX Runtime fuses it into
# MatMulNBits; TensorRT refuses non-zero zero points); "fold" = signed INT4 codes q - 2^(bits-1), zero point 0, plus
# the per-group offset (2^(bits-1) - zero) * scale applied to the group sums of x by one small fp16 MatMul.
ZERO_POINT_FORMS = ("dq", "fold")
# Measured on Gemma 3 270M (demo checkpoint, the first 8 test windows x 512 tokens, PyTorch): an int8 head costs
# +0.10% perplexity, int4 +7.5% (blocks of 128; +4.5% / +5.2% with blocks of 64 / 32), beyond the 2% budget.
DEFAULT_HEAD = "int8"
# ONNX Runtime's MatMulNBits accuracy levels: 1 = fp32 activations, 4 = activations quantized to int8 on the fly.
# Level 4 takes ~45% less CPU per decoded token than level 1 (Gemma 3 270M, int4 head, one thread) for +0.65%
# perplexity (int8 head, served session) and 94% greedy agreement with the checkpoint. An export that already
# quantizes its activations to INT8 in the graph (--act-quant int8 / W8A8) defaults to 1: there the MatMulNBits
# left are the 4-bit adapters, whose input is the full-precision x, and level 4 measured (Gemma 3 270M, the
# defaults' checkpoint) 10% faster decoding and +0.8% perplexity on 32 windows, but verify's agreement with the
# checkpoint fell from top-1 91.4% to 86.7% and its perplexity gap from 0.03% to 3.9% (limit 4%) on the demo's
# windows: too little margin for the main job's check.
ORT_ACCURACY_LEVELS = (1, 4)
DEFAULT_ORT_ACCURACY_LEVEL = 4
W8A8_ORT_ACCURACY_LEVEL = 1
OPSET = 21
# onnx 1.23 writes IR 11+ by default, which ONNX Runtime 1.31 refuses; IR 10 carries everything opset 21 needs
# (INT4, blocked DequantizeLinear).
IR_VERSION = 10
# protobuf cannot serialize more than 2 GiB; stay well below it before switching to external data.
EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    dtype: the compute dtype of the graph (activations, float weights, Q/DQ scales).
    with_cache: KV-cache inputs/outputs (`past_key_values.{i}.key` ... `present.{i}.value`); False = prefill only.
    lowrank: "decomposed" = Add(Y, MatMul(MatMul(X, R^T), L^T)); "plugin" = one LowRankAdd node (slim_trt domain).
    act_quant: None, or "int8" for static symmetric per-tensor INT8 Q/DQ on the inputs of compressed MatMuls.
    external_data: True = always write model.onnx.data, False = never, None = only above ~1.5 GB.
    head: "none", or "int8" / "int4" weight-only quantization of the embedding and LM head (exporter.head).
    ort_accuracy_level: the MatMulNBits accuracy level ONNX Runtime runs the INT4/INT8 weights with, recorded in
      slim_export.json's session config (1 = fp32 activations, 4 = int8 activations); None = 4, or 1 when the
      graph quantizes its activations itself (act_quant "int8").
    outliers: how SpQR checkpoints' fp16 outliers run: "scatter" (Gather, Mul, ScatterElements add: nnz values and
      indices), "columns" (Gather of the input columns holding any outlier, MatMul with that fp16 slice) or "dense"
      (a second fp16 GEMM of the layer's size).
    zero_points: weights with zero points (SpQR): "dq" keeps them in DequantizeLinear (ONNX Runtime), "fold" writes
      symmetric INT4 codes and a per-group offset term that TensorRT can parse (ZERO_POINT_FORMS).
    """

    dtype: str = "fp16"
    with_cache: bool = True
    lowrank: str = "decomposed"
    act_quant: str | None = None
    external_data: bool | None = None
    head: str = DEFAULT_HEAD
    ort_accuracy_level: int | None = None
    outliers: str = DEFAULT_OUTLIER_FORM
    zero_points: str = "dq"

    def __post_init__(self) -> None:
        if self.zero_points not in ZERO_POINT_FORMS:
            raise SlimError(f"bad --zero-points {self.zero_points!r}: choose dq (ONNX Runtime) or fold (TensorRT)")
        if self.outliers not in OUTLIER_FORMS:
            raise SlimError(f"bad --outliers {self.outliers!r}: choose one of {', '.join(OUTLIER_FORMS)}")
        if self.dtype not in DTYPES:
            raise SlimError(f"bad --dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.lowrank not in LOWRANK_MODES:
            raise SlimError(f"bad --lowrank {self.lowrank!r}: choose one of {', '.join(LOWRANK_MODES)}")
        if self.act_quant not in ACT_QUANT:
            raise SlimError(f"bad --act-quant {self.act_quant!r}: use int8 (or leave it out for weight-only)")
        if self.head not in HEAD_MODES:
            raise SlimError(f"bad --head {self.head!r}: choose one of {', '.join(HEAD_MODES)}")
        if self.ort_accuracy_level is not None and self.ort_accuracy_level not in ORT_ACCURACY_LEVELS:
            raise SlimError(f"bad --ort-accuracy-level {self.ort_accuracy_level!r}: choose 1 (fp32 activations) or "
                            "4 (int8 activations)")

    def session_config(self) -> dict[str, str]:
        """The ONNX Runtime session config entries every consumer of the export uses (slim_export.json)."""
        return {"session.disable_quant_qdq": "0",
                "session.qdq_matmulnbits_accuracy_level": str(self.accuracy_level)}

    @property
    def accuracy_level(self) -> int:
        """The MatMulNBits accuracy level the export declares (ort_accuracy_level, or its default)."""
        if self.ort_accuracy_level is not None:
            return self.ort_accuracy_level
        return W8A8_ORT_ACCURACY_LEVEL if self.act_quant == "int8" else DEFAULT_ORT_ACCURACY_LEVEL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
