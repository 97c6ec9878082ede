"""`slim-trt build` / `bench` on a machine without TensorRT or a GPU, and the GPU-free pre-flight of build."""
from __future__ import annotations

import importlib.util
import shutil

import onnx
import pytest

from slim_trt.cli import main
from slim_trt.errors import SlimError
from slim_trt.trt.builder import plan_build
from slim_trt.trt.shapes import Range

no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                 reason="TensorRT is installed: the missing-TensorRT path cannot be exercised")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@no_tensorrt
def test_build_without_tensorrt_exits_2_with_install_hint(tiny_exports, tmp_path, capsys):
    engine = tmp_path / "tiny.plan"
    assert main(["build", str(tiny_exports["decomposed"]), "-o", str(engine)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("slim-trt build: error: TensorRT is not installed")
    assert "pip install slim-trt[trt]" in line and "NVIDIA GPU" in line and "JetPack" in line
    # with a target the lint pre-flight runs first (it passes on this export), then the same error
    assert main(["build", str(tiny_exports["decomposed"]), "-o", str(engine), "--target", "hopper"]) == 2
    assert "TensorRT is not installed" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial file


@no_tensorrt
def test_bench_without_tensorrt_exits_2(capsys, tmp_path):
    assert main(["bench", str(tmp_path / "x.plan"), "--compare", str(tmp_path / "y.plan")]) == 2
    assert "slim-trt bench: error: TensorRT is not installed" in one_error_line(capsys)


def test_other_subcommands_are_unaffected(tiny_exports, capsys):
    assert main(["lint", str(tiny_exports["decomposed"])]) == 0
    capsys.readouterr()
    assert main(["build", "--list-targets"]) == 0
    listing = capsys.readouterr().out
    for name in ("ampere", "ada", "hopper", "jetson-orin", "jetson-thor"):
        assert f"\n{name} " in listing
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "build" in out and "bench" in out and "export" in out


def test_preflight_stops_on_lint_errors(tiny_exports, tmp_path, capsys):
    broken = tmp_path / "opset17"
    shutil.copytree(tiny_exports["decomposed"].parent, broken)
    model = onnx.load(str(broken / "model.onnx"))
    model.opset_import[0].version = 17  # INT4 DequantizeLinear needs opset 21
    onnx.save(model, str(broken / "model.onnx"))
    assert main(["build", str(broken / "model.onnx"), "-o", str(tmp_path / "x.plan"), "--target", "hopper"]) == 2
    line = one_error_line(capsys)
    assert "lint found" in line and "for target trt10" in line and "--skip-lint" in line
    assert not (tmp_path / "x.plan").exists()


def test_preflight_plan_for_a_jetson(tiny_exports, tmp_path):
    plan = plan_build(tiny_exports["decomposed"], tmp_path / "tiny.plan", target="jetson-orin",
                      seq=Range(1, 16, 64), past=Range(0, 32, 128))
    assert plan.lint["target"] == "jetson-orin-jp6" and plan.lint["ok"]
    assert plan.lint["summary"]["flop_fraction_2to4"] == 0.75  # the 2:4 share of GEMM FLOPs lint measured
    # JetPack 6's TensorRT 10.3 documents opset <= 20; lint warns and the warning reaches the build report
    assert len(plan.lint["warnings"]) == 1 and "[opset]" in plan.lint["warnings"][0]
    assert plan.warnings == ["lint jetson-orin-jp6: " + plan.lint["warnings"][0]]
    shapes = plan.shapes[0]
    assert shapes["input_ids"] == ((1, 1), (1, 16), (2, 64))  # batch 1,1,2 from the jetson-orin profile
    assert shapes["attention_mask"] == ((1, 1), (1, 48), (2, 192))
    assert shapes["past_key_values.1.value"] == ((1, 2, 0, 16), (1, 2, 32, 16), (2, 2, 128, 16))
    assert plan.workspace_bytes == 2 * 2**30 and plan.plugins == []
    assert plan.report == tmp_path / "tiny.build.json" and plan.log == tmp_path / "tiny.build.log"
    with pytest.raises(SlimError, match="exceeds the model's context of 256 tokens"):
        plan_build(tiny_exports["decomposed"], tmp_path / "tiny.plan", target="jetson-orin", past=Range(0, 1, 256))
    (tmp_path / "tiny.plan").write_bytes(b"")
    with pytest.raises(SlimError, match="already exists: pass --force"):
        plan_build(tiny_exports["decomposed"], tmp_path / "tiny.plan", target="hopper")


def test_preflight_finds_the_plugin_library(tiny_exports, tmp_path, monkeypatch):
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    monkeypatch.setenv("SLIM_TRT_PLUGIN_PATH", str(lib_dir))
    monkeypatch.chdir(tmp_path)  # no plugins/build/ here
    from slim_trt.trt import plugins

    monkeypatch.setattr(plugins, "_repo_build_dirs", lambda: [])
    with pytest.raises(SlimError, match="LowRankAdd plugin but liblowrank_add_plugin.so was not found: build it"):
        plan_build(tiny_exports["plugin"], tmp_path / "p.plan", target="hopper")
    (lib_dir / "liblowrank_add_plugin.so").write_bytes(b"\x7fELF")
    plan = plan_build(tiny_exports["plugin"], tmp_path / "p.plan", target="hopper")
    assert plan.plugins == [lib_dir / "liblowrank_add_plugin.so"]
    assert plan.required_plugins == [("LowRankAdd", "1", "slim_trt")]
    with pytest.raises(SlimError, match="plugin library /nope.so does not exist"):
        plan_build(tiny_exports["plugin"], tmp_path / "p.plan", target="hopper", plugins=["/nope.so"])


def test_preflight_keeps_the_sparse_prediction_for_the_target(tiny_exports, tmp_path):
    plan = plan_build(tiny_exports["decomposed"], tmp_path / "tiny.plan", target="jetson-orin")
    assert plan.lint["gpu"] == "jetson-orin"
    base = [g for g in plan.lint["gemms"] if g["dtype"] == "int4"]
    assert len(base) == 14 and {g["sparse_class"] for g in base} == {"int4-weight-only"}
    assert not any(g["sparse_eligible"] for g in plan.lint["gemms"])
    assert plan.lint["summary"]["sparse_tensor_cores"]["line"].startswith(
        "sparse tensor cores (jetson-orin): 0 of 14 2:4 GEMMs eligible (14 are INT4 weight-only)")
