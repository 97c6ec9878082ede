"""MLP channel permutations folded into the weights (issue 23): an equivalent network whose down_proj groups
keep more saliency."""
import pytest
import torch

from slim_trt.algorithms.permute import nm_retained
from slim_trt.compression.calibration.families import block_linears, decoder_blocks
from slim_trt.compression.calibration.permutation import mlp_groups, permute_mlp
from tests.conftest import calib_windows, tiny_model


@pytest.mark.parametrize("family,reader", [("llama", "mlp.down_proj"), ("qwen2", "mlp.down_proj"),
                                           ("gemma3", "mlp.down_proj"), ("opt", "fc2")])
def test_permuted_mlp_computes_the_same_function(family, reader):
    model = tiny_model(family)
    windows = calib_windows(n=4, seqlen=16)
    with torch.no_grad():
        ref = model(windows).logits
    g = torch.Generator().manual_seed(3)
    for block in decoder_blocks(model):
        linears = block_linears(block)
        assert [r for _, r in mlp_groups(linears)] == [reader]
        W = linears[reader].weight.detach().clone()
        norm = torch.rand(W.shape[1], generator=g) ** 3
        shares = permute_mlp(linears, {reader: norm}, 2, 4)
        assert shares[reader + ":after"] > shares[reader]
        # the reported shares are the reader's before and after, and the columns moved as a permutation
        total = float((W.abs() * norm).sum())
        assert shares[reader] == pytest.approx(nm_retained(W.abs() * norm) / total, rel=1e-6)
        assert torch.equal(linears[reader].weight.sum(0).sort().values, W.sum(0).sort().values)
    with torch.no_grad():
        assert torch.allclose(model(windows).logits, ref, rtol=1e-4, atol=1e-4)


def test_a_skipped_mlp_layer_leaves_the_group_alone():
    block = decoder_blocks(tiny_model("llama"))[0]
    linears = {n: m for n, m in block_linears(block).items() if n != "mlp.up_proj"}
    assert mlp_groups(linears) == []
    assert permute_mlp(linears, {}, 2, 4) == {}
