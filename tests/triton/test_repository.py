"""Repository generation (`deploy`): layout, shared weight files, skipped models and their reasons, errors."""
from __future__ import annotations

import json
import os

import onnx
import pytest

pytest.importorskip("tritonclient.grpc", reason="configs are built with tritonclient's model_config_pb2")

from slim_trt.triton import configs, deploy, read_export, read_repository  # noqa: E402
from slim_trt.errors import SlimError  # noqa: E402
from tests.triton.toy_export import build_toy_export, toy_model  # noqa: E402


def test_layout_and_manifest(toy_export, tmp_path):
    result = deploy(toy_export, tmp_path / "repo")
    repo = result.repo
    assert result.models == {"slim_onnx": "python", "slim_generate": "python", "slim_ort": "onnxruntime"}
    assert result.skipped == {"slim_trt": "no --engine given"}
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "slim_generate", "slim_onnx", "slim_ort",
                                                      "slim_repository.json"]
    assert sorted(p.name for p in (repo / "slim_onnx" / "1").iterdir()) == \
        ["model.onnx", "model.py", "slim_export.json", "slim_ort_rewrite.py", "slim_runtime.py"]
    assert (repo / "slim_generate" / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert (repo / "slim_ort" / "1" / "model.onnx").is_file()
    # One copy of the weights on disk: the three models hard-link the export's model.onnx.
    inodes = {(repo / m / "1" / "model.onnx").stat().st_ino for m in ("slim_onnx", "slim_generate", "slim_ort")}
    assert inodes == {(toy_export / "model.onnx").stat().st_ino}
    manifest = read_repository(repo)
    assert manifest["models"]["slim_generate"] == {"backend": "python", "device": "cpu", "depends_on": []}
    for model in result.models:
        config = configs.parse((repo / model / "config.pbtxt").read_text())
        assert config.name == model
    assert not list(tmp_path.glob(".repo.partial-*"))


def test_readme_has_server_and_client_commands(toy_export, tmp_path):
    repo = deploy(toy_export, tmp_path / "repo", name="toy").repo
    text = (repo / "README.md").read_text()
    assert f"slim-trt serve {repo}" in text
    assert f"tritonserver --model-repository={repo}" in text
    assert "curl -s localhost:8000/v2/models/toy_generate/infer" in text
    assert 'client.infer("toy_generate", [prompt, steps])' in text
    assert "`toy_trt`: no --engine given" in text


def test_engine_and_plugin_libraries(tmp_path):
    export = build_toy_export(tmp_path / "plugin_export", lowrank="plugin")
    engine = tmp_path / "toy.plan"
    engine.write_bytes(b"serialized engine bytes")
    trt_plugin = tmp_path / "libslim_lowrank_trt.so"
    trt_plugin.write_bytes(b"\x7fELF trt plugin")
    with pytest.raises(SlimError, match="--trt-plugin-library"):
        deploy(export, tmp_path / "r0", engine=str(engine))
    result = deploy(export, tmp_path / "repo", engine=str(engine), trt_plugin_library=str(trt_plugin),
                    generate_via="trt")
    repo = result.repo
    assert result.models == {"slim_onnx": "python", "slim_generate": "python", "slim_trt": "tensorrt"}
    assert "--ort-op-library" in result.skipped["slim_ort"]
    assert (repo / "slim_trt" / "1" / "model.plan").read_bytes() == b"serialized engine bytes"
    manifest = read_repository(repo)
    assert manifest["tensorrt_plugins"] == ["plugins/tensorrt/libslim_lowrank_trt.so"]
    assert manifest["models"]["slim_generate"]["depends_on"] == ["slim_trt"]
    assert not (repo / "slim_generate" / "1" / "model.onnx").exists()  # it calls slim_trt: no weights of its own
    generate = configs.parse((repo / "slim_generate" / "config.pbtxt").read_text())
    assert generate.parameters["decoder_model"].string_value == "slim_trt"
    text = (repo / "README.md").read_text()
    assert f'--backend-config=tensorrt,plugins={repo}/plugins/tensorrt/libslim_lowrank_trt.so' in text
    assert f"LD_PRELOAD={repo}/plugins/tensorrt/libslim_lowrank_trt.so tritonserver" in text


def test_ort_op_library_path_names_its_final_place(tmp_path):
    export = build_toy_export(tmp_path / "plugin_export", lowrank="plugin", tokenizer=False)
    library = tmp_path / "libslim_lowrank_ort.so"
    library.write_bytes(b"\x7fELF ort op")
    result = deploy(export, tmp_path / "repo", ort_op_library=str(library))
    config = configs.parse((result.repo / "slim_ort" / "config.pbtxt").read_text())
    final = result.repo / "plugins" / "onnxruntime" / library.name
    assert list(config.model_operations.op_library_filename) == [str(final)] and final.is_file()
    assert result.skipped["slim_generate"].startswith("the export has no tokenizer")


def test_bf16_export_skips_the_python_models(tmp_path):
    export = build_toy_export(tmp_path / "bf16", dtype="float32")
    raw = json.loads((export / "slim_export.json").read_text())
    for t in raw["inputs"] + raw["outputs"]:
        if t["name"].startswith(("past", "present")):
            t["dtype"] = "bfloat16"
    raw["dtype"] = "bf16"
    (export / "slim_export.json").write_text(json.dumps(raw))
    result = deploy(export, tmp_path / "repo")
    assert set(result.models) == {"slim_ort"}
    assert "bf16" in result.skipped["slim_onnx"] and "bfloat16" in result.skipped["slim_generate"]
    config = configs.parse((result.repo / "slim_ort" / "config.pbtxt").read_text())
    assert {t.name: t.data_type for t in config.input}["past_key_values.0.key"] == configs._pb().TYPE_BF16


def test_external_data_files_are_deployed(tmp_path):
    export = tmp_path / "ext"
    build_toy_export(export, tokenizer=False)
    onnx.save(toy_model(), str(export / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    info = read_export(export)
    assert [p.name for p in info.model_files] == ["model.onnx", "model.onnx.data"]
    repo = deploy(export, tmp_path / "repo").repo
    assert (repo / "slim_onnx" / "1" / "model.onnx.data").stat().st_size == (export / "model.onnx.data").stat().st_size
    os.remove(export / "model.onnx.data")
    with pytest.raises(SlimError, match="model.onnx.data is missing"):
        read_export(export)


def test_existing_repository_needs_force(toy_export, tmp_path):
    repo = tmp_path / "repo"
    deploy(toy_export, repo)
    (repo / "marker").write_text("old")
    with pytest.raises(SlimError, match="already exists: pass --force"):
        deploy(toy_export, repo)
    deploy(toy_export, repo, overwrite=True)
    assert not (repo / "marker").exists() and (repo / "slim_onnx" / "config.pbtxt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no partial or old folder left


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("with_cache"), "has no 'with_cache'"),
    (lambda d: d.update(schema_version=2), "schema_version 2"),
    (lambda d: d.update(dtype="int4"), "dtype 'int4'"),
    (lambda d: d.update(model_file="other.onnx"), "other.onnx is missing"),
    (lambda d: d.update(tokenizer="tok"), "tokenizer folder .*tok is missing"),
])
def test_bad_export_folders(tmp_path, edit, message):
    export = build_toy_export(tmp_path / "e")
    raw = json.loads((export / "slim_export.json").read_text())
    edit(raw)
    (export / "slim_export.json").write_text(json.dumps(raw))
    with pytest.raises(SlimError, match=message):
        deploy(export, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_bad_options(toy_export, tmp_path):
    for kwargs, message in ((dict(name="a b"), "bad --name"), (dict(trt_accelerator=True), "needs --device gpu"),
                            (dict(generate_via="trt"), "needs --engine"), (dict(engine="nope.plan"), "nope.plan"),
                            (dict(instances=0), "--instances")):
        with pytest.raises(SlimError, match=message):
            deploy(toy_export, tmp_path / "repo", **kwargs)
    with pytest.raises(SlimError, match="has no slim_export.json"):
        deploy(tmp_path, tmp_path / "repo")


def test_public_api_name_works_after_the_package_is_imported(toy_export, tmp_path):
    import slim_trt
    import slim_trt.triton.client  # noqa: F401 - the package is imported; slim_trt.deploy stays the function

    result = slim_trt.deploy(toy_export, tmp_path / "repo", name="api")
    assert set(result.models) == {"api_onnx", "api_generate", "api_ort"}


def test_readme_commands_paste_into_a_shell_with_a_space_in_the_path(tmp_path):
    """Issue 11: every path in the README's commands is shell-quoted, so each line pastes as it is."""
    import shlex

    export = build_toy_export(tmp_path / "plugin export", lowrank="plugin")
    engine = tmp_path / "my engines" / "toy.plan"
    engine.parent.mkdir()
    engine.write_bytes(b"serialized engine bytes")
    trt_plugin = tmp_path / "libslim_lowrank_trt.so"
    trt_plugin.write_bytes(b"\x7fELF trt plugin")
    repo = deploy(export, tmp_path / "my repo", engine=str(engine), trt_plugin_library=str(trt_plugin)).repo
    lines = (repo / "README.md").read_text().splitlines()
    plugin = f"{repo}/plugins/tensorrt/libslim_lowrank_trt.so"
    assert shlex.split(next(x for x in lines if x.startswith("slim-trt serve"))) == [
        "slim-trt", "serve", str(repo), "--http-port", "8000", "--grpc-port", "8001"]
    assert shlex.split(next(x for x in lines if x.startswith("tritonserver"))) == [
        "tritonserver", f"--model-repository={repo}", f"--backend-config=tensorrt,plugins={plugin}"]
    assert shlex.split(next(x for x in lines if x.startswith("LD_PRELOAD"))) == [
        f"LD_PRELOAD={plugin}", "tritonserver", f"--model-repository={repo}"]


def _external_export(tmp_path, name):
    export = tmp_path / name
    build_toy_export(export, tokenizer=False)
    onnx.save(toy_model(), str(export / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    return export


def _relocate(export, location):
    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(export / "model.onnx"))


def test_external_data_outside_the_export_folder_is_refused(tmp_path):
    """Issue 25: deploy triton accepted locations outside the folder and hard-linked a symlinked
    model.onnx.data (to /etc/passwd) into every model of the repository; it now passes the same gate as
    generate, lint, verify and deploy jetson."""
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"x" * 4096)
    cases = {
        "dotdot": lambda e: _relocate(e, "../secret.txt"),
        "absolute": lambda e: _relocate(e, str(outside)),
        "symlink": lambda e: ((e / "model.onnx.data").unlink(), (e / "model.onnx.data").symlink_to(outside)),
    }
    for name, tamper in cases.items():
        export = _external_export(tmp_path, name)
        tamper(export)
        with pytest.raises(SlimError, match="which is outside the export folder"):
            deploy(export, tmp_path / f"repo-{name}")
        assert not (tmp_path / f"repo-{name}").exists()
