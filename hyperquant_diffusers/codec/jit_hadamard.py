"""numba kernel of the per-tile Walsh–Hadamard transform (:mod:`.hadamard`) on the CPU.

Imported only by :mod:`.cpu_kernels`. Each tile is transformed in cache with the reference's butterflies (span
1, 2, 4, ...: ``(a + b, a - b)``, float32, same pairs, same order), then scaled by the same float32 factor, so
the result is bit-identical to ``hadamard._fwht_rows``; the optional sign flip of :func:`.rht` (an exact
multiplication by ±1) is fused into the load.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Rows transformed together: the same butterfly on _ROWS rows is one contiguous (SIMD) loop.
_ROWS = 16


@njit(cache=True, nogil=True, error_model="numpy")
def fwht_rows(x, signs, use_signs, tile, scale, r0, r1, out):
    """Rows [r0, r1) of ``x`` (R, K) float32 -> ``out`` (R, K): ``H_tile (signs * x)`` per tile, times ``scale``
    (float32); ``signs`` float32 (K,) used when ``use_signs``."""
    k = x.shape[1]
    buf = np.empty((tile, _ROWS), dtype=np.float32)  # a tile of _ROWS rows, the rows innermost
    for rb in range(r0, r1, _ROWS):
        nr = min(_ROWS, r1 - rb)
        for t0 in range(0, k, tile):
            for q in range(nr):  # rows outermost: contiguous reads
                for i in range(tile):
                    buf[i, q] = x[rb + q, t0 + i] * signs[t0 + i] if use_signs else x[rb + q, t0 + i]
            h = 1
            while h < tile:
                for j in range(0, tile, 2 * h):
                    for i in range(j, j + h):
                        for q in range(_ROWS):
                            a = buf[i, q]
                            b = buf[i + h, q]
                            buf[i, q] = a + b
                            buf[i + h, q] = a - b
                h *= 2
            for q in range(nr):
                for i in range(tile):
                    out[rb + q, t0 + i] = buf[i, q] * scale
