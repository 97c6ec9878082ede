"""`slim-trt deploy triton` and `slim-trt serve` argument handling through the real CLI entry point."""
from __future__ import annotations

import pytest

pytest.importorskip("tritonclient.grpc", reason="configs are built with tritonclient's model_config_pb2")

from slim_trt.cli import main  # noqa: E402


def test_deploy_triton_prints_models_and_next_command(toy_export, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["deploy", "triton", str(toy_export), "-o", str(repo), "--name", "toy", "--max-batch-size", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote Triton model repository {repo}"
    assert [line.split()[:2] for line in out[1:5]] == [["toy_onnx", "python"], ["toy_generate", "python"],
                                                       ["toy_ort", "onnxruntime"], ["toy_trt", "not"]]
    assert out[4].endswith("not generated: no --engine given")
    assert out[5].startswith(f"serve it: slim-trt serve {repo}")
    assert "max_batch_size: 4" in (repo / "toy_onnx" / "config.pbtxt").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--trt-accelerator"], "--trt-accelerator needs --device gpu"),
    (["--engine", "missing.plan"], "engine missing.plan does not exist"),
    (["--generate-via", "trt"], "--generate-via trt needs --engine"),
])
def test_deploy_user_errors_exit_2_with_one_line(toy_export, tmp_path, capsys, argv, message):
    assert main(["deploy", "triton", str(toy_export), "-o", str(tmp_path / "repo"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slim-trt deploy: error: ") and message in err
    assert not (tmp_path / "repo").exists()


def test_serve_user_errors_exit_2(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "model repository" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--http-port", "70000"]) == 2
    assert "bad --http-port 70000" in capsys.readouterr().err


def test_deploy_prints_a_serve_command_that_pastes_into_a_shell(toy_export, tmp_path, capsys):
    import shlex

    repo = tmp_path / "my repo"
    assert main(["deploy", "triton", str(toy_export), "-o", str(repo)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("serve it: "))
    assert shlex.split(line.removeprefix("serve it: "))[:3] == ["slim-trt", "serve", str(repo)]
