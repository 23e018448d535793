"""Pairs of lattice coordinates <-> ranks in a 2-D lattice's norm order: the symbols the A2, Z and D4 streams code.

After the RHT, a pair of consecutive values is an isotropic 2-D Gaussian, whose squared norm is exponentially
distributed; the number of lattice points inside a disk grows with its area, so a point's *rank* in the order
of increasing norm is close to geometrically distributed, the distribution a Rice code is optimal for (to
~0.03 bits per symbol). Coding ranks costs ~0.02–0.05 bits per value over the index entropy at 3–5 bps, where
sign–magnitude Rice coding of each coordinate cost 0.10–0.24.

Kinds of table (``kind`` argument), each a prefix of the order of its points by an integer key, ties broken by
``c1`` then ``c0`` (smaller first):

* ``"A2"``: A2 points ``(c0, c1)`` (codec coordinates, point = ``(c0/2, c1·√3/2)``, ``c0 ≡ c1 mod 2``), key
  ``c0² + 3·c1²`` (= 4·squared norm); the first ``A2_RANK_TABLE`` ranks are tabulated.
* ``"Z2"``: integer pairs, key ``c0² + c1²``; the table holds every pair with key ``<= Z2_RANK_NORM2``
  (``Z2_RANK_TABLE`` of them). Z codes consecutive coordinate pairs, D4 the first pair of each vector.
* ``"Z2coset"``: integer pairs ranked within their checkerboard coset ``(c0 + c1) mod 2`` (two tables, even and
  odd, each holding the coset's pairs with key ``<= Z2_RANK_NORM2``: ``Z2_COSET_RANK_TABLE[coset]``). D4's
  second pair lies in the coset of its first (the vector's sum is even), so the decoder knows which table.

A point outside its table has the *escape* rank (:func:`escape_rank`): the table's size, for ``"Z2coset"`` the
larger coset table's size ``Z2_COSET_ESCAPE`` for both cosets; the stream then carries its coordinates raw.
Tables are built once per (kind, device) and cached.
"""

from __future__ import annotations

import math

import torch

from .constants import A2_RANK_TABLE, Z2_COSET_ESCAPE, Z2_COSET_RANK_TABLE, Z2_RANK_NORM2, Z2_RANK_TABLE

KINDS = ("A2", "Z2", "Z2coset")
_TABLES: dict = {}


