import pytest

from slim_trt.config import DEFAULT_PRESET, PRESETS, CalibConfig, CompressConfig, Sparsity, describe, preset_name
from slim_trt.errors import SlimError


def test_sparsity_parse():
    assert Sparsity.parse("2:4") == Sparsity("nm", 2, 4, 0.5)
    assert Sparsity.parse("4:8").ratio == 0.5
    assert Sparsity.parse("unstructured:0.3").ratio == pytest.approx(0.3)
    assert Sparsity.parse("none").kind == "none"
    assert str(Sparsity.parse("2:4")) == "2:4"


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "x:4", "unstructured:1.5", "unstructured:0", "half", "unstructured:a"])
def test_sparsity_parse_rejects(bad):
    with pytest.raises(SlimError):
        Sparsity.parse(bad)


def test_defaults_are_the_w8a8_2to4_recipe_and_the_presets_are_named_rows():
    c = CompressConfig()  # issue 23: W8A8 2:4 (bench row 31), the recipe TensorRT's sparse INT8 tensor cores run
    assert c == CompressConfig(**PRESETS["trt-int8-sparse"]) and DEFAULT_PRESET == "trt-int8-sparse"
    assert (c.sparsity, c.bits, c.quantizer, c.pruner, c.lowrank, c.rank_ratio, c.quantize_adapters) == \
        ("2:4", 8, "slim", "sparsegpt", "lrc", 0.23, True)
    assert c.effective_group_size == -1 and (c.refit_rounds, c.rank_allocation, c.max_bits) == (3, "uniform", None)
    assert (c.act_bits, c.act_scale_method, c.smooth_alpha, c.adapter_quantizer) == (8, "mse", 0.5, "gptq")
    assert preset_name(c) == "trt-int8-sparse" and "SmoothQuant alpha 0.5" in describe(c)
    assert preset_name(CompressConfig(refit_rounds=1)) is None  # a changed knob is a custom recipe
    d = CompressConfig(**PRESETS["int4-dense"])  # row 42: the defaults of issues 14-22
    assert (d.sparsity, d.bits, d.quantizer, d.lowrank, d.rank_ratio, d.adapter_quantizer, d.max_bits) == \
        ("none", 4, "gptq", "hessian", 0.23, "rtn", 4.5)
    assert d.effective_group_size == 128 and d.act_bits is None and not d.zero_points  # TensorRT's symmetric INT4
    assert CompressConfig(lowrank="none").refit_rounds == 0  # nothing to alternate with
    s = CompressConfig(**PRESETS["slim-2to4"])  # row 24: the defaults until issue 14
    assert (s.sparsity, s.quantizer, s.pruner, s.adapter_quantizer, s.effective_group_size) == \
        ("2:4", "slim", "sparsegpt", "gptq", 128)
    p = CompressConfig(**PRESETS["slim-paper"])
    assert (p.sparsity, p.bits, p.quantizer, p.pruner, p.lowrank, p.rank_ratio, p.quantize_adapters) == \
        ("2:4", 4, "slim", "wanda", "slim", 0.1, False)
    assert p.effective_group_size == 0 and CompressConfig(quantizer="slim", group_size=None).effective_group_size == 0
    # a weight flag INT8 activations cannot take names the presets that take it
    with pytest.raises(SlimError, match="--act-bits 8 needs --bits 8.*--preset slim-2to4 or int4-dense"):
        CompressConfig(bits=4)
    # every knob is in each preset, so it keeps its meaning whatever the defaults become
    for preset in PRESETS.values():
        assert set(preset) == {f for f in CompressConfig.__dataclass_fields__ if f != "skip_layers"}


WEIGHT_ONLY = dict(act_bits=None, smooth_alpha=None, lowrank="hessian")


@pytest.mark.parametrize("kw", [dict(rank_ratio=0.0), dict(rank_ratio=1.0), dict(rank_ratio=-0.1), dict(bits=5),
                                dict(bits=3, quantizer="slim", pruner="wanda", **WEIGHT_ONLY),
                                dict(bit_allocation="slim-llm", bits=8, **WEIGHT_ONLY),
                                dict(quantizer="awq"), dict(pruner="random"), dict(lowrank="qr"),
                                dict(group_size=-2), dict(rank_multiple=0), dict(sparsity="3:2")])
def test_config_rejects(kw):
    with pytest.raises(SlimError):
        CompressConfig(**kw)


