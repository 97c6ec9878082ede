"""The compress/info/eval commands, end to end on a tiny saved model, and their bad-input errors."""
import json

import pytest
import torch

from slim_trt.cli import main
from tests.conftest import run_cli as run

FAST = ["--nsamples", "4", "--seqlen", "16", "-q"]




def test_compress_info_eval(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    rc, _, err = run(["compress", tiny_model_dir, "-o", out, *FAST, "--preset", "slim-2to4", "--json",
                      tmp_path / "s.json"], capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["compressed_layers"] == 14 and s["bits_per_param"] > 3.0
    assert s["bits_per_param_with_adapters"] > s["bits_per_param"]
    rc, text, _ = run(["info", out], capsys)
    assert rc == 0 and "model.layers.1.mlp.down_proj" in text and "2:4" in text
    # info names the recipe, and says that it is not the default and what the default is
    assert "recipe       --preset slim-2to4: SparseGPT 2:4, INT4 SLiM-Quant weights (groups of 128)" in text
    assert "(the default is --preset trt-int8-sparse: 2:4-sparse INT8 weights x INT8 activations" in text
    rc, text, _ = run(["info", out, "--json", "-"], capsys)
    recipe = json.loads(text)["recipe"]
    assert recipe["preset"] == "slim-2to4" and recipe["default"] is False and "Ampere" in recipe["why_default"]
    rc, text, _ = run(["eval", out, "--seqlen", "16", "--windows", "3"], capsys)
    assert rc == 0 and float(text.strip()) > 1.0


@pytest.mark.parametrize("flags,expect", [
    ([], dict(sparsity="2:4", bits=8, pruner="sparsegpt", quantizer="slim", lowrank="lrc", rank_ratio=0.23,
              quantize_adapters=True, adapter_quantizer="gptq", effective_group_size=-1, refit_rounds=3,
              refit_rounding="every", refit_scales="every", max_bits=None, act_bits=8, smooth_alpha=0.5)),
    (["--preset", "int4-dense"], dict(sparsity="none", quantizer="gptq", lowrank="hessian", rank_ratio=0.23,
                                      quantize_adapters=True, adapter_quantizer="rtn", effective_group_size=128,
                                      refit_rounds=3, max_bits=4.5, act_bits=None, smooth_alpha=None)),
    (["--preset", "slim-2to4"], dict(sparsity="2:4", pruner="sparsegpt", quantizer="slim", lowrank="hessian",
                                     rank_ratio=0.23, quantize_adapters=True, adapter_quantizer="gptq",
                                     effective_group_size=128, refit_rounds=6)),
    (["--refit-rounding", "last", "--refit-scales", "first"], dict(refit_rounding="last", refit_scales="first")),
    (["--preset", "slim-2to4", "--refit-mask", "reselect", "--channel-permutation", "mlp"],
     dict(sparsity="2:4", refit_mask="reselect", channel_permutation="mlp")),
    ([], dict(refit_mask="reselect", channel_permutation="mlp", dense_target=0.25)),  # the W8A8 2:4 preset (row 86)
    (["--sparsity", "unstructured:0.5"], dict(channel_permutation="none")),  # no N:M groups to arrange
    (["--channel-permutation", "attn,mlp"], dict(channel_permutation="mlp,attn")),
    (["--pruner", "wanda"], dict(pruner="wanda", refit_mask="keep")),  # no SparseGPT sweep to reselect in
    (["--sparsity", "none"], dict(sparsity="none", refit_mask="keep")),
    (["--quantizer", "spqr"], dict(quantizer="spqr", refit_mask="keep")),
    (["--preset", "slim-paper"], dict(pruner="wanda", quantizer="slim", lowrank="slim", rank_ratio=0.1,
                                      quantize_adapters=False, effective_group_size=0, refit_rounds=0)),
    (["--preset", "slim-paper", "--quantize-adapters", "--lowrank", "hessian"],
     dict(pruner="wanda", lowrank="hessian", quantize_adapters=True, adapter_quantizer="rtn")),
    (["--no-quantize-adapters", "--adapter-quantizer", "rtn"], dict(quantize_adapters=False, adapter_quantizer="rtn")),
    (["--act-bits", "none", "--refit-rounds", "0"],  # the default's weights, weight-only: W8A16 2:4 + H-LoRA
     dict(sparsity="2:4", bits=8, effective_group_size=-1, lowrank="hessian", act_bits=None, smooth_alpha=None)),
    (["--preset", "trt-int8-sparse"], dict(bits=8, effective_group_size=-1, pruner="sparsegpt", lowrank="lrc",
                                           act_bits=8, act_scale_method="mse", smooth_alpha=0.5)),
    (["--act-bits", "8", "--smooth-alpha", "0.7", "--act-scale", "max", "--refit-rounds", "0"],
     dict(bits=8, effective_group_size=-1, lowrank="lrc", act_bits=8, act_scale_method="max", smooth_alpha=0.7)),
    (["--act-bits", "8", "--smooth-alpha", "none", "--refit-rounds", "0"],  # the preset's smoothing turned off
     dict(bits=8, lowrank="lrc", act_bits=8, smooth_alpha=None)),
    (["--dense-target", "0.25", "--refit-rounds", "0"], dict(dense_target=0.25, lowrank="lrc", act_bits=8)),
    (["--dense-target", "0.25", "--dense-target-damp", "0.1", "--refit-rounds", "0"],
     dict(dense_target=0.25, dense_target_damp=0.1)),
])
def test_defaults_preset_and_flags_reach_the_manifest(flags, expect, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    rc, _, err = run(["compress", tiny_model_dir, "-o", out, *FAST, *flags], capsys)
    assert rc == 0, err
    method = json.loads((out / "slim_manifest.json").read_text())["method"]
    assert {k: method[k] for k in expect} == expect
    if not flags:  # info names the default recipe and says why it is the default
        rc, text, _ = run(["info", out], capsys)
        assert rc == 0 and "recipe       --preset trt-int8-sparse (the default): SparseGPT 2:4, INT8" in text
        assert "(the default because 2:4-sparse INT8 weights x INT8 activations" in text


def test_help_teaches(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # the description is wrapped to the terminal: one line per paragraph
    with pytest.raises(SystemExit) as e:
        main(["compress", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--rank-ratio" in out and "examples:" in out and "gemma3-270m" in out
    # which recipe is the default and why, and what --bits 4 alone means
    assert "The defaults are --preset trt-int8-sparse (W8A8 2:4)" in out and "sparse INT8 tensor cores" in out
    assert "`--bits 4` alone is exactly --preset slim-2to4" in out and "--preset int4-dense" in out


@pytest.mark.parametrize("flags,preset", [
    ([], "trt-int8-sparse"), (["--act-bits", "8"], "trt-int8-sparse"), (["--bits", "8"], "trt-int8-sparse"),
    (["--bits", "4"], "slim-2to4"),  # INT4 weights are weight-only in TensorRT: the weight-only 2:4 recipe
    (["--preset", "int4-dense"], "int4-dense"), (["--preset", "slim-2to4", "--bits", "4"], "slim-2to4"),
])
def test_flags_start_from_the_recipe_they_can_work_with(flags, preset):
    from slim_trt.cli import build_parser
    from slim_trt.cli.compress import config_from_args
    from slim_trt.config import PRESETS, CompressConfig

    args = build_parser().parse_args(["compress", "M", "-o", "O", *flags])
    assert config_from_args(args) == CompressConfig(**PRESETS[preset])


@pytest.mark.parametrize("flags,message", [
    (["--bits", "4", "--act-bits", "8"], "--act-bits 8 needs --bits 8"),
    (["--preset", "int4-dense", "--act-bits", "8"], "--act-bits 8 needs --bits 8"),
    (["--quantizer", "spqr", "--act-bits", "8"], "--quantizer spqr is weight-only"),
    (["--act-bits", "none", "--lowrank", "lrc"], "--lowrank lrc corrects the error of quantized activations"),
    (["--bits", "4", "--smooth-alpha", "0.5"], "--smooth-alpha moves activation outliers"),
    (["--channel-permutation", "mlp,heads"], "bad --channel-permutation 'mlp,heads': give none or a comma list"),
    (["--channel-permutation", "attn", "--sparsity", "none"], "--channel-permutation arranges channels for N:M"),
])
def test_flags_that_cannot_combine_are_one_line_exit_2(flags, message, tiny_model_dir, tmp_path, capsys):
    rc, out, err = run(["compress", tiny_model_dir, "-o", tmp_path / "ckpt", *FAST, *flags], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()


def _unsupported_model(tmp_path):
    import transformers as tf

    from tests.conftest import tiny_tokenizer

    cfg = tf.GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    path = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _nan_model(tmp_path):
    from tests.conftest import tiny_model, tiny_tokenizer

    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].self_attn.v_proj.weight[3, 3] = float("inf")
    m.save_pretrained(tmp_path / "nan")
    tiny_tokenizer().save_pretrained(tmp_path / "nan")
    return tmp_path / "nan"


# Flags that cannot combine with INT8 activations (issue 13), or need them.
W8A8_FLAG_CASES = {
    "act_bits_4": ["--act-bits", "4"],
    "act_bits_int4_weights": ["--act-bits", "8", "--bits", "4"],
    "act_bits_group_scales": ["--act-bits", "8", "--group-size", "128"],
    "lrc_without_act_bits": ["--act-bits", "none", "--lowrank", "lrc"],
    "smooth_without_act_bits": ["--act-bits", "none", "--smooth-alpha", "0.5"],
    "act_bits_paper_preset": ["--preset", "slim-paper", "--act-bits", "8"],
    "smooth_out_of_range": ["--act-bits", "8", "--smooth-alpha", "1.5"],
}


@pytest.mark.parametrize("case,needle", [
    ("missing", "no such model folder"),
    ("unsupported", "unsupported architecture 'gpt2'"),
    ("rank", "--rank-ratio"),
    ("nm", "does not divide"),
    ("empty_calib", "empty"),
    ("nan", "model.layers.0.self_attn.v_proj"),
    ("exists", "--force"),
    ("bad_sparsity", "bad sparsity"),
    ("act_bits_4", "bad --act-bits 4"),
    ("act_bits_int4_weights", "--act-bits 8 needs --bits 8"),
    ("act_bits_group_scales", "--group-size -1"),
    ("lrc_without_act_bits", "--lowrank lrc corrects"),
    ("smooth_without_act_bits", "--smooth-alpha"),
    ("act_bits_paper_preset", "--act-bits 8 needs --bits 8"),
    ("smooth_out_of_range", "bad --smooth-alpha 1.5"),
])
def test_bad_input_exits_2_with_one_line(case, needle, tiny_model_dir, tmp_path, capsys):
    model, out, extra = tiny_model_dir, tmp_path / "out", []
    if case == "missing":
        model = tmp_path / "nowhere" / "model"
    elif case == "unsupported":
        model = _unsupported_model(tmp_path)
    elif case == "rank":
        extra = ["--rank-ratio", "1.5"]
    elif case == "nm":
        extra = ["--sparsity", "2:7"]
    elif case == "empty_calib":
        (tmp_path / "empty.txt").write_text("")
        extra = ["--calib", tmp_path / "empty.txt"]
    elif case == "nan":
        model = _nan_model(tmp_path)
    elif case == "exists":  # a non-empty folder; an empty one is fine, as for export (issue 25)
        out.mkdir()
        (out / "old.txt").write_text("x")
    elif case == "bad_sparsity":
        extra = ["--sparsity", "half"]
    extra = W8A8_FLAG_CASES.get(case, extra)
    rc, _, err = run(["compress", model, "-o", out, *FAST, *extra], capsys)
    assert rc == 2
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("slim-trt compress: error: ") and needle in lines[0], err
    assert "Traceback" not in err
    if case != "exists":
        assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_unknown_flag_value_is_exit_2(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--pruner", "random"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,needle", [("--max-bits", "0", "bad --max-bits 0"),
                                               ("--max-bits", "lots", "is not a number of bits"),
                                               ("--smooth-alpha", "half", "'half' is not a strength in [0, 1]"),
                                               ("--dense-target", "2", "bad --dense-target 2.0: give a fraction in [0, 1]"),
                                               ("--dense-target", "most", "invalid float value: 'most'"),
                                               ("--dense-target-damp", "0", "bad dense_target_damp 0.0")])
def test_bad_number_or_none_exits_2(flag, value, needle, tiny_model_dir, tmp_path, capsys):
    extra = ["--act-bits", "8"] if flag == "--smooth-alpha" else []
    try:
        rc = main(["compress", str(tiny_model_dir), "-o", str(tmp_path / "out"), *FAST, *extra, flag, value])
    except SystemExit as e:  # argparse's own usage error for what is not a number
        rc = e.code
    assert rc == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_max_bits_lowers_the_ranks_and_says_so(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    # The 2:4 preset's 3.125-bit base leaves room for smaller adapters under 4.0 bits/param
    rc, _, err = run(["compress", tiny_model_dir, "-o", out, *FAST, "--preset", "slim-2to4", "--max-bits", "4.0"],
                     capsys)
    assert rc == 0, err
    manifest = json.loads((out / "slim_manifest.json").read_text())
    assert manifest["method"]["max_bits"] == 4.0
    assert manifest["summary"]["bits_per_param_with_adapters"] <= 4.0
    assert manifest["summary"]["rank_ratio"] < 0.23 and "to fit --max-bits 4" in err
    rc, _, err = run(["compress", tiny_model_dir, "-o", tmp_path / "free", *FAST, "--preset", "int4-dense",
                      "--max-bits", "none"], capsys)
    assert rc == 0, err
    free = json.loads((tmp_path / "free" / "slim_manifest.json").read_text())
    assert free["method"]["max_bits"] is None and free["summary"]["rank_ratio"] == 0.23


def test_int4_dense_on_a_toy_model_keeps_no_adapters_and_says_so(tiny_model_dir, tmp_path, capsys):
    # 64-wide layers: rank 1 over the dense INT4 base is already past 4.5 bits/param, so no adapters (and a line
    # saying so); the base alone over the budget stays an error (exit 2, nothing written).
    INT4 = ["--preset", "int4-dense"]
    rc, _, err = run(["compress", tiny_model_dir, "-o", tmp_path / "ckpt", *FAST, *INT4], capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / "ckpt" / "slim_manifest.json").read_text())["summary"]
    assert s["rank_ratio"] == 0 and s["bits_per_param_with_adapters"] == s["bits_per_param"] <= 4.5
    assert "no adapters: even rank 1 would take these layers past --max-bits 4.5" in err
    rc, _, err = run(["compress", tiny_model_dir, "-o", tmp_path / "over", *FAST, *INT4, "--max-bits", "4.0"], capsys)
    assert rc == 2 and "--max-bits 4 cannot be met" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "over").exists()
    # sensitivity ranks share out a budget of zero: nothing to allocate, the same no-adapter model
    rc, _, err = run(["compress", tiny_model_dir, "-o", tmp_path / "sens", *FAST, *INT4, "--rank-allocation",
                      "sensitivity"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "sens" / "slim_manifest.json").read_text())["summary"]["rank_ratio"] == 0
    # LRC without adapters would leave the activation error uncorrected: refused, one line
    rc, _, err = run(["compress", tiny_model_dir, "-o", tmp_path / "lrc", *FAST, "--act-bits", "8", "--max-bits", "5.5"],
                     capsys)
    assert rc == 2 and "no room for rank-1 LRC adapters" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("device,needle", [
    ("tpu", "bad --device 'tpu': choose auto, cpu, cuda or cuda:N"),
    pytest.param("cuda", "no usable CUDA GPU here", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                             reason="this machine has a GPU")),
    pytest.param("cuda:1", "use --device cpu", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                        reason="this machine has a GPU")),
])
def test_bad_device_exits_2_with_one_line_and_writes_nothing(device, needle, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(["compress", tiny_model_dir, "-o", out, *FAST, "--device", device], capsys)
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_the_summary_line_splits_the_time_and_the_manifest_keeps_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    rc, _, err = run(["compress", tiny_model_dir, "-o", out, *FAST, "--preset", "slim-2to4", "--device", "cpu", "-q"],
                     capsys)
    assert rc == 0, err
    assert " on cpu (" in err and "threads), peak host memory" in err
    split = next(line for line in err.splitlines() if line.startswith("time split: "))
    for name in ("calibration_forward", "hessian", "sweep", "adapter_svd", "adapter_rounding", "refit rounds"):
        assert name in split, split
    summary = json.loads((out / "slim_manifest.json").read_text())["summary"]
    assert summary["device"] == "cpu" and summary["peak_device_gb"] is None and summary["threads"] >= 1
    assert sum(summary["phases"].values()) == pytest.approx(summary["seconds"], abs=0.1)


def test_the_permutation_line_averages_each_layers_shares_over_blocks():
    from slim_trt.cli.compress import permutation_line

    shares = {"0.mlp.down_proj": 0.80, "0.mlp.down_proj:after": 0.83, "1.mlp.down_proj": 0.70,
              "1.mlp.down_proj:after": 0.75, "0.self_attn.o_proj": 0.9, "0.self_attn.o_proj:after": 0.92}
    assert permutation_line(shares) == "down_proj 0.750 -> 0.790, o_proj 0.900 -> 0.920"