def _order(g0: torch.Tensor, g1: torch.Tensor, key: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """Permutation sorting the points by (key, c1, c0); all int64 and exact."""
    return torch.argsort((key * (2 * b1 + 1) + (g1 + b1)) * (2 * b0 + 1) + (g0 + b0))


def _build(kind: str) -> dict:
    """CPU tables of ``kind``: points int32 (T, 2) in rank order (Z2coset: even coset's then odd coset's),
    ``base`` first row of each coset, rank LUT int32 over the box |c0| <= b0, |c1| <= b1 (escape rank outside
    the table), ``esc`` escape rank, ``sizes`` table size(s)."""
    if kind == "A2":
        t = A2_RANK_TABLE
        # a disk of key <= nmax holds ~ pi/(2*sqrt 3) * nmax points; 5% margin so it holds at least t
        nmax = int(t * 2.0 * math.sqrt(3.0) / math.pi * 1.05) + 64
        b0, b1 = math.isqrt(nmax), math.isqrt(nmax // 3)
    else:
        nmax = Z2_RANK_NORM2
        b0 = b1 = math.isqrt(nmax)
    c0 = torch.arange(-b0, b0 + 1, dtype=torch.int64)
    c1 = torch.arange(-b1, b1 + 1, dtype=torch.int64)
    g0, g1 = torch.meshgrid(c0, c1, indexing="ij")
    g0, g1 = g0.reshape(-1), g1.reshape(-1)
    if kind == "A2":
        ok = ((g0 - g1) & 1) == 0
        g0, g1 = g0[ok], g1[ok]
        key = g0 * g0 + 3 * g1 * g1
    else:
        key = g0 * g0 + g1 * g1
    inside = key <= nmax
    g0, g1, key = g0[inside], g1[inside], key[inside]
    if kind == "A2":
        if g0.numel() < A2_RANK_TABLE:
            raise AssertionError("A2 rank table disk too small")  # construction bug, not bad input
        order = _order(g0, g1, key, b0, b1)[:A2_RANK_TABLE]
        groups, esc = [order], (A2_RANK_TABLE,)
    elif kind == "Z2":
        groups, esc = [_order(g0, g1, key, b0, b1)], (Z2_RANK_TABLE,)
    else:
        groups = []
        for cs in (0, 1):
            sel = (((g0 + g1) & 1) == cs).nonzero().squeeze(1)
            groups.append(sel[_order(g0[sel], g1[sel], key[sel], b0, b1)])
        esc = Z2_COSET_RANK_TABLE
    if tuple(int(o.numel()) for o in groups) != tuple(esc):
        raise AssertionError(f"{kind} rank table has {[o.numel() for o in groups]} points, expected {esc}")
    sizes = torch.tensor(esc, dtype=torch.int64)
    esc = Z2_COSET_ESCAPE if kind == "Z2coset" else esc[0]
    lut = torch.full((2 * b0 + 1, 2 * b1 + 1), -1, dtype=torch.int32)
    pts, base = [], [0]
    for cs, o in enumerate(groups):
        lut[g0[o] + b0, g1[o] + b1] = torch.arange(o.numel(), dtype=torch.int32)
        pts.append(torch.stack((g0[o], g1[o]), 1))
        base.append(base[-1] + o.numel())
    pts = torch.cat(pts).to(torch.int32)
    lut = torch.where(lut < 0, torch.full_like(lut, esc), lut)  # outside the table: the escape rank
    return dict(pts=pts, base=torch.tensor(base[:-1], dtype=torch.int64), sizes=sizes, lut=lut, b0=b0, b1=b1,
                esc=esc)


def _tables(kind: str, device) -> dict:
    if kind not in KINDS:
        raise ValueError(f"unknown rank table kind {kind!r}; choose one of {KINDS}")
    key = (kind, str(torch.device(device)))
    if key not in _TABLES:
        cpu = _TABLES.get((kind, "cpu"))
        if cpu is None:
            cpu = _TABLES[(kind, "cpu")] = _build(kind)
        if key not in _TABLES:
            _TABLES[key] = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in cpu.items()}
    return _TABLES[key]


def escape_rank(kind: str) -> int:
    """The escape rank of ``kind``: ``A2_RANK_TABLE``, ``Z2_RANK_TABLE`` or ``Z2_COSET_ESCAPE``."""
    return {"A2": A2_RANK_TABLE, "Z2": Z2_RANK_TABLE, "Z2coset": Z2_COSET_ESCAPE}[kind]


def table_sizes(kind: str) -> tuple[int, ...]:
    """Points in ``kind``'s table(s): one size, or (even, odd) for ``"Z2coset"``; a rank at or above its table's
    size that is not the escape rank is malformed."""
    return {"A2": (A2_RANK_TABLE,), "Z2": (Z2_RANK_TABLE,), "Z2coset": Z2_COSET_RANK_TABLE}[kind]


def rank_points(c: torch.Tensor, kind: str) -> torch.Tensor:
    """Coordinate pairs (..., 2m) int -> rank of each pair in ``kind``'s table, int64 (numel/2,).

    A pair outside the table gets the escape rank (:func:`escape_rank`). ``"A2"`` expects A2 points
    (``c0 ≡ c1 mod 2``); ``"Z2coset"`` ranks each pair within its own coset.
    """
    t = _tables(kind, c.device)
    b0, b1 = t["b0"], t["b1"]
    g = c.reshape(-1, 2).to(torch.int64)
    inbox = (g[:, 0].abs() <= b0) & (g[:, 1].abs() <= b1)
    i0 = torch.where(inbox, g[:, 0] + b0, torch.zeros_like(g[:, 0]))
    i1 = torch.where(inbox, g[:, 1] + b1, torch.zeros_like(g[:, 1]))
    r = t["lut"][i0, i1].to(torch.int64)
    return torch.where(inbox, r, torch.full_like(r, t["esc"]))


def unrank_points(r: torch.Tensor, kind: str, coset: torch.Tensor | None = None) -> torch.Tensor:
    """Ranks int (n,), each below its table's size -> coordinate pairs int32 (n, 2).

    ``coset`` (int (n,), 0/1) selects the table of each rank for ``"Z2coset"``.
    """
    t = _tables(kind, r.device)
    idx = r.to(torch.int64)
    if kind == "Z2coset":
        if coset is None:
            raise ValueError("Z2coset ranks need the coset of each pair")
        idx = idx + t["base"][coset.to(torch.int64)]
    return t["pts"][idx]


def packed_table(kind: str, device) -> torch.Tensor:
    """``kind``'s points in rank order as one int32 per pair, ``(c1 << 16) | (c0 & 0xFFFF)`` (both fit int16),
    for the GPU decoder's gather; ``"Z2coset"``: the even coset's table, then the odd coset's."""
    t = _tables(kind, device)
    if "packed" not in t:
        p = t["pts"].to(torch.int64)
        if int(p.abs().max()) >= 1 << 15:
            raise AssertionError("rank table coordinates exceed int16")
        v = (p[:, 1] << 16) | (p[:, 0] & 0xFFFF)
        t["packed"] = torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)
    return t["packed"]
