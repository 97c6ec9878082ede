"""The accuracy benchmark's rows: read from accuracy_rows.json (the data), checked, and turned into the recipe
each row stores in the results (and compares against before it skips a finished row).

A row of the file is the dense reference ("dense": true), a peer library ("peer": key of "peers"), or our recipe
("recipe": a key of "recipes", "set": CompressConfig fields changed on it, "finetune": a key of "finetunes").
A recipe is a preset ("preset") or another recipe ("base") with fields changed ("set").
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import harness
from slim_trt.errors import SlimError

ROWS_FILE = Path(__file__).resolve().parent / "accuracy_rows.json"

# The method our rows store in their config. It names the compressor as it was when the first rows were stored;
# the module has moved since (slim_trt.compression.compressor), but the stored name is the results' contract:
# rows already measured and rows measured later must compare alike (best_rows reads it).
OUR_METHOD = "slim_trt.compressor"

_ROW_KEYS = {"number", "name", "group", "label", "dense", "peer", "recipe", "set", "finetune"}


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
    group: str = ""

    @property
    def key(self) -> str:
        return f"{self.number}-{self.name}"


def load_rows(path: Path = ROWS_FILE) -> tuple[tuple[Row, ...], dict]:
    """(rows, peers) from the rows file; a row the file cannot describe is a SlimError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SlimError(f"{path}: cannot read the accuracy rows ({e}); fix the file (it is JSON)") from None
    recipes = {name: _recipe(name, data.get("recipes", {}), path) for name in data.get("recipes", {})}
    rows: list[Row] = []
    for spec in data.get("rows", []):
        where = f"{path.name}: row {spec.get('number')} {spec.get('name')!r}"
        row = _row(spec, where, data, recipes)
        if any(r.number == row.number or r.name == row.name for r in rows):
            raise SlimError(f"{where}: number or name already used by another row (rows are never renumbered)")
        rows.append(row)
    return tuple(rows), data.get("peers", {})


def _row(spec: dict, where: str, data: dict, recipes: dict) -> Row:
    """One row of the file, its recipe resolved and checked as a CompressConfig now (not when a run reaches it)."""
    from slim_trt.config import CompressConfig

    groups, peers, finetunes = data.get("groups", {}), data.get("peers", {}), data.get("finetunes", {})
    unknown = set(spec) - _ROW_KEYS
    if unknown:
        raise SlimError(f"{where} has unknown fields {sorted(unknown)}: use {sorted(_ROW_KEYS)}")
    if not isinstance(spec.get("number"), int) or not spec.get("name") or not spec.get("label"):
        raise SlimError(f"{where} needs an integer number, a name and a label")
    if spec.get("group") not in groups:
        raise SlimError(f"{where}: group {spec.get('group')!r} is not one of the file's groups ({', '.join(groups)})")
    kinds = [k for k in ("dense", "peer", "recipe") if spec.get(k)]
    if len(kinds) != 1:
        raise SlimError(f"{where} needs exactly one of dense, peer, recipe (it has {kinds or 'none'})")
    if spec.get("peer") and spec["peer"] not in peers:
        raise SlimError(f"{where}: unknown peer {spec['peer']!r} ({', '.join(peers)})")
    if not spec.get("recipe"):
        if spec.get("set") or spec.get("finetune"):
            raise SlimError(f"{where}: set and finetune apply to a recipe row only")
        return Row(spec["number"], spec["name"], spec["label"], peer=spec.get("peer"), group=spec["group"])
    if spec["recipe"] not in recipes:
        raise SlimError(f"{where}: unknown recipe {spec['recipe']!r} ({', '.join(recipes)})")
    compress = {**recipes[spec["recipe"]], **spec.get("set", {})}
    try:
        CompressConfig(**compress)
    except (TypeError, SlimError) as e:
        raise SlimError(f"{where}: its recipe is not a CompressConfig ({e})") from None
    finetune = None
    if spec.get("finetune"):
        if spec["finetune"] not in finetunes:
            raise SlimError(f"{where}: unknown finetune {spec['finetune']!r} ({', '.join(finetunes)})")
        finetune = dict(finetunes[spec["finetune"]]["set"])
    return Row(spec["number"], spec["name"], spec["label"], compress=compress, finetune=finetune, group=spec["group"])


def _recipe(name: str, recipes: dict, path: Path, chain: tuple = ()) -> dict:
    """A recipe's CompressConfig keyword arguments: its preset, or its base's with its own changes."""
    from slim_trt.config import PRESETS

    if name in chain:
        raise SlimError(f"{path.name}: recipes {' -> '.join((*chain, name))} form a circle")
    if name not in recipes:
        raise SlimError(f"{path.name}: recipe {chain[-1]!r} has unknown base {name!r}")
    spec = recipes[name]
    if "preset" in spec:
        if spec["preset"] not in PRESETS:
            raise SlimError(f"{path.name}: recipe {name!r} names unknown preset {spec['preset']!r} "
                            f"({', '.join(PRESETS)})")
        return {**PRESETS[spec["preset"]], **spec.get("set", {})}
    if "base" not in spec:
        raise SlimError(f"{path.name}: recipe {name!r} needs a preset or a base")
    return {**_recipe(spec["base"], recipes, path, (*chain, name)), **spec.get("set", {})}


ROWS, PEERS = load_rows()


def select_rows(spec: str) -> list[Row]:
    return harness.select_rows(spec, ROWS)


def row_config(row: Row) -> dict:
    """The recipe a row stores: the full CompressConfig (and fine-tuning), the peer's recipe, or dense."""
    from slim_trt.config import CompressConfig

    if row.compress is not None:
        out = {"method": OUR_METHOD, **CompressConfig(**row.compress).to_dict()}
        if row.finetune is not None:
            out["finetune"] = finetune_settings(row)
        return out
    if row.peer is not None:
        return PEERS[row.peer]["recipe"]
    return {"method": "dense"}


# CompressConfig fields added after results were stored, with the behaviour those results had (a stored config
# without the field was made that way, whatever the field's default is today).
LEGACY = {"adapter_quantizer": "rtn", "refit_rounds": 0, "rank_allocation": "uniform", "max_bits": None,
          "refit_rounding": "every", "refit_scales": "every", "act_bits": None, "smooth_alpha": None,
          "refit_mask": "keep", "channel_permutation": "none", "dense_target": 0.0, "dense_target_damp": 0.01, "dense_target_frame": "layer"}


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


def finetune_settings(row: Row) -> dict:
    """The row's fine-tuning as recorded: every FinetuneConfig field (defaults filled in) plus "windows"."""
    from slim_trt.compression.finetune import FinetuneConfig

    kw = {k: v for k, v in row.finetune.items() if k != "windows"}
    return {**FinetuneConfig(**kw).to_dict(), "windows": row.finetune.get("windows", 32)}
