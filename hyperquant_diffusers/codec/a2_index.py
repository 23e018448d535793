"""A2 points <-> ranks in the lattice's norm order, the symbols the A2 stream Rice-codes.

After the RHT, a pair of consecutive values is an isotropic 2-D Gaussian, whose squared norm is exponentially
distributed; the number of lattice points inside a disk grows with its area, so a point's *rank* in the order
of increasing norm is close to geometrically distributed, the distribution a Rice code is optimal for (to
~0.03 bits per symbol). Coding the rank of each point costs ~0.02 bits per value over the index entropy at
3–5 bps, where sign–magnitude Rice coding of the two axes cost 0.10–0.19.

Order: points ``(c0, c1)`` (codec coordinates, point = ``(c0/2, c1·√3/2)``, ``c0 ≡ c1 mod 2``) sorted by the
integer key ``N = c0² + 3·c1²`` (= 4·squared norm), ties by ``c1`` then ``c0``. The first
``A2_RANK_TABLE`` ranks are tabulated; any other point has rank ``A2_RANK_TABLE`` (escape).
"""

from __future__ import annotations

import math

import torch

from .constants import A2_RANK_TABLE

_TABLES: dict = {}


def _tables(device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(points int32 (T, 2) in rank order, rank LUT int32 (2*B0+1, 2*B1+1) over the box |c0|<=B0, |c1|<=B1,
    B0, B1); built once per device."""
    key = str(torch.device(device))
    if key not in _TABLES:
        t = A2_RANK_TABLE
        # a disk of key <= nmax holds ~ pi/(2*sqrt 3) * nmax points; 5% margin so it holds at least t
        nmax = int(t * 2.0 * math.sqrt(3.0) / math.pi * 1.05) + 64
        b0, b1 = math.isqrt(nmax), math.isqrt(nmax // 3)
        c0 = torch.arange(-b0, b0 + 1, dtype=torch.int64)
        c1 = torch.arange(-b1, b1 + 1, dtype=torch.int64)
        g0, g1 = torch.meshgrid(c0, c1, indexing="ij")
        g0, g1 = g0.reshape(-1), g1.reshape(-1)
        ok = ((g0 - g1) & 1) == 0
        g0, g1 = g0[ok], g1[ok]
        n = g0 * g0 + 3 * g1 * g1
        inside = n <= nmax
        g0, g1, n = g0[inside], g1[inside], n[inside]
        if g0.numel() < t:
            raise AssertionError("A2 rank table disk too small")  # construction bug, not bad input
        order = torch.argsort((n * (2 * b1 + 1) + (g1 + b1)) * (2 * b0 + 1) + (g0 + b0))[:t]
        pts = torch.stack((g0[order], g1[order]), 1)
        lut = torch.full((2 * b0 + 1, 2 * b1 + 1), t, dtype=torch.int32)
        lut[pts[:, 0] + b0, pts[:, 1] + b1] = torch.arange(t, dtype=torch.int32)
        _TABLES[key] = (pts.to(torch.int32).to(device), lut.to(device), b0, b1)
    return _TABLES[key]


def a2_rank(c: torch.Tensor) -> torch.Tensor:
    """A2 coordinates (..., 2m) int -> rank of each point, int64 (numel/2,); ``A2_RANK_TABLE`` = escape."""
    pts, lut, b0, b1 = _tables(c.device)
    g = c.reshape(-1, 2).to(torch.int64)
    inbox = (g[:, 0].abs() <= b0) & (g[:, 1].abs() <= b1)
    i0 = torch.where(inbox, g[:, 0] + b0, torch.zeros_like(g[:, 0]))
    i1 = torch.where(inbox, g[:, 1] + b1, torch.zeros_like(g[:, 1]))
    r = lut[i0, i1].to(torch.int64)
    return torch.where(inbox, r, torch.full_like(r, A2_RANK_TABLE))


def a2_unrank(r: torch.Tensor) -> torch.Tensor:
    """Ranks int (n,) all < ``A2_RANK_TABLE`` -> A2 coordinates int32 (n, 2)."""
    pts, _, _, _ = _tables(r.device)
    return pts[r.to(torch.int64)]
