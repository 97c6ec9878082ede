"""Per-target TensorRT support tables, kept as data in tables/<target>.json (each names its source)."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files

from ..errors import SlimError
from ..targets.profile import LINT_TABLES

TARGETS = LINT_TABLES  # the targets room holds the table names, so profiles can name them without the linter


@lru_cache(maxsize=None)
def load_table(target: str) -> dict:
    if target not in TARGETS:
        raise SlimError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    table = json.loads(files("slim_trt.linter").joinpath("tables", f"{target}.json").read_text())
    table["ops"] = frozenset(table["ops"])
    return table


@lru_cache(maxsize=None)
def ort_only_ops() -> dict:
    """ONNX Runtime contrib ops (com.microsoft) an export may hold for ONNX Runtime only (tables/ort_only_ops.json)."""
    return json.loads(files("slim_trt.linter").joinpath("tables", "ort_only_ops.json").read_text())
