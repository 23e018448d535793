"""Parallel decode of the codec's pair-rank-coded block streams (Z, D4, A2) -> int8 (or fp8-e4m3) coordinates.

The stream layout is :mod:`hyperquant_diffusers.codec.stream`'s for the rank-coded lattices: per block of
``block_values`` consecutive coordinates, one Rice symbol per coordinate *pair* (``block_values / 2`` symbols),
laid out ``[low k_j bits per symbol][unary q ones + a zero per symbol][32-bit Rice escapes][raw escaped pairs]``,
LSB first in int32 words, each block starting at ``offsets[b]`` words, no head. Symbol ``j`` has Rice parameter
``k_j = k`` (Z, A2, and the first pair of each D4 vector) or ``max(k - 1, 0)`` (the second pair of a D4 vector,
odd ``j``). Its value is a rank in a table of :mod:`hyperquant_diffusers.codec.rank_index`:

* Z: every pair in ``"Z2"``; A2: every point in ``"A2"``;
* D4: even ``j`` (pair (c0, c1)) in ``"Z2"``, odd ``j`` (pair (c2, c3)) in ``"Z2coset"``, the table of the
  coset ``(c0 + c1) mod 2`` of the same vector's first pair.

A rank equal to the table's escape rank is followed, in the block's tail, by the pair's coordinates raw (two
32-bit two's-complement fields, first coordinate first; escaped pairs in symbol order).

One Triton program decodes one block at a time (a persistent grid walks the blocks), every symbol in parallel:

* the low bits sit at ``j*k`` (D4: ``j*k - (j >> 1)`` when ``k > 0``, the odd symbols having one bit fewer);
* the unary section becomes one quotient per symbol in a per-program scratch row through the pass the E8 decoder
  uses (``unary_pass`` of :mod:`._bits`), which also counts the Rice escapes;
* Rice escapes and escaped pairs are placed by two-level prefix counts;
* a rank becomes its pair by one gather from the rank table, packed as one int32 per pair
  (``(c1 << 16) | (c0 & 0xFFFF)``, :func:`~hyperquant_diffusers.codec.rank_index.packed_table`), a torch tensor on
  the device passed as a pointer.

Output: coordinates clamped to [-127, 127] as int8 (exact while ``|c| <= 127``) or to ±448 cast to float8-e4m3;
per block ``max |c|`` (so a caller can tell that a clamp happened) and an error flag per block: 1 unary section
truncated, 2 a low-bit, escape or raw-pair field past the block's end, 4 a unary run longer than the escape code
or a Rice escape holding a value small enough to be coded directly, 8 a rank beyond its table or an escaped pair
that is not a valid escape (inside its table, in the wrong coset, or not an A2 point). No read leaves its block.
"""

from __future__ import annotations

import torch

from ..codec import constants as codec_constants
from ..codec.rank_index import _tables, escape_rank, packed_table, table_sizes
from ..codec.rice import RiceStreamError
from ._bits import (bit_helpers, decode_buffers, decode_reference, decode_scratch, raise_on_flags,
                    stats_placeholder)
from ._launch import CachedLauncher
from ._pools import outside_graph_pools
from ._triton import interpreting, jit_cache, num_sms, require_triton

ESCAPE_Q = codec_constants.ESCAPE_Q
ESCAPE_BITS = codec_constants.ESCAPE_BITS
_LAT_CODE = {"Z": 0, "A2": 1, "D4": 2}


