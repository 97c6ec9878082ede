"""Will it fit: weights + KV cache at the max shapes + builder workspace, against a target's memory budget.

The weights are counted as the export's bytes on disk (model.onnx and its external data): TensorRT stores the
same INT4/INT8/fp16 weights in the engine, so this is the engine's weight memory to within the small tensors
TensorRT adds or folds. On Jetson the GPU shares this memory with the CPU and the OS. Pure arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .shapes import ShapeRanges, kv_cache_bytes

GB = 2**30


def model_bytes(onnx_path: str | Path) -> int:
    """model.onnx plus model.onnx.data beside it (the export's external data file)."""
    onnx_path = Path(onnx_path)
    data = onnx_path.with_name(onnx_path.name + ".data")
    return onnx_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int  # the present.* outputs at the largest profile's max shapes
    workspace_bytes: int
    budget_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.workspace_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {"weights_bytes": self.weights_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "workspace_bytes": self.workspace_bytes, "total_bytes": self.total_bytes,
                "budget_bytes": self.budget_bytes, "fits": self.fits}

    def line(self) -> str:
        return (f"weights {self.weights_bytes / GB:.2f} GiB + KV cache {self.kv_cache_bytes / GB:.2f} GiB + workspace "
                f"{self.workspace_bytes / GB:.2f} GiB = {self.total_bytes / GB:.2f} GiB of a "
                f"{self.budget_bytes / GB:g} GiB budget")


def estimate_memory(onnx_path: str | Path, meta: dict, ranges: list[ShapeRanges], workspace_gb: float | None,
                    budget_gb: float) -> MemoryEstimate:
    return MemoryEstimate(weights_bytes=model_bytes(onnx_path),
                          kv_cache_bytes=max(kv_cache_bytes(meta, r) for r in ranges),
                          workspace_bytes=int((workspace_gb or 0) * GB), budget_bytes=int(budget_gb * GB))
