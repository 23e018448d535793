"""numba kernels of the block stream (:mod:`.stream`, :mod:`.rice`) on the CPU: symbols, Rice parameters, bits.

Imported only by :mod:`.cpu_kernels` (which checks that numba is there); the torch code in :mod:`.stream` and
:mod:`.rice` is the reference these kernels reproduce bit for bit (``tests/test_codec_cpu_kernels.py``).

A kernel works on a range of blocks ``[b0, b1)`` of ``block_values`` coordinates (the last block may be
shorter), so :mod:`.cpu_kernels` can hand disjoint ranges to threads (every kernel is ``nogil``). Per block:

* the *symbols* are those of :mod:`.stream`: E8 magnitudes (parity head, sign tail), or pair ranks looked up
  in the rank tables of :mod:`.rank_index` (passed in as arrays, escape pairs' raw coordinates in the tail);
* :func:`block_stats` gives the block's Rice bits for every parameter k in [0, MAX_RICE_K] (the table that
  ``rice.rice_cost_table`` builds, from the same value buckets), the symbols' sum and count, and the raw bits;
* :func:`choose_ks` replays ``rice.best_rice_k``'s window search, whose window width is shared by all rows
  of one call (one call per group of full blocks, one for a shorter last block, as ``stream._per_block_k``);
* :func:`pack_blocks` writes the blocks at their word offsets.

Units: coordinates int32/int64, symbols and bit counts int64, words uint32 (viewed as int32 by the caller).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .constants import ESCAPE_BITS, ESCAPE_Q, MAX_RICE_K

#: Bucket width of the Rice cost histogram: ``rice._TOP`` bits (bucket ``(m >> t) + HALF * t``).
_TOP = max(5, (ESCAPE_Q - 1).bit_length())
_HALF = 1 << (_TOP - 1)
#: Buckets a histogram holds: enough for any int64 symbol below 2**62.
_NBUCKETS = (1 << _TOP) + _HALF * 63
_NK = MAX_RICE_K + 1
_MASK32 = (1 << 32) - 1

#: Lattice kinds of these kernels: E8 sign-magnitude, or rank-coded pairs (A2, Z, D4).
KIND_E8, KIND_RANK = 0, 1


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _rice_cost(m, k):
    """``rice.rice_cost`` of one value (int64)."""
    q = m >> k
    if q >= ESCAPE_Q:
        return k + ESCAPE_Q + 1 + ESCAPE_BITS
    return k + q + 1


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _bucket(m):
    """``rice._buckets`` of one value: ``(m >> t) + HALF * t`` with ``t = max(bit_length(m) - TOP, 0)``."""
    t = 0
    while (m >> t) >= (1 << _TOP):
        t += 1
    return (m >> t) + _HALF * t


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _bucket_value(b):
    """``rice._bucket_values``: a representative value of bucket ``b``."""
    t = b // _HALF - 1
    if t < 0:
        t = 0
    return (b - _HALF * t) << t


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _rank(lut, b0, b1, esc, c0, c1):
    """``rank_index.rank_points`` of one pair."""
    if -b0 <= c0 <= b0 and -b1 <= c1 <= b1:
        return np.int64(lut[c0 + b0, c1 + b1])
    return np.int64(esc)


@njit(cache=True, nogil=True, error_model="numpy")
def block_symbols(kind, c, s, e, lut_a, ba0, ba1, esc_a, lut_b, bb0, bb1, esc_b, period, sym, shift):
    """Symbols of the coordinates ``c[s:e]`` (one block) into ``sym``/``shift`` (int64 scratch).

    E8 (``kind`` KIND_E8): magnitudes ``|c| >> 1``, the last of an even vector halved again with shift -1.
    Rank-coded: the rank of each pair, pair ``j`` of a vector in table a (``j % period == 0``) or table b
    (shift -1). Returns (symbols, head bits, tail bits, largest |c|, vectors of odd sum (D4 check))."""
    n = e - s
    amax = 0
    if kind == KIND_E8:  # branch-free: zeros, signs and parities are coin flips to a branch predictor
        head = n // 8
        tail = 0
        for v in range(head):
            o = s + 8 * v
            even = np.int64((c[o] & 1) == 0)
            for i in range(8):
                x = np.int64(c[o + i])
                a = -x if x < 0 else x
                amax = max(amax, a)
                last_even = even if i == 7 else 0
                sym[8 * v + i] = (a >> 1) >> last_even
                shift[8 * v + i] = -last_even
                tail += np.int64(x != 0) & (1 if i < 7 else even)
        return n, head, tail, amax, 0
    npair = n // 2
    tail = 0
    odd_vectors = 0
    for p in range(npair):
        c0 = np.int64(c[s + 2 * p])
        c1 = np.int64(c[s + 2 * p + 1])
        for x in (c0, c1):
            a = -x if x < 0 else x
            if a > amax:
                amax = a
        if period == 2 and p % 2 == 1:
            r = _rank(lut_b, bb0, bb1, esc_b, c0, c1)
            shift[p] = -1
            if r == esc_b:
                tail += 2 * ESCAPE_BITS
            if ((np.int64(c[s + 2 * p - 2]) + np.int64(c[s + 2 * p - 1]) + c0 + c1) & 1) != 0:
                odd_vectors += 1
        else:
            r = _rank(lut_a, ba0, ba1, esc_a, c0, c1)
            shift[p] = 0
            if r == esc_a:
                tail += 2 * ESCAPE_BITS
        sym[p] = r
    return npair, 0, tail, amax, odd_vectors


@njit(cache=True, nogil=True, error_model="numpy")
def cost_table(sym, shift, n, hist, out):
    """Rice bits of ``sym[:n]`` for every k in [0, MAX_RICE_K] into ``out`` (int64 (MAX_RICE_K+1,)), each value
    coded with ``max(k + shift, 0)``; the sum of the symbols is returned. ``hist`` int64 (2, _NBUCKETS) scratch.

    The value buckets of ``rice._buckets`` share one cost at every k, so the table is a histogram of buckets
    times their costs, as in ``rice.rice_cost_table``."""
    top = 0
    total = 0
    for i in range(n):
        m = sym[i]
        total += m
        b = _bucket(m)
        hist[-shift[i], b] += 1
        if b > top:
            top = b
    for k in range(_NK):
        out[k] = 0
    for b in range(top + 1):
        h0 = hist[0, b]
        h1 = hist[1, b]
        if h0 == 0 and h1 == 0:
            continue
        rep = _bucket_value(b)
        for k in range(_NK):
            acc = 0
            if h0:
                acc += h0 * _rice_cost(rep, k)
            if h1:
                acc += h1 * _rice_cost(rep, k - 1 if k > 0 else 0)
            out[k] += acc
        hist[0, b] = 0
        hist[1, b] = 0
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def block_stats(kind, c, b0, b1, block_values, n_total, lut_a, ba0, ba1, esc_a, lut_b, bb0, bb1, esc_b, period,
                table, msum, nsym, raw, amax, odd):
    """Per block in [b0, b1): Rice bits for every k (``table`` (nb, MAX_RICE_K+1)), symbol sum and count, raw
    head + tail bits, largest |c|, D4 vectors of odd sum; all int64 arrays indexed by block."""
    sym = np.empty(block_values, dtype=np.int64)
    shift = np.empty(block_values, dtype=np.int64)
    hist = np.zeros((2, _NBUCKETS), dtype=np.int64)
    for b in range(b0, b1):
        s = b * block_values
        e = min(s + block_values, n_total)
        ns, head, tail, am, od = block_symbols(kind, c, s, e, lut_a, ba0, ba1, esc_a, lut_b, bb0, bb1, esc_b,
                                               period, sym, shift)
        msum[b] = cost_table(sym, shift, ns, hist, table[b])
        nsym[b] = ns
        raw[b] = head + tail
        amax[b] = am
        odd[b] = od


@njit(cache=True, nogil=True, error_model="numpy")
def _window_best(row, k0, lo, hi):
    """First minimum of ``row`` over k = clamp(k0 + d, 0, MAX_RICE_K), d = lo..hi; (index in the window, k)."""
    best_i, best_k, best_c = 0, 0, 0
    for i in range(hi - lo + 1):
        k = min(max(k0 + lo + i, 0), MAX_RICE_K)
        cst = row[k]
        if i == 0 or cst < best_c:
            best_i, best_k, best_c = i, k, cst
    return best_i, best_k


#: Windows ``rice.best_rice_k`` may search: t = 0 .. WINDOWS - 1 (the t-th spans k0 - 1 - 3t .. k0 + 1 + 3t).
WINDOWS = 9


@njit(cache=True, nogil=True, error_model="numpy")
def window_ks(row, msum, n, kt):
    """What ``rice.best_rice_k`` gives one row (``row`` its bits per k, ``msum`` its symbols' sum, ``n`` their
    count) in each window t: ``kt[t]``; returns the bit mask of the windows whose minimum is on the edge (the
    call's window is the first t whose bit no row of the call sets, or the last). Also returns the first
    minimum over every k, what the last window gives."""
    k0 = np.int64(math.floor(math.log2(max(msum / n, 0.0) + 1.0)))
    mask = 0
    for t in range(WINDOWS):
        lo, hi = -1 - 3 * t, 1 + 3 * t
        i, k = _window_best(row, k0, lo, hi)
        kt[t] = k
        first = min(max(k0 + lo, 0), MAX_RICE_K)
        last = min(max(k0 + hi, 0), MAX_RICE_K)
        if (i == 0 and first > 0) or (i == hi - lo and last < MAX_RICE_K):
            mask |= 1 << t
    best = 0
    for k in range(1, MAX_RICE_K + 1):
        if row[k] < row[best]:
            best = k
    return mask, best


@njit(cache=True, nogil=True, error_model="numpy")
def _group_ks(table, msum, n, g0, g1, out):
    """``rice.best_rice_k`` of the rows [g0, g1) of one call (rows of ``n`` symbols): the window around
    ``floor(log2(mean + 1))`` widens by 3 on each side while any row's minimum lies on its edge."""
    if g1 <= g0:
        return
    k0 = np.empty(g1 - g0, dtype=np.int64)
    for g in range(g0, g1):
        mean = max(msum[g] / n, 0.0)
        k0[g - g0] = np.int64(math.floor(math.log2(mean + 1.0)))
    lo, hi = -1, 1
    while True:
        edge = False
        for g in range(g0, g1):
            i, _ = _window_best(table[g], k0[g - g0], lo, hi)
            first = min(max(k0[g - g0] + lo, 0), MAX_RICE_K)
            last = min(max(k0[g - g0] + hi, 0), MAX_RICE_K)
            if (i == 0 and first > 0) or (i == hi - lo and last < MAX_RICE_K):
                edge = True
                break
        if not edge or hi - lo > 2 * MAX_RICE_K:
            break
        lo, hi = lo - 3, hi + 3
    for g in range(g0, g1):
        out[g] = _window_best(table[g], k0[g - g0], lo, hi)[1]


@njit(cache=True, nogil=True, error_model="numpy")
def choose_ks(table, msum, nsym, per):
    """Rice parameter per block (int64 (nb,)) as ``stream._per_block_k``: one search over the full blocks
    (``per`` symbols each), one over a shorter last block."""
    nb = table.shape[0]
    out = np.zeros(nb, dtype=np.int64)
    nfull = nb
    if nb and nsym[nb - 1] < per:
        nfull = nb - 1
    _group_ks(table, msum, per, 0, nfull, out)
    if nfull < nb:
        _group_ks(table, msum, nsym[nb - 1], nfull, nb, out)
    return out


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _or_bits(words, pos, value, nbits, wend):
    """OR ``value`` (< 2**nbits, nbits <= 32) into ``words`` at bit ``pos`` (LSB first); the bits there are 0.
    A field never reaches word ``wend`` (the next block's, another thread's): its high half is only written
    below it, and is 0 when the field ends in the last word."""
    v = value << (pos & 31)
    w = pos >> 5
    words[w] |= v & _MASK32
    if w + 1 < wend:
        words[w + 1] |= v >> 32


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _or_bit(words, pos, bit):
    """OR one bit (0 or 1) into ``words`` at bit ``pos``."""
    words[pos >> 5] |= bit << (pos & 31)


@njit(cache=True, nogil=True, error_model="numpy")
def pack_block(kind, c, s, e, sym, shift, ns, k, words, w0, wend, qc, esc_a, esc_b, period):
    """Write one block (coordinates ``c[s:e]``, its symbols ``sym``/``shift`` (``ns``), Rice parameter ``k``) in
    ``rice.encode_blocks``' layout (head, low bits, unary, Rice escapes, tail, word padding) into words
    [w0, wend) of ``words`` (uint32, zero on entry); ``qc`` int64 scratch.

    Fields are ORed in at positions that only grow (no serial bit writer: its carried state made it 8x slower);
    a unary section is filled with ones, then each value's terminating zero is cleared."""
    pos = w0 * 32
    if kind == KIND_E8:  # head: one parity bit per vector
        nv = (e - s) // 8
        for v in range(nv):
            _or_bit(words, pos + v, c[s + 8 * v] & 1)
        pos += nv
    ulen = 0
    for i in range(ns):  # low bits (zeros for a Rice escape)
        ke = max(k + shift[i], 0)
        q = sym[i] >> ke
        esc = q >= ESCAPE_Q
        low = 0 if esc else sym[i] - (q << ke)
        _or_bits(words, pos, low, ke, wend)
        q = ESCAPE_Q if esc else q
        qc[i] = q
        ulen += q + 1
        pos += ke
    if ulen:  # unary: min(q, ESCAPE_Q) ones then a zero per value: all ones, then clear the zeros
        end = pos + ulen
        wa = pos >> 5
        wb = (end - 1) >> 5
        words[wa] |= (_MASK32 << (pos & 31)) & _MASK32
        for w in range(wa + 1, wb + 1):
            words[w] = _MASK32
        words[wb] &= (np.int64(1) << (((end - 1) & 31) + 1)) - 1
        p = pos
        for i in range(ns):
            p += qc[i] + 1
            words[(p - 1) >> 5] &= ~(np.int64(1) << ((p - 1) & 31))
        pos = end
    for i in range(ns):  # Rice escapes: the value raw
        if qc[i] == ESCAPE_Q:
            _or_bits(words, pos, sym[i] & _MASK32, ESCAPE_BITS, wend)
            pos += ESCAPE_BITS
    if kind == KIND_E8:  # tail: sign bits of the coordinates whose sign is not implied
        for v in range((e - s) // 8):
            o = s + 8 * v
            even = np.int64((c[o] & 1) == 0)
            for i in range(8):
                x = c[o + i]
                present = np.int64(x != 0) & (1 if i < 7 else even)
                _or_bit(words, pos, np.int64(x < 0) & present)
                pos += present
    else:  # tail: raw coordinates of escaped pairs
        for p in range(ns):
            esc = esc_b if (period == 2 and p % 2 == 1) else esc_a
            if sym[p] == esc:
                for j in range(2):
                    _or_bits(words, pos, np.int64(c[s + 2 * p + j]) & _MASK32, ESCAPE_BITS, wend)
                    pos += ESCAPE_BITS


@njit(cache=True, nogil=True, error_model="numpy")
def pack_blocks(kind, c, ks, word_off, b0, b1, block_values, n_total, lut_a, ba0, ba1, esc_a, lut_b, bb0, bb1,
                esc_b, period, words):
    """Write blocks [b0, b1) of the stream from word ``word_off[b]`` on into ``words`` (uint32, zero on entry):
    :func:`pack_block` with Rice parameters ``ks``."""
    sym = np.empty(block_values, dtype=np.int64)
    shift = np.empty(block_values, dtype=np.int64)
    qc = np.empty(block_values, dtype=np.int64)
    for b in range(b0, b1):
        s = b * block_values
        e = min(s + block_values, n_total)
        ns, _, _, _, _ = block_symbols(kind, c, s, e, lut_a, ba0, ba1, esc_a, lut_b, bb0, bb1, esc_b, period,
                                       sym, shift)
        pack_block(kind, c, s, e, sym, shift, ns, ks[b], words, word_off[b], word_off[b + 1], qc, esc_a, esc_b,
                   period)
