"""Streaming compression (slim_trt/compression/streaming.py): bit-identical to the in-memory path, resumable, and within the
stated peak host memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slim_trt.compression.calibration.families import decoder_blocks
from slim_trt.compression.compressor import compress_model
from slim_trt.config import PRESETS, CalibConfig, CompressConfig
from slim_trt.errors import SlimError
from tests.conftest import slim_2to4, save_tiny_model, tiny_model, tiny_tokenizer

CALIB = CalibConfig(nsamples=4, seqlen=16, batch_size=2)


def _save(path, family="llama", dtype=torch.float32, seed=0, tied=False):
    model = tiny_model(family, seed)
    if tied:  # one tensor for the embedding and the head, stored once (as Gemma 3 270M's)
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model = model.to(dtype)
    model.save_pretrained(path)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


def _same_checkpoint(a: Path, b: Path) -> None:
    """Every file byte for byte; the manifests differ only in the run's summary (times, memory)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "slim_manifest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((p / "slim_manifest.json").read_text()) for p in (a, b))
    assert {k for k in ma if ma[k] != mb.get(k)} <= {"summary", "content_sha256"}
    assert list(ma["layers"]) == list(mb["layers"])  # same layers in the same order


@pytest.mark.parametrize("family,dtype,preset,tied", [
    ("llama", torch.float32, None, False), ("opt", torch.float16, None, False), ("gemma3", torch.bfloat16, None, True),
    ("llama", torch.bfloat16, "trt-int8-sparse", False),
])
def test_streaming_gives_the_in_memory_checkpoint_bit_for_bit(tmp_path, family, dtype, preset, tied):
    src = _save(tmp_path / "model", family, dtype, tied=tied)
    # W8A8 with SmoothQuant changes the norms: the streamed block keeps them for the save
    cfg = CompressConfig(**{**PRESETS[preset], "smooth_alpha": 0.5}) if preset else slim_2to4()
    _, whole = compress_model(str(src), tmp_path / "whole", cfg, CALIB, progress=False, stream=False, device="cpu")
    _, streamed = compress_model(str(src), tmp_path / "streamed", cfg, CALIB, progress=False, device="cpu")
    assert not whole.streamed and streamed.streamed
    assert whole.peak_host_bytes_bound is None and streamed.peak_host_bytes_bound > 0
    _same_checkpoint(tmp_path / "whole", tmp_path / "streamed")
    summary = json.loads((tmp_path / "streamed" / "slim_manifest.json").read_text())["summary"]
    assert summary["streamed"] is True and summary["peak_host_bytes"] > 0
    parts = summary["host_memory"]
    model = tiny_model(family)
    stored = sum(t.numel() for t in model.state_dict().values()) * dtype.itemsize
    assert parts["stored_bytes"] == stored - (model.lm_head.weight.numel() * dtype.itemsize if tied else 0)
    if tied:
        manifest = json.loads((tmp_path / "streamed" / "slim_manifest.json").read_text())
        assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert parts["block32"] == 4 * sum(p.numel() for p in decoder_blocks(model)[0].parameters())
    assert parts["acts"] == CALIB.nsamples * CALIB.seqlen * model.config.hidden_size * 4


def test_an_interrupted_streamed_run_resumes_to_the_same_checkpoint(tmp_path, monkeypatch):
    from tests.compression.test_compressor import _interrupt_after_first_block

    src = _save(tmp_path / "model", "llama", torch.bfloat16)
    compress_model(str(src), tmp_path / "whole", slim_2to4(), CALIB, progress=False, stream=False)
    out = tmp_path / "streamed"
    _interrupt_after_first_block(monkeypatch, lambda: compress_model(str(src), out, slim_2to4(), CALIB,
                                                                     progress=False))
    partial = tmp_path / "streamed.partial"
    assert not out.exists() and (partial / "block_0000.json").exists()
    assert not (partial / "block_0001.json").exists()
    _, report = compress_model(str(src), out, slim_2to4(), CALIB, progress=False)
    assert report.streamed and not partial.exists()
    _same_checkpoint(tmp_path / "whole", out)


