"""Assertions shared by the tests."""

from __future__ import annotations

import torch

# A real change of these O(1) features is ≥ 1e-2 in every case measured; float32 rounding across CPUs,
# thread counts and vector widths stays below 1e-5. A negated `allclose` with a tiny atol would also pass
# on a pure rounding difference, so "differs" always means "differs by more than this".
DIFFERS_BY = 1e-3


def differ(a: torch.Tensor, b: torch.Tensor, by: float = DIFFERS_BY) -> bool:
    """True when some entry of `a` and `b` differs by more than `by` (a margin far above rounding)."""
    return bool((a.detach().double() - b.detach().double()).abs().max() > by)
