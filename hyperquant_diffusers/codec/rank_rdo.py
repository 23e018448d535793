"""Rate–distortion optimal points for the pair-rank-coded lattices Z and D4 (see :mod:`.stream`).

With the Rice parameters fixed, a Z pair costs ``rice(rank in Z², k)`` (plus 2·ESCAPE_BITS raw bits when it
escapes), a D4 vector ``rice(rank of (c0, c1) in Z², k) + rice(rank of (c2, c3) in its coset, max(k-1, 0))``.
The Lagrangian ``J(p) = ||y - p||^2 + lambda * bits(p)`` is minimized

* Z: per pair over the integer pairs within ``_REACH`` of the rounded pair (rank costs are not separable
  per coordinate);
* D4: per parity ``s`` of the first pair, the best first pair of parity ``s`` and the best second pair of
  parity ``s`` are found independently (given ``s`` the cost is separable into the two pairs), then the better
  parity is taken: exact over the candidates.

Candidates lie within ``_REACH`` (2) of the rounded pair in each coordinate. A point 3 or more units off in a
coordinate is at least 6 squared units worse in distortion than the rounded pair; it could only win by saving
more than ``6 / lambda`` bits (52 for Z, 40 for D4 at the default lambda) over every candidate inside, while a
Rice escape caps a rank's cost at ``k + ESCAPE_Q + 1 + ESCAPE_BITS`` bits, so this needs a k = 0 block with an
outlier pair. ``tests/test_codec_rank.py`` and ``tests/test_codec_rdo.py`` check the result against brute force
over a larger box (lambda at 1x and 6x the default).

:func:`rd_rank_chunk` has the signature of ``rdo._rd_chunk`` so the RDO can route Z and D4 to it.
"""

from __future__ import annotations

import torch

from .constants import ESCAPE_BITS
from .rank_index import escape_rank, rank_points
from .rice import rice_cost

#: candidate offsets per coordinate around the rounded pair: -_REACH .. _REACH
_REACH = 2
#: pairs per pass (bounds the candidate tables' memory)
_PASS = 1 << 17


def _offsets(device) -> torch.Tensor:
    o = torch.arange(-_REACH, _REACH + 1, device=device)
    return torch.cartesian_prod(o, o)  # (C, 2)


def _pair_costs(y: torch.Tensor, k: torch.Tensor, lam: float, kind: str):
    """Candidates (P, C, 2) int64 around the rounded pairs ``y`` (P, 2) and their J (P, C) with Rice
    parameter ``k`` (P,) for ranks in ``kind``'s table."""
    base = torch.round(y).to(torch.int64)
    cand = base.unsqueeze(1) + _offsets(y.device)
    dist = (cand.to(y.dtype) - y.unsqueeze(1)).square().sum(-1)
    r = rank_points(cand, kind).view(cand.shape[0], -1)
    bits = rice_cost(r, k.to(torch.int64).unsqueeze(1)) + (r == escape_rank(kind)).to(torch.int64) * (2 * ESCAPE_BITS)
    return cand, dist + lam * bits.to(y.dtype)


def _rd_pairs_z(y: torch.Tensor, k: torch.Tensor, lam: float) -> torch.Tensor:
    cand, j = _pair_costs(y, k, lam, "Z2")
    i = j.argmin(1)
    return cand[torch.arange(cand.shape[0], device=y.device), i]


def _rd_d4(y: torch.Tensor, k: torch.Tensor, lam: float) -> torch.Tensor:
    cand1, j1 = _pair_costs(y[:, :2], k, lam, "Z2")
    cand2, j2 = _pair_costs(y[:, 2:], (k - 1).clamp_min(0), lam, "Z2coset")
    inf = torch.finfo(j1.dtype).max
    rows = torch.arange(y.shape[0], device=y.device)
    best = []
    for s in (0, 1):
        m1 = ((cand1.sum(-1) & 1) == s)
        m2 = ((cand2.sum(-1) & 1) == s)
        a, ia = torch.where(m1, j1, inf).min(1)
        b, ib = torch.where(m2, j2, inf).min(1)
        best.append((a + b, torch.cat((cand1[rows, ia], cand2[rows, ib]), 1)))
    use1 = best[1][0] < best[0][0]
    return torch.where(use1.unsqueeze(1), best[1][1], best[0][1])


def rd_rank_chunk(lattice: str, y: torch.Tensor, k: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact minimizer of ``J`` for ``y`` (M, d) float in lattice units, Rice parameters ``k`` (M, d) int (each
    coordinate's block parameter, as ``rdo._coord_k`` gives them), lattice "Z" (d = 1, M even: consecutive rows
    pair up, as in the stream) or "D4" (d = 4). Returns int32 coordinates (M, d)."""
    dt = y.dtype if y.dtype == torch.float64 else torch.float32
    shape = y.shape
    if lattice == "Z":
        yp, kp, fn = y.to(dt).reshape(-1, 2), k.reshape(-1, 2)[:, 0], _rd_pairs_z
    elif lattice == "D4":
        yp, kp, fn = y.to(dt).reshape(-1, 4), k.reshape(-1, 4)[:, 0], _rd_d4
    else:
        raise ValueError(f"rd_rank_chunk handles the rank-coded lattices Z and D4, not {lattice!r}")
    out = torch.empty(yp.shape, dtype=torch.int32, device=y.device)
    for s in range(0, yp.shape[0], _PASS):
        out[s: s + _PASS] = fn(yp[s: s + _PASS], kp[s: s + _PASS], float(lam)).to(torch.int32)
    return out.reshape(shape)
