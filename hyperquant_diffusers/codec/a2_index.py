"""A2 points <-> ranks in the lattice's norm order: the ``"A2"`` tables of :mod:`.rank_index` (kept for callers
of ``a2_rank`` / ``a2_unrank``; the ranks are those of format versions 2 and 3)."""

from __future__ import annotations

import torch

from .rank_index import rank_points, unrank_points


def a2_rank(c: torch.Tensor) -> torch.Tensor:
    """A2 coordinates (..., 2m) int -> rank of each point, int64 (numel/2,); ``A2_RANK_TABLE`` = escape."""
    return rank_points(c, "A2")


def a2_unrank(r: torch.Tensor) -> torch.Tensor:
    """Ranks int (n,) all < ``A2_RANK_TABLE`` -> A2 coordinates int32 (n, 2)."""
    return unrank_points(r, "A2")