def test_non_finite_stored_weights_are_refused_before_compressing(tmp_path):
    from safetensors.torch import load_file, save_file

    src = save_tiny_model(tmp_path / "model", "llama")
    f = src / "model.safetensors"
    state = load_file(str(f))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(SlimError, match=r"NaN or Inf in model\.layers\.1\.mlp\.up_proj\.weight .*1 of 8192"):
        compress_model(str(src), tmp_path / "out", slim_2to4(), CALIB, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_weights_under_names_the_model_does_not_use_are_loaded_whole_and_said_so(tmp_path, capsys):
    """Tensor names that are not the model's (a checkpoint transformers would rename on load) cannot be streamed
    tensor by tensor: compress hands the folder to the in-memory loader, whose checks then apply (and says so
    on stderr when that load works)."""
    from safetensors.torch import load_file, save_file

    from slim_trt.compression.streaming import open_streamed

    src = save_tiny_model(tmp_path / "model", "llama")
    f = src / "model.safetensors"
    state = load_file(str(f))
    state["model.norm.gamma"] = state.pop("model.norm.weight")
    save_file(state, str(f), metadata={"format": "pt"})
    streamed, why_not = open_streamed(src)
    assert streamed is None
    assert why_not == "the weights lack 1 tensor name(s) the model has (e.g. model.norm.weight)"
    with pytest.raises(SlimError, match=r"the weights lack 1 tensor\(s\) the config needs \(e\.g\. model\.norm\.weight"):
        compress_model(str(src), tmp_path / "out", slim_2to4(), CALIB, progress=False)
    # The note is said only when the whole load works: here the one error line is all the user sees.
    assert "loaded whole, not streamed" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_weights_without_the_base_model_prefix_are_streamed(tmp_path):
    """Checkpoints saved from the base model (no "model." prefix) are found under the prefix-less names."""
    from safetensors.torch import load_file, save_file

    from slim_trt.compression.streaming import open_streamed

    src = save_tiny_model(tmp_path / "model", "llama")
    f = src / "model.safetensors"
    state = {k.removeprefix("model."): v for k, v in load_file(str(f)).items()}
    save_file(state, str(f), metadata={"format": "pt"})
    streamed, why_not = open_streamed(src)
    assert why_not is None
    assert streamed.entries["model.layers.1.mlp.up_proj.weight"].name == "layers.1.mlp.up_proj.weight"
    streamed.load_block(1)
    torch.testing.assert_close(streamed.model.model.layers[1].mlp.up_proj.weight,
                               state["layers.1.mlp.up_proj.weight"], rtol=0, atol=0)
    assert streamed.model.model.layers[0].mlp.up_proj.weight.is_meta  # only the block asked for


# A 64-block LLaMA-style model in bf16: 109 MB stored, 219 MB in float32; one block is 3.4 MB in float32.
MEMORY_MODEL = dict(layers=64, hidden=256, intermediate=768)


def _memory_model(path: Path, layers: int = MEMORY_MODEL["layers"]) -> int:
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=MEMORY_MODEL["hidden"],
                         intermediate_size=MEMORY_MODEL["intermediate"], num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(5.0)
    model.to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer(256).save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_peak_host_memory_stays_within_the_stated_bound(tmp_path):
    """A fresh process compresses a bf16 model; its peak resident memory (the kernel's VmHWM, which the summary
    reports) minus its baseline stays within host_peak_bound, which is below the model in float32: the test
    fails if the model were ever held whole in float32. A cheap recipe (dense INT4, no adapters: --preset int4-dense,
    what this test measured before issue 23) keeps it short: with the issue-14 defaults the same model peaked 138 MB
    over its baseline against a bound of 181 MB (the formula in docs/compression.md); the W8A8 defaults peak at
    154 MB (the test below runs them on 8 of its blocks)."""
    params = _memory_model(tmp_path / "model")
    out, summary_file = tmp_path / "out", tmp_path / "summary.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slim_trt", "compress", str(tmp_path / "model"), "-o", str(out),
                             "--nsamples", "8", "--seqlen", "64", "--preset", "int4-dense", "--pruner", "wanda",
                             "--lowrank", "none", "--device", "cpu",
                             "-q", "--json",
                             str(summary_file)], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err
    s = json.loads(summary_file.read_text())
    peak = s["peak_host_bytes"]
    parts = s["host_memory"]
    fp32_model = 4 * params
    assert s["streamed"] and parts["stored_bytes"] == 2 * params
    # wait4's ru_maxrss also counts the pages this test process had when it forked the child (kept over exec)
    assert parts["baseline"] < peak <= usage.ru_maxrss * 1024
    assert peak <= s["peak_host_bytes_bound"], (peak, s["peak_host_bytes_bound"], parts)
    bound = s["peak_host_bytes_bound"] - parts["baseline"]
    assert bound < fp32_model  # so the model was never whole in float32
    # the goal: 1.5x the stored bytes plus one block's calibration activations
    assert peak - parts["baseline"] <= 1.5 * parts["stored_bytes"] + parts["acts"]


