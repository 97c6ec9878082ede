"""The bits budget: ranks planned from layer shapes (algorithms.pipeline.plan_ranks / layer_bits)."""
from __future__ import annotations

import pytest
import torch

from slim_trt.algorithms.pipeline import bits_per_param, compress_weight, layer_bits, plan_ranks, storage_bits
from slim_trt.config import PRESETS, CompressConfig
from slim_trt.errors import SlimError


def model_shapes(blocks: int, hidden: int, inter: int, q: int, kv: int) -> dict[str, tuple[int, int]]:
    """{name: (N, K)} of a LLaMA-style decoder's block linears."""
    one = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
           "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return {f"layers.{i}.{n}": s for i in range(blocks) for n, s in one.items()}


GEMMA3_270M = model_shapes(18, 640, 2048, 1024, 256)
SMOLLM_135M = model_shapes(30, 576, 1536, 576, 192)   # the LLaMA-family shape of issue 11 (576-wide layers)
LLAMA2_7B = model_shapes(32, 4096, 11008, 4096, 4096)
QWEN25_05B = model_shapes(24, 896, 4864, 896, 128)


SLIM_2TO4 = CompressConfig(**PRESETS["slim-2to4"])


def int4_dense(**changes) -> CompressConfig:
    """--preset int4-dense (bench row 42, the defaults of issues 14-22) with some knobs changed."""
    return CompressConfig(**{**PRESETS["int4-dense"], **changes})


def test_budget_does_not_bind_on_gemma_2to4_so_the_benchmarked_ranks_stay():
    ranks, ratio = plan_ranks(GEMMA3_270M, SLIM_2TO4)
    assert ratio == 0.23
    assert sorted(set(ranks.values())) == [59, 148]  # the ranks of bench rows 24 and 25
    assert bits_per_param(GEMMA3_270M, ranks, SLIM_2TO4) == pytest.approx(4.4681, abs=1e-4)
    assert ranks == plan_ranks(GEMMA3_270M, CompressConfig(**{**PRESETS["slim-2to4"], "max_bits": None}))[0]


def test_int4_dense_lowers_the_rank_to_the_budget_on_gemma():
    # Bench row 42 (--preset int4-dense): a dense INT4 base leaves 0.375 bits/param for the adapters, rank 40 of 640.
    ranks, ratio = plan_ranks(GEMMA3_270M, int4_dense())
    assert ratio < 0.23 and sorted(set(ranks.values())) == [16, 40]
    assert bits_per_param(GEMMA3_270M, ranks, int4_dense()) == pytest.approx(4.4976, abs=1e-4)


def test_the_w8a8_defaults_have_no_budget_so_the_benchmarked_ranks_stay():
    # Bench row 31 (the defaults): INT8 2:4 stores 5.020 bits/param before adapters; rank 0.23 as measured.
    ranks, ratio = plan_ranks(GEMMA3_270M, CompressConfig())
    assert ratio == 0.23 and sorted(set(ranks.values())) == [59, 148]
    assert bits_per_param(GEMMA3_270M, ranks, CompressConfig()) == pytest.approx(6.3629, abs=1e-4)


def test_budget_binds_on_a_576_wide_llama():
    unbounded, _ = plan_ranks(SMOLLM_135M, CompressConfig(**{**PRESETS["slim-2to4"], "max_bits": None}))
    assert bits_per_param(SMOLLM_135M, unbounded, SLIM_2TO4) == pytest.approx(4.5788, abs=1e-4)
    ranks, ratio = plan_ranks(SMOLLM_135M, SLIM_2TO4)
    bits = bits_per_param(SMOLLM_135M, ranks, SLIM_2TO4)
    assert 4.45 < bits <= 4.5 and ratio < 0.23
    assert all(ranks[n] <= unbounded[n] for n in ranks)


@pytest.mark.parametrize("shapes", [GEMMA3_270M, SMOLLM_135M, LLAMA2_7B, QWEN25_05B],
                         ids=["gemma3-270m", "smollm-135m", "llama2-7b", "qwen2.5-0.5b"])
@pytest.mark.parametrize("recipe,budget", [("int4-dense", 4.5), ("slim-2to4", 4.5), ("slim-2to4", 4.0)])
def test_the_budget_holds_on_every_shape(shapes, recipe, budget):
    base = PRESETS[recipe]
    cfg = CompressConfig(**{**base, "max_bits": budget})
    ranks, ratio = plan_ranks(shapes, cfg)
    assert bits_per_param(shapes, ranks, cfg) <= budget
    # ... and it is the largest uniform ratio that fits: the next rank step up would break it.
    bigger, _ = plan_ranks(shapes, CompressConfig(**{**base, "max_bits": None, "rank_ratio": min(0.99, ratio + 1 / 4096)}))
    if ratio < 0.23 and bigger != ranks:
        assert bits_per_param(shapes, bigger, cfg) > budget


def test_an_unreachable_budget_is_one_clear_error():
    with pytest.raises(SlimError, match="--max-bits 4.5 cannot be met"):
        plan_ranks(GEMMA3_270M, int4_dense(bits=8))
    assert plan_ranks(GEMMA3_270M, int4_dense(bits=8, lowrank="none"))[0]["layers.0.q_proj"] == 0
    assert PRESETS["slim-paper"]["max_bits"] is None  # the paper's recipe is 5.2 bits: no budget


@pytest.mark.parametrize("cfg", [int4_dense(), CompressConfig(**PRESETS["slim-paper"]),
                                 int4_dense(group_size=-1, quantizer="gptq", refit_rounds=0),
                                 int4_dense(bits=8, lowrank="svd", max_bits=None, refit_rounds=0),
                                 int4_dense(bits=16, lowrank="none")],
                         ids=["int4-dense", "paper", "per-channel", "int8-dense", "fp-noadapters"])
def test_layer_bits_from_shapes_match_what_is_stored(cfg):
    torch.manual_seed(0)
    N, K = 48, 160  # K not a multiple of the group size
    W = torch.randn(N, K)
    X = torch.randn(K, 256)
    H = X @ X.T / 256
    s = X.norm(dim=1)
    rank = 7
    cw = compress_weight(W, H, s, s, cfg, rank=rank)
    stored = storage_bits(cw, cfg.sparsity_spec.kind, cfg.sparsity_spec.n, cfg.sparsity_spec.m)
    assert layer_bits(N, K, rank, cfg) == (stored["base_bits"], stored["adapter_bits"])


def test_when_not_even_rank_1_fits_int4_dense_keeps_no_adapters():
    # A 64-wide toy model: rank 1 (padded to 2 in INT4, with its scales) costs ~0.5 bits/param over the dense
    # INT4 base, so lowering the ratio ends at no adapters rather than an error; the base alone fits.
    toy = model_shapes(2, 64, 176, 64, 32)
    ranks, ratio = plan_ranks(toy, int4_dense())
    assert ratio == 0.0 and set(ranks.values()) == {0}
    assert 4.125 < bits_per_param(toy, ranks, int4_dense()) <= 4.5  # K = 64 < 128: one scale per 64 columns
    with pytest.raises(SlimError, match="without any adapters"):  # the base alone is over: refused as before
        plan_ranks(toy, int4_dense(max_bits=4.1))
