"""bench/accuracy_report.py re-renders the committed results: the JSON in bench/results/ gives back, with nothing
run, the committed Markdown byte for byte and the same derived fields (the best rows, gap closed, W8A8 goals).
A change to the rows' labels, to the stored method name or to the report's rules that would change the committed
report fails here."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))  # the bench modules import their sibling harness by name
import accuracy_report  # noqa: E402
import accuracy_rows  # noqa: E402

RESULTS = REPO / "bench" / "results" / "accuracy_gemma3-270m"


def _committed() -> tuple[dict, str]:
    return json.loads(RESULTS.with_suffix(".json").read_text()), RESULTS.with_suffix(".md").read_text()


def test_the_committed_json_renders_the_committed_markdown():
    data, md = _committed()
    derived = copy.deepcopy(data)
    accuracy_report.derive(derived)
    assert derived == data  # the derived fields are the committed ones
    assert accuracy_report.markdown(derived) == md
    assert derived["best_one_shot"] == "86-w8a8-sgpt-lrc-smooth-remask-permmlp-asym025-src"
    assert derived["best_one_shot_2to4"] == "94-sgpt-slimq-hlora-gq4-r023-refit6-remask-permmlp-asym025"
    assert derived["best_finetuned"] == "92-w8a8-sgpt-lrc-smooth-remask-permmlp-asym025-src-ft"


def test_stored_rows_name_our_method_as_the_rows_do():
    """best_rows picks among rows whose config names our method: the stored name and the one new rows write must
    be the same string, or a re-render loses every best row."""
    data, _ = _committed()
    ours = {r.key for r in accuracy_rows.ROWS if r.compress is not None}
    stored = {k: r["config"]["method"] for k, r in data["rows"].items() if k in ours}
    assert stored and set(stored.values()) == {accuracy_rows.OUR_METHOD}
    row = next(r for r in accuracy_rows.ROWS if r.key in stored)
    assert accuracy_rows.row_config(row)["method"] == accuracy_rows.OUR_METHOD


def test_the_plot_is_a_png_of_the_ok_rows():
    data, _ = _committed()
    png = accuracy_report.plot_png(data)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert accuracy_report.plot_png({**data, "rows": {}}) is None