def test_config_round_trip_and_fingerprint():
    c = CompressConfig(sparsity="unstructured:0.5", skip_layers=("*.down_proj",))
    d = c.to_dict()
    assert CompressConfig.from_dict(d) == c
    assert c.fingerprint() != CompressConfig().fingerprint()


def test_calib_config_rejects():
    for kw in (dict(nsamples=0), dict(seqlen=2), dict(batch_size=0)):
        with pytest.raises(SlimError):
            CalibConfig(**kw)


@pytest.mark.parametrize("kw,needle", [(dict(refit_rounding="sometimes"), "bad --refit-rounding 'sometimes'"),
                                       (dict(refit_scales="last"), "bad --refit-scales 'last'")])
def test_bad_refit_modes_are_refused_with_the_choices(kw, needle):
    with pytest.raises(SlimError) as e:
        CompressConfig(**kw)
    assert needle in str(e.value) and "choose one of" in str(e.value)


def test_the_presets_keep_the_refit_rounds_they_were_measured_with():
    for name in ("slim-2to4", "slim-paper", "trt-int8-sparse", "int4-dense"):
        cfg = CompressConfig(**PRESETS[name])
        assert (cfg.refit_rounding, cfg.refit_scales) == ("every", "every")
    # the defaults too: row 31's rounds (row 56's cheaper ones measured 1.341x against 1.320x on row 24)
    assert (CompressConfig().refit_rounding, CompressConfig().refit_scales) == ("every", "every")


def test_preset_results_are_the_bench_rows_and_labels_come_from_the_config():
    import json
    from pathlib import Path

    from slim_trt.config import PRESET_RESULTS, measured, recipe_label

    rows = {r["number"]: r for r in json.loads((Path(__file__).parents[1] / "bench" / "results" /
                                                "accuracy_gemma3-270m.json").read_text())["rows"].values()}
    assert set(PRESET_RESULTS) == set(PRESETS)
    for name, (row, ratio, bits) in PRESET_RESULTS.items():  # what `compress --help` quotes is what the bench wrote
        assert (round(rows[row]["ratio_to_dense"], 3), round(rows[row]["bits_per_param_with_adapters"], 3)) == \
            (ratio, bits), name
    # and the row measured the preset's recipe: every field the row stored has the preset's value (rows store the
    # fields that existed when they ran; row 7 predates the group-size convention, so slim-paper is left out)
    for name, (row, _, _) in PRESET_RESULTS.items():
        want, got = CompressConfig(**PRESETS[name]).to_dict(), rows[row]["config"]
        if name != "slim-paper":
            assert {k: v for k, v in got.items() if k in want} == \
                {k: list(v) if isinstance(v, tuple) else v for k, v in want.items() if k in got}, name
    assert measured("slim-2to4") == "1.165x dense perplexity at 4.468 bits/param on Gemma 3 270M (bench row 94)"
    assert measured("trt-int8-sparse") == "1.202x dense perplexity at 6.363 bits/param on Gemma 3 270M (bench row 86)"
    assert measured("trt-fp8-sparse") == "1.198x dense perplexity at 6.363 bits/param on Gemma 3 270M (bench row 68)"
    assert [recipe_label(CompressConfig(**PRESETS[n])) for n in ("trt-int8-sparse", "slim-2to4", "int4-dense")] == \
        ["W8A8 2:4", "W4A16 2:4", "W4A16 dense"]
    assert recipe_label(CompressConfig(**PRESETS["trt-fp8-sparse"])) == "FP8 2:4"
    assert recipe_label(CompressConfig(**{**PRESETS["int4-dense"], "sparsity": "unstructured:0.5"})) == \
        "W4A16 unstructured:0.5"


def test_fp8_preset_is_the_int8_recipe_in_fp8():
    """trt-fp8-sparse (issue 24) = trt-int8-sparse with FP8 E4M3 weights and activations, nothing else changed but
    the dense target the INT8 defaults took after FP8 was measured (row 68 ran without it)."""
    fp8, int8 = PRESETS["trt-fp8-sparse"], PRESETS["trt-int8-sparse"]
    assert {k for k in fp8 if fp8[k] != int8[k]} == {"weight_format", "act_format", "dense_target"}
    c = CompressConfig(**fp8)
    assert (c.weight_format, c.act_format, c.scale_method) == ("fp8", "fp8", "fp8")
    assert preset_name(c) == "trt-fp8-sparse" and CompressConfig().scale_method == "slim"
    assert "FP8 E4M3 weights (absmax/448 per output channel)" in describe(c)
    assert "static per-tensor FP8 E4M3 activations" in describe(c)
    assert CompressConfig.from_dict(c.to_dict()) == c
    # a config stored before issue 24 (no format fields) reads back as INT8
    old = {k: v for k, v in CompressConfig().to_dict().items() if k not in ("weight_format", "act_format")}
    assert CompressConfig.from_dict(old) == CompressConfig()


