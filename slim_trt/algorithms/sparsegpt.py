"""SparseGPT (Frantar & Alistarh 2023): prune with the OBS criterion w^2 / [H^-1]_jj^2 and compensate the
removed weights on the columns not yet visited, optionally quantizing each kept column on the way (joint
sparsity + GPTQ). Reference: github.com/IST-DASLab/sparsegpt."""
from __future__ import annotations

import torch

from ..config import Sparsity
from .obs import sweep
from .qtensor import QuantizedTensor
from .zeropoint import GroupGrid


def sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: Sparsity | str,
    bits: int | None = None,
    group_size: int = 128,
    scale_method: str = "absmax",
    blocksize: int = 128,
    percdamp: float = 0.01,
    grid: GroupGrid | None = None,
) -> tuple[torch.Tensor, torch.Tensor, QuantizedTensor | None]:
    """Returns (W_new, keep mask, QuantizedTensor or None).

    N:M: each group of m columns keeps its n best weights by the OBS criterion, chosen when the sweep reaches
    the group (so the choice sees the updates from earlier columns). Unstructured: the `ratio` lowest-scoring
    weights of each block of `blocksize` columns are pruned (all rows together, as in the reference), so one
    row's sparsity can differ from another's while every block holds the exact ratio.
    bits 4 / 8: every kept weight is rounded to the grid right after its column's mask is known; W_new is then
    exactly the QuantizedTensor's dequantized value, and q is 0 wherever the mask is False. Scales come from
    the weights an upfront estimate of the mask keeps (group_size 0 / -1) or from the group's current kept
    weights when the sweep reaches it (G > 0). grid (zeropoint.GroupGrid): zero-point grids per group instead.
    """
    sp = Sparsity.parse(sparsity) if isinstance(sparsity, str) else sparsity
    W_new, keep, q, scale, zero = sweep(W, H, bits=bits, group_size=group_size, scale_method=scale_method,
                                        sparsity=sp, blocksize=blocksize, percdamp=percdamp, grid=grid)
    if grid is not None:
        return W_new, keep, grid.quantized(q, scale, zero)
    qt = None if q is None else QuantizedTensor(q=q, scale=scale, bits=bits, group_size=group_size)
    return W_new, keep, qt
