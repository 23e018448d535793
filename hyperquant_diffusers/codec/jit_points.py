"""numba kernels of the nearest-point and rate–distortion quantizers (:mod:`.lattices`, :mod:`.rdo`,
:mod:`.rank_rdo`) on the CPU.

Imported only by :mod:`.cpu_kernels`. Every kernel repeats the torch reference's float32 operations one for one
(same operations, same order, round-half-to-even, first index on ties, no fused multiply–add: numba compiles
without fastmath), so the coordinates are bit-identical; ``tests/test_codec_cpu_kernels.py`` checks it. The one
place where torch's order is not the obvious one is a float32 sum of 8 values along a row (E8 distances and
Lagrangians): it depends on torch's CPU vector width, so ``order`` tells the kernels which one to repeat
(:mod:`.cpu_kernels` measures it).

Inputs are float32 values in lattice units, flat (n,) with ``block_values`` per Rice block; kernels work on a
range of blocks ``[b0, b1)`` (or of vectors) and are ``nogil``, so ranges run in threads. Coordinates come out
int32 in the codec's representation (see :mod:`.lattices`). The wrapper only calls them where every float32
operation stays exact on integers (|y| below ``cpu_kernels.MAX_ABS_Y``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .constants import ESCAPE_BITS
from .jit_stream import _NBUCKETS, KIND_E8, KIND_RANK, _rank, _rice_cost, block_symbols, cost_table
from .rank_rdo import _REACH

#: Codes of the lattices in these kernels.
LAT_Z, LAT_A2, LAT_D4, LAT_E8 = 0, 1, 2, 3
#: ``order`` of an 8-value float32 sum: left to right from 0 (torch with 8-float vectors, e.g. AVX2), or
#: torch's 4-way interleaved scalar sum (((a0+a4) + (a1+a5)) + (a2+a6)) + (a3+a7) (16-float vectors, AVX512).
SUM8_SEQUENTIAL, SUM8_ILP4 = 0, 1

_F0 = np.float32(0.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_THREE = np.float32(3.0)
_FMAX = np.float32(np.finfo(np.float32).max)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _sum8(a, order):
    """float32 sum of a[0:8] in torch's order (see ``order``). Both orders are computed and one is selected:
    a branch here keeps the compiler from holding ``a`` in registers (2.5x slower E8 kernels)."""
    seq = _F0
    for i in range(8):
        seq = seq + a[i]
    ilp = (((a[0] + a[4]) + (a[1] + a[5])) + (a[2] + a[6])) + (a[3] + a[7])
    return ilp if order == SUM8_ILP4 else seq


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _nearest_dn(x, f, n):
    """``lattices._nearest_dn`` of one row ``x[:n]`` (float32, n = 4 or 8) into ``f``: rounded, and if the sum is
    odd the coordinate farthest from its rounding (first on ties) rounded the other way. The sum of rounded
    values is exact in any order below ``cpu_kernels.MAX_ABS_Y``. Selects, not branches: the parity is a coin
    flip, and mispredicted branches would cost more than the arithmetic."""
    s = _F0
    for i in range(n):
        f[i] = np.rint(x[i])
        s = s + f[i]
    best = -_ONE
    j = 0
    for i in range(n):
        e = abs(x[i] - f[i])
        gt = e > best
        j = i if gt else j
        best = e if gt else best
    step = _ONE if x[j] - f[j] >= _F0 else -_ONE
    f[j] = f[j] + (step if (np.int64(s) & 1) != 0 else _F0)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _nearest_e8(y, o, out, g, g1, f0, f1, d, order):
    """``lattices.nearest_e8`` of the vector y[o:o+8] into out[o:o+8] (scratch g, g1, f0, f1, d: float32 (8,)):
    the nearest points of D8 and of D8 + 1/2, whichever is closer (D8 on ties)."""
    for i in range(8):
        g[i] = y[o + i]
        g1[i] = g[i] - _HALF
    _nearest_dn(g, f0, 8)
    _nearest_dn(g1, f1, 8)
    for i in range(8):
        f1[i] = f1[i] + _HALF
    for i in range(8):
        t = g[i] - f0[i]
        d[i] = t * t
    d0 = _sum8(d, order)
    for i in range(8):
        t = g[i] - f1[i]
        d[i] = t * t
    d1 = _sum8(d, order)
    use1 = d1 < d0
    for i in range(8):
        out[o + i] = np.int32((f1[i] if use1 else f0[i]) * _TWO)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _nearest_a2(u, v0, sqrt3):
    """``lattices.nearest_a2`` of one pair: (c0, c1) int64."""
    v = v0 / sqrt3
    i0 = np.rint(u)
    j0 = np.rint(v)
    i1 = np.rint(u - _HALF) + _HALF
    j1 = np.rint(v - _HALF) + _HALF
    a = u - i0
    b = v - j0
    d0 = a * a + _THREE * (b * b)
    a = u - i1
    b = v - j1
    d1 = a * a + _THREE * (b * b)
    if d1 < d0:
        return np.int64(np.rint(_TWO * i1)), np.int64(np.rint(_TWO * j1))
    return np.int64(np.rint(_TWO * i0)), np.int64(np.rint(_TWO * j0))


@njit(cache=True, nogil=True, error_model="numpy")
def nearest_range(lat, y, s, e, out, sqrt3, order):
    """Nearest points of the values y[s:e] (whole vectors) into out[s:e] (int32)."""
    if lat == LAT_Z:
        for i in range(s, e):
            out[i] = np.int32(np.rint(y[i]))
    elif lat == LAT_A2:
        for i in range(s, e, 2):
            c0, c1 = _nearest_a2(y[i], y[i + 1], sqrt3)
            out[i] = np.int32(c0)
            out[i + 1] = np.int32(c1)
    elif lat == LAT_D4:
        x = np.empty(4, dtype=np.float32)
        f = np.empty(4, dtype=np.float32)
        for o in range(s, e, 4):
            for i in range(4):
                x[i] = y[o + i]
            _nearest_dn(x, f, 4)
            for i in range(4):
                out[o + i] = np.int32(f[i])
    else:
        g = np.empty(8, dtype=np.float32)
        g1 = np.empty(8, dtype=np.float32)
        f0 = np.empty(8, dtype=np.float32)
        f1 = np.empty(8, dtype=np.float32)
        d = np.empty(8, dtype=np.float32)
        for o in range(s, e, 8):
            _nearest_e8(y, o, out, g, g1, f0, f1, d, order)


@njit(cache=True, nogil=True, error_model="numpy")
def nearest_stats(lat, y, b0, b1, block_values, n_total, sqrt3, order, lut_a, ba0, ba1, esc_a, lut_b, bb0, bb1,
                  esc_b, period, table, msum, nsym):
    """Per block in [b0, b1): the nearest points (kept in a scratch block), then their Rice bits for every k,
    symbol sum and count (``jit_stream.block_stats``' first outputs): what ``rdo.rd_nearest_point`` needs of
    the nearest points to choose the Rice parameters."""
    kind = KIND_E8 if lat == LAT_E8 else KIND_RANK
    cblk = np.empty(block_values, dtype=np.int32)
    sym = np.empty(block_values, dtype=np.int64)
    shift = np.empty(block_values, dtype=np.int64)
    hist = np.zeros((2, _NBUCKETS), dtype=np.int64)
    for b in range(b0, b1):
        s = b * block_values
        e = min(s + block_values, n_total)
        nearest_range(lat, y[s:e], 0, e - s, cblk, sqrt3, order)
        ns, _, _, _, _ = block_symbols(kind, cblk, 0, e - s, lut_a, ba0, ba1, esc_a, lut_b, bb0, bb1, esc_b,
                                       period, sym, shift)
        msum[b] = cost_table(sym, shift, ns, hist, table[b])
        nsym[b] = ns


# ---- rate–distortion optimized points ----------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _rd_e8_coset(y, o, a, lam_bits, row7, row0, best, pen, alt, off, ai, order):
    """``rdo._rd_e8_coset`` for the vector y[o:o+8] and the coset values ``a`` (float32 (8,), doubled
    coordinates at or below 2y), bit costs in ``lam_bits`` rows ``row0 + a`` (``row7 + a`` for the last
    coordinate): returns J of the coset's best point, whose doubled coordinates are ``off + ai`` (int32 (8,));
    ``best``, ``pen``, ``alt`` are scratch. Selects rather than branches: the choices are close to coin flips,
    and mispredictions would cost more than the arithmetic."""
    odd_labels = 0
    for i in range(8):
        ai[i] = np.int32(a[i])
        h = a[i] * _HALF
        row = (row7 if i == 7 else row0) + ai[i]
        yi = y[o + i]
        # candidates a-2, a, a+2, a+4: J = (y - c/2)^2 + lam * bits(c)
        t = yi - (h - _ONE)
        c0 = t * t + lam_bits[row, 0]
        t = yi - (h + _F0)
        c1 = t * t + lam_bits[row, 1]
        t = yi - (h + _ONE)
        c2 = t * t + lam_bits[row, 2]
        t = yi - (h + _TWO)
        c3 = t * t + lam_bits[row, 3]
        a_first = c1 <= c3  # best of a's label: a beats a+4
        b_first = c0 <= c2  # best of the other label: a-2 beats a+2
        ja = min(c1, c3)
        jb = min(c0, c2)
        ua = ja <= jb
        off_a = 0 if a_first else 4
        off_b = -2 if b_first else 2
        off[i] = off_a if ua else off_b
        alt[i] = off_b if ua else off_a
        best[i] = min(ja, jb)
        pen[i] = abs(ja - jb)
        odd_labels += ((ai[i] >> 1) & 1) + (0 if ua else 1)
    seq = _F0  # _sum8, written out: the call form is 2x slower here
    for i in range(8):
        seq = seq + best[i]
    ilp = (((best[0] + best[4]) + (best[1] + best[5])) + (best[2] + best[6])) + (best[3] + best[7])
    total = ilp if order == SUM8_ILP4 else seq
    # odd label sum: the coordinate whose switch costs least (first on ties) takes its other label's best
    pmin = pen[0]
    jmin = 0
    for i in range(1, 8):
        lt = pen[i] < pmin
        jmin = i if lt else jmin
        pmin = pen[i] if lt else pmin
    odd = (odd_labels & 1) == 1
    total = total + (pmin if odd else _F0)
    off[jmin] = alt[jmin] if odd else off[jmin]
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def rd_e8_blocks(y, ks, b0, b1, block_values, n_total, lam_bits, width, cmax, order, out):
    """``rdo._rd_e8`` (table-driven) of the blocks [b0, b1) with Rice parameter ``ks[b]`` into ``out`` (int32).
    ``lam_bits`` (rows, 4) float32 is ``rdo._e8_cost_table(kmax, cmax, ...)``, ``width`` its ``2 cmax - 5``."""
    ae = np.empty(8, np.float32)
    ao = np.empty(8, np.float32)
    best = np.empty(8, np.float32)
    pen = np.empty(8, np.float32)
    alt = np.empty(8, np.int32)
    offe = np.empty(8, np.int32)
    offo = np.empty(8, np.int32)
    aie = np.empty(8, np.int32)
    aio = np.empty(8, np.int32)
    for b in range(b0, b1):
        s = b * block_values
        e = min(s + block_values, n_total)
        # rows of (k, class, a): (4 k + class) * width + a + cmax - 2; classes even, even last, odd, odd last
        base = ks[b] * (4 * width) + (cmax - 2)
        for o in range(s, e, 8):
            for i in range(8):
                t = _TWO * y[o + i]
                ae[i] = np.floor(t / _TWO) * _TWO
                ao[i] = np.floor((t - _ONE) / _TWO) * _TWO + _ONE
            je = _rd_e8_coset(y, o, ae, lam_bits, base + width, base, best, pen, alt, offe, aie, order)
            jo = _rd_e8_coset(y, o, ao, lam_bits, base + 3 * width, base + 2 * width, best, pen, alt, offo, aio,
                              order)
            u = jo < je
            for i in range(8):
                out[o + i] = (offo[i] + aio[i]) if u else (offe[i] + aie[i])


def _spiral(reach: int) -> np.ndarray:
    """Offsets (d0, d1) within ``reach`` of a pair, nearest first, with their index in ``rank_rdo._offsets``'
    order (d0 outer, d1 inner): int64 (C, 3)."""
    offs = [(d0, d1, (d0 + reach) * (2 * reach + 1) + d1 + reach)
            for d0 in range(-reach, reach + 1) for d1 in range(-reach, reach + 1)]
    return np.array(sorted(offs, key=lambda o: (o[0] ** 2 + o[1] ** 2, o[2])), dtype=np.int64)


#: rank_rdo's candidate offsets (``_REACH``), nearest first: near candidates set a low bar early, and a
#: candidate whose distance alone exceeds the best J so far is never scored (its J can only be larger).
_SPIRAL = _spiral(_REACH)


@njit(cache=True, nogil=True, error_model="numpy")
def _pair_best(y0, y1, k, lam, lut, bl0, bl1, esc, parity):
    """Over the integer pairs within 2 of the rounded (y0, y1), the first minimum (in ``rank_rdo._offsets``
    order) of ``J = dist + lam * bits`` (``rank_rdo._pair_costs``), among pairs of coordinate-sum parity
    ``parity`` (-1: all pairs); returns (J, c0, c1)."""
    r0 = np.int64(np.rint(y0))
    r1 = np.int64(np.rint(y1))
    best_j = _FMAX
    best_i = 1 << 30
    b0c, b1c = r0, r1
    for o in range(_SPIRAL.shape[0]):
        c0 = r0 + _SPIRAL[o, 0]
        c1 = r1 + _SPIRAL[o, 1]
        if parity >= 0 and ((c0 + c1) & 1) != parity:
            continue
        t0 = np.float32(c0) - y0
        t1 = np.float32(c1) - y1
        dist = t0 * t0 + t1 * t1
        if best_i < (1 << 30) and dist > best_j:  # J >= dist > best J: cannot win
            continue
        r = _rank(lut, bl0, bl1, esc, c0, c1)
        bits = _rice_cost(r, k) + (2 * ESCAPE_BITS if r == esc else 0)
        j = dist + lam * np.float32(bits)
        idx = _SPIRAL[o, 2]
        if j < best_j or (j == best_j and idx < best_i):
            best_j, best_i, b0c, b1c = j, idx, c0, c1
    return best_j, b0c, b1c


@njit(cache=True, nogil=True, error_model="numpy")
def rd_rank_blocks(lat, y, ks, b0, b1, block_values, n_total, lam, sqrt3, h1, lut_a, ba0, ba1, esc_a, lut_b, bb0,
                   bb1, esc_b, ring, out):
    """Rate–distortion optimal points of Z, D4 (``rank_rdo``) or A2 (``rdo._rd_chunk``'s ring search) for the
    blocks [b0, b1) with Rice parameter ``ks[b]``, into ``out`` (int32). ``lam`` float32; A2: ``sqrt3`` and
    ``h1`` (float32 √3 and √3/2, as the reference rounds them), ``ring`` int64 (19, 2) the offsets searched."""
    for b in range(b0, b1):
        s = b * block_values
        e = min(s + block_values, n_total)
        k = ks[b]
        if lat == LAT_Z:
            for o in range(s, e, 2):
                _, c0, c1 = _pair_best(y[o], y[o + 1], k, lam, lut_a, ba0, ba1, esc_a, -1)
                out[o] = np.int32(c0)
                out[o + 1] = np.int32(c1)
        elif lat == LAT_D4:
            k2 = max(k - 1, 0)
            cc = np.zeros(8, dtype=np.int64)
            for o in range(s, e, 4):
                best = _FMAX
                sel = 0
                for par in range(2):
                    ja, a0, a1 = _pair_best(y[o], y[o + 1], k, lam, lut_a, ba0, ba1, esc_a, par)
                    jb, c2, c3 = _pair_best(y[o + 2], y[o + 3], k2, lam, lut_b, bb0, bb1, esc_b, par)
                    cc[4 * par] = a0
                    cc[4 * par + 1] = a1
                    cc[4 * par + 2] = c2
                    cc[4 * par + 3] = c3
                    tot = ja + jb
                    if par == 0:
                        best = tot
                    elif tot < best:
                        sel = 1
                for i in range(4):
                    out[o + i] = np.int32(cc[4 * sel + i])
        else:
            h0 = _HALF
            for o in range(s, e, 2):
                u = y[o]
                v = y[o + 1]
                n0, n1 = _nearest_a2(u, v, sqrt3)
                best_j = _FMAX
                bc0, bc1 = n0, n1
                for j in range(ring.shape[0]):
                    c0 = n0 + ring[j, 0]
                    c1 = n1 + ring[j, 1]
                    t0 = np.float32(c0) * h0 - u
                    t1 = np.float32(c1) * h1 - v
                    dist = t0 * t0 + t1 * t1
                    if j > 0 and dist > best_j:
                        continue
                    r = _rank(lut_a, ba0, ba1, esc_a, c0, c1)
                    bits = _rice_cost(r, k) + (2 * ESCAPE_BITS if r == esc_a else 0)
                    jj = dist + lam * np.float32(bits)
                    if j == 0 or jj < best_j:
                        best_j, bc0, bc1 = jj, c0, c1
                out[o] = np.int32(bc0)
                out[o + 1] = np.int32(bc1)
