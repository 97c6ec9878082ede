"""Optimization-profile shapes: min/opt/max for batch, sequence and past length, mapped onto the model's inputs.

An export's slim_export.json lists every input with its shape as integers and axis names ("batch",
"sequence", "past_sequence", "total_sequence"). The user gives ranges for the three free axes
(`--batch 1,1,8 --seq 1,128,2048 --past 0,512,4096`, or one number for a fixed size); total_sequence is
sequence + past_sequence. Pure functions, no TensorRT.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SlimError

AXES = ("batch", "sequence", "past_sequence", "total_sequence")


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    @staticmethod
    def parse(text: str, *, flag: str = "range", floor: int = 1) -> "Range":
        """'1,128,2048' -> Range(1, 128, 2048); '64' -> Range(64, 64, 64)."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise SlimError(f"bad {flag} {text!r}: give MIN,OPT,MAX integers (e.g. 1,128,2048) or one integer") from None
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise SlimError(f"bad {flag} {text!r}: give MIN,OPT,MAX (three integers) or one integer")
        return Range.of(values, flag=flag, floor=floor)

    @staticmethod
    def of(values, *, flag: str = "range", floor: int = 1) -> "Range":
        lo, opt, hi = (int(v) for v in values)
        if not floor <= lo <= opt <= hi:
            raise SlimError(f"bad {flag} {lo},{opt},{hi}: need {floor} <= MIN <= OPT <= MAX")
        return Range(lo, opt, hi)

    def __add__(self, other: "Range") -> "Range":
        return Range(self.min + other.min, self.opt + other.opt, self.max + other.max)

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class ShapeRanges:
    """Ranges of the free axes of one optimization profile."""

    batch: Range
    sequence: Range
    past_sequence: Range

    def axis(self, name: str) -> Range:
        if name == "total_sequence":
            return self.sequence + self.past_sequence
        if name in ("batch", "sequence", "past_sequence"):
            return getattr(self, name)
        raise SlimError(f"unknown axis name {name!r} in the export's shapes: expected one of {', '.join(AXES)}")

    def to_dict(self) -> dict:
        return {"batch": self.batch.as_list(), "sequence": self.sequence.as_list(),
                "past_sequence": self.past_sequence.as_list()}

    @staticmethod
    def from_dict(d: dict) -> "ShapeRanges":
        try:
            return ShapeRanges(batch=Range.of(d["batch"], flag="batch"),
                               sequence=Range.of(d["sequence"], flag="sequence"),
                               past_sequence=Range.of(d.get("past_sequence", (0, 0, 0)), flag="past_sequence",
                                                      floor=0))
        except KeyError as e:
            raise SlimError(f"a shape profile needs 'batch' and 'sequence' ranges (missing {e})") from None


def io_from_onnx(onnx_path: str | Path) -> dict:
    """Inputs/outputs with axis names, read from the ONNX graph (for files without slim_export.json)."""
    import onnx

    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def entries(values):
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    inputs = entries(model.graph.input)
    return {"inputs": inputs, "outputs": entries(model.graph.output),
            "with_cache": any(i["name"].startswith("past_key_values.") for i in inputs)}


def _clamp(r: Range, cap: int) -> Range:
    return Range(min(r.min, cap), min(r.opt, cap), min(r.max, cap))


def _as_range(value, flag: str, floor: int) -> Range:
    return value if isinstance(value, Range) else Range.parse(value, flag=flag, floor=floor)


GENERIC_SHAPES = {"batch": (1, 1, 4), "sequence": (1, 128, 1024), "past_sequence": (0, 512, 2048)}


def shape_ranges(meta: dict, target_shapes: dict | None = None, *, batch: str | Range | None = None,
                 seq: str | Range | None = None, past: str | Range | None = None) -> ShapeRanges:
    """The user's --batch/--seq/--past over the target's defaults, checked against the export.

    Defaults are fitted into the model's context (max_position_embeddings): with a KV cache the prompt gets at
    most half of it and the past the rest; without a cache the past is 0.
    """
    shapes = target_shapes or GENERIC_SHAPES
    ctx = meta.get("max_position_embeddings")
    cache = meta.get("with_cache", True)
    b = _as_range(batch, "--batch", 1) if batch is not None else Range.of(shapes["batch"], flag="batch")
    if seq is not None:
        s = _as_range(seq, "--seq", 1)
    else:
        s = Range.of(shapes["sequence"], flag="sequence")
        if ctx:
            s = _clamp(s, max(1, ctx // 2) if cache else ctx)
    if not cache:
        if past is not None and _as_range(past, "--past", 0).max > 0:
            raise SlimError("--past was given but this export has no KV cache (it was exported with --no-cache): "
                            "drop --past")
        p = Range(0, 0, 0)
    elif past is not None:
        p = _as_range(past, "--past", 0)
    else:
        p = Range.of(shapes["past_sequence"], flag="past_sequence", floor=0)
        if ctx:
            p = _clamp(p, max(0, ctx - s.max))
    if ctx and s.max + p.max > ctx:
        raise SlimError(f"--seq max {s.max} + --past max {p.max} exceeds the model's context of {ctx} tokens "
                        f"(max_position_embeddings): lower them")
    return ShapeRanges(b, s, p)


def input_profiles(meta: dict, ranges: ShapeRanges) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """{input name: (min shape, opt shape, max shape)} for every input of the export."""
    inputs = meta.get("inputs")
    if not inputs:
        raise SlimError("the export lists no inputs (slim_export.json 'inputs'): re-run `slim-trt export`")
    out = {}
    for entry in inputs:
        mins, opts, maxs = [], [], []
        for dim in entry["shape"]:
            if isinstance(dim, int) and not isinstance(dim, bool):
                if dim <= 0:
                    raise SlimError(f"input {entry['name']} has an unnamed dynamic dimension: re-export so every "
                                    f"dynamic axis is named ({', '.join(AXES)})")
                mins.append(dim), opts.append(dim), maxs.append(dim)
            else:
                r = ranges.axis(str(dim))
                mins.append(r.min), opts.append(r.opt), maxs.append(r.max)
        out[entry["name"]] = (tuple(mins), tuple(opts), tuple(maxs))
    return out


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}


def kv_cache_bytes(meta: dict, ranges: ShapeRanges) -> int:
    """Bytes of the present.* outputs at the profile's max shapes (what the cache costs at the limit)."""
    total = 0
    for entry in meta.get("outputs", []):
        if not entry["name"].startswith("present."):
            continue
        n = _DTYPE_BYTES.get(entry.get("dtype", "float16"), 2)
        for dim in entry["shape"]:
            n *= dim if isinstance(dim, int) else ranges.axis(str(dim)).max
        total += n
    return total
