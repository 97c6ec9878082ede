import pytest
import torch

from slim_trt.algorithms.asymmetric import accumulate_drift, asymmetric_target
from slim_trt.algorithms.gptq import accumulate_hessian


def _stats(X: torch.Tensor, X_ref: torch.Tensor, batch: int):
    H = D = None
    n = 0
    for xb, rb in zip(X.split(batch), X_ref.split(batch)):
        D = accumulate_drift(D, n, xb, rb)
        H, n = accumulate_hessian(H, n, xb)
    return H, D


def test_target_is_the_least_squares_fit_to_the_dense_output():
    """W* = argmin ||X_ref W^T - X W*^T||: the layer that best reproduces the dense model's output from the
    compressed model's inputs (undamped, against lstsq in float64)."""
    torch.manual_seed(0)
    W = torch.randn(8, 16)
    X = torch.randn(600, 16)
    # the dense inputs differ by a systematic error (what the compressed layers before did) and noise
    X_ref = X @ (torch.eye(16) + 0.3 * torch.randn(16, 16)) + 0.05 * torch.randn(600, 16)
    H, D = _stats(X, X_ref, batch=128)  # uneven batches: the token weighting must match H's
    W_star = asymmetric_target(W, H, D, percdamp=1e-7).double()
    best = torch.linalg.lstsq(X.double(), (X_ref @ W.T).double()).solution.T
    torch.testing.assert_close(W_star, best, rtol=0, atol=1e-5)
    # and it is a better fit than W itself, which ignores the drift
    err = lambda V: float((X_ref.double() @ W.T.double() - X.double() @ V.T).norm())
    assert err(W_star) < 0.2 * err(W.double())


def test_no_drift_leaves_the_weight_exactly():
    """Without drift the damping must not shrink W (why W + W D H^-1, not W C H^-1)."""
    torch.manual_seed(1)
    W = torch.randn(4, 8)
    X = torch.randn(100, 8)
    H, D = _stats(X, X.clone(), batch=32)
    assert torch.count_nonzero(D) == 0
    assert torch.equal(asymmetric_target(W, H, D), W)


def test_batches_add_up_to_one_pass():
    torch.manual_seed(2)
    X, X_ref = torch.randn(90, 8), torch.randn(90, 8)
    _, whole = _stats(X, X_ref, batch=90)
    _, split = _stats(X, X_ref, batch=7)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole, 2.0 / 90 * (X_ref - X).T @ X, rtol=1e-5, atol=1e-6)


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="do not pair"):
        accumulate_drift(None, 0, torch.zeros(4, 8), torch.zeros(5, 8))


def test_a_layer_no_token_reached_keeps_its_weight():
    W = torch.randn(3, 4)
    assert torch.equal(asymmetric_target(W, torch.zeros(4, 4), torch.zeros(4, 4)), W)


def test_the_source_ridge_makes_the_step_the_same_with_or_without_smoothquant():
    """SmoothQuant divides input channel j by s_j and multiplies W's column j by it, exactly; with the ridge taken
    in the source model's coordinates the smoothed layer takes the unsmoothed layer's step (times s), while a ridge
    relative to the smoothed H gives another step."""
    from slim_trt.algorithms.asymmetric import source_ridge

    torch.manual_seed(3)
    K = 16
    X = torch.randn(500, K) * torch.linspace(0.1, 10.0, K)  # uneven channels, as LLM inputs are
    H, D = _stats(X, X @ (torch.eye(K) + 0.2 * torch.randn(K, K)), batch=100)
    W = torch.randn(8, K)
    s = torch.rand(K) + 0.5
    ss = s[:, None] * s[None, :]
    plain = asymmetric_target(W, H, D, 0.01, 0.25) * s
    smoothed = asymmetric_target(W * s, H / ss, D / ss, 0.01, 0.25, source_ridge(H / ss, s, 0.01))
    torch.testing.assert_close(smoothed, plain, rtol=1e-4, atol=1e-5)
    layer_frame = asymmetric_target(W * s, H / ss, D / ss, 0.01, 0.25)
    assert float((layer_frame - plain).abs().max()) > 1e-3
    # no smoothing (s = 1): the source ridge is the plain one
    torch.testing.assert_close(asymmetric_target(W, H, D, 0.01, 0.25, source_ridge(H, torch.ones(K), 0.01)),
                               asymmetric_target(W, H, D, 0.01, 0.25), rtol=1e-4, atol=1e-5)