def _compress_summary(model: Path, out: Path, *flags: str) -> tuple[dict, int]:
    """A fresh process compresses `model` on one thread; its summary and wait4's ru_maxrss (bytes)."""
    summary_file = out.parent / (out.name + ".json")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slim_trt", "compress", str(model), "-o", str(out),
                             "--nsamples", "8", "--seqlen", "64", "--device", "cpu", "-q", "--json",
                             str(summary_file), *flags], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, err
    return json.loads(summary_file.read_text()), usage.ru_maxrss * 1024


@pytest.mark.slow
def test_the_w8a8_defaults_stay_within_the_bound_too(tmp_path):
    """The defaults (W8A8: SmoothQuant, |x| histograms, MSE activation scales, LRC) within the same bound. The MSE
    scale search once scored all 128 clips of a grid at once over up to 65536 histogram bins: about 5 x 67 MB of
    float64 temporaries, 546 MB over the baseline on the 64-block model against a bound of 181 MB."""
    _memory_model(tmp_path / "model", layers=8)
    s, maxrss = _compress_summary(tmp_path / "model", tmp_path / "out")
    parts = s["host_memory"]
    assert s["streamed"] and parts["baseline"] < s["peak_host_bytes"] <= maxrss
    assert s["peak_host_bytes"] <= s["peak_host_bytes_bound"], (s["peak_host_bytes"], s["peak_host_bytes_bound"], parts)


def test_the_bound_is_its_largest_stage_and_counts_kept_inputs_in_the_statistics_stage():
    """host_peak_bound: runtime + the largest of start / statistics / block / save; a W8A8 run's kept inputs
    (runner.KeptInputs) are held while a block's statistics are gathered, not beside its sweeps' work copies."""
    from slim_trt.compression.streaming import host_peak_bound

    parts = dict(outer32=100, kept32=10, packed=50, kwargs=1, acts=20, block32=5, hessians=7, forward=3,
                 runtime=1000, dense=0, inputs=0)
    assert host_peak_bound(parts) == 1000 + (100 + 10 + 50)  # the save
    assert host_peak_bound({**parts, "block32": 20}) == 1000 + (10 + 1 + 3 * 20 + 7 + 3) + 8 * 20  # a block
    assert host_peak_bound({**parts, "inputs": 200}) == 1000 + (10 + 1 + 3 * 20 + 7 + 3) + 5 + 200  # statistics


def test_w8a8_keeps_its_inputs_when_they_take_at_most_a_quarter_of_the_memory(monkeypatch):
    """compressor.keeps_inputs: kept inputs cost 4 bytes per token and input channel of a block's linears (an upper
    bound: q/k/v counted thrice); weight-only recipes keep none."""
    import slim_trt.compression.compressor as comp

    model = tiny_model("llama")
    windows = torch.zeros(4, 16, dtype=torch.long)
    width = comp.kept_input_width(model, CompressConfig())
    lin = {n: m for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert width == sum(m.in_features for m in lin.values())
    need = 4 * windows.numel() * width
    monkeypatch.setattr(comp, "available_memory_bytes", lambda: 4 * need)
    assert comp.keeps_inputs(model, CompressConfig(), windows)
    monkeypatch.setattr(comp, "available_memory_bytes", lambda: 4 * need - 4)
    assert not comp.keeps_inputs(model, CompressConfig(), windows)
    assert not comp.keeps_inputs(model, CompressConfig(**PRESETS["slim-2to4"]), windows)
