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
