"""E8 Rice block decode, one lane per E8 vector (``rice_decode(..., impl="vectors")``): the codec's bit-stripped block
stream -> int8 (or fp8-e4m3) coordinates, the contract of :func:`.rice_decode.rice_decode`.

The default E8 decoder (``_TUNE["impl"]`` of :mod:`.rice_decode`): bit-exact against the codec on the H100, the
H200 and in Triton's CPU interpreter (tests/test_kernels.py runs every E8 decoder test on both implementations),
1.5-1.7x the units kernel's speed on the LTX-2 shapes when it was measured against it (H100), and 1.13-1.25x faster
since: 0.167 ms per 67M weights to int8 on the H200 (bench/RESULTS.md).

Why a second design: the units kernel walks every unary terminator with one lane per 16-bit unit and works on
(vectors, 8) tiles whose per-vector values Triton broadcasts across lanes (~170-200 Gvalues/s on the H100). Here the
unit of work is the E8 vector: one lane owns whole 8-coordinate vectors, so nothing crosses lanes but a few prefix
sums per block. The decode is bound by instruction issue on the integer pipes (ncu: ~67% of issue slots busy, DRAM
~6%), so the common case is kept to 32-bit operations with few instructions per value, block-wide prefix sums and
reductions (shared memory and a barrier each) are kept few, and the launch caps registers at 64 (some spill) so that
8 programs fit an SM.

* pass 1 cuts the unary section into runs of ``lane_words`` consecutive words, one run per lane (3 x 128 lanes:
  one step covers a 4096-value block's ~262 words at 4 bits per weight): a prefix sum of the lanes' zero counts
  ranks their terminators, and every 8th terminator (the end of a vector's unary run) is located inside its word by
  a popcount binary search, in as many rounds as the step's fullest word has vector ends (one (sum, max)
  reduction gives that and the step's terminator count); its bit position + 1, where the next vector's run starts,
  goes to a per-program scratch row (4 bytes per vector);
* pass 2 takes tiles of up to ``sub // 8`` vectors. In the common tile (~99% at 4 bits per weight) every run is
  shorter than an escape's and the low bits of a vector fit 32 bits: a lane reads one 32-bit window of its run's
  terminators and takes them lowest first (find first set, clear it), and one 32-bit window of low bits (a window
  is one funnel shift of the two words it spans). Other tiles first pack the quotients one byte per coordinate in
  a 64-bit register, from a 32- or 64-bit window, or (runs longer than 64 bits) a fresh window per coordinate, and
  read escapes and wide low-bit fields on their own. E8's parity rules rebuild the stripped bits exactly as the
  codec does. The absolute values are packed as output bytes (clamped int8, or magnitudes for e4m3), four to a
  32-bit half, until a prefix sum over the tile places each vector's sign bits. The present (signed) coordinates
  are the nonzero bytes, but an odd vector's, whose first 7 always are and last never is; each present byte takes
  the sign bit of its rank among them by one byte permute (PRMT), and the signs go onto all 8 bytes at once (two's
  complement for int8, the sign bit for e4m3). The 8 bytes leave as one 64-bit store (the output must be 8-byte
  aligned).

Error flags per block as the units kernel's, plus 8: an escaped value small enough to be coded directly (the
codec rejects that stream too). No read leaves its block.
"""

from __future__ import annotations

import functools

import torch

from ._bits import bit_helpers, decode_scratch
from ._launch import CachedLauncher
from ._triton import interpreting, jit_cache, num_sms

#: E8 coordinates per vector: a lane's unit of work
_D = 8


