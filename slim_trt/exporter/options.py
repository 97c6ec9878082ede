"""Export options, validated on construction (bad values are user errors)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import SlimError

DTYPES = ("fp16", "bf16", "fp32")
LOWRANK_MODES = ("decomposed", "plugin")
ACT_QUANT = (None, "int8")
HEAD_MODES = ("none", "int8", "int4")
DEFAULT_HEAD = "none"
# ONNX Runtime's MatMulNBits accuracy levels: 1 = fp32 activations, 4 = activations quantized to int8 on the fly.
ORT_ACCURACY_LEVELS = (1, 4)
DEFAULT_ORT_ACCURACY_LEVEL = 1
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
      slim_export.json's session config (1 = fp32 activations, 4 = int8 activations).
    """

    dtype: str = "fp16"
    with_cache: bool = True
    lowrank: str = "decomposed"
    act_quant: str | None = None
    external_data: bool | None = None
    head: str = DEFAULT_HEAD
    ort_accuracy_level: int = DEFAULT_ORT_ACCURACY_LEVEL

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SlimError(f"bad --dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.lowrank not in LOWRANK_MODES:
            raise SlimError(f"bad --lowrank {self.lowrank!r}: choose one of {', '.join(LOWRANK_MODES)}")
        if self.act_quant not in ACT_QUANT:
            raise SlimError(f"bad --act-quant {self.act_quant!r}: use int8 (or leave it out for weight-only)")
        if self.head not in HEAD_MODES:
            raise SlimError(f"bad --head {self.head!r}: choose one of {', '.join(HEAD_MODES)}")
        if self.ort_accuracy_level not in ORT_ACCURACY_LEVELS:
            raise SlimError(f"bad --ort-accuracy-level {self.ort_accuracy_level!r}: choose 1 (fp32 activations) or "
                            "4 (int8 activations)")

    def session_config(self) -> dict[str, str]:
        """The ONNX Runtime session config entries every consumer of the export uses (slim_export.json)."""
        return {"session.disable_quant_qdq": "0",
                "session.qdq_matmulnbits_accuracy_level": str(self.ort_accuracy_level)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
