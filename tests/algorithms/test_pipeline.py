"""compress_weight runs on one thread: the caller's thread count is restored and does not change the result."""
import torch

from slim_trt.algorithms.pipeline import compress_weight
from tests.conftest import slim_2to4


def test_compress_weight_gives_the_same_bits_on_any_caller_thread_count(layer):
    W, X, H = layer
    s = X.square().sum(0).sqrt()
    cfg = slim_2to4(refit_rounds=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compress_weight(W, H, s, s, cfg, rank=8)
        torch.set_num_threads(2)
        two = compress_weight(W, H, s, s, cfg, rank=8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert two.refit_rounds == one.refit_rounds
    for a, b in ((one.weight.q, two.weight.q), (one.weight.scale, two.weight.scale), (one.mask, two.mask),
                 (one.lora_L.q, two.lora_L.q), (one.lora_R.q, two.lora_R.q), (one.lora_L.scale, two.lora_L.scale)):
        assert torch.equal(a, b)
    assert one.rel_error == two.rel_error < one.rel_error_base
