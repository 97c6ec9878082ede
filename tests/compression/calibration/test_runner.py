from types import SimpleNamespace

import pytest
import torch

from slim_trt.compression.calibration.families import decoder_blocks
from slim_trt.compression.calibration.runner import LinearStats, run_layerwise
from tests.conftest import calib_windows, tiny_model


def test_identity_pass_reproduces_the_dense_model(family):
    """With a callback that changes nothing, every block sees exactly the dense activations."""
    model = tiny_model(family)
    windows = calib_windows(n=5, seqlen=24)
    ref = model(windows).logits
    seen = []

    def keep(i, block, linears, stats):
        seen.append((i, sorted(linears), {n: s.ntokens for n, s in stats.items()}))
        return {}

    results = run_layerwise(model, windows, keep, batch_size=2)  # batches of 2, 2, 1: two batch shapes
    assert [r.index for r in results] == [0, 1]
    assert all(r.output_rel_error == 0.0 for r in results)
    assert all(all(n == 5 * 24 for n in counts.values()) for _, _, counts in seen)
    assert torch.equal(model(windows).logits, ref)


def test_stats_match_the_layer_inputs():
    model = tiny_model("llama")
    windows = calib_windows(n=4, seqlen=16)
    captured = []
    blk = decoder_blocks(model)[1]
    h = blk.mlp.down_proj.register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    model(windows)
    h.remove()
    x = torch.cat(captured)
    got = {}

    def grab(i, block, linears, stats):
        if i == 1:
            got.update(stats)
        return {}

    run_layerwise(model, windows, grab, batch_size=4)
    s: LinearStats = got["mlp.down_proj"]
    assert s.ntokens == x.shape[0]
    torch.testing.assert_close(s.act_norm, x.norm(dim=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.saliency, s.act_norm)
    # H = 2/n sum x x^T with n counted in rows of the batches the hook saw
    H = s.hessian
    assert torch.allclose(H, H.T, atol=1e-5)
    direction = (x.T @ x) / (x.T @ x).norm()
    torch.testing.assert_close(H / H.norm(), direction, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_permuted_and_smoothed_statistics_match_a_new_pass(family):
    """The runner follows the MLP/value permutations and SmoothQuant's division without a new pass for the second
    moments (only the |x| histograms are gathered again): what compress_block receives is what a fresh pass over
    the changed block gathers, and layers reading one input share one H and one set of error moments."""
    from types import SimpleNamespace

    from slim_trt.compression.compressor import act_calibration, channel_transform
    from slim_trt.config import CompressConfig

    config = CompressConfig(channel_permutation="mlp,attn")
    model = tiny_model(family)
    windows = calib_windows(n=4, seqlen=16)
    block_inputs: dict[int, list] = {}  # every call of each block: the last two are the runner's last pass
    for i, blk in enumerate(decoder_blocks(model)):
        blk.register_forward_pre_hook(lambda _m, a, kw, i=i: block_inputs.setdefault(i, []).append((a, kw)),
                                      with_kwargs=True)
    act = act_calibration(config, model)
    report = SimpleNamespace(permutation={})
    checked = []

    def check(i, block, linears, stats):
        batches = block_inputs[i][-2:]  # the very inputs the runner's passes read (2 batches of 2 windows)
        fresh = {n: LinearStats(collect_act=True) for n in linears}
        hooks = [linears[n].register_forward_hook(lambda _m, a, _o, st=st: st.add(a[0])) for n, st in fresh.items()]
        for a, kw in batches:
            block(*a, **kw)
        for h in hooks:
            h.remove()
        for n, st in fresh.items():
            st.act_scale, st.act_bits, st.act_format = act.scale(st), act.bits, act.fmt
        hooks = [linears[n].register_forward_hook(lambda _m, a, _o, st=st: st.add_quantized(a[0]))
                 for n, st in fresh.items()]
        for a, kw in batches:
            block(*a, **kw)
        for h in hooks:
            h.remove()
        for n, st in stats.items():
            ref = fresh[n]
            torch.testing.assert_close(st.hessian, ref.hessian, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(st.sq_sum, ref.sq_sum, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(st.channel_absmax, ref.channel_absmax, rtol=1e-5, atol=1e-7)
            # measured on the same inputs by the same operations: the same histogram and scale
            assert torch.equal(st.abs_hist.counts, ref.abs_hist.counts) and st.act_scale == ref.act_scale, n
            for name in ("H_xe", "H_ee", "H_qq"):
                torch.testing.assert_close(getattr(st.act_moments, name), getattr(ref.act_moments, name),
                                           rtol=1e-4, atol=1e-6)
        assert stats["self_attn.k_proj"].act_moments is stats["self_attn.q_proj"].act_moments
        assert stats["mlp.up_proj"].hessian is stats["mlp.gate_proj"].hessian
        checked.append(i)
        return {}

    with torch.no_grad():
        run_layerwise(model, windows, check, batch_size=2, act=act,
                      transform=channel_transform(config, report, model.config))
    assert checked == [0, 1]
    assert {k.split(".", 1)[1] for k in report.permutation} >= {"mlp.down_proj", "self_attn.o_proj"}


def test_only_the_dense_pass_computes_the_input_products(monkeypatch):
    """X^T X costs as much as a layer's forward: the dense pass computes it once per distinct input and batch
    (q/k/v share theirs, gate/up theirs), the histogram and error-moment passes never."""
    from slim_trt.compression.calibration import runner
    from slim_trt.compression.compressor import act_calibration
    from slim_trt.config import CompressConfig

    names = []
    once = runner.InputProducts.once
    def counted(self, name, compute, *state):
        return once(self, name, lambda: names.append(name) or compute(), *state)

    monkeypatch.setattr(runner.InputProducts, "once", counted)
    model = tiny_model("llama")
    with torch.no_grad():
        run_layerwise(model, calib_windows(n=4, seqlen=16), lambda *a: {}, batch_size=2,
                      act=act_calibration(CompressConfig(), model))
    # 2 blocks x 2 batches x 4 distinct inputs (q/k/v, o, gate/up, down), in each of the three passes
    assert names.count("products") == 16
    # the histograms once, after SmoothQuant (the first pass only takes the max |x| it needs)
    assert sum(n == "hist" for n in names) == 16 and sum(n.startswith("moments") for n in names) == 16


def _perturb(block, seed: int = 0) -> None:
    """A stand-in for compression: every linear's weight changed by a fixed random factor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, lin in sorted((n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)):
            lin.weight.mul_(1 + 0.3 * torch.randn(lin.weight.shape, generator=g))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_asymmetric_drift_is_measured_against_the_dense_model(family):
    """With asymmetric, block 1's linears get D = 2/n sum (x_ref - x) x^T with x_ref their input in the untouched
    dense model and x their input behind the compressed block 0, in the coordinates of the block as it is after
    the MLP/value permutations and SmoothQuant (drift permuted and rescaled with H, no new pass)."""
    import copy
    from types import SimpleNamespace

    from slim_trt.compression.compressor import act_calibration, channel_transform
    from slim_trt.config import CompressConfig

    config = CompressConfig(channel_permutation="mlp,attn", dense_target=1.0)
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    windows = calib_windows(n=4, seqlen=16)
    dense_in, seen_in = [], []
    decoder_blocks(dense)[1].register_forward_pre_hook(lambda _m, a, kw: dense_in.append((a, kw)),
                                                       with_kwargs=True)
    with torch.no_grad():
        for batch in windows.split(2):
            dense(batch, use_cache=False)  # no cache object in the recorded kwargs
    decoder_blocks(model)[1].register_forward_pre_hook(lambda _m, a, kw: seen_in.append((a, kw)), with_kwargs=True)
    checked = []

    def compress_block(i, block, linears, stats):
        if i == 0:
            assert all(st.drift is None for st in stats.values())  # both streams enter block 0 equal
            _perturb(block)
            return {}
        fresh = {n: LinearStats() for n in linears}
        refs = {}
        # The compressed stream's inputs of block 1 (block 0 was perturbed): the calls whose input is not the dense
        # model's (the first call records the block's arguments), one per batch.
        ours = {}
        for a, kw in seen_in[1:]:
            if not any(torch.allclose(a[0], d[0][0], rtol=1e-3, atol=1e-4) for d in dense_in):
                ours.setdefault(id(a[0]), (a, kw))
        assert len(ours) == 2
        for (a_ref, kw_ref), (a, kw) in zip(dense_in, ours.values()):
            keep = [linears[n].register_forward_hook(lambda _m, x, _o, n=n: refs.__setitem__(n, x[0]))
                    for n in linears]
            block(*a_ref, **kw_ref)
            for h in keep:
                h.remove()
            add = [linears[n].register_forward_hook(lambda _m, x, _o, n=n: fresh[n].add(x[0], ref=refs[n]))
                   for n in linears]
            block(*a, **kw)
            for h in add:
                h.remove()
        for n, st in stats.items():
            assert st.drift is not None and float(st.drift.abs().max()) > 0, n
            torch.testing.assert_close(st.drift, fresh[n].drift, rtol=1e-4, atol=1e-5)
        assert stats["self_attn.k_proj"].drift is stats["self_attn.q_proj"].drift  # one input, one drift
        # SmoothQuant's divisors are kept for the source-frame ridge (algorithms.asymmetric.source_ridge)
        assert stats["self_attn.q_proj"].smoothing is not None and stats["self_attn.q_proj"].smoothing.shape == \
            stats["self_attn.q_proj"].sq_sum.shape
        checked.append(i)
        return {}

    with torch.no_grad():
        results = run_layerwise(model, windows, compress_block, batch_size=2, act=act_calibration(config, model),
                                transform=channel_transform(config, SimpleNamespace(permutation={}), model.config),
                                asymmetric=True)
    assert checked == [1]
    assert all(r.drift_rel_error is not None and r.drift_rel_error > 0 for r in results)


def test_asymmetric_resume_keeps_the_dense_stream():
    """A restored block still passes the dense model's hidden states on (it runs dense before it is restored):
    block 1's drift is the same whether block 0 was compressed in this run or restored."""
    drifts = []

    def run(restore: bool):
        model = tiny_model("llama")
        got = {}

        def compress_block(i, block, linears, stats):
            if i == 0:
                _perturb(block)
            else:
                got.update({n: st.drift for n, st in stats.items()})
            return {}

        def restore_block(i, block):
            if restore and i == 0:
                _perturb(block)
                return True
            return False

        with torch.no_grad():
            run_layerwise(model, calib_windows(n=4, seqlen=16), compress_block, batch_size=2, asymmetric=True,
                          restore_block=restore_block, restorable=lambda i: restore and i == 0)
        drifts.append(got)

    run(False)
    run(True)
    assert drifts[0].keys() == drifts[1].keys() and drifts[0]
    for n in drifts[0]:
        torch.testing.assert_close(drifts[1][n], drifts[0][n], rtol=1e-5, atol=1e-6)


def test_a_restore_the_runner_was_not_told_of_is_refused():
    """restorable(i) must announce a restore: the dense stream cannot be recovered after it."""
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="restorable"), torch.no_grad():
        run_layerwise(model, calib_windows(n=2, seqlen=8), lambda *a: {}, asymmetric=True,
                      restore_block=lambda i, block: True)


@pytest.mark.parametrize("smooth_alpha", [None, 0.5])
def test_kept_inputs_spare_a_pass_and_give_the_statistics_bit_for_bit(monkeypatch, smooth_alpha):
    """A W8A8 block's error moments come from kept inputs (runner.KeptInputs: the histogram pass's with SmoothQuant,
    the first pass's without): the block runs once less per batch, and every statistic is bit for bit what the
    pass it spares gives. Where the inputs would not fit the device (resources.fits), or keep_inputs is False, or
    (without SmoothQuant) a channel permutation changed the block after the first pass, the runner runs it."""
    import slim_trt.compression.calibration.runner as runner_mod
    from slim_trt.compression.compressor import act_calibration, channel_transform
    from slim_trt.config import CompressConfig

    config = CompressConfig(smooth_alpha=smooth_alpha, dense_target=0.25,
                            channel_permutation="none" if smooth_alpha is None else "mlp,attn")

    def run(keep: bool, room: bool = True):
        monkeypatch.setattr(runner_mod, "fits", lambda need, device: room)
        model = tiny_model("llama")
        calls = [0]
        decoder_blocks(model)[1].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        got = {}

        def grab(i, block, linears, stats):
            got[i] = stats
            return {}

        with torch.no_grad():
            run_layerwise(model, calib_windows(n=4, seqlen=16), grab, batch_size=2,
                          act=act_calibration(config, model), asymmetric=True, keep_inputs=keep,
                          transform=channel_transform(config, SimpleNamespace(permutation={}), model.config))
        return got, calls[0]

    kept, kept_calls = run(True)
    rerun, rerun_calls = run(False)
    no_room, no_room_calls = run(True, room=False)
    assert rerun_calls - kept_calls == 2 and no_room_calls == rerun_calls  # one pass of 2 batches spared
    if smooth_alpha is None:  # a permutation after the first pass: no inputs kept
        config = CompressConfig(smooth_alpha=None, dense_target=0.25, channel_permutation="mlp,attn")
        assert run(True)[1] == run(False)[1]
    for other in (rerun, no_room):
        for i, stats in other.items():
            for n, ref in stats.items():
                st = kept[i][n]
                assert torch.equal(st.abs_hist.counts, ref.abs_hist.counts) and st.act_scale == ref.act_scale
                for name in ("H_xe", "H_ee", "H_qq"):
                    assert torch.equal(getattr(st.act_moments, name), getattr(ref.act_moments, name)), (i, n, name)
                assert torch.equal(st.hessian, ref.hessian)
                assert (st.drift is None) == (i == 0) and (i == 0 or torch.equal(st.drift, ref.drift))
