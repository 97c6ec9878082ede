"""bench/accuracy_rows.json and its reader: every row is a recipe the code can run (so a row cannot drift from
CompressConfig or the presets), and a row the file cannot describe is one clear error naming it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slim_trt.errors import SlimError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))  # the bench modules import their sibling harness by name
import accuracy_rows  # noqa: E402


def test_every_row_builds_its_config_and_its_recorded_recipe():
    from slim_trt.compression.finetune import FinetuneConfig
    from slim_trt.config import CompressConfig

    data = json.loads(accuracy_rows.ROWS_FILE.read_text())
    rows = accuracy_rows.ROWS
    assert [r.number for r in rows] == [spec["number"] for spec in data["rows"]]
    assert len({r.number for r in rows}) == len({r.name for r in rows}) == len(rows) >= 67
    for row in rows:
        assert row.group in data["groups"], row.key
        if row.compress is None:
            assert accuracy_rows.row_config(row) in ({"method": "dense"}, data["peers"].get(row.peer, {}).get("recipe"))
            continue
        cfg = CompressConfig(**row.compress)  # a field CompressConfig does not have, or a bad value, fails here
        stored = accuracy_rows.row_config(row)
        assert stored["method"] == accuracy_rows.OUR_METHOD
        assert CompressConfig.from_dict(stored) == cfg, row.key  # what the JSON stores reads back as the recipe
        assert accuracy_rows.same_config(stored, row), row.key
        if row.finetune is not None:
            FinetuneConfig(**{k: v for k, v in row.finetune.items() if k != "windows"})
            assert stored["finetune"]["windows"] == row.finetune["windows"]


def test_recipes_resolve_through_their_bases_and_the_preset():
    from slim_trt.config import PRESETS

    by_number = {r.number: r for r in accuracy_rows.ROWS}
    assert by_number[7].compress == PRESETS["slim-paper"]  # row 7 is the paper's recipe, unchanged
    # row 24: paper -> sgpt -> hlora -> slim-2to4; each level's changes on the one below
    assert by_number[24].compress == {**PRESETS["slim-paper"], "pruner": "sparsegpt", "quantizer": "slim",
                                      "group_size": 128, "quantize_adapters": True, "rank_ratio": 0.23,
                                      "lowrank": "hessian", "adapter_quantizer": "gptq", "refit_rounds": 3,
                                      "max_bits": 4.5}
    assert by_number[43].compress["max_bits"] is None  # JSON null is None: SpQR rows have no bits cap
    assert by_number[23].finetune == {"loss": "kd", "steps": 50, "minutes": 25.0, "batch_size": 4, "lr": 1e-4,
                                      "windows": 128}
    assert by_number[11].peer == "modelopt" and by_number[11].compress is None
    assert by_number[1].compress is None and by_number[1].peer is None


def _write(tmp_path, **changes) -> Path:
    """The real rows file with `changes` applied to its top-level sections."""
    data = json.loads(accuracy_rows.ROWS_FILE.read_text())
    for section, change in changes.items():
        change(data[section])
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(data))
    return path


def test_a_new_row_is_a_data_change(tmp_path):
    n = max(r.number for r in accuracy_rows.ROWS) + 1
    path = _write(tmp_path, rows=lambda rows: rows.append(
        {"number": n, "name": "w8a8-sgpt-lrc-smooth-r03", "group": "issue-23", "label": "row 67 at rank 0.3",
         "recipe": "w8a8", "set": {"lowrank": "lrc", "smooth_alpha": 0.5, "rank_ratio": 0.3}}))
    rows, _ = accuracy_rows.load_rows(path)
    assert rows[-1].key == f"{n}-w8a8-sgpt-lrc-smooth-r03" and rows[-1].compress["rank_ratio"] == 0.3
    assert rows[:-1] == accuracy_rows.ROWS


@pytest.mark.parametrize("changes, message", [
    (dict(rows=lambda rows: rows[1].update(recipe="nope")), "row 2 'magnitude-absmax': unknown recipe 'nope'"),
    (dict(rows=lambda rows: rows[1].update(bits=8)), "row 2 'magnitude-absmax' has unknown fields ['bits']"),
    (dict(rows=lambda rows: rows[1]["set"].update(bitz=8)), "row 2 'magnitude-absmax': its recipe is not a Compr"),
    (dict(rows=lambda rows: rows[1]["set"].update(bits=5)), "row 2 'magnitude-absmax': its recipe is not a Compr"),
    (dict(rows=lambda rows: rows[2].update(number=2)), "row 2 'wanda-absmax': number or name already used"),
    (dict(rows=lambda rows: rows[1].update(group="issue-99")), "group 'issue-99' is not one of the file's groups"),
    (dict(rows=lambda rows: rows[1].update(peer="modelopt")), "needs exactly one of dense, peer, recipe"),
    (dict(rows=lambda rows: rows[0].update(set={"bits": 8})), "set and finetune apply to a recipe row only"),
    (dict(rows=lambda rows: rows[22].update(finetune="long")), "row 23 'sgpt-gptq-hlora-gq4-r02-ft': unknown finetune"),
    (dict(recipes=lambda r: r["paper"].update(preset="nope")), "recipe 'paper' names unknown preset 'nope'"),
    (dict(recipes=lambda r: r["paper"].update(preset=None, base="slimllm") or r["paper"].pop("preset")),
     "form a circle"),
])
def test_a_row_the_file_cannot_describe_is_one_error_naming_it(tmp_path, changes, message):
    with pytest.raises(SlimError, match=message.replace("(", r"\(").replace("[", r"\[")):
        accuracy_rows.load_rows(_write(tmp_path, **changes))


def test_a_file_that_is_not_json_says_so(tmp_path):
    (tmp_path / "rows.json").write_text("{not json")
    with pytest.raises(SlimError, match="cannot read the accuracy rows"):
        accuracy_rows.load_rows(tmp_path / "rows.json")


def test_the_command_says_what_is_wrong_with_the_rows_file_in_one_line(tmp_path):
    """bench/accuracy.py reads the rows on start: a bad row is one line on stderr and exit code 2, no traceback."""
    bench = tmp_path / "bench"
    bench.mkdir()
    for f in ("accuracy.py", "accuracy_rows.py", "accuracy_run.py", "accuracy_report.py", "harness.py"):
        shutil.copy(REPO / "bench" / f, bench / f)
    _write(tmp_path, rows=lambda rows: rows[3].update(recipe="nope")).rename(bench / "accuracy_rows.json")
    r = subprocess.run([sys.executable, str(bench / "accuracy.py"), "--rows", "1"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error: accuracy_rows.json: row 4 'sparsegpt-gptq': unknown recipe 'nope' (paper, sgpt, hlora, slim-2to4, "
        "w8a16, w8a8, w8-dense, gptq-dense, spqr-dense, slimllm)"]
