"""The CLI's help and the demo's messages print the defaults and presets from slim_trt.config (cli/recipes.py):
they show what CompressConfig, the presets, FinetuneConfig, CalibConfig and ExportOptions hold, and follow when
those change, so the prose cannot drift from what the commands run."""
import dataclasses
import subprocess
import sys

import pytest

from slim_trt.cli import main
from slim_trt.config import PRESETS, CalibConfig, CompressConfig, FinetuneConfig, describe, measured, recipe_label
from slim_trt.errors import SlimError
from slim_trt.exporter.options import ExportOptions


def help_of(args, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "2000")  # one line per paragraph and flag: strings are asserted whole
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_compress_help_shows_each_default_as_the_config_holds_it(capsys, monkeypatch):
    out = help_of(["compress"], capsys, monkeypatch)
    c = CompressConfig()
    # the defaults' values as CompressConfig() holds them, then the presets that differ
    assert c.sparsity == "2:4" and "[default: 2:4; none in --preset int4-dense]" in out
    assert c.bits == 8 and "[default: 8; 4 in --preset slim-paper, slim-2to4 and int4-dense]" in out
    assert c.rank_ratio == 0.23 and "[default: 0.23; 0.1 in --preset slim-paper]" in out
    assert c.max_bits is None and "[default: none; 4.5 in --preset slim-2to4 and int4-dense]" in out
    assert c.smooth_alpha == 0.5 and "[default: 0.5; none in --preset slim-paper, slim-2to4 and int4-dense]" in out
    assert c.adapter_quantizer == "gptq" and "[default: gptq; rtn in --preset slim-paper and int4-dense]" in out
    assert c.group_size == -1 and ("[default: -1 (INT8 GEMMs take no groups); 0 in --preset slim-paper; 128 in "
                                   "--preset slim-2to4 and int4-dense; 16 with --quantizer spqr]") in out
    assert "store the adapters in 4 bits (groups of 128)" in out and (c.adapter_bits, c.adapter_group_size) == (4, 128)
    for field in ("pruner", "lowrank", "refit_rounds", "refit_rounding", "refit_scales", "refit_mask",
                  "channel_permutation", "rank_allocation", "act_scale_method", "outlier_share"):
        assert f"[default: {getattr(c, field)}" in out, field
    # each preset named, described from its config and with what it measured
    assert ("The defaults are --preset trt-int8-sparse (W8A8 2:4): SparseGPT 2:4, INT8 SLiM-Quant weights (per output "
            "channel), static per-tensor INT8 activations (MSE scales) after SmoothQuant alpha 0.5, LRC adapters rank "
            "0.23 rounded to 4 bits by GPTQ, 3 refit rounds choosing the mask again, MLP channels permuted for the N:M "
            "groups, layers fitted toward the dense model's outputs (asymmetric calibration, step 0.25); 1.202x dense "
            "perplexity at 6.363 bits/param on Gemma 3 270M (bench row 86). Why: 2:4-sparse INT8 "
            "weights x INT8 activations") in out
    assert ("--preset int4-dense (W4A16 dense): dense, INT4 GPTQ weights (groups of 128), H-LoRA adapters rank 0.23 "
            "rounded to 4 bits by RTN, 3 refit rounds, within 4.5 bits/param; 1.144x dense perplexity at 4.498 "
            "bits/param on Gemma 3 270M (bench row 42).") in out
    for name, kw in PRESETS.items():
        preset = CompressConfig(**kw)
        assert f"--preset {name} ({recipe_label(preset)}): {describe(preset)}; {measured(name)}." in out, name
    assert "(W8A16 2:4: SparseGPT 2:4, INT8 SLiM-Quant weights (per output channel), H-LoRA adapters" in out  # --act-bits none
    # calibration and fine-tuning defaults from CalibConfig and FinetuneConfig
    calib, ft = CalibConfig(), FinetuneConfig()
    assert (calib.nsamples, calib.seqlen, calib.seed, calib.batch_size, ft.steps, ft.loss) == (128, 2048, 0, 8, 100, "ce")
    assert "calibration windows (default: 128)" in out and "tokens per calibration window (default: 2048)" in out
    assert "which calibration windows are drawn (default: 0)" in out and "windows per forward pass (default: 8)" in out
    assert "the schedule still spans --finetune-steps, default 100;" in out and "(distil the dense model) [default: ce]" in out


