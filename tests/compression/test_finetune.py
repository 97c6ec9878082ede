"""Adapter fine-tuning on tiny models: what trains, what does not, the STE grid, resume, outputs, the CLI."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import slim_trt
from slim_trt.algorithms.lowrank import quantize_adapter
from slim_trt.checkpoint.compressed_linear import compressed_layers
from slim_trt.compression.compressor import compress
from slim_trt.errors import SlimError
from slim_trt.compression.finetune import FinetuneConfig, batch_indices, distill_loss, finetune, lr_at, save_finetuned
from tests.conftest import slim_2to4, calib_windows, tiny_model
from tests.conftest import run_cli as run

QUANT = slim_2to4(quantize_adapters=True, adapter_group_size=16)
FIXED = dict(lr=1e-2, schedule="constant", warmup_steps=0)


@pytest.fixture(scope="module")
def compressed():
    """A tiny llama with 2:4 INT4 base and 4-bit adapters (groups of 16), compressed once for the module."""
    model = tiny_model("llama")
    compress(model, QUANT, calib_windows(n=8, seqlen=32), progress=False)
    return model


@pytest.fixture(scope="module")
def compressed_float():
    """The same with float adapters (the SLiM paper's default)."""
    model = tiny_model("llama")
    compress(model, slim_2to4(), calib_windows(n=8, seqlen=32), progress=False)
    return model


def _frozen_state(model) -> dict[str, torch.Tensor]:
    """Everything fine-tuning must not touch: every parameter, the base integers, scales and masks."""
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    for name, layer in compressed_layers(model):
        out[f"{name}.q"] = layer.qweight.q.clone()
        out[f"{name}.scale"] = layer.qweight.scale.clone()
        out[f"{name}.mask"] = layer.mask.clone()
        out[f"{name}.weight"] = layer.weight.clone()
    return out


def _adapters(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{f}": getattr(m, f).clone() for n, m in compressed_layers(model) for f in ("lora_L", "lora_R")}


def test_only_adapters_change_and_4bit_adapters_end_on_their_grid(compressed):
    model = copy.deepcopy(compressed)
    before, adapters_before = _frozen_state(model), _adapters(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rep = finetune(model, calib_windows(n=4, seqlen=32, seed=3), FinetuneConfig(steps=5, batch_size=2, **FIXED),
                   progress=False)
    after = _frozen_state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any("lora" in n for n, _ in model.named_parameters())  # back to buffers
    changed = [k for k, v in _adapters(model).items() if not torch.equal(v, adapters_before[k])]
    assert len(changed) == 28  # 14 layers x (L, R)
    assert rep.steps == 5 and rep.adapted_layers == 14 and rep.trainable_params == sum(
        m.rank * (m.in_features + m.out_features) for _, m in compressed_layers(model))
    for name, layer in compressed_layers(model):
        for f in ("lora_L", "lora_R"):
            q = getattr(layer, f"{f}_q")
            assert q.bits == 4 and q.group_size == 16 and int(q.q.min()) >= -8 and int(q.q.max()) <= 7
            A = getattr(layer, f)
            assert torch.equal(A, q.dequantize())  # the float form is exactly the stored integers x scales
            assert torch.equal(quantize_adapter(A, 4, 16).q, q.q)  # and already on the AbsMax grid


def test_fake_quant_offset_is_computed_once_per_step_and_follows_every_update(compressed, monkeypatch):
    """The micro-batches of one step share the straight-through offset q(A) - A; an optimizer step (in place)
    or a reassigned master makes the next forward quantize again, and the forward equals the uncached one."""
    import slim_trt.checkpoint.compressed_linear as cl

    layer = copy.deepcopy(next(m for _, m in compressed_layers(compressed)))
    L, R = layer.train_adapters()
    calls = []
    real = cl.quantize_adapter
    monkeypatch.setattr(cl, "quantize_adapter", lambda A, *a: calls.append(1) or real(A, *a))
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))

    def uncached():
        Lq, Rq = (A + (real(A, 4, 16).dequantize() - A).detach() for A in (L, R))
        return torch.nn.functional.linear(layer.quantized_input(x), layer.weight) + x @ Rq.T @ Lq.T

    y1 = layer(x)
    y1.sum().backward()
    assert len(calls) == 2 and torch.equal(layer(x), y1) and len(calls) == 2  # the second forward reuses both
    assert L.grad is not None and torch.equal(y1, uncached())
    torch.optim.SGD([L, R], lr=0.5).step()  # in place: the masters' version moves
    y2 = layer(x)
    assert len(calls) == 4 and torch.equal(y2, uncached()) and not torch.equal(y2, y1)
    with torch.no_grad():
        L.data = L.data * 2  # a new tensor under the same Parameter (as a resumed state may load it)
    assert torch.equal(layer(x), uncached()) and len(calls) == 5  # L again, R still cached
    layer.freeze_adapters()
    assert layer._fake_quant_offsets == {}


@pytest.mark.parametrize("quantized", [False, True])
def test_training_loss_goes_down_on_a_fixed_batch(quantized, compressed, compressed_float):
    model = copy.deepcopy(compressed if quantized else compressed_float)
    rep = finetune(model, calib_windows(n=4, seqlen=24, seed=3),
                   FinetuneConfig(steps=25, batch_size=4, micro_batch_size=2, **FIXED), progress=False)
    assert len(rep.losses) == 25 and rep.stopped == "steps"
    # measured: 5.79 -> 1.38 (float adapters), 5.79 -> 1.66 (4-bit adapters through the STE)
    assert rep.final_loss < 0.4 * rep.initial_loss, rep.losses


def test_distill_loss_is_zero_against_itself_and_trains_toward_the_teacher():
    teacher = tiny_model("llama")
    ids = calib_windows(n=4, seqlen=24, seed=5)
    with torch.no_grad():
        assert float(distill_loss(teacher, teacher, ids)) == pytest.approx(0.0, abs=1e-3)
        model = copy.deepcopy(teacher)
        compress(model, slim_2to4(refit_mask="keep"), calib_windows(n=8, seqlen=32), progress=False)
        before = float(distill_loss(model, teacher, ids))
    assert before > 0.1
    rep = finetune(model, ids, FinetuneConfig(steps=20, batch_size=4, micro_batch_size=2, loss="kd", **FIXED),
                   progress=False, teacher=teacher)
    with torch.no_grad():
        after = float(distill_loss(model, teacher, ids))
    # the loss is per predicted token; GPTQ-rounded adapters (the default) start training re-gridded on the AbsMax
    # grid of the straight-through estimator, which moves the first loss a little (measured 0.0929 vs 0.0931)
    assert rep.losses[0] == pytest.approx(before / (4 * 23), rel=1e-2)
    assert after < 0.5 * before, (before, after)  # measured 0.236 -> 0.037 nats per token
    assert all(p.grad is None for p in teacher.parameters())  # the teacher only ran forward


def test_kd_without_a_teacher_is_refused(compressed_float):
    with pytest.raises(SlimError, match="--teacher"):
        finetune(copy.deepcopy(compressed_float), calib_windows(n=2, seqlen=16), FinetuneConfig(loss="kd"),
                 progress=False)


def test_interrupted_run_resumes_to_the_same_adapters(tmp_path):
    # OPT has dropout 0.1: the resumed run must also restore the RNG to draw the same dropout masks.
    model = tiny_model("opt")
    compress(model, slim_2to4(), calib_windows(n=8, seqlen=32), progress=False)
    windows = calib_windows(n=6, seqlen=24, seed=4)
    cfg = FinetuneConfig(steps=9, batch_size=2, save_every=3, lr=3e-3)

    a = copy.deepcopy(model)
    rep_a = finetune(a, windows, cfg, state_dir=tmp_path / "a", progress=False)

    b = copy.deepcopy(model)

    def crash(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(b, windows, cfg, state_dir=tmp_path / "b", progress=False, on_step=crash)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-0000003.json", "step-0000003.safetensors"]
    with pytest.raises(SlimError, match="different"):
        finetune(copy.deepcopy(model), windows, FinetuneConfig(steps=9, batch_size=2, save_every=3, lr=1e-3),
                 state_dir=tmp_path / "b", progress=False)
    # a damaged saved state is not resumed from (nor does it fail every re-run): dropped, and the run starts over
    import shutil

    shutil.copytree(tmp_path / "b", tmp_path / "c")
    damaged = tmp_path / "c" / "step-0000003.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1] + bytes([damaged.read_bytes()[-1] ^ 1]))
    with pytest.warns(UserWarning, match=f"{tmp_path / 'c'}: the saved fine-tuning state step-0000003 is corrupt"):
        rep_c = finetune(copy.deepcopy(model), windows, cfg, state_dir=tmp_path / "c", progress=False)
    assert rep_c.resumed_from == 0 and rep_c.losses == rep_a.losses
    b = copy.deepcopy(model)
    rep_b = finetune(b, windows, cfg, state_dir=tmp_path / "b", progress=False)
    assert rep_b.resumed_from == 3 and rep_b.steps == 9
    assert rep_b.losses == rep_a.losses
    ad_a, ad_b = _adapters(a), _adapters(b)
    assert all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)


def test_time_budget_stops_early_and_leaves_a_resumable_state(compressed_float, tmp_path):
    model = copy.deepcopy(compressed_float)
    rep = finetune(model, calib_windows(n=4, seqlen=16), FinetuneConfig(steps=10_000, minutes=0.01, batch_size=1),
                   state_dir=tmp_path / "s", progress=False)
    assert rep.stopped == "time" and 0 < rep.steps < 10_000 and len(rep.losses) == rep.steps
    assert (tmp_path / "s" / f"step-{rep.steps:07d}.json").exists()  # saved at the stop, between save points


def test_save_load_round_trip_gives_identical_logits(compressed, tmp_path):
    model = copy.deepcopy(compressed)
    rep = finetune(model, calib_windows(n=4, seqlen=32, seed=3), FinetuneConfig(steps=3, batch_size=2, **FIXED),
                   progress=False)
    out, plotted = save_finetuned(model, tmp_path / "ft", manifest_extra={"note": "test"}, report=rep)
    assert plotted and (out / "finetune_loss.png").stat().st_size > 1000
    loaded = slim_trt.load(out)
    x = calib_windows(n=2, seqlen=20, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    with pytest.raises(SlimError, match="--force"):
        save_finetuned(model, out, manifest_extra={}, report=rep)


def test_schedule_and_batch_order():
    cfg = FinetuneConfig(steps=10, lr=1e-3, warmup_steps=2)
    assert [lr_at(s, cfg) for s in (0, 1)] == [5e-4, 1e-3]
    assert lr_at(2, cfg) == pytest.approx(1e-3) and lr_at(6, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_at(9, FinetuneConfig(steps=10, lr=1e-3, schedule="constant")) == 1e-3
    # every window exactly once per epoch, the same order whenever a step is asked for
    idx = torch.cat([batch_indices(s, 3, 6, seed=1) for s in range(4)])
    assert sorted(idx[:6].tolist()) == list(range(6)) and sorted(idx[6:].tolist()) == list(range(6))
    assert torch.equal(batch_indices(3, 3, 6, seed=1), idx[9:])
    assert not torch.equal(batch_indices(0, 6, 6, seed=1), batch_indices(0, 6, 6, seed=2))


def test_a_schedule_the_time_budget_cut_is_named_with_the_steps_that_fit():
    """Bench row 92's case: 50 steps of cosine, 25 minutes, stopped at step 32 after 1537 s (48 s a step)."""
    from slim_trt.compression.finetune import schedule_hint

    cfg = FinetuneConfig(steps=50, minutes=25.0, lr=1e-4, loss="kd", batch_size=4)
    cut = {"steps": 32, "stopped": "time", "seconds": 1537.0}
    assert schedule_hint(cfg, cut) == ("the time budget stopped the cosine schedule at step 32 of 50, its learning "
                                       "rate still 35% of the peak: at 48 s a step, --steps 31 would end it within "
                                       "the 25 minutes")
    assert schedule_hint(cfg, {**cut, "stopped": "steps"}) is None  # ran to its end
    assert schedule_hint(FinetuneConfig(steps=50, minutes=25.0, schedule="constant"), cut) is None  # nothing to end


@pytest.mark.parametrize("kw", [dict(steps=0), dict(lr=0.0), dict(lr=float("nan")), dict(minutes=0.0),
                                dict(batch_size=0), dict(schedule="linear"), dict(save_every=0), dict(steps=2.5),
                                dict(loss="mse")])
def test_config_rejects(kw):
    with pytest.raises(SlimError):
        FinetuneConfig(**kw)


# ------------------------------------------------------------------------------------------- CLI
FAST = ["--nsamples", "4", "--seqlen", "16", "-q"]




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from slim_trt.compression.compressor import compress_model
    from slim_trt.config import CalibConfig
    from tests.conftest import save_tiny_model

    root = tmp_path_factory.mktemp("ft")
    src = save_tiny_model(root / "tiny-llama", "llama")
    out, _ = compress_model(str(src), root / "ckpt", slim_2to4(), CalibConfig(nsamples=4, seqlen=16),
                            progress=False)
    return out


def test_finetune_cli_writes_a_checkpoint_with_its_record(ckpt, tmp_path, capsys):
    out = tmp_path / "ft"
    rc, _, err = run(["finetune", ckpt, "-o", out, *FAST, "--steps", "4", "--batch-size", "2", "--eval-windows", "2",
                      "--json", tmp_path / "s.json"], capsys)
    assert rc == 0, err
    assert "wrote" in err and "held-out perplexity" in err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["steps"] == 4 and s["stopped"] == "steps" and s["eval_ppl_after"] > 1.0
    manifest = json.loads((out / "slim_manifest.json").read_text())
    ft = manifest["finetune"]
    assert ft["config"]["steps"] == 4 and len(ft["losses"]) == 4 and ft["source_checkpoint"] == str(ckpt)
    assert manifest["method"] == json.loads((ckpt / "slim_manifest.json").read_text())["method"]
    assert (out / "finetune_loss.png").exists() and not (tmp_path / "ft.partial").exists()
    a, b = slim_trt.load(ckpt), slim_trt.load(out)
    la, lb = dict(compressed_layers(a)), dict(compressed_layers(b))
    assert all(torch.equal(la[n].qweight.q, lb[n].qweight.q) for n in la)
    assert any(not torch.equal(la[n].lora_L, lb[n].lora_L) for n in la)
    rc, text, _ = run(["info", out], capsys)
    assert rc == 0 and "finetune     4 steps" in text


def test_finetune_cli_distils_from_the_source_model(ckpt, tmp_path, capsys):
    out = tmp_path / "ft"
    rc, _, err = run(["finetune", ckpt, "-o", out, *FAST, "--steps", "3", "--batch-size", "2", "--loss", "kd",
                      "--eval-windows", "0"], capsys)
    assert rc == 0, err
    ft = json.loads((out / "slim_manifest.json").read_text())["finetune"]
    source = json.loads((ckpt / "slim_manifest.json").read_text())["source_model"]
    assert ft["config"]["loss"] == "kd" and ft["teacher"] == source and len(ft["losses"]) == 3
    assert ft["losses"][0] > 0


def test_compress_with_finetune_kd(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    rc, _, err = run(["compress", tiny_model_dir, "-o", out, *FAST, "--preset", "slim-2to4", "--finetune-steps", "2",
                      "--finetune-loss", "kd"], capsys)
    assert rc == 0, err
    ft = json.loads((out / "slim_manifest.json").read_text())["finetune"]
    assert ft["config"]["loss"] == "kd" and ft["teacher"] == str(tiny_model_dir) and ft["steps"] == 2
    rc, _, err = run(["compress", tiny_model_dir, "-o", tmp_path / "x", *FAST, "--finetune-loss", "kd"], capsys)
    assert rc == 2 and "--finetune-steps" in err and not (tmp_path / "x").exists()


def test_compress_with_finetune_steps(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    rc, _, err = run(["compress", tiny_model_dir, "-o", out, *FAST, "--preset", "slim-2to4", "--finetune-steps", "2"],
                     capsys)
    assert rc == 0, err
    assert "fine-tuned the adapters: 2 steps" in err
    assert json.loads((out / "slim_manifest.json").read_text())["finetune"]["steps"] == 2
    assert (out / "finetune_loss.png").exists() and not (tmp_path / "ckpt.partial").exists()


@pytest.mark.parametrize("case,needle", [
    ("missing", "no such checkpoint"),
    ("no_adapters", "no low-rank adapters"),
    ("exists", "--force"),
    ("lr", "bad --lr"),
    ("steps", "bad --steps"),
    ("same", "is the input"),  # outputs.check_outputs (issue 25), before "already exists"
    ("state", "different"),
])
def test_bad_input_exits_2_with_one_line(case, needle, ckpt, tiny_model_dir, tmp_path, capsys):
    src, out, extra = ckpt, tmp_path / "out", []
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "no_adapters":
        src = tmp_path / "plain"
        assert run(["compress", tiny_model_dir, "-o", src, *FAST, "--lowrank", "none"], capsys)[0] == 0
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("someone's file")
    elif case == "lr":
        extra = ["--lr", "0"]
    elif case == "steps":
        extra = ["--steps", "0"]
    elif case == "same":
        out = ckpt
    elif case == "state":  # an interrupted run with another config lives in OUT.partial
        with pytest.raises(KeyboardInterrupt):
            model = slim_trt.load(ckpt)
            finetune(model, calib_windows(n=4, seqlen=16), FinetuneConfig(steps=4, batch_size=1, save_every=1),
                     state_dir=tmp_path / "out.partial", progress=False,
                     on_step=lambda s, _: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, err = run(["finetune", src, "-o", out, *FAST, "--steps", "2", *extra], capsys)
    assert rc == 2
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("slim-trt finetune: error: ") and needle in lines[0], err
    assert "Traceback" not in err
    if case not in ("exists", "same"):
        assert not out.exists()