@jit_cache
def _kernel():
    # Triton resolves a jitted function's callees and ``tl`` through the module globals, so the helpers are bound
    # there (built lazily: importing this module never imports Triton).
    global tl, _read, _unary_pass, _outside, _block_header, _e4m3x2_bits
    import triton
    import triton.language as tl

    h = bit_helpers()
    _read, _unary_pass, _block_header, _e4m3x2_bits = h.read, h.unary_pass, h.block_header, h.e4m3x2_bits

    @triton.jit
    def _outside(c0, c1, A2: tl.constexpr, BOX: tl.constexpr, LN: tl.constexpr, L1: tl.constexpr,
                 L0: tl.constexpr):
        # True where the pair's key (N, c1, c0) is beyond the table's last entry (LN, L1, L0), N = c0^2 + c1^2
        # (A2: c0^2 + 3 c1^2); a pair outside the box |c| <= BOX is outside. Exact in int64 inside the box.
        inbox = (c0 <= BOX) & (c0 >= -BOX) & (c1 <= BOX) & (c1 >= -BOX)
        a0 = tl.where(inbox, c0, 0).to(tl.int64)
        a1 = tl.where(inbox, c1, 0).to(tl.int64)
        if A2:
            nn = a0 * a0 + 3 * a1 * a1
        else:
            nn = a0 * a0 + a1 * a1
        beyond = (nn > LN) | ((nn == LN) & ((a1 > L1) | ((a1 == L1) & (a0 > L0))))
        return ~inbox | beyond

    @triton.jit
    def rank_decode_kernel(words_ptr, offs_ptr, ks_ptr, tab1_ptr, tab2_ptr, out_ptr, scratch_ptr, err_ptr,
                           amax_ptr, n, nb,
                           BV: tl.constexpr, LAT: tl.constexpr, CW: tl.constexpr, OUT_FP8: tl.constexpr,
                           ESC_Q: tl.constexpr, CHECK: tl.constexpr, SUB: tl.constexpr,
                           ESC1: tl.constexpr, ESC2: tl.constexpr, SIZE2_0: tl.constexpr, SIZE2_1: tl.constexpr,
                           BOX: tl.constexpr,
                           T1N: tl.constexpr, T1C1: tl.constexpr, T1C0: tl.constexpr,
                           E0N: tl.constexpr, E0C1: tl.constexpr, E0C0: tl.constexpr,
                           E1N: tl.constexpr, E1C1: tl.constexpr, E1C0: tl.constexpr,
                           UB: tl.constexpr, HW: tl.constexpr):
        # Symbols are handled as (SR, 2) tiles: row i, column t is symbol 2i + t (D4: vector i's pair t). The
        # block-level unary pass fills the scratch row with one quotient per symbol; the per-symbol work then runs
        # over sub-chunks of SUB symbols with scalar carries (Rice-escape rank, escaped-pair rank).
        SR: tl.constexpr = SUB // 2
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        ri = tl.arange(0, SR)
        tj = tl.arange(0, 2)
        lidx = ri[:, None] * 2 + tj[None, :]                     # (SR, 2) symbol index within a sub-chunk
        col = lidx & 1
        NU: tl.constexpr = CW * (32 // UB)                      # units of the unary pass scanned per step
        sp = scratch_ptr + (pid + 0 * n).to(tl.int64) * (BV // 2)
        for b in range(pid, nb, nprog):
            wp, nwords, end_bit, v0, nvals, k, kpos = _block_header(words_ptr, offs_ptr, ks_ptr, b, n, BV)
            cnt = nvals // 2                                     # symbols in this block
            err = cnt * 0
            amax = cnt * 0
            if LAT == 2:
                un_start = cnt * k - kpos * (cnt // 2)
            else:
                un_start = cnt * k
            err = err | ((un_start > end_bit).to(tl.int32) * 2)
            # ---- unary section -> q per symbol (int8) in this program's scratch row ------------------------
            esc_start, n_resc, trunc = _unary_pass(wp, sp, un_start, cnt, nwords, NU, UB, ESC_Q, HW)
            err = err | trunc
            # Rice escapes come before the raw pairs
            tail_start = esc_start + n_resc * 32
            resc_carry = cnt * 0
            pesc_carry = cnt * 0
            for s0 in range(0, BV // 2, SUB):
                idx = s0 + lidx
                valid = (idx < cnt) & (trunc == 0)
                if LAT == 2:
                    keff = tl.maximum(k - col, 0)
                    low_pos = idx * k - kpos * (idx >> 1)
                else:
                    keff = k + col * 0
                    low_pos = idx * k
                q = tl.load(sp + idx, mask=valid, other=0).to(tl.int32)
                if CHECK:
                    err = err | (tl.max(tl.max((q > ESC_Q) & valid, 1), 0).to(tl.int32) * 4)
                lok = valid & (low_pos + keff <= end_bit)
                if CHECK:
                    err = err | (tl.max(tl.max(valid & ~lok, 1), 0).to(tl.int32) * 2)
                low = _read(wp, low_pos, keff, lok).to(tl.int32)
                r = (tl.minimum(q, ESC_Q - 1) << keff) | low
                resc = (q == ESC_Q) & valid
                e32 = resc.to(tl.int32)
                eg = tl.sum(e32, 1)
                n_e = tl.sum(eg, 0)
                if n_e > 0:
                    erank = resc_carry + (tl.cumsum(eg, 0) - eg)[:, None] + tl.cumsum(e32, 1) - e32
                    epos = esc_start + erank * 32
                    eok = resc & (epos + 32 <= end_bit)
                    ev = _read(wp, epos, erank * 0 + 32, eok)
                    if CHECK:
                        err = err | (tl.max(tl.max(resc & ~eok, 1), 0).to(tl.int32) * 2)
                        # a value whose quotient is below ESC_Q must have been coded directly
                        small = (ev >> keff.to(tl.uint32)) < ESC_Q
                        err = err | (tl.max(tl.max(eok & small, 1), 0).to(tl.int32) * 4)
                    # ranks beyond 2^31 are malformed anyway: saturate so the comparisons below flag them
                    evi = ev.to(tl.int32, bitcast=True)
                    r = tl.where(resc, tl.where(evi < 0, 0x7FFFFFFF, evi), r)
                resc_carry += n_e
                # ---- ranks -> pairs ------------------------------------------------------------------------
                if LAT == 2:
                    esc_rank = tl.where(col == 0, ESC1, ESC2)
                else:
                    esc_rank = ESC1 + col * 0
                pesc = (r == esc_rank) & valid
                err = err | (tl.max(tl.max((r > esc_rank) & valid, 1), 0).to(tl.int32) * 8)
                p32 = pesc.to(tl.int32)
                pg = tl.sum(p32, 1)
                prank = pesc_carry + (tl.cumsum(pg, 0) - pg)[:, None] + tl.cumsum(p32, 1) - p32
                pesc_carry += tl.sum(pg, 0)
                ppos = tail_start + prank * 64
                pok = pesc & (ppos + 64 <= end_bit)
                if CHECK:
                    err = err | (tl.max(tl.max(pesc & ~pok, 1), 0).to(tl.int32) * 2)
                raw0 = _read(wp, ppos, prank * 0 + 32, pok).to(tl.int32, bitcast=True)
                raw1 = _read(wp, ppos + 32, prank * 0 + 32, pok).to(tl.int32, bitcast=True)
                inner = valid & ~pesc & (r < esc_rank) & (r >= 0)
                if LAT == 2:
                    # first pairs (column 0) from the Z^2 table, then the coset of each vector's first pair
                    t1 = tl.load(tab1_ptr + r, mask=inner & (col == 0), other=0)
                    a0 = tl.where(pesc, raw0, (t1 << 16) >> 16)
                    a1 = tl.where(pesc, raw1, t1 >> 16)
                    par = (tl.sum(tl.where(col == 0, a0 + a1, 0), 1) & 1)[:, None] + col * 0
                    size2 = tl.where(par == 1, SIZE2_1, SIZE2_0)
                    in2 = inner & (col == 1) & (r < size2)
                    err = err | (tl.max(tl.max(inner & (col == 1) & (r >= size2), 1), 0).to(tl.int32) * 8)
                    t2 = tl.load(tab2_ptr + r + par * SIZE2_0, mask=in2, other=0)
                    tv = tl.where(col == 0, t1, t2)
                else:
                    tv = tl.load(tab1_ptr + r, mask=inner, other=0)
                c0 = tl.where(pesc, raw0, (tv << 16) >> 16)
                c1 = tl.where(pesc, raw1, tv >> 16)
                if CHECK:
                    # an escaped pair must lie outside its table (and in the right coset / be an A2 point)
                    if LAT == 2:
                        out1 = _outside(c0, c1, False, BOX, T1N, T1C1, T1C0)
                        oute = _outside(c0, c1, False, BOX, E0N, E0C1, E0C0)
                        outo = _outside(c0, c1, False, BOX, E1N, E1C1, E1C0)
                        outc = tl.where(par == 1, outo, oute)
                        ok_esc = tl.where(col == 0, out1, outc & (((c0 + c1) & 1) == par))
                    elif LAT == 1:
                        ok_esc = _outside(c0, c1, True, BOX, T1N, T1C1, T1C0) & (((c0 - c1) & 1) == 0)
                    else:
                        ok_esc = _outside(c0, c1, False, BOX, T1N, T1C1, T1C0)
                    err = err | (tl.max(tl.max(pok & ~ok_esc, 1), 0).to(tl.int32) * 8)
                    a64 = tl.maximum(tl.abs(c0.to(tl.int64)), tl.abs(c1.to(tl.int64)))
                    amax = tl.maximum(amax, tl.max(tl.max(tl.where(valid, tl.minimum(a64, 0x7FFFFFFF), 0), 1), 0).to(tl.int32))
                if OUT_FP8:
                    o = _e4m3x2_bits(tl.minimum(tl.maximum(c1, -448), 448), tl.minimum(tl.maximum(c0, -448), 448),
                                     HW)
                    o0 = (o & 0xFF).to(tl.uint8)
                    o1 = (o >> 8).to(tl.uint8)
                else:
                    o0 = tl.minimum(tl.maximum(c0, -127), 127).to(tl.int8).to(tl.uint8, bitcast=True)
                    o1 = tl.minimum(tl.maximum(c1, -127), 127).to(tl.int8).to(tl.uint8, bitcast=True)
                out8 = out_ptr.to(tl.pointer_type(tl.uint8))        # int8 or e4m3 bytes
                tl.store(out8 + v0 + 2 * idx, o0, mask=valid)
                tl.store(out8 + v0 + 2 * idx + 1, o1, mask=valid)
            if CHECK:
                tl.store(amax_ptr + b, amax)
                tl.store(err_ptr + b, err)
            tl.debug_barrier()   # the next block reuses this program's scratch row

    return CachedLauncher(rank_decode_kernel)


#: launch shape: best on the H100 over D4 3/4 bps and Z 4 bps of a few shapes near rice_decode's (bench/RESULTS.md)
_TUNE = {"programs_per_sm": 16, "num_warps": 4, "chunk_words": 64, "sub": 1024, "unit_bits": 16}
_KINDS = {"Z": ("Z2", "Z2"), "A2": ("A2", "A2"), "D4": ("Z2", "Z2coset")}


def _last_keys(kind: str) -> list[tuple[int, int, int]]:
    """(N, c1, c0) of the last entry of each table of ``kind`` (one, or even and odd coset)."""
    t = _tables(kind, "cpu")
    out = []
    ends = torch.cumsum(torch.tensor(table_sizes(kind)), 0) - 1
    for e in ends.tolist():
        c0, c1 = (int(x) for x in t["pts"][e])
        out.append(((c0 * c0 + 3 * c1 * c1) if kind == "A2" else (c0 * c0 + c1 * c1), c1, c0))
    return out


_LAUNCH: dict = {}


def _launch_tables(lat: str, dev) -> tuple:
    """(first table, second table, the kernel's table constants) for ``lat`` on ``dev``, built once: the decoder
    runs once per layer per forward, where host work would show next to a ~0.1 ms kernel."""
    key = (lat, str(dev))
    if key not in _LAUNCH:
        k1, k2 = _KINDS[lat]
        s2 = table_sizes("Z2coset")
        t1 = _last_keys(k1)[0]
        e0, e1 = _last_keys("Z2coset")
        box = _tables(k1, "cpu")["b0"] if lat != "D4" else _tables("Z2", "cpu")["b0"]
        kc = dict(ESC1=escape_rank(k1), ESC2=escape_rank(k2), SIZE2_0=s2[0], SIZE2_1=s2[1], BOX=box,
                  T1N=t1[0], T1C1=t1[1], T1C0=t1[2], E0N=e0[0], E0C1=e0[1], E0C0=e0[2], E1N=e1[0], E1C1=e1[1],
                  E1C0=e1[2])
        _LAUNCH[key] = outside_graph_pools(dev, lambda: (packed_table(k1, dev), packed_table(k2, dev), kc))
    return _LAUNCH[key]


def rank_decode(words: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, n: int, lattice: str,
                block_values: int, *, out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.int8,
                check: bool = False, stats: bool = True, programs: int | None = None, num_warps: int | None = None,
                chunk_words: int | None = None, sub: int | None = None, unit_bits: int | None = None,
                stream=None):
    """Decode a rank-coded codec block stream (Z, D4 or A2) on the GPU (or the Triton interpreter).

    Same contract as :func:`.rice_decode.rice_decode`: ``words`` int32 (n_words,), ``offsets`` int32/int64
    (n_blocks+1,) word offsets, ``ks`` uint8 (n_blocks, 1), ``n`` coordinates, ``lattice`` in {"Z", "D4", "A2"}
    (A2: its integer codec coordinates ``(c0, c1)``, not points). Writes ``out`` (n,) of ``out_dtype`` (int8 or
    torch.float8_e4m3fn; a view of a reused buffer may be passed) and returns ``(out, amax, err)``: per block
    ``max |c|`` int32 (n_blocks,) and error flags int32 (n_blocks,) (see the module docstring), computed when
    ``stats`` (default) or ``check``; ``stats=False, check=False`` is the fast path for a stream already checked
    once (amax and err are then None; the table gathers and all reads stay masked either way).
    ``check=True`` synchronizes and raises ``RiceStreamError`` on any error flag and ``ValueError`` if a
    coordinate was clamped. ``sub``: coordinates per sub-chunk of the per-symbol pass, ``chunk_words`` /
    ``unit_bits``: the unary pass's step (as in ``rice_decode``); ``stream`` as in ``rice_decode``.
    """
    require_triton()
    lat = str(lattice).upper()
    if lat not in _LAT_CODE:
        raise ValueError(f"the rank decoder handles the rank-coded lattices Z, D4 and A2, not {lattice!r}")
    bv = int(block_values)
    if bv % 8 or bv <= 0:
        raise ValueError(f"block_values must be a positive multiple of 8, got {block_values}")
    if int(n) % (4 if lat == "D4" else 2):
        raise ValueError(f"{n} coordinates is not a whole number of {lat} coding units")
    nb = (int(n) + bv - 1) // bv
    if offsets.numel() != nb + 1 or ks.shape[0] != nb:
        raise RiceStreamError(f"stream index describes {offsets.numel() - 1} blocks, expected {nb}")
    dev = words.device
    stats = bool(stats or check)
    out, amax, err = decode_buffers(n, nb, out, out_dtype, dev, stats)
    err_arg = err if stats else stats_placeholder(dev)
    amax_arg = amax if stats else err_arg
    nprog = max(1, min(nb, programs or num_sms(dev.index or 0) * _TUNE["programs_per_sm"]))
    scratch = decode_scratch(dev, nprog * (bv // 2), stream)
    tab1, tab2, kc = _launch_tables(lat, dev)
    s = min(bv, sub or _TUNE["sub"]) // 2   # ``sub`` counts coordinates, as in rice_decode; SUB counts pairs
    if nb:
        _kernel()((nprog,), words, offsets, ks.reshape(-1), tab1, tab2, out, scratch, err_arg, amax_arg, int(n), nb,
                            BV=bv, LAT=_LAT_CODE[lat], CW=chunk_words or _TUNE["chunk_words"],
                            OUT_FP8=out_dtype == torch.float8_e4m3fn, ESC_Q=ESCAPE_Q, CHECK=stats,
                            SUB=max(2, s), UB=unit_bits or _TUNE["unit_bits"], **kc,
                            HW=not interpreting(), num_warps=num_warps or _TUNE["num_warps"], stream=stream)
    if check and nb:
        raise_on_flags(err, amax, out_dtype, "rank-coded stream")
    return out, amax, err


#: the torch reference: the codec's decoder, clamped/cast like the kernel
rank_decode_reference = decode_reference