def test_other_commands_show_their_config_defaults(capsys, monkeypatch):
    ft = FinetuneConfig()
    out = help_of(["finetune"], capsys, monkeypatch)
    assert (ft.steps, ft.lr, ft.warmup_steps, ft.save_every, ft.max_grad_norm) == (100, 1e-4, 5, 10, 1.0)
    for text in ("optimizer steps (the schedule's length) (default: 100)", "peak learning rate (default: 0.0001)",
                 "steps of linear warmup to --lr (default: 5)", "steps between resumable states (default: 10)",
                 "gradient clipping (0 = off) (default: 1.0)", "after the warmup (default: cosine)",
                 "learns more per window (default: ce)"):
        assert text in out, text
    opts = ExportOptions()
    out = help_of(["export"], capsys, monkeypatch)
    assert (opts.dtype, opts.lowrank, opts.head, opts.zero_points) == ("fp16", "decomposed", "int8", "dq")
    assert "fp32 (CPU checks) (default: fp16)" in out and "for the fused TensorRT plugin (default: decomposed)" in out
    assert "which TensorRT parses [default: dq]" in out and "[default: only above ~1.5 GiB]" in out
    assert "Write OUT/model.onnx (opset 21;" in out
    out = help_of(["demo"], capsys, monkeypatch)
    assert f"The recipe is the compress defaults, --preset trt-int8-sparse (W8A8 2:4): {describe(CompressConfig())} " in out
    assert "lint target [default: trt10]" in out
    out = help_of(["info"], capsys, monkeypatch)
    assert "The default recipe is --preset trt-int8-sparse (W8A8 2:4): 2:4-sparse INT8 weights x INT8" in out
    out = help_of([], capsys, monkeypatch)
    assert "fit low-rank adapters: SLiM and beyond; by default --preset trt-int8-sparse, W8A8 2:4)" in out


def test_help_and_demo_follow_a_changed_preset(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # The defaults with another rank and SmoothQuant strength, and int4-dense with unstructured sparsity: the
    # help, what compress runs and what the demo says and runs all change with the table, nothing else edited.
    changed = {**PRESETS["trt-int8-sparse"], "rank_ratio": 0.3, "smooth_alpha": 0.6}
    monkeypatch.setitem(PRESETS, "trt-int8-sparse", changed)
    monkeypatch.setitem(PRESETS, "int4-dense", {**PRESETS["int4-dense"], "sparsity": "unstructured:0.5"})
    out = help_of(["compress"], capsys, monkeypatch)
    # trt-fp8-sparse is a table entry of its own (row 67's recipe in FP8, without the dense target): it keeps the values it was given
    assert "[default: 0.3; 0.1 in --preset slim-paper; 0.23 in --preset slim-2to4, trt-fp8-sparse and int4-dense]" in out
    assert "[default: 0.6; none in --preset slim-paper, slim-2to4 and int4-dense; 0.5 in --preset trt-fp8-sparse]" in out
    assert "[default: 2:4; unstructured:0.5 in --preset int4-dense]" in out
    assert "after SmoothQuant alpha 0.6, LRC adapters rank 0.3 rounded to 4 bits by GPTQ" in out
    assert "--preset int4-dense (W4A16 unstructured:0.5): SparseGPT unstructured:0.5, INT4 GPTQ weights" in out
    from slim_trt.cli import build_parser
    from slim_trt.cli.compress import config_from_args

    assert config_from_args(build_parser().parse_args(["compress", "M", "-o", "O"])) == CompressConfig(**changed)
    assert "LRC adapters rank 0.3" in help_of(["demo"], capsys, monkeypatch)

    ran = []

    def stop(source, out, config, calib, **kw):  # the demo's compression: record the recipe, then stop
        ran.append(config)
        raise SlimError("stopped by the test")

    import slim_trt.compression.compressor as compressor

    monkeypatch.setattr(compressor, "compress_model", stop)
    rc = main(["demo", "--model", str(tiny_model_dir), "--out", str(tmp_path / "demo"), "--nsamples", "4",
               "--seqlen", "32", "--eval-windows", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and ran == [CompressConfig(**changed)] and (ran[0].rank_ratio, ran[0].smooth_alpha) == (0.3, 0.6)
    assert ("[2/5] compressing with the defaults (--preset trt-int8-sparse, W8A8 2:4: SparseGPT 2:4, INT8 SLiM-Quant "
            "weights (per output channel), static per-tensor INT8 activations (MSE scales) after SmoothQuant alpha "
            "0.6, LRC adapters rank 0.3 rounded to 4 bits by GPTQ") in err


def test_a_changed_finetune_default_reaches_the_help(capsys, monkeypatch):
    import slim_trt.cli.finetune as finetune_cli

    monkeypatch.setattr(finetune_cli, "FinetuneConfig", lambda: dataclasses.replace(FinetuneConfig(), steps=250, lr=3e-4))
    out = help_of(["finetune"], capsys, monkeypatch)
    assert "optimizer steps (the schedule's length) (default: 250)" in out and "peak learning rate (default: 0.0003)" in out


def test_top_level_help_imports_no_torch():
    code = ("import sys\nfrom slim_trt.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
