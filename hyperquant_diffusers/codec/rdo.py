"""Rate–distortion optimized choice of lattice points for the Rice-coded stream.

The nearest lattice point minimizes distortion alone. The Rice code charges more bits for larger
coordinates than an ideal entropy coder would, so at the same total rate it pays to sometimes choose a
nearby point with smaller coordinates. Each vector takes the lattice point ``p`` minimizing

    J(p) = ||x - p||^2 + lambda * bits(p)

exactly (not among a few candidates): with the Rice parameters ``ks`` fixed, ``bits(p)`` is a sum of
per-coordinate costs (see :mod:`.stream`: Rice-coded magnitude, a sign bit when present, the parity bit), so
``J`` is separable within each coset of the lattice's sub-lattice of integer vectors:

* Z: every coordinate on its own (the two integers around ``x``).
* A2 (coded by point rank, :mod:`.a2_index`): not separable; the nearest point and its 18 neighbours within
  distance 2 are searched.
* D4 (integer vectors of even sum): per coordinate the best integer of each parity; if the best choices have
  an odd sum, the coordinate whose switch to its other parity costs least switches (Conway & Sloane's D_n
  rule, applied to ``J`` instead of distance).
* E8 (doubled coordinates: all even or all odd, sum ≡ 0 mod 4): the D_n rule on ``c/2`` (even coset) or
  ``(c-1)/2`` (odd coset), then the cheaper coset.

Per coordinate only the two values of each label around ``x`` are candidates: one further step toward zero
moves the point a whole class step (>= 1 lattice unit), costing more distortion than any bits it saves at
every rate the codec accepts (the brute-force test in ``tests/test_codec_rdo.py`` checks optimality).
``lambda = -dD/dR = 2 ln2 * D`` (high-rate slope, ``D = G V^(2/d)`` per value in lattice units); a sweep of
``lambda`` over 0.6..2x this value on iid Gaussians at 3/4/5 bps found no better multiplier (bench/RESULTS.md).
The Rice parameters come from the nearest points; re-choosing them after the RDO pass and repeating it changed
nothing measurable, so one pass is done.
"""

from __future__ import annotations

import math

import torch

from .a2_index import a2_rank
from .constants import A2_RANK_TABLE, ESCAPE_BITS, lattice_spec
from .lattices import nearest_point
from .rice import rice_cost
from .stream import choose_ks

_SQRT3 = math.sqrt(3.0)
#: A2 offsets (codec coordinates) of a point's 18 neighbours within distance 2, and the point itself.
_A2_RING2 = torch.tensor([[0, 0], [2, 0], [-2, 0], [1, 1], [1, -1], [-1, 1], [-1, -1], [0, 2], [0, -2], [3, 1],
                          [3, -1], [-3, 1], [-3, -1], [4, 0], [-4, 0], [2, 2], [2, -2], [-2, 2], [-2, -2]])
#: Values processed per RDO pass (bounds the memory of the candidate tables: ~40 bytes per value and candidate).
RDO_CHUNK = 1 << 22


def rd_lambda(lattice: str) -> float:
    """Lagrange multiplier (squared lattice units per bit) at the high-rate slope of the lattice's D(R)."""
    spec = lattice_spec(lattice)
    return 2.0 * math.log(2.0) * spec.nsm * spec.volume ** (2.0 / spec.dim)


