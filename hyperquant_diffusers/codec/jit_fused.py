"""numba kernel of ``quantize``'s last step in one pass per block: values -> (RDO) lattice points -> Rice words.

Imported only by :mod:`.cpu_kernels`. The separate kernels (:mod:`.jit_points`, :mod:`.jit_stream`) need two
passes because the Rice parameters come from a search whose window is shared by every block of a call
(``rice.best_rice_k``). But whatever the window, a block's parameter is almost always its cost's first minimum
over every k. So per block this kernel takes that minimum, for the nearest points (the RDO's bit costs) and
again for the chosen points (the stream's), and packs the block right away, while its values are in cache. It
also records what every window would give (``jit_stream.window_ks``); :mod:`.cpu_kernels` finds the window the
reference's search stops at and checks the guesses: if one is wrong it discards the result and runs the
separate kernels, so the output is always theirs (and the torch reference's).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .constants import MAX_RICE_K
from .jit_points import LAT_E8, nearest_range, rd_e8_blocks, rd_rank_blocks
from .jit_stream import _NBUCKETS, KIND_E8, KIND_RANK, block_symbols, cost_table, pack_block, window_ks


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_blocks(lat, rdo, y, row_steps, row_len, b0, b1, block_values, n_total, sqrt3, h1, order, lam32,
                    lam_bits, width, cmax,
                    ring, lut_a, ba0, ba1, esc_a, lut_b, bb0, bb1, esc_b, period, ks0, ks, blk_words, kt0, mask0,
                    kt1, mask1, words):
    """Blocks [b0, b1) of the flat float32 values ``y / row_steps[i // row_len]`` (lattice units; the division of
    ``tensor.quantize``, float32 as there): coordinates (nearest, or with ``rdo`` the
    RDO points for the nearest points' Rice parameter ``ks0[b]``), their Rice parameter ``ks[b]``, words
    ``blk_words[b]``.
    The parameters taken are the rows' first minimum over every k; ``kt0``/``mask0`` (the nearest points', with
    ``rdo``) and ``kt1``/``mask1`` (the stream's) are what each window of the reference's search gives and its
    edge mask (``jit_stream.window_ks``), for the caller to check the guess. The blocks are packed one after the
    other into ``words`` (uint32, zero on entry); returns the words used, or -1 when they do not fit."""
    kind = KIND_E8 if lat == LAT_E8 else KIND_RANK
    c = np.empty(block_values, dtype=np.int32)
    yb = np.empty(block_values, dtype=np.float32)
    sym = np.empty(block_values, dtype=np.int64)
    shift = np.empty(block_values, dtype=np.int64)
    qc = np.empty(block_values, dtype=np.int64)
    hist = np.zeros((2, _NBUCKETS), dtype=np.int64)
    row = np.empty(MAX_RICE_K + 1, dtype=np.int64)
    kb = np.empty(1, dtype=np.int64)
    w = 0
    cap = words.shape[0]
    for b in range(b0, b1):
        s = b * block_values
        e = min(s + block_values, n_total)
        i = s
        while i < e:  # row by row: one integer division per row, not per value
            r = i // row_len
            j1 = min(e, (r + 1) * row_len)
            st = row_steps[r]
            for j in range(i, j1):
                yb[j - s] = y[j] / st
            i = j1
        nearest_range(lat, yb, 0, e - s, c, sqrt3, order)
        ns, head, tail, _, _ = block_symbols(kind, c, 0, e - s, lut_a, ba0, ba1, esc_a, lut_b, bb0, bb1, esc_b,
                                             period, sym, shift)
        if rdo:
            msum = cost_table(sym, shift, ns, hist, row)
            mask0[b], kb[0] = window_ks(row, msum, ns, kt0[b])
            ks0[b] = kb[0]
            if lat == LAT_E8:
                rd_e8_blocks(yb, kb, 0, 1, block_values, e - s, lam_bits, width, cmax, order, c)
            else:
                rd_rank_blocks(lat, yb, kb, 0, 1, block_values, e - s, lam32, sqrt3, h1, lut_a, ba0, ba1, esc_a,
                               lut_b, bb0, bb1, esc_b, ring, c)
            ns, head, tail, _, _ = block_symbols(kind, c, 0, e - s, lut_a, ba0, ba1, esc_a, lut_b, bb0, bb1, esc_b,
                                                 period, sym, shift)
        msum = cost_table(sym, shift, ns, hist, row)
        mask1[b], k = window_ks(row, msum, ns, kt1[b])
        ks[b] = k
        nw = (head + tail + row[k] + 31) // 32
        blk_words[b] = nw
        if w + nw > cap:
            return -1
        pack_block(kind, c, 0, e - s, sym, shift, ns, k, words, w, w + nw, qc, esc_a, esc_b, period)
        w += nw
    return w
