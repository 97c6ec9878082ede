"""Small, seeded data shared by the algorithm tests: heavy-tailed weights and correlated layer inputs."""
from __future__ import annotations

import pytest
import torch

N, K, T = 128, 256, 1024  # output channels, input channels, calibration tokens


def _student_t(shape: tuple[int, ...], df: int = 3, seed: int = 0) -> torch.Tensor:
    """Student-t samples (heavy tails like LLM weights), built from normals so only a Generator is needed."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = sum(torch.randn(shape, generator=g) ** 2 for _ in range(df))
    return z / torch.sqrt(chi2 / df)


def _correlated_inputs(t: int = T, k: int = K, seed: int = 1) -> torch.Tensor:
    """[t, k] activations: a rank-16 shared component (strong channel correlation) plus noise, with log-normal
    per-channel scales (a few outlier channels, as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(t, 16, generator=g) @ torch.randn(16, k, generator=g)
    x = latent + 0.3 * torch.randn(t, k, generator=g)
    return x * torch.exp(0.7 * torch.randn(k, generator=g))


def _output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """||(W - W_hat) X^T||_F / ||W X^T||_F: the relative error of the layer output on the inputs X."""
    return float(torch.linalg.norm((W - W_hat) @ X.T) / torch.linalg.norm(W @ X.T))


@pytest.fixture(scope="module")
def layer():
    """(W [N, K], X [T, K], H = 2/T X^T X) for a layer with correlated inputs."""
    g = torch.Generator().manual_seed(2)
    W = 0.05 * torch.randn(N, K, generator=g)
    X = _correlated_inputs()
    H = 2.0 / X.shape[0] * X.T @ X
    return W, X, H


@pytest.fixture(scope="session")
def student_t():
    return _student_t


@pytest.fixture(scope="session")
def correlated_inputs():
    return _correlated_inputs


@pytest.fixture(scope="session")
def output_error():
    return _output_error
