"""Rule quantized-table: an INT8 per-row embedding / tied head is TensorRT-parsable, an INT4 one is not, and ONNX
Runtime's contrib forms never are."""
from __future__ import annotations

import pytest

from slim_trt.exporter import ExportOptions, export_model
from slim_trt.linter import TARGETS, format_report, lint
from slim_trt.runtime.ort_rewrite import for_onnxruntime
from tests.exporter.conftest import compressed_model


def _tied_gemma():
    model = compressed_model("gemma3", group_size=16)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    return model


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    model = _tied_gemma()
    for head in ("none", "int8", "int4"):
        export_model(model, root / head, options=ExportOptions(head=head))
    return root


def _rule(report):
    return [f for f in report.findings if f.rule == "quantized-table"]


@pytest.mark.parametrize("target", TARGETS)
def test_int8_table_parses_int4_does_not(heads, target):
    none = lint(heads / "none" / "model.onnx", target=target)
    assert none.ok and not _rule(none)
    int8 = lint(heads / "int8" / "model.onnx", target=target)
    assert int8.ok, format_report(int8)
    assert sorted(f.severity for f in _rule(int8)) == ["info"] and "per-axis" in _rule(int8)[0].message
    int4 = lint(heads / "int4" / "model.onnx", target=target)
    assert not int4.ok
    errors = [f for f in _rule(int4) if f.severity == "error"]
    assert len(errors) == 1 and "--head int8" in errors[0].message and "INT4 blocked" in errors[0].message


def test_onnxruntime_forms_are_refused(heads):
    import onnx

    fused, _ = for_onnxruntime(onnx.load(str(heads / "int8" / "model.onnx")))
    errors = [f for f in _rule(lint(fused, target="trt10")) if f.severity == "error"]
    assert {f.message.split(" ")[0] for f in errors} == {"GatherBlockQuantized", "MatMulNBits"}
