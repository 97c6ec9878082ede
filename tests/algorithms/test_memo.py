import gc

import torch

from slim_trt.algorithms.memo import per_tensor


def _counting():
    calls = []

    @per_tensor
    def factor(H, damp):
        calls.append(damp)
        return H * damp

    return factor, calls


def test_a_factorisation_is_computed_once_per_tensor_and_damping():
    factor, calls = _counting()
    H = torch.eye(3)
    a = factor(H, 0.1)
    assert factor(H, 0.1) is a and factor(H.detach(), 0.1) is a  # a detach() view is the same H
    factor(H, 0.2)
    assert calls == [0.1, 0.2]
    factor(H.clone(), 0.1)  # equal values in another tensor: computed again
    assert calls == [0.1, 0.2, 0.1]


def test_an_in_place_change_or_a_freed_tensor_drops_the_entry():
    factor, calls = _counting()
    H = torch.eye(3)
    factor(H, 0.1)
    H.mul_(2.0)
    assert factor(H, 0.1)[0, 0] == 0.2 and calls == [0.1, 0.1]
    assert factor.cache_size() == 1
    del H
    gc.collect()
    assert factor.cache_size() == 0


def test_a_short_lived_view_keeps_the_entry_while_its_storage_lives():
    """Callers factorise H through a new detach() view on every call (gptq_adapters, the sweeps): the entry must
    outlive the view, or every call would factorise again."""
    factor, calls = _counting()
    H = torch.eye(3)
    a = factor(H.detach(), 0.1)
    gc.collect()
    assert factor.cache_size() == 1
    assert factor(H.detach().to(torch.float32), 0.1) is a and calls == [0.1]
    del H, a
    gc.collect()
    assert factor.cache_size() == 0