@pytest.mark.parametrize("kw,needle", [
    (dict(weight_format="fp8"), "FP8 needs FP8 weights and FP8 activations together"),
    (dict(act_format="fp8"), "FP8 needs FP8 weights and FP8 activations together"),
    (dict(weight_format="fp8", act_format="fp8", group_size=128), "one weight scale per output channel"),
    (dict(weight_format="fp8", act_format="fp8", pruner="wanda", refit_mask="keep"), "--pruner sparsegpt"),
    (dict(weight_format="fp4"), "bad --weight-format 'fp4': choose one of int, fp8"),
])
def test_fp8_combinations_are_refused_with_the_fix(kw, needle):
    with pytest.raises(SlimError, match=needle.replace("(", r"\(").replace("'", "'")):
        CompressConfig(**kw)


@pytest.mark.parametrize("value,parts,spelled", [
    ("none", (), "none"), ("mlp", ("mlp",), "mlp"), ("mlp,attn", ("mlp", "attn"), "mlp,attn"),
    ("attn, mlp", ("mlp", "attn"), "mlp,attn"), ("attn", ("attn",), "attn"),
])
def test_channel_permutation_is_none_or_a_list_of_parts(value, parts, spelled):
    c = CompressConfig(channel_permutation=value)
    assert (c.permutation_parts, c.channel_permutation) == (parts, spelled)
    assert c.permutes_channels == bool(parts)
    assert CompressConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("value", ["", "mlp,", "mlp,mlp", "heads", "none,mlp", "MLP", None, 1])
def test_bad_channel_permutation_is_refused_in_one_line(value):
    with pytest.raises(SlimError) as e:
        CompressConfig(channel_permutation=value)
    assert str(e.value).startswith("bad --channel-permutation") and "\n" not in str(e.value)
    assert "comma list of distinct parts from mlp, attn, residual (e.g. mlp,attn)" in str(e.value)


def test_describe_names_the_permuted_parts():
    assert "MLP channels permuted for the N:M groups" in describe(CompressConfig())
    assert "MLP and attention value channels permuted for the N:M groups" in \
        describe(CompressConfig(channel_permutation="attn,mlp"))
    assert "MLP, attention value and residual-stream channels permuted for the N:M groups" in \
        describe(CompressConfig(channel_permutation="residual,attn,mlp"))


def test_dense_target_is_off_by_default_named_when_on_and_old_configs_read_back_without_it():
    """Asymmetric calibration (dense_target) at GPTAQ's step 0.25, GPTQ's ridge in the source model's frame, won on
    the W8A8 defaults (bench row 86) and on slim-2to4 (row 79): on there; FP8 keeps row 68's recipe (not measured
    with it). A config stored before the field reads back with it off; the recipe line names it when on."""
    c = CompressConfig()
    assert (c.dense_target, c.dense_target_damp, c.dense_target_frame) == (0.25, 0.01, "source")
    assert {n: CompressConfig(**kw).dense_target for n, kw in PRESETS.items() if CompressConfig(**kw).dense_target} \
        == {"slim-2to4": 0.25, "trt-int8-sparse": 0.25}
    old = {k: v for k, v in CompressConfig().to_dict().items()
           if k not in ("dense_target", "dense_target_damp", "dense_target_frame")}
    assert CompressConfig.from_dict(old) == CompressConfig(dense_target=0.0)
    assert "asymmetric" not in describe(CompressConfig(dense_target=0.0))
    # the frames differ only through SmoothQuant's divisors: without it (or without a dense target) one spelling
    assert CompressConfig(dense_target_frame="layer", smooth_alpha=None, act_bits=None, lowrank="hessian") == \
        CompressConfig(smooth_alpha=None, act_bits=None, lowrank="hessian")
    assert CompressConfig(dense_target_frame="layer") != CompressConfig()
    assert "dense model's outputs (asymmetric calibration, step 0.25)" in describe(CompressConfig(dense_target=0.25))
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(SlimError, match="bad --dense-target"):
            CompressConfig(dense_target=bad)
    for bad in (0.0, -1.0, False, "lots"):
        with pytest.raises(SlimError, match="bad dense_target_damp"):
            CompressConfig(dense_target_damp=bad)
