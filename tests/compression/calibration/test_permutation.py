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
        shares, perms = permute_mlp(linears, {reader: norm}, 2, 4)
        assert shares[reader + ":after"] > shares[reader]
        assert list(perms) == [reader] and torch.equal(linears[reader].weight, W[:, perms[reader]])
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
    assert permute_mlp(linears, {}, 2, 4) == ({}, {})


@pytest.mark.parametrize("family,reader", [("llama", "self_attn.o_proj"), ("qwen2", "self_attn.o_proj"),
                                           ("mistral", "self_attn.o_proj"),
                                           ("gemma3", "self_attn.o_proj"), ("opt", "self_attn.out_proj")])
def test_permuted_value_channels_compute_the_same_function(family, reader):
    """attn: value rows (and bias) within each KV head with o_proj's columns of the heads reading it (GQA on
    LLaMA/Qwen2/Mistral: 2 query heads per KV head; MQA on Gemma 3, head_dim 16 not hidden/heads; OPT: out_proj)."""
    from slim_trt.compression.calibration.permutation import attn_groups, permute_attn

    model = tiny_model(family)
    with torch.no_grad():  # random value biases (Qwen2's and OPT's start at zero): the bias must move with its row
        for block in decoder_blocks(model):
            v = block.self_attn.v_proj
            if v.bias is not None:
                v.bias.copy_(torch.randn(v.bias.shape, generator=torch.Generator().manual_seed(5)))
    windows = calib_windows(n=4, seqlen=16)
    with torch.no_grad():
        ref = model(windows).logits
    g = torch.Generator().manual_seed(3)
    for block in decoder_blocks(model):
        linears = block_linears(block)
        assert [o for _, o in attn_groups(block, linears)] == [reader]
        W, V = linears[reader].weight.detach().clone(), linears["self_attn.v_proj"].weight.detach().clone()
        norm = torch.rand(W.shape[1], generator=g) ** 3
        shares, perms = permute_attn(block, model.config, linears, {reader: norm}, 2, 4)
        assert sorted(shares) == [reader, reader + ":after"]
        assert list(perms) == [reader] and torch.equal(linears[reader].weight, W[:, perms[reader]])
        assert shares[reader + ":after"] > shares[reader]
        total = float((W.abs() * norm).sum())
        assert shares[reader] == pytest.approx(nm_retained(W.abs() * norm) / total, rel=1e-6)
        assert not torch.equal(linears[reader].weight, W)
        assert torch.equal(linears["self_attn.v_proj"].weight.sum(1).sort().values, V.sum(1).sort().values)
    with torch.no_grad():
        assert torch.allclose(model(windows).logits, ref, rtol=1e-4, atol=1e-4)


def test_attention_without_a_readable_head_layout_is_left_alone():
    from slim_trt.compression.calibration.permutation import permute_attn

    model = tiny_model("llama")
    block = decoder_blocks(model)[0]
    linears = block_linears(block)
    before = linears["self_attn.o_proj"].weight.clone()
    norms = {n: torch.ones(m.in_features) for n, m in linears.items()}
    wrong = type(model.config)(**{**model.config.to_dict(), "num_key_value_heads": 4})  # v_proj is 2 heads wide
    assert permute_attn(block, wrong, linears, norms, 2, 4) == ({}, {})
    assert permute_attn(block, object(), linears, norms, 2, 4) == ({}, {})  # no config at all
    assert permute_attn(block, model.config, linears, norms, 2, 32) == ({}, {})  # head_dim 16: no whole 2:32 groups
    assert torch.equal(linears["self_attn.o_proj"].weight, before)
