"""Rate–distortion optimized choice of lattice points for the Rice-coded stream.

The nearest lattice point minimizes distortion alone. The Rice code charges more bits for larger
coordinates than an ideal entropy coder would, so at the same total rate it pays to sometimes choose a
nearby point with smaller coordinates. Each vector takes the lattice point ``p`` minimizing

    J(p) = ||x - p||^2 + lambda * bits(p)

exactly (not among a few candidates), with the Rice parameters ``ks`` fixed:

* Z and D4 (coded by pair ranks, see :mod:`.stream`): :func:`.rank_rdo.rd_rank_chunk`.
* A2 (coded by point rank, :mod:`.a2_index`): not separable; the nearest point and its 18 neighbours within
  distance 2 are searched.
* E8: ``bits(p)`` is a sum of per-coordinate costs (Rice-coded magnitude, a sign bit when present, the parity
  bit), so ``J`` is separable within each coset of the integer sub-lattice D8 (doubled coordinates: all even
  or all odd, sum ≡ 0 mod 4): per coordinate the best value of each label; if the best choices have an odd
  label sum, the coordinate whose switch to its other label costs least switches (Conway & Sloane's D_n rule,
  applied to ``J`` instead of distance), on ``c/2`` (even coset) or ``(c-1)/2`` (odd coset), then the cheaper
  coset. The bit costs of the candidates are looked up in a table per Rice parameter.

E8: per coordinate only the two values of each label around ``x`` are candidates: one further step toward zero
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

from . import cpu_kernels
from .a2_index import a2_rank
from .constants import A2_RANK_TABLE, ESCAPE_BITS, lattice_spec
from .lattices import nearest_point
from .rank_rdo import rd_rank_chunk
from .rice import rice_cost
from .stream import choose_ks

_SQRT3 = math.sqrt(3.0)
#: A2 offsets (codec coordinates) of a point's 18 neighbours within distance 2, and the point itself.
_A2_RING2 = torch.tensor([[0, 0], [2, 0], [-2, 0], [1, 1], [1, -1], [-1, 1], [-1, -1], [0, 2], [0, -2], [3, 1],
                          [3, -1], [-3, 1], [-3, -1], [4, 0], [-4, 0], [2, 2], [2, -2], [-2, 2], [-2, -2]])
#: Values processed per RDO pass (bounds the memory of the candidate tables: ~40 bytes per value and candidate).
RDO_CHUNK = 1 << 20


def rd_lambda(lattice: str) -> float:
    """Lagrange multiplier (squared lattice units per bit) at the high-rate slope of the lattice's D(R)."""
    spec = lattice_spec(lattice)
    return 2.0 * math.log(2.0) * spec.nsm * spec.volume ** (2.0 / spec.dim)


def _coord_k(ks: torch.Tensor, start: int, n: int, lattice: str, block_values: int) -> torch.Tensor:
    """Rice parameter of each of the ``n`` coordinates starting at flat index ``start``: int32 (n,)."""
    spec = lattice_spec(lattice)
    if spec.classes == 1:
        b0, b1 = start // block_values, (start + n + block_values - 1) // block_values
        per_block = ks[b0:b1, 0].to(torch.int32)
        k = per_block.unsqueeze(1).expand(b1 - b0, block_values).reshape(-1)
        return k[start - b0 * block_values: start - b0 * block_values + n]
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


def _rd_chunk(lattice: str, y: torch.Tensor, k: torch.Tensor, lam: float, e8_table=None) -> torch.Tensor:
    """Exact minimizer of ``J`` for ``y`` (M, d) float in lattice units with Rice parameters ``k`` (M, d) int32.

    Returns int32 coordinates (M, d) in the codec's representation (see :mod:`.lattices`).
    """
    name = lattice
    dt = y.dtype if y.dtype == torch.float64 else torch.float32
    y = y.to(dt)

    def dist(t, vals, weight):
        return (t.unsqueeze(-1) - vals).square() * weight

    if name in ("Z", "D4"):  # rank-coded pairs (see .stream): not separable per coordinate
        return rd_rank_chunk(name, y, k, lam)
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
        return _rd_e8(y, k, lam, dt, e8_table)
    raise ValueError(f"unknown lattice {lattice!r}")


#: E8 bit-cost tables are built for coordinates up to this magnitude; beyond, the costs are computed directly.
_E8_TABLE_MAX = 1 << 14