@jit_cache
def _kernel():
    # Triton resolves a jitted function's callees and ``tl`` through the module globals, so the helpers are bound
    # there (built lazily: importing this module never imports Triton).
    global tl, _popc, _lowest, _read32, _read64, _first_zero64, _select, _quotients, _tile_quotients, \
        _run_starts, _tile_magnitudes, _block_header, _e8_even_vectors, _e4m3x2_bits, _word_terminators, \
        _vector_ends, _store_run_starts, _sum_max, _nonzero_bytes, _byte_prmt, _rank_nibbles, _window32
    import triton
    import triton.language as tl

    h = bit_helpers()
    _popc, _lowest, _block_header, _e8_even_vectors = h.popc, h.lowest, h.block_header, h.e8_even_vectors
    _e4m3x2_bits = h.e4m3x2_bits

    @triton.jit
    def _read32(wp, pos, nbits, nwords, mask):
        # ``nbits`` (0..32) bits LSB-first at bit ``pos`` of the block at ``wp`` (``nwords`` words) as uint32;
        # words outside the block read as 0
        wi = pos >> 5
        off = (pos & 31).to(tl.uint32)
        lo = tl.load(wp + wi, mask=mask & (wi >= 0) & (wi < nwords), other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(wp + wi + 1, mask=mask & (wi >= -1) & (wi + 1 < nwords) & ((pos & 31) + nbits > 32),
                     other=0).to(tl.uint32, bitcast=True)
        v = (lo >> off) | ((hi << 1) << (31 - off))
        m = tl.where(nbits >= 32, tl.full(v.shape, 0xFFFFFFFF, tl.uint32),
                     (tl.full(v.shape, 1, tl.uint32) << tl.minimum(nbits, 31).to(tl.uint32)) - 1)
        return v & m

    @triton.jit
    def _window32(wp, pos, nwords, mask, HW: tl.constexpr):
        # the 32 bits LSB-first at bit ``pos`` of the block at ``wp`` (``nwords`` words) as uint32; words outside
        # the block read as 0 (one unsigned compare each: a negative index from a corrupt stream is out too). The
        # two words it spans are joined by one funnel shift on the GPU
        wi = pos >> 5
        lo = tl.load(wp + wi, mask=mask & (wi.to(tl.uint32, bitcast=True) < nwords), other=0)
        hi = tl.load(wp + wi + 1, mask=mask & ((wi + 1).to(tl.uint32, bitcast=True) < nwords), other=0)
        lo = lo.to(tl.uint32, bitcast=True)
        hi = hi.to(tl.uint32, bitcast=True)
        if HW:
            return tl.inline_asm_elementwise("shf.r.wrap.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                             [lo, hi, pos.to(tl.uint32, bitcast=True)], dtype=tl.uint32,
                                             is_pure=True, pack=1)
        else:
            off = (pos & 31).to(tl.uint32)
            return (lo >> off) | ((hi << 1) << (31 - off))

    @triton.jit
    def _read64(wp, pos, nwords, mask, other):
        # 64 bits LSB-first at bit ``pos`` as uint64; words outside the block read as ``other`` (0 or -1)
        wi = pos >> 5
        a = tl.load(wp + wi, mask=mask & (wi >= 0) & (wi < nwords), other=other)
        b = tl.load(wp + wi + 1, mask=mask & (wi >= -1) & (wi + 1 < nwords), other=other)
        c = tl.load(wp + wi + 2, mask=mask & (wi >= -2) & (wi + 2 < nwords), other=other)
        a = a.to(tl.uint32, bitcast=True).to(tl.uint64)
        b = b.to(tl.uint32, bitcast=True).to(tl.uint64)
        c = c.to(tl.uint32, bitcast=True).to(tl.uint64)
        off = (pos & 31).to(tl.uint64)
        return ((a | (b << 32)) >> off) | ((c << 32) << (32 - off))

    @triton.jit
    def _first_zero64(x, HW: tl.constexpr):
        # index of the lowest zero bit of uint64 lanes (64: none)
        lo = (x & 0xFFFFFFFF).to(tl.uint32) ^ 0xFFFFFFFF
        hi = (x >> 32).to(tl.uint32) ^ 0xFFFFFFFF
        return tl.where(lo != 0, _lowest(lo, HW), tl.where(hi != 0, 32 + _lowest(hi, HW), 64))

    @triton.jit
    def _select(x, t, HW: tl.constexpr):
        # index of the ``t``-th (from 0) set bit of uint32 lanes ``x``, for ``t < popc(x)``: binary search on
        # the popcounts of halves
        pos = t * 0
        for s in tl.static_range(5):
            lo = _popc(x & ((1 << (16 >> s)) - 1), HW)
            up = t >= lo
            t = tl.where(up, t - lo, t)
            x = tl.where(up, x >> (16 >> s), x)
            pos += tl.where(up, 16 >> s, 0)
        return pos

    @triton.jit
    def _word_terminators(wp, wi, ws, before, nwords, HW: tl.constexpr):
        # word ``wi`` of the unary section (first word ``ws``, whose ``before`` bits belong to the section ahead)
        # with its terminators (zeros) as set bits, and their count; words past the block read as no terminators
        w = tl.load(wp + wi, mask=wi < nwords, other=-1).to(tl.uint32, bitcast=True)
        inv = w ^ 0xFFFFFFFF
        inv = tl.where(wi == ws, inv & (before ^ 0xFFFFFFFF), inv)
        return inv, _popc(inv, HW)

    @triton.jit
    def _vector_ends(z, zr):
        # how many of a word's ``z`` terminators, the first of rank ``zr``, end a vector (rank 7 mod 8)
        t0 = (7 - zr) & 7
        return tl.where(z > t0, ((z - 1 - t0) >> 3) + 1, 0)

    @triton.jit
    def _store_run_starts(sp, inv, z, zr, wi, cnt, ends, HW: tl.constexpr):
        # the start bit of the run after each vector-ending terminator of word ``wi`` (``ends``: the most any word
        # of the step holds, so lanes with fewer store nothing in the last rounds) into the scratch row ``sp``
        t0 = (7 - zr) & 7
        for s in range(ends):
            t = t0 + 8 * s
            ok = (t < z) & (zr + t < cnt)
            tl.store(sp + ((zr + t + 1) >> 3), wi * 32 + _select(inv, t, HW) + 1, mask=ok)

    @triton.jit
    def _nonzero_bytes(v):
        # 0x01 in each nonzero byte of uint32 lanes, 0x00 elsewhere (no carry crosses a byte)
        return ((((v & 0x7F7F7F7F) + 0x7F7F7F7F) | v) >> 7) & 0x01010101

    @triton.jit
    def _byte_prmt(a, b, sel, HW: tl.constexpr):
        # byte permute of uint32 lanes: byte i of the result is byte (nibble i of ``sel``, 0-7) of the 8 bytes
        # b:a (a holds bytes 0-3); the GPU's PRMT instruction, or the same by shifts in the interpreter
        if HW:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.uint32,
                                             is_pure=True, pack=1)
        else:
            ab = a.to(tl.uint64) | (b.to(tl.uint64) << 32)
            r = tl.zeros(a.shape, tl.uint32)
            for i in tl.static_range(4):
                idx = ((sel >> (4 * i)) & 7).to(tl.uint64)
                r |= ((ab >> (8 * idx)) & 0xFF).to(tl.uint32) << (8 * i)
            return r

    @triton.jit
    def _rank_nibbles(e):
        # bytes e0..e3 (each < 8) of uint32 lanes as the nibbles of a PRMT selector: e0 | e1 << 4 | e2 << 8 | e3 << 12
        x = e | (e >> 4)
        return (x & 0xFF) | ((x >> 8) & 0xFF00)

    @triton.jit
    def _sum_max(a0, b0, a1, b1):
        return a0 + a1, tl.maximum(b0, b1)

    @triton.jit
    def _quotients(wp, u, nwords, gmask, SPAN: tl.constexpr, ESC_Q: tl.constexpr, HW: tl.constexpr):
        # The 8 unary quotients of each vector whose run starts at bit ``u``: packed one byte each (saturated at
        # 255) in uint64, the vector's escape count, and whether a run exceeded the escape code. SPAN bounds the
        # tile's runs: 32 or 64, one window per vector, whose terminators (zeros) are taken lowest first (find
        # first set, clear it: 32-bit operations only); 0, runs longer than 64 bits: a fresh 64-bit window is read
        # before each coordinate.
        qp = tl.zeros(u.shape, tl.uint64)
        ne = u * 0
        bad = u < 0
        if SPAN == 32:
            tlo = _window32(wp, u, nwords, gmask, HW) ^ 0xFFFFFFFF     # terminators as set bits
            thi = tlo * 0
        else:
            win = _read64(wp, u, nwords, gmask, -1)
            tlo = (win & 0xFFFFFFFF).to(tl.uint32) ^ 0xFFFFFFFF
            thi = (win >> 32).to(tl.uint32) ^ 0xFFFFFFFF
        prev = u * 0 - 1
        p = u
        for j in tl.static_range(8):            # the E8 vector's coordinates
            if SPAN == 0:
                win = _read64(wp, p, nwords, gmask, -1)
                q = _first_zero64(win, HW)
                p += q + 1
            elif SPAN == 32:
                pos = _lowest(tlo, HW)
                tlo = tlo & (tlo - 1)
                q = pos - prev - 1
                prev = pos
            else:
                inlo = tlo != 0
                pos = tl.where(inlo, _lowest(tlo, HW), 32 + _lowest(thi, HW))
                tlo = tl.where(inlo, tlo & (tlo - 1), tlo)
                thi = tl.where(inlo, thi, thi & (thi - 1))
                q = pos - prev - 1
                prev = pos
            qp |= tl.minimum(q, 255).to(tl.uint64) << (8 * j)
            ne += (q == ESC_Q).to(tl.int32)
            bad = bad | (q > ESC_Q)
        return qp, ne, bad & gmask

    @triton.jit
    def _run_starts(sp, g, gmask):
        # the tile's vectors' unary run starts (scratch row of pass 1) and its longest run, bits
        u = tl.load(sp + g, mask=gmask, other=0)
        span = tl.max(tl.where(gmask, tl.load(sp + g + 1, mask=gmask, other=0) - u, 0), 0)
        return u, span

    @triton.jit
    def _tile_quotients(wp, u, span, gmask, nwords, ESC_Q: tl.constexpr, HW: tl.constexpr):
        # quotients of the tile's vectors (see _quotients) through the cheapest window that holds every run
        if span > 64:
            qp, ne, bad = _quotients(wp, u, nwords, gmask, 0, ESC_Q, HW)
        elif span > 32:
            qp, ne, bad = _quotients(wp, u, nwords, gmask, 64, ESC_Q, HW)
        else:
            qp, ne, bad = _quotients(wp, u, nwords, gmask, 32, ESC_Q, HW)
        return qp, ne, bad

    @triton.jit
    def _tile_magnitudes(wp, nwords, gi, gmask, qp, term, lw, lp, k, k7, ev, par, has_esc, esc_start,
                         esc_rank, end_bit, err, amax, INLINE: tl.constexpr, SG: tl.constexpr,
                         ESC_Q: tl.constexpr, CHECK: tl.constexpr, OUT_FP8: tl.constexpr,
                         HW: tl.constexpr):
        # Packed one byte per coordinate, coordinates 0-3 in ``vlo`` and 4-7 in ``vhi`` (uint32): for int8 output the
        # absolute values |c| = 2 m + parity clamped to 127 (the signs are applied to all 8 bytes at once), for fp8
        # the magnitudes m saturated at 255 (|c| then exceeds e4m3's 448 anyway); and the magnitude sum. A
        # coordinate is present (has a sign bit) exactly where its byte is nonzero, but for an odd vector's: all
        # of its first 7 are, its last never (see _present_bytes). INLINE: a tile whose runs
        # are all shorter than an escape's and whose low bits fit 32: quotients straight from the vectors' 32-bit
        # windows of terminators ``term`` (no escapes, no saturation), low bits from the 32-bit ``lw``; otherwise
        # quotients from the packed ``qp``, escapes read from their section, low bits by the window that fits.
        D: tl.constexpr = 8
        vlo = tl.zeros([SG], tl.uint32)
        vhi = tl.zeros([SG], tl.uint32)
        msum = gi * 0
        prev = gi * 0 - 1
        for j in tl.static_range(D):
            if j == D - 1:
                keff = k7
            else:
                keff = gi * 0 + k
            if INLINE:
                pos = _lowest(term, HW)
                term = term & (term - 1)
                q = pos - prev - 1
                prev = pos
                fm32 = (tl.full([SG], 1, tl.uint32) << keff.to(tl.uint32)) - 1
                low = ((lw.to(tl.uint32) >> (j * k).to(tl.uint32)) & fm32).to(tl.int32)
                m = (q << keff) | low
            else:
                q = ((qp >> (8 * j)) & 0xFF).to(tl.int32)
                if k * D <= 32:
                    fm32 = (tl.full([SG], 1, tl.uint32) << keff.to(tl.uint32)) - 1
                    low = ((lw.to(tl.uint32) >> (j * k).to(tl.uint32)) & fm32).to(tl.int32)
                elif k * D <= 64:
                    fm = (tl.full([SG], 1, tl.uint64) << keff.to(tl.uint64)) - 1
                    low = ((lw >> (j * k).to(tl.uint64)) & fm).to(tl.int32)
                else:
                    low = _read32(wp, lp + j * k, keff, nwords, gmask).to(tl.int32)
                m = (tl.minimum(q, ESC_Q - 1) << keff) | low
                if has_esc:
                    esc = gmask & (q == ESC_Q)
                    epos = esc_start + esc_rank * 32
                    e32 = _window32(wp, epos, nwords, esc & (epos + 32 <= end_bit), HW)
                    m = tl.where(esc, e32.to(tl.int32, bitcast=True), m)
                    esc_rank += esc.to(tl.int32)
                    if CHECK:
                        small = (e32 >> keff.to(tl.uint32)) < ESC_Q
                        err = err | (tl.max((esc & small).to(tl.int32), 0) * 8)
            if j == D - 1:
                mag = tl.where(ev == 1, 2 * m + (msum & 1), m)
            else:
                mag = m
            msum += mag
            magu = mag.to(tl.uint32, bitcast=True)
            if INLINE:          # no escapes: |c| < 2**10
                val = 2 * mag + par
            else:               # an escaped magnitude of 2**31 or more reads negative as int32: saturate unsigned
                val = 2 * tl.minimum(magu, 1 << 29).to(tl.int32) + par
            if OUT_FP8:
                byte = tl.minimum(magu, 255)        # |c| = 2 m + parity becomes e4m3 bits with the signs
            else:
                byte = tl.minimum(val, 127).to(tl.uint32)
            if j < 4:
                vlo |= byte << (8 * j)
            else:
                vhi |= byte << (8 * (j - 4))
            if CHECK:
                amax = tl.maximum(amax, tl.max(tl.where(gmask, val, 0), 0))
        return vlo, vhi, msum, err, amax

    @triton.jit
    def rice_decode_kernel(words_ptr, offs_ptr, ks_ptr, out_ptr, scratch_ptr, err_ptr, amax_ptr, n, nb,
                           BV: tl.constexpr, SG: tl.constexpr, NT: tl.constexpr, NWU: tl.constexpr,
                           UW: tl.constexpr, SROW: tl.constexpr, OUT_FP8: tl.constexpr, ESC_Q: tl.constexpr,
                           CHECK: tl.constexpr, HWN: tl.constexpr, HW: tl.constexpr):
        D: tl.constexpr = 8                                  # _D: Triton reads no plain globals
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        gi = tl.arange(0, SG)
        wu = tl.arange(0, NWU)
        # the shared int8 scratch area holds an int32 row per program (the start bit of each vector's run); the
        # pointer is cast here rather than the tensor viewed per call (host time: one launch per layer call)
        sp = scratch_ptr.to(tl.pointer_type(tl.int32)) + (pid + 0 * n).to(tl.int64) * SROW
        out64 = out_ptr.to(tl.pointer_type(tl.uint64))
        for b in range(pid, nb, nprog):
            wp, nwords, end_bit, v0, cnt, k, kpos = _block_header(words_ptr, offs_ptr, ks_ptr, b, n, BV)
            ng = cnt // D                                        # vectors
            err = cnt * 0
            # one parity bit per vector in the head; even vectors strip their last magnitude's low bit
            n_even = _e8_even_vectors(wp, ng, nwords, HWN, HW)
            head = ng
            un_start = head + cnt * k - kpos * n_even
            # ---- pass 1: where each vector's unary run starts ----------------------------------------------------
            tl.store(sp, un_start)
            ws = un_start >> 5
            before = (tl.full([], 1, tl.uint32) << (un_start & 31).to(tl.uint32)) - 1   # bits ahead of the section
            carry = cnt * 0
            c = cnt * 0
            # a step covers NWU * UW words, UW consecutive ones per lane: one prefix sum and one reduction per step
            # (at 4 bits per weight a 4096-value block's unary section is ~262 words: one step of 3 x 128)
            while (carry < cnt) & (ws + c * (NWU * UW) < nwords):
                wi0 = ws + c * (NWU * UW) + wu * UW
                inv0, z0 = _word_terminators(wp, wi0, ws, before, nwords, HW)
                zl = z0
                if UW > 1:
                    inv1, z1 = _word_terminators(wp, wi0 + 1, ws, before, nwords, HW)
                    zl += z1
                if UW > 2:
                    inv2, z2 = _word_terminators(wp, wi0 + 2, ws, before, nwords, HW)
                    zl += z2
                if UW > 3:
                    inv3, z3 = _word_terminators(wp, wi0 + 3, ws, before, nwords, HW)
                    zl += z3
                zr0 = carry + tl.cumsum(zl, 0) - zl              # rank of the lane's first terminator
                ends = _vector_ends(z0, zr0)
                if UW > 1:
                    zr1 = zr0 + z0
                    ends = tl.maximum(ends, _vector_ends(z1, zr1))
                if UW > 2:
                    zr2 = zr1 + z1
                    ends = tl.maximum(ends, _vector_ends(z2, zr2))
                if UW > 3:
                    zr3 = zr2 + z2
                    ends = tl.maximum(ends, _vector_ends(z3, zr3))
                # the step's terminators, and the most vector ends in one of its words: at 4 bits per weight a word
                # holds ~16 terminators, so 2-3 rounds of selects instead of the 4 a 32-bit word can need
                step_terms, max_ends = tl.reduce((zl, ends), 0, _sum_max)
                _store_run_starts(sp, inv0, z0, zr0, wi0, cnt, max_ends, HW)
                if UW > 1:
                    _store_run_starts(sp, inv1, z1, zr1, wi0 + 1, cnt, max_ends, HW)
                if UW > 2:
                    _store_run_starts(sp, inv2, z2, zr2, wi0 + 2, cnt, max_ends, HW)
                if UW > 3:
                    _store_run_starts(sp, inv3, z3, zr3, wi0 + 3, cnt, max_ends, HW)
                carry += step_terms
                c += 1
            err = err | (carry < cnt).to(tl.int32)
            tl.debug_barrier()                                   # the scratch row is read by other lanes next
            esc_start = tl.load(sp + ng)                         # the bit after the last terminator
            # ---- the block's escape count: the sign section starts after the escapes ---------------------------
            n_esc = cnt * 0
            if NT > 1:
                for t in range(NT):
                    g = t * SG + gi
                    u, span = _run_starts(sp, g, g < ng)
                    qp, ne, bad = _tile_quotients(wp, u, span, g < ng, nwords, ESC_Q, HW)
                    n_esc += tl.sum(ne, 0)
            # ---- pass 2: tiles of SG vectors ----------------------------------------------------------------------
            ev_carry = cnt * 0
            esc_carry = cnt * 0
            sign_carry = cnt * 0
            amax = cnt * 0
            for t in range(NT):
                g = t * SG + gi
                gmask = g < ng
                u, span = _run_starts(sp, g, gmask)
                # every run shorter than an escape's (8 terminators + at most ESC_Q - 1 ones) and the low bits
                # within 32 bits: the common tile, whose quotients are read inline below
                inline = (span < D + ESC_Q) & (k * D <= 32)
                if inline:                                       # no escapes: no prefix sum of them either
                    qp = tl.zeros([SG], tl.uint64)
                    bad = gi < 0
                    term = _window32(wp, u, nwords, gmask, HW) ^ 0xFFFFFFFF    # terminators as set bits
                    esc_rank = gi * 0
                    tile_esc = cnt * 0
                else:
                    qp, ne, bad = _tile_quotients(wp, u, span, gmask, nwords, ESC_Q, HW)
                    term = tl.zeros([SG], tl.uint32)
                    esc_rank = esc_carry + tl.cumsum(ne, 0) - ne
                    tile_esc = tl.sum(ne, 0)
                if NT == 1:
                    n_esc = tile_esc
                tail_start = esc_start + n_esc * 32
                if CHECK:
                    err = err | (tl.max(bad.to(tl.int32), 0) * 4) | ((tail_start > end_bit).to(tl.int32) * 2)
                par = (tl.load(wp + (g >> 5), mask=gmask & ((g >> 5) < nwords), other=0) >> (g & 31)) & 1
                odd = par == 1
                ev = (gmask & (par == 0)).to(tl.int32)
                lp = head + g * (D * k) - kpos * (ev_carry + tl.cumsum(ev, 0) - ev)
                ev_carry += tl.sum(ev, 0)
                esc_carry += tile_esc
                has_esc = tile_esc > 0
                k7 = tl.maximum(k - ev, 0)                       # coordinate 7 of an even vector is stripped
                small_k = k * D <= 64
                if k * D <= 32:
                    lw = _window32(wp, lp, nwords, gmask, HW).to(tl.uint64)
                else:
                    lw = _read64(wp, lp, nwords, gmask & small_k, 0)
                if inline:
                    vlo, vhi, msum, err, amax = _tile_magnitudes(
                        wp, nwords, gi, gmask, qp, term, lw, lp, k, k7, ev, par, has_esc, esc_start, esc_rank,
                        end_bit, err, amax, True, SG, ESC_Q, CHECK, OUT_FP8, HW)
                else:
                    vlo, vhi, msum, err, amax = _tile_magnitudes(
                        wp, nwords, gi, gmask, qp, term, lw, lp, k, k7, ev, par, has_esc, esc_start, esc_rank,
                        end_bit, err, amax, False, SG, ESC_Q, CHECK, OUT_FP8, HW)
                # signs: a vector's are consecutive in the tail, one read per vector. Present coordinates as 0x01
                # bytes: the nonzero ones, but an odd vector's first 7 all are and its last never is
                plo = tl.where(odd, 0x01010101, _nonzero_bytes(vlo))
                phi = tl.where(odd, 0x00010101, _nonzero_bytes(vhi))
                # each byte's rank among the vector's present coordinates (exclusive prefix sums by multiplies)
                clo = plo * 0x01010101
                elo = clo - plo
                ehi = phi * 0x01010101 - phi + (clo >> 24) * 0x01010101
                pg = (((plo + phi) * 0x01010101) >> 24).to(tl.int32)
                sbase = tail_start + sign_carry + tl.cumsum(pg, 0) - pg
                sign_carry += tl.sum(pg, 0)
                if CHECK:
                    err = err | (tl.max((gmask & (sbase + pg > end_bit)).to(tl.int32), 0) * 2)
                # a full 32-bit window: bits past the vector's pg signs are never picked (a byte's rank is below pg
                # where it is present, and absent bytes are masked off)
                sw = _window32(wp, sbase, nwords, gmask & (pg > 0) & (sbase + pg <= end_bit), HW)
                # the vector's sign bits as bytes, and each present coordinate takes the one of its rank
                slo = ((sw & 0xF) * 0x00204081) & 0x01010101
                shi = (((sw >> 4) & 0xF) * 0x00204081) & 0x01010101
                nlo = _byte_prmt(slo, shi, _rank_nibbles(elo), HW) & plo
                nhi = _byte_prmt(slo, shi, _rank_nibbles(ehi), HW) & phi
                # an odd vector's last sign makes the sum 0 mod 4: parity of (sum of magnitudes - negatives)
                nneg = (((nlo + nhi) * 0x01010101) >> 24).to(tl.int32)
                nhi |= tl.where(odd, ((msum - nneg) & 1).to(tl.uint32) << 24, 0)
                # nlo/nhi: 0x01 in each negative coordinate's byte
                if OUT_FP8:
                    outp = (nlo.to(tl.uint64) | (nhi.to(tl.uint64) << 32)) << 7    # e4m3's sign bit
                    for j in tl.static_range(D // 2):            # the GPU converts two bytes per instruction
                        if j < 2:
                            vh = vlo
                        else:
                            vh = vhi
                        clo_b = 2 * ((vh >> (16 * (j % 2))) & 0xFF).to(tl.int32) + par
                        chi_b = 2 * ((vh >> (16 * (j % 2) + 8)) & 0xFF).to(tl.int32) + par
                        pair = _e4m3x2_bits(tl.minimum(chi_b, 448), tl.minimum(clo_b, 448), HW)
                        outp |= pair.to(tl.uint64) << (16 * j)
                else:
                    # two's complement of the negative bytes; none is 0 (a signed |c| is >= 1), so no carry
                    olo = (vlo ^ (nlo * 0xFF)) + nlo
                    ohi = (vhi ^ (nhi * 0xFF)) + nhi
                    outp = olo.to(tl.uint64) | (ohi.to(tl.uint64) << 32)
                tl.store(out64 + (v0 // D + g), outp, mask=gmask)
            if CHECK:
                tl.store(amax_ptr + b, amax)
                tl.store(err_ptr + b, err)
            tl.debug_barrier()   # the next block reuses this program's scratch row

    return CachedLauncher(rice_decode_kernel)


#: launch shape: persistent programs per SM, warps, unary words per step of pass 1 (``chunk_words``, in runs of
#: ``lane_words`` consecutive words per lane), coordinates per tile of pass 2 (H100 sweep of 16 launch shapes
#: without a cap, bench_kernels.py --decoder-ab: the best three within 1.5%). 384 words in runs of 3 cover the
#: ~262-word unary section of a 4096-value block at 4 bits per weight in one step (128 words per step took three,
#: the last almost empty)
#: maxnreg: a register cap per thread for ptxas (None: ptxas chooses, 128 at 4 warps with Triton 3.6). Capped at 64
#: with 32 programs per SM the kernel spills 54 registers but runs 8 programs per SM instead of 4: 1.18-1.25x faster
#: on the H100 (bench/RESULTS.md, 14:31 UTC sweep of caps 64-96)
_TUNE = {"programs_per_sm": 32, "num_warps": 4, "chunk_words": 384, "lane_words": 3, "sub": 4096,
         "maxnreg": 64}
#: the most consecutive unary words one lane of pass 1 takes (the kernel unrolls up to this many)
MAX_LANE_WORDS = 4


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=64)
def _launch_plan(bv: int, tile: int, cw: int, uw: int, num_warps: int, maxnreg, interp: bool):
    """The launch constants of a block size and launch shape, computed once (this runs per layer call, so its host
    time counts): the scratch row length (int32 per program) and the kernel's constexpr / option keywords."""
    if tile < _D or tile & (tile - 1):
        raise ValueError(f"sub must be a power of two of at least {_D} coordinates, got {tile}")
    if not 1 <= uw <= MAX_LANE_WORDS:
        raise ValueError(f"lane_words must be 1 to {MAX_LANE_WORDS}, got {uw}")
    lanes = cw // uw if cw > 0 and cw % uw == 0 else 0
    if lanes & (lanes - 1) or not lanes:
        raise ValueError(f"chunk_words must be lane_words ({uw}) times a power of two, got {cw}")
    sg = min(_pow2_at_least(bv // _D), tile // _D)
    nt = -(-(bv // _D) // sg)
    srow = nt * sg + 1
    kw = dict(BV=bv, SG=sg, NT=nt, NWU=lanes, UW=uw, SROW=srow, HWN=_pow2_at_least(-(-(bv // _D) // 32)),
              HW=not interp, num_warps=num_warps)
    if maxnreg and not interp:           # a ptxas option: nothing to cap in the interpreter
        kw["maxnreg"] = maxnreg
    return srow, kw


def launch(words, offsets, ks, out, err_arg, amax_arg, n: int, nb: int, block_values: int, esc_q: int, *,
           stats: bool, programs=None, num_warps=None, chunk_words=None, lane_words=None, sub=None, maxnreg=None,
           stream=None) -> None:
    """Launch the kernel on validated arguments (:func:`.rice_decode.rice_decode` checks them): ``out`` (n,) int8
    or float8_e4m3fn, 8-byte aligned; ``err_arg``/``amax_arg`` int32 (nb,) (written when ``stats``)."""
    srow, kw = _launch_plan(int(block_values), sub or _TUNE["sub"], chunk_words or _TUNE["chunk_words"],
                            lane_words or _TUNE["lane_words"], num_warps or _TUNE["num_warps"],
                            maxnreg or _TUNE["maxnreg"], interpreting())
    if out.data_ptr() % 8:
        raise ValueError("the vector decoder stores 8 bytes per vector: out must be 8-byte aligned")
    dev = words.device
    nprog = max(1, min(nb, programs or num_sms(dev.index or 0) * _TUNE["programs_per_sm"]))
    scratch = decode_scratch(dev, nprog * srow * 4, stream)
    # ks is (n_blocks, 1) or (n_blocks,): the kernel reads it flat
    _kernel()((nprog,), words, offsets, ks if ks.is_contiguous() else ks.reshape(-1), out, scratch, err_arg,
              amax_arg, int(n), nb, OUT_FP8=out.dtype == torch.float8_e4m3fn, ESC_Q=esc_q, CHECK=stats,
              stream=stream, **kw)
