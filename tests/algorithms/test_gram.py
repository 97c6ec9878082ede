import pytest
import torch

from slim_trt.algorithms.gram import GRAM_PANEL, gram


@pytest.mark.parametrize("K", [7, 2 * GRAM_PANEL, 2 * GRAM_PANEL + 1, 640, 3 * GRAM_PANEL])
def test_gram_is_xtx(K):
    g = torch.Generator().manual_seed(K)
    X = torch.randn(300, K, generator=g) * torch.logspace(-2, 2, K)  # LLM-like: a few channels 100x the rest
    G, ref = gram(X), X.double().T @ X.double()
    assert G.shape == (K, K) and G.dtype == torch.float32
    off = torch.ones(K, K, dtype=torch.bool)
    for i in range(0, K, GRAM_PANEL):  # the mirrored panels are copies of the computed ones
        off[i:i + GRAM_PANEL, i:i + GRAM_PANEL] = False
    if K > 2 * GRAM_PANEL:
        assert torch.equal(G[off], G.T[off])
    rel = ((G.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, rel
    # the panel seams: the mirrored lower triangle carries the upper one's values, not zeros or stale memory
    assert float((G.double() - ref).abs().max() / ref.abs().max()) < 1e-6


def test_gram_refuses_a_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        gram(torch.zeros(2, 3, 4))
