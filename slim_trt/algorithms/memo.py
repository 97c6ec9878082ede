"""Memoisation of the factorisations of one calibration Hessian.

A compressed layer factorises its H many times with the same damping: the SparseGPT sweep, every refit
round's sweep and every GPTQ rounding of the adapters need the Cholesky factor of (H + damp I)^-1, and every
H-LoRA fit the Cholesky root of H + damp I. Layers that read the same input (q/k/v, gate/up) share one H. The
factorisations are pure functions of H, so they are computed once per H and reused while that H lives.

A result is reused only for the same tensor (the same storage, shape, strides and dtype: `detach()` views count)
and only while it is unmodified (its version counter, shared by views, is unchanged); the entry goes when the
tensor's storage is freed. The storage, not the tensor object, decides: callers pass short-lived views
(`H.detach().to(torch.float32)` makes a new one on every call), and an entry tied to such a view would be dropped
as soon as the call returned. The cached tensors are returned as they are: callers must not modify them in place.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch


def _key(T: torch.Tensor) -> tuple:
    return T.data_ptr(), tuple(T.shape), T.stride(), T.dtype, T.device


def per_tensor(fn: Callable) -> Callable:
    """Cache fn(T, *args, **kwargs) (hashable arguments) for as long as tensor T is alive and unmodified."""
    cache: dict[tuple, tuple[weakref.ref, int, dict]] = {}

    @functools.wraps(fn)
    def wrapper(T: torch.Tensor, *args, **kwargs):
        key = _key(T)
        entry = cache.get(key)
        if entry is None or entry[0]() is None or entry[1] != T._version:
            owner = T.untyped_storage()  # lives as long as any tensor on it (its Python object is preserved)
            cache[key] = entry = (weakref.ref(owner, lambda _ref, k=key: _evict(cache, k, _ref)), T._version, {})
        results, call = entry[2], (args, tuple(sorted(kwargs.items())))
        if call not in results:
            results[call] = fn(T, *args, **kwargs)
        return results[call]

    wrapper.cache_size = lambda: len(cache)  # for tests
    return wrapper


def _evict(cache: dict, key: tuple, ref: weakref.ref) -> None:
    entry = cache.get(key)
    if entry is not None and entry[0] is ref:
        del cache[key]