def _e8_cost_table(kmax: int, cmax: int, lam: float, dt, device) -> torch.Tensor:
    """``lam * bits`` of one E8 coordinate (doubled, ``c`` in [-cmax, cmax]) for every Rice parameter k <= kmax
    and class (even coset, even coset's last coordinate, odd coset, odd coset's last), as rows of the four
    candidates ``a-2, a, a+2, a+4``: (rows, 4) in ``dt``, the row of (k, cls, a) at ``(4 k + cls) W + a + cmax - 2``
    with ``W = 2 cmax - 5`` (``|a| <= cmax - 4``).

    The bits are those of the stream (see :mod:`.stream`): even coset ``rice(|c| >> 1, k)`` plus a sign bit if
    ``c != 0``, its last coordinate ``rice(|c| >> 2, max(k-1, 0))`` plus the sign bit; odd coset
    ``rice(|c| >> 1, k)`` plus a sign bit, but for the last coordinate (its sign is implied)."""
    c = torch.arange(-cmax, cmax + 1, dtype=torch.int32, device=device)
    mag = c.abs()
    kk = torch.arange(kmax + 1, dtype=torch.int32, device=device).unsqueeze(1)
    nz = (c != 0).to(torch.int32)
    even = rice_cost(mag >> 1, kk) + nz
    even7 = rice_cost(mag >> 2, (kk - 1).clamp_min(0)) + nz
    odd = rice_cost(mag >> 1, kk) + 1
    odd7 = odd - 1
    lb = lam * torch.stack((even, even7, odd, odd7), 1).to(dt)  # (kmax+1, 4, W)
    w = lb.shape[-1]
    # row for a (as c, from -cmax+2 to cmax-4): the costs of its candidates a-2, a, a+2, a+4
    return torch.stack([lb[..., j: w - 6 + j] for j in (0, 2, 4, 6)], -1).reshape(-1, 4)


def _rd_e8_coset(y: torch.Tensor, a: torch.Tensor, lam_bits: torch.Tensor, idx0: torch.Tensor, consts: dict):
    """One coset of E8 for ``y`` (M, 8): ``a`` (M, 8) float the coset value at or below ``2 y`` (doubled
    coordinates); candidates a-2, a, a+2, a+4 with bit costs looked up in ``lam_bits`` at ``idx0 + c``.

    Returns (J per vector (M,), chosen doubled coordinates int32 (M, 8)): the D_n rule of
    :func:`_best_even_labels` on the candidates' J, written out for the four fixed offsets."""
    ai = a.to(torch.int32)
    # J = (y - c/2)^2 + lam * bits; (y - c/2)^2 is the rounded (2y - c)^2 / 4 exactly (powers of two)
    w = a.mul_(0.5).unsqueeze(-1) + consts["half_rel"]
    j = torch.sub(y.unsqueeze(-1), w, out=w).square_()
    j += lam_bits.index_select(0, (idx0 + ai).view(-1)).view(j.shape)
    c0, c1, c2, c3 = j.unbind(-1)
    a_first = c1 <= c3  # a's label: a beats a+4
    b_first = c0 <= c2  # the other label: a-2 beats a+2
    ja = torch.minimum(c1, c3).contiguous()
    jb = torch.minimum(c0, c2).contiguous()
    use_a = ja <= jb
    best = torch.minimum(ja, jb)
    pen = ja.sub_(jb).abs_()
    # parity of the chosen labels: a's label (a >> 1 & 1; for odd a the same bit as (a - 1) >> 1) where taken
    odd = (((ai >> 1) & 1).sum(1) + (~use_a).sum(1)) & 1
    odd = odd.bool()
    pmin, jmin = pen.min(1)
    flip = torch.zeros_like(use_a)
    flip.scatter_(1, jmin.unsqueeze(1), odd.unsqueeze(1))
    off = torch.where(use_a.logical_xor_(flip), torch.where(a_first, consts["0"], consts["4"]),
                      torch.where(b_first, consts["-2"], consts["2"]))
    total = best.sum(1) + torch.where(odd, pmin, torch.zeros_like(pmin))
    return total, off.add_(ai)


def _e8_table_for(y: torch.Tensor, kmax: int, lam: float, dt):
    """(cost table, cmax) covering the E8 candidates of ``y`` (lattice units) for Rice parameters <= kmax, or
    None where the coordinates are too large for a table (one host sync)."""
    if y.numel() == 0:
        return None
    lo, hi = torch.aminmax(y)
    cmax = int(2.0 * max(-float(lo), float(hi))) + 6
    if cmax > _E8_TABLE_MAX:
        return None
    return _e8_cost_table(kmax, cmax, lam, dt, y.device), cmax


def _rd_e8(y: torch.Tensor, k: torch.Tensor, lam: float, dt, table=None) -> torch.Tensor:
    """Exact E8 minimizer of ``J`` (see :func:`_rd_chunk`) with table-driven bit costs; int32 (M, 8).
    ``table``: :func:`_e8_table_for` of these (or wider) coordinates and parameters, built here if None."""
    if table is None:
        table = _e8_table_for(y, int(k.max()) if k.numel() else 0, lam, dt)
    if table is None:
        return _rd_e8_direct(y, k, lam, dt)
    lam_bits, cmax = table
    t = 2.0 * y
    a_even = torch.floor(t / 2.0) * 2.0
    a_odd = torch.floor((t - 1.0) / 2.0) * 2.0 + 1.0
    width = 2 * cmax - 5
    pos7 = torch.tensor([0] * 7 + [1], dtype=torch.int32, device=y.device) * width
    idx0 = k.to(torch.int32) * (4 * width) + (pos7 + (cmax - 2))
    dev = y.device
    consts = {"half_rel": torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=dt, device=dev),
              **{str(v): torch.tensor(v, dtype=torch.int32, device=dev) for v in (0, 4, -2, 2)}}
    m = y.shape[0]
    # both cosets in one batch (rows 0..m-1: even coset, m..2m-1: odd coset)
    j, v = _rd_e8_coset(torch.cat((y, y)), torch.cat((a_even, a_odd)), lam_bits,
                        torch.cat((idx0, idx0 + 2 * width)), consts)
    return torch.where((j[m:] < j[:m]).unsqueeze(1), v[m:], v[:m])