def _coord_k(ks: torch.Tensor, start: int, n: int, lattice: str, block_values: int) -> torch.Tensor:
    """Rice parameter of each of the ``n`` coordinates starting at flat index ``start``: int32 (n,)."""
    spec = lattice_spec(lattice)
    pos = torch.arange(start, start + n, device=ks.device)
    cls = (pos % spec.dim) % spec.classes
    return ks.to(torch.int32)[pos // block_values, cls]


def _coset_table(t: torch.Tensor, offset: float, step: float, ncand: int):
    """Candidate values of a residue class: ``offset + step * Z`` around ``t`` (M, d) -> float (M, d, ncand).

    ``ncand`` 2: the bracketing pair; 4: one more on each side (the bracketing pair of each label when labels
    alternate along the class).
    """
    a = torch.floor((t - offset) / step) * step + offset
    rel = (0.0, step) if ncand == 2 else (-step, 0.0, step, 2 * step)
    return a.unsqueeze(-1) + torch.tensor(rel, dtype=t.dtype, device=t.device)


def _best(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate the cheapest candidate: (cost (M, d), index (M, d))."""
    j, i = cost.min(-1)
    return j, i


def _best_even_labels(cost: torch.Tensor, label_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cheapest choice with an even number of odd labels per vector.

    ``cost`` (M, d, 4) for the values a-s, a, a+s, a+2s of a class whose label alternates along it;
    ``label_a`` (M, d) int64 the label (0/1) of ``a``. Returns (total cost (M,), chosen index (M, d)).
    """
    ca = torch.where(cost[..., 1] <= cost[..., 3], 1, 3)  # best of a's label
    cb = torch.where(cost[..., 0] <= cost[..., 2], 0, 2)  # best of the other label
    ja, jb = cost.gather(-1, ca.unsqueeze(-1)).squeeze(-1), cost.gather(-1, cb.unsqueeze(-1)).squeeze(-1)
    use_a = ja <= jb
    idx = torch.where(use_a, ca, cb)
    best = torch.where(use_a, ja, jb)
    pen = (ja - jb).abs()
    lab = torch.where(use_a, label_a, 1 - label_a)
    odd = (lab.sum(1) & 1).bool()
    pmin, j = pen.min(1)
    flip = torch.zeros_like(use_a)
    flip.scatter_(1, j.unsqueeze(1), odd.unsqueeze(1))
    idx = torch.where(flip, torch.where(use_a, cb, ca), idx)
    return best.sum(1) + torch.where(odd, pmin, torch.zeros_like(pmin)), idx


def _rd_chunk(lattice: str, y: torch.Tensor, k: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact minimizer of ``J`` for ``y`` (M, d) float in lattice units with Rice parameters ``k`` (M, d) int32.

    Returns int32 coordinates (M, d) in the codec's representation (see :mod:`.lattices`).
    """
    name = lattice
    dt = y.dtype if y.dtype == torch.float64 else torch.float32
    y = y.to(dt)
    kk = k.unsqueeze(-1)
    km1 = (kk - 1).clamp_min(0)

    def dist(t, vals, weight):
        return (t.unsqueeze(-1) - vals).square() * weight

    if name == "Z":
        vals = _coset_table(y, 0.0, 1.0, 2)
        ci = vals.to(torch.int32)  # |c| <= MAX_ABS_COORD: int32 halves the memory traffic
        bits = rice_cost(ci.abs(), kk) + (ci != 0)
        _, i = _best(dist(y, vals, 1.0) + lam * bits.to(dt))
        return vals.gather(-1, i.unsqueeze(-1)).squeeze(-1).to(torch.int32)
    if name == "D4":
        vals = _coset_table(y, 0.0, 1.0, 4)
        ci = vals.to(torch.int32)  # |c| <= MAX_ABS_COORD: int32 halves the memory traffic
        mag = ci.abs()
        bits = rice_cost(mag, kk) + (ci != 0)
        bits[:, 3] = rice_cost(mag[:, 3] >> 1, km1[:, 3]) + (ci[:, 3] != 0)
        label_a = ci[..., 1] & 1
        _, i = _best_even_labels(dist(y, vals, 1.0) + lam * bits.to(dt), label_a)
        return vals.gather(-1, i.unsqueeze(-1)).squeeze(-1).to(torch.int32)
    if name == "A2":
        # rank-coded (see .a2_index): the cost is not separable, so search the nearest point and its 18
        # neighbours within distance 2 (the bits fall only toward the origin, by at most a few per ring)
        c0 = nearest_point("A2", y.reshape(-1)).view(-1, 1, 2).to(torch.int64)
        cand = c0 + _A2_RING2.to(y.device)
        pts = cand.to(dt) * torch.tensor([0.5, 0.5 * _SQRT3], dtype=dt, device=y.device)
        dist = (pts - y.unsqueeze(1)).square().sum(-1)
        r = a2_rank(cand).view(cand.shape[0], -1)
        bits = rice_cost(r, k[:, :1].to(torch.int64)) + (r == A2_RANK_TABLE).to(torch.int64) * (2 * ESCAPE_BITS)
        i = (dist + lam * bits.to(dt)).argmin(1)
        return cand[torch.arange(cand.shape[0], device=y.device), i].to(torch.int32)
    if name == "E8":
        t = 2.0 * y
        out = []
        for odd in (0, 1):
            vals = _coset_table(t, float(odd), 2.0, 4)
            ci = vals.to(torch.int32)  # |c| <= MAX_ABS_COORD: int32 halves the memory traffic
            mag = ci.abs()
            if odd:  # every coordinate non-zero: a sign bit each, except the last (implied by sum ≡ 0 mod 4)
                bits = rice_cost(mag >> 1, kk) + 1
                bits[:, 7] -= 1
                label_a = ((ci[..., 1] - 1) >> 1) & 1
            else:  # the last magnitude's low bit is implied: coded as (|c| >> 2) with k - 1
                bits = rice_cost(mag >> 1, kk) + (ci != 0)
                bits[:, 7] = rice_cost(mag[:, 7] >> 2, km1[:, 7]) + (ci[:, 7] != 0)
                label_a = (ci[..., 1] >> 1) & 1
            j, i = _best_even_labels(dist(t, vals, 0.25) + lam * bits.to(dt), label_a)
            out.append((j, vals.gather(-1, i.unsqueeze(-1)).squeeze(-1)))
        use1 = out[1][0] < out[0][0]
        return torch.where(use1.unsqueeze(1), out[1][1], out[0][1]).to(torch.int32)
    raise ValueError(f"unknown lattice {lattice!r}")


def rd_point(lattice: str, y: torch.Tensor, ks: torch.Tensor, block_values: int, lam: float | None = None,
             chunk_values: int = RDO_CHUNK) -> torch.Tensor:
    """Coordinates minimizing ``||y - p||^2 + lam * bits(p)`` per lattice vector, given the Rice parameters.

    ``y`` (..., n) float in lattice units (the flattened tensor is cut into blocks of ``block_values`` like the
    stream); ``ks`` uint8 (n_blocks, classes) as :func:`.stream.choose_ks` returns; ``lam`` squared lattice
    units per bit (default :func:`rd_lambda`). Returns int32 coordinates, same shape as ``y``.
    """
    spec = lattice_spec(lattice)
    lam = rd_lambda(spec.name) if lam is None else float(lam)
    flat = y.reshape(-1)
    n = flat.numel()
    step = max(1, int(chunk_values) // block_values) * block_values
    out = torch.empty(n, dtype=torch.int32, device=flat.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        k = _coord_k(ks, s, e - s, spec.name, block_values).view(-1, spec.dim)
        out[s:e] = _rd_chunk(spec.name, flat[s:e].view(-1, spec.dim), k, lam).reshape(-1)
    return out.reshape(y.shape)


def rd_nearest_point(lattice: str, y: torch.Tensor, block_values: int, rdo: bool = True) -> torch.Tensor:
    """Rate–distortion optimized lattice coordinates for ``y`` (..., n) in lattice units; int32, same shape.

    The Rice parameters used for the bit costs are those the block coder picks for the nearest points. With
    ``rdo=False`` this is the nearest point.
    """
    spec = lattice_spec(lattice)
    c0 = nearest_point(spec.name, y.reshape(-1))
    if not rdo:
        return c0.reshape(y.shape)
    ks = choose_ks(c0, spec.name, block_values)
    return rd_point(spec.name, y, ks, block_values)