def _rd_e8_direct(y: torch.Tensor, k: torch.Tensor, lam: float, dt) -> torch.Tensor:
    """E8 minimizer with the bit costs computed per candidate (coordinates too large for the cost table)."""
    t = 2.0 * y
    kk = k.unsqueeze(-1)
    km1 = (kk - 1).clamp_min(0)
    out = []
    for odd in (0, 1):
        vals = _coset_table(t, float(odd), 2.0, 4)
        ci = vals.to(torch.int32)
        mag = ci.abs()
        if odd:
            bits = rice_cost(mag >> 1, kk) + 1
            bits[:, 7] -= 1
            label_a = ((ci[..., 1] - 1) >> 1) & 1
        else:
            bits = rice_cost(mag >> 1, kk) + (ci != 0)
            bits[:, 7] = rice_cost(mag[:, 7] >> 2, km1[:, 7]) + (ci[:, 7] != 0)
            label_a = (ci[..., 1] >> 1) & 1
        j, i = _best_even_labels((t.unsqueeze(-1) - vals).square() * 0.25 + lam * bits.to(dt), label_a)
        out.append((j, vals.gather(-1, i.unsqueeze(-1)).squeeze(-1)))
    use1 = out[1][0] < out[0][0]
    return torch.where(use1.unsqueeze(1), out[1][1], out[0][1]).to(torch.int32)


def rd_point(lattice: str, y: torch.Tensor, ks: torch.Tensor, block_values: int, lam: float | None = None,
             chunk_values: int | None = None) -> torch.Tensor:
    """Coordinates minimizing ``||y - p||^2 + lam * bits(p)`` per lattice vector, given the Rice parameters.

    ``y`` (..., n) float in lattice units (the flattened tensor is cut into blocks of ``block_values`` like the
    stream); ``ks`` uint8 (n_blocks, classes) as :func:`.stream.choose_ks` returns; ``lam`` squared lattice
    units per bit (default :func:`rd_lambda`). Returns int32 coordinates, same shape as ``y``. ``chunk_values``
    values per pass (default ``RDO_CHUNK`` on the CPU, 4x that on other devices); the result does not depend on it.
    """
    spec = lattice_spec(lattice)
    lam = rd_lambda(spec.name) if lam is None else float(lam)
    flat = y.reshape(-1)
    n = flat.numel()
    if chunk_values is None:
        chunk_values = RDO_CHUNK if flat.device.type == "cpu" else 4 * RDO_CHUNK
        if spec.name == "A2":  # 19 int64 candidate pairs per point: 8x smaller passes (2x faster on a CPU)
            chunk_values //= 8
    step = max(1, int(chunk_values) // block_values) * block_values
    out = torch.empty(n, dtype=torch.int32, device=flat.device)
    table = None
    if spec.name == "E8" and n:  # one bit-cost table for every pass (one host sync, not one per pass)
        dt = flat.dtype if flat.dtype == torch.float64 else torch.float32
        table = _e8_table_for(flat, int(ks.max()), lam, dt)
    for s in range(0, n, step):
        e = min(n, s + step)
        k = _coord_k(ks, s, e - s, spec.name, block_values).view(-1, spec.dim)
        if table is not None:
            out[s:e] = _rd_e8(flat[s:e].view(-1, 8).to(table[0].dtype), k, lam, table[0].dtype, table).reshape(-1)
        else:
            out[s:e] = _rd_chunk(spec.name, flat[s:e].view(-1, spec.dim), k, lam).reshape(-1)
    return out.reshape(y.shape)


def rd_nearest_point(lattice: str, y: torch.Tensor, block_values: int, rdo: bool = True) -> torch.Tensor:
    """Rate–distortion optimized lattice coordinates for ``y`` (..., n) in lattice units; int32, same shape.

    The Rice parameters used for the bit costs are those the block coder picks for the nearest points. With
    ``rdo=False`` this is the nearest point.
    """
    spec = lattice_spec(lattice)
    if rdo and cpu_kernels.usable(y):
        c = cpu_kernels.rd_nearest_point(spec.name, y, block_values, rd_lambda(spec.name))
        if c is not None:
            return c
    c0 = nearest_point(spec.name, y.reshape(-1))
    if not rdo:
        return c0.reshape(y.shape)
    ks = choose_ks(c0, spec.name, block_values)
    return rd_point(spec.name, y, ks, block_values)
