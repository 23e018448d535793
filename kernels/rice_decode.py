"""Parallel Rice block decode of E8 streams: the codec's bit-stripped block stream -> int8 (or fp8-e4m3) coordinates.

The stream layout is :mod:`hyperquant_diffusers.codec.stream`'s for E8: per block of ``block_values`` consecutive
coordinates of the row-major (out, in) weight, ``[parity head][low k_eff bits per value][unary q ones + a zero
per value][32-bit escapes][sign bits]``, LSB first in int32 words, each block starting at ``offsets[b]`` words.
The pair-rank-coded lattices (Z, D4, A2) have their own decoder, :mod:`.rank_decode`; :func:`rice_decode` routes
them there.

One Triton program decodes one block at a time (a persistent grid walks the blocks). The unit of work is the E8
vector: one lane owns whole 8-coordinate vectors, so nothing crosses lanes but four prefix sums per tile.

* pass 1 cuts the unary section into words, one lane each: a prefix sum of the words' zero counts ranks their
  terminators, and every 8th terminator (the end of a vector's unary run) is located inside its word by a
  popcount binary search; its bit position + 1, where the next vector's run starts, goes to a per-program scratch
  row (4 bytes per vector);
* pass 2 takes tiles of up to ``sub // 8`` vectors. A lane reads its vector's unary run as one 64-bit window (a
  tile with a run longer than 64 bits re-reads the window before each coordinate) and its low bits as one more
  (``8 k <= 64``; larger ``k`` read each field); the quotients, then the magnitudes, are packed one byte per
  coordinate in 64-bit registers between the steps. Prefix sums over the tile place the low bits (even vectors
  strip one), the escapes and the sign bits; E8's parity rules rebuild the stripped bits exactly as the codec
  does, and the 8 output bytes of a vector leave as one 64-bit store.

Output: coordinates clamped to [-127, 127] as int8 (the codec's ``int8_codes`` contract: the cast is exact while
``|c| <= 127``), or cast to float8-e4m3 for the fp8 MMA; and per block ``max |c|`` so a caller can tell that a
clamp happened, and an error flag per block (1: unary section truncated, 2: escape or sign section past the
block's end, 4: unary run longer than the escape code, 8: an escaped value small enough to be coded directly)
for malformed streams: exactly the streams the codec's decoder rejects. No read leaves its block.
"""

from __future__ import annotations

import torch

from ..codec import constants as codec_constants
from ..codec.rice import RiceStreamError
from ._bits import (bit_helpers, decode_buffers, decode_reference, decode_scratch, raise_on_flags,
                    stats_placeholder)
from ._launch import CachedLauncher
from ._triton import interpreting, jit_cache, num_sms, require_triton

ESCAPE_Q = codec_constants.ESCAPE_Q
ESCAPE_BITS = codec_constants.ESCAPE_BITS
#: E8 coordinates per vector: a lane's unit of work
_D = 8


@jit_cache
def _kernel():
    # Triton resolves a jitted function's callees and ``tl`` through the module globals, so the helpers are bound
    # there (built lazily: importing this module never imports Triton).
    global tl, _popc, _lowest, _read32, _read64, _first_zero64, _select, _quotients, _tile_quotients
    import triton
    import triton.language as tl

    h = bit_helpers()
    _popc, _lowest = h.popc, h.lowest

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
    def _quotients(wp, u, nwords, gmask, REREAD: tl.constexpr, ESC_Q: tl.constexpr, HW: tl.constexpr):
        # The 8 unary quotients of each vector whose run starts at bit ``u``: packed one byte each (saturated at
        # 255) in uint64, the vector's escape count, and whether a run exceeded the escape code. REREAD: read a
        # fresh 64-bit window before each coordinate (runs longer than one window), else one window per vector.
        qp = tl.zeros(u.shape, tl.uint64)
        ne = u * 0
        bad = u < 0
        win = _read64(wp, u, nwords, gmask, -1)
        p = u
        for j in tl.static_range(8):            # the E8 vector's coordinates
            if REREAD:
                win = _read64(wp, p, nwords, gmask, -1)
            q = _first_zero64(win, HW)
            if REREAD:
                p += q + 1
            else:
                win = tl.where(q >= 63, tl.zeros_like(win), (win >> q.to(tl.uint64)) >> 1)
            qp |= tl.minimum(q, 255).to(tl.uint64) << (8 * j)
            ne += (q == ESC_Q).to(tl.int32)
            bad = bad | (q > ESC_Q)
        return qp, ne, bad & gmask

    @triton.jit
    def _tile_quotients(wp, sp, g, gmask, nwords, ESC_Q: tl.constexpr, HW: tl.constexpr):
        # quotients of the tile's vectors ``g`` from their run starts in the scratch row (see _quotients)
        u = tl.load(sp + g, mask=gmask, other=0)
        span = tl.load(sp + g + 1, mask=gmask, other=0) - u
        if tl.max((gmask & (span > 64)).to(tl.int32), 0) > 0:
            qp, ne, bad = _quotients(wp, u, nwords, gmask, True, ESC_Q, HW)
        else:
            qp, ne, bad = _quotients(wp, u, nwords, gmask, False, ESC_Q, HW)
        return qp, ne, bad

    @triton.jit
    def rice_decode_kernel(words_ptr, offs_ptr, ks_ptr, out_ptr, scratch_ptr, err_ptr, amax_ptr, n, nb,
                           BV: tl.constexpr, SG: tl.constexpr, NT: tl.constexpr, NWU: tl.constexpr,
                           SROW: tl.constexpr, OUT_FP8: tl.constexpr, ESC_Q: tl.constexpr, CHECK: tl.constexpr,
                           HWN: tl.constexpr, HW: tl.constexpr):
        D: tl.constexpr = 8                                  # _D: Triton reads no plain globals
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        gi = tl.arange(0, SG)
        wu = tl.arange(0, NWU)
        sp = scratch_ptr + (pid + 0 * n).to(tl.int64) * SROW     # int32: the start bit of each vector's run
        out64 = out_ptr.to(tl.pointer_type(tl.uint64))
        for b in range(pid, nb, nprog):
            w0 = tl.load(offs_ptr + b).to(tl.int64)
            w1 = tl.load(offs_ptr + b + 1).to(tl.int64)
            wp = words_ptr + w0
            nwords = (w1 - w0).to(tl.int32)
            end_bit = nwords * 32
            v0 = (w0 * 0 + b) * BV
            cnt = tl.minimum(n - v0, BV).to(tl.int32)
            k = tl.load(ks_ptr + b).to(tl.int32)
            kpos = (k > 0).to(tl.int32)
            ng = cnt // D                                        # vectors
            err = cnt * 0
            # one parity bit per vector in the head; even vectors strip their last magnitude's low bit
            hw = tl.arange(0, HWN)
            hwv = tl.load(wp + hw, mask=(hw * 32 < ng) & (hw < nwords), other=0).to(tl.uint32, bitcast=True)
            nbits = tl.minimum(tl.maximum(ng - hw * 32, 0), 32)
            hmask = tl.where(nbits >= 32, tl.full([HWN], 0xFFFFFFFF, tl.uint32),
                             (tl.full([HWN], 1, tl.uint32) << tl.minimum(nbits, 31).to(tl.uint32)) - 1)
            n_even = ng - tl.sum(_popc(hwv & hmask, HW), 0)
            head = ng
            un_start = head + cnt * k - kpos * n_even
            # ---- pass 1: where each vector's unary run starts ----------------------------------------------------
            tl.store(sp, un_start)
            ws = un_start >> 5
            before = (tl.full([], 1, tl.uint32) << (un_start & 31).to(tl.uint32)) - 1   # bits ahead of the section
            carry = cnt * 0
            c = cnt * 0
            while (carry < cnt) & (ws + c * NWU < nwords):
                wi = ws + c * NWU + wu
                w = tl.load(wp + wi, mask=wi < nwords, other=-1).to(tl.uint32, bitcast=True)
                inv = w ^ 0xFFFFFFFF                             # terminators as set bits
                inv = tl.where(wi == ws, inv & (before ^ 0xFFFFFFFF), inv)
                z = _popc(inv, HW)
                zr = carry + tl.cumsum(z, 0) - z                 # rank of the word's first terminator
                t0 = (7 - zr) & 7                                # its first terminator of rank 7 mod 8
                for s in tl.static_range(4):
                    t = t0 + 8 * s
                    ok = (t < z) & (zr + t < cnt)
                    tl.store(sp + ((zr + t + 1) >> 3), wi * 32 + _select(inv, t, HW) + 1, mask=ok)
                carry += tl.sum(z, 0)
                c += 1
            err = err | (carry < cnt).to(tl.int32)
            tl.debug_barrier()                                   # the scratch row is read by other lanes next
            esc_start = tl.load(sp + ng)                         # the bit after the last terminator
            # ---- the block's escape count: the sign section starts after the escapes ---------------------------
            n_esc = cnt * 0
            if NT > 1:
                for t in range(NT):
                    g = t * SG + gi
                    qp, ne, bad = _tile_quotients(wp, sp, g, g < ng, nwords, ESC_Q, HW)
                    n_esc += tl.sum(ne, 0)
            # ---- pass 2: tiles of SG vectors ----------------------------------------------------------------------
            ev_carry = cnt * 0
            esc_carry = cnt * 0
            sign_carry = cnt * 0
            amax = cnt * 0
            for t in range(NT):
                g = t * SG + gi
                gmask = g < ng
                qp, ne, bad = _tile_quotients(wp, sp, g, gmask, nwords, ESC_Q, HW)
                if NT == 1:
                    n_esc = tl.sum(ne, 0)
                tail_start = esc_start + n_esc * 32
                if CHECK:
                    err = err | (tl.max(bad.to(tl.int32), 0) * 4) | ((tail_start > end_bit).to(tl.int32) * 2)
                par = (tl.load(wp + (g >> 5), mask=gmask & ((g >> 5) < nwords), other=0) >> (g & 31)) & 1
                odd = par == 1
                ev = (gmask & (par == 0)).to(tl.int32)
                lp = head + g * (D * k) - kpos * (ev_carry + tl.cumsum(ev, 0) - ev)
                ev_carry += tl.sum(ev, 0)
                esc_rank = esc_carry + tl.cumsum(ne, 0) - ne
                esc_carry += tl.sum(ne, 0)
                has_esc = tl.sum(ne, 0) > 0
                k7 = tl.maximum(k - ev, 0)                       # coordinate 7 of an even vector is stripped
                small_k = k * D <= 64
                lw = _read64(wp, lp, nwords, gmask & small_k, 0)
                # magnitudes: packed one byte each (saturated at 255: |c| then exceeds both clamps anyway)
                magp = tl.zeros([SG], tl.uint64)
                pm = gi * 0                                      # present (signed) coordinates, one bit each
                msum = gi * 0
                for j in tl.static_range(D):
                    q = ((qp >> (8 * j)) & 0xFF).to(tl.int32)
                    if j == D - 1:
                        keff = k7
                    else:
                        keff = gi * 0 + k
                    if small_k:
                        fm = (tl.full([SG], 1, tl.uint64) << keff.to(tl.uint64)) - 1
                        low = ((lw >> (j * k).to(tl.uint64)) & fm).to(tl.int32)
                    else:
                        low = _read32(wp, lp + j * k, keff, nwords, gmask).to(tl.int32)
                    m = (tl.minimum(q, ESC_Q - 1) << keff) | low
                    if has_esc:
                        esc = gmask & (q == ESC_Q)
                        epos = esc_start + esc_rank * 32
                        e32 = _read32(wp, epos, gi * 0 + 32, nwords, esc & (epos + 32 <= end_bit))
                        m = tl.where(esc, e32.to(tl.int32, bitcast=True), m)
                        esc_rank += esc.to(tl.int32)
                        if CHECK:
                            small = (e32 >> keff.to(tl.uint32)) < ESC_Q
                            err = err | (tl.max((esc & small).to(tl.int32), 0) * 8)
                    if j == D - 1:
                        mag = tl.where(ev == 1, 2 * m + (msum & 1), m)
                        present = (ev == 1) & (mag != 0)
                    else:
                        mag = m
                        present = (mag != 0) | odd
                    msum += mag
                    pm |= present.to(tl.int32) << j
                    # an escaped magnitude of 2**31 or more reads negative as int32: unsigned minima saturate it
                    magu = mag.to(tl.uint32, bitcast=True)
                    magp |= tl.minimum(magu, 255).to(tl.uint64) << (8 * j)
                    if CHECK:
                        big = tl.minimum(magu, 1 << 29).to(tl.int32)
                        amax = tl.maximum(amax, tl.max(tl.where(gmask, 2 * big + par, 0), 0))
                # signs: a vector's are consecutive in the tail, one read per vector
                pg = _popc(pm.to(tl.uint32), HW)
                sbase = tail_start + sign_carry + tl.cumsum(pg, 0) - pg
                sign_carry += tl.sum(pg, 0)
                if CHECK:
                    err = err | (tl.max((gmask & (sbase + pg > end_bit)).to(tl.int32), 0) * 2)
                sw = _read32(wp, sbase, pg, nwords, gmask & (pg > 0) & (sbase + pg <= end_bit))
                outp = tl.zeros([SG], tl.uint64)
                srank = gi * 0
                nneg = gi * 0
                for j in tl.static_range(D):
                    mag = ((magp >> (8 * j)) & 0xFF).to(tl.int32)
                    pj = (pm >> j) & 1
                    neg = (pj & (sw >> srank.to(tl.uint32)).to(tl.int32)) & 1
                    srank += pj
                    if j == D - 1:
                        # an odd vector's last sign makes the sum 0 mod 4: parity of (sum of magnitudes - negatives)
                        neg = tl.where(odd, (msum - nneg) & 1, neg)
                    else:
                        nneg += neg
                    val = 2 * mag + par
                    cval = tl.where(neg == 1, -val, val)
                    if OUT_FP8:
                        o = tl.minimum(tl.maximum(cval, -448), 448).to(tl.float32).to(tl.float8e4nv)
                        byte = o.to(tl.uint8, bitcast=True)
                    else:
                        byte = tl.minimum(tl.maximum(cval, -127), 127).to(tl.int8).to(tl.uint8, bitcast=True)
                    outp |= byte.to(tl.uint64) << (8 * j)
                tl.store(out64 + (v0 // D + g), outp, mask=gmask)
            if CHECK:
                tl.store(amax_ptr + b, amax)
                tl.store(err_ptr + b, err)
            tl.debug_barrier()   # the next block reuses this program's scratch row

    return CachedLauncher(rice_decode_kernel)


#: launch shape (bench/bench_kernels.py sweeps it on the device; see bench/RESULTS.md): persistent programs per SM,
#: warps, unary words per step of pass 1, coordinates per tile of pass 2
_TUNE = {"programs_per_sm": 16, "num_warps": 4, "chunk_words": 128, "sub": 4096}


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def rice_decode(words: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, n: int, lattice: str,
                block_values: int, *, out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.int8,
                check: bool = False, stats: bool = True, programs: int | None = None, num_warps: int | None = None,
                chunk_words: int | None = None, sub: int | None = None, unit_bits: int | None = None,
                stream=None):
    """Decode a codec block stream on the GPU (or the Triton interpreter).

    ``words`` int32 (n_words,), ``offsets`` int32/int64 (n_blocks+1,) word offsets, ``ks`` uint8 (n_blocks, 1),
    ``n`` coordinates, ``lattice`` "E8" (or "Z", "D4", "A2": routed to :func:`.rank_decode.rank_decode`). Writes ``out`` (n,) of ``out_dtype`` (int8 or
    torch.float8_e4m3fn; a view of a reused buffer may be passed) and returns ``(out, amax, err)``: per block
    ``max |c|`` int32 (n_blocks,) and error flags int32 (n_blocks,), computed when ``stats`` (default) or
    ``check``; ``stats=False, check=False`` is the fast path for a stream already checked once (amax and err are
    then None). ``check=True`` synchronizes and raises ``RiceStreamError`` on any error flag and
    ``ValueError`` if a coordinate was clamped. ``stream``: a ``torch.cuda.Stream`` to decode on (default: the
    current stream). Launch shape (defaults in ``_TUNE``): ``programs`` in the persistent grid, ``num_warps``;
    for E8 ``chunk_words`` unary words per step and ``sub`` coordinates per tile (a power of two >= 8);
    ``unit_bits`` applies to the rank decoder only.
    """
    require_triton()
    lat = str(lattice).upper()
    if lat in ("Z", "D4", "A2"):
        # pair-rank-coded streams have their own decoder
        from .rank_decode import rank_decode
        return rank_decode(words, offsets, ks, n, lat, block_values, out=out, out_dtype=out_dtype, check=check,
                           stats=stats, programs=programs, num_warps=num_warps, chunk_words=chunk_words, sub=sub,
                           unit_bits=unit_bits, stream=stream)
    if lat != "E8":
        raise ValueError(f"unknown lattice {lattice!r}; the GPU decoders handle E8, D4, Z and A2")
    bv = int(block_values)
    if bv <= 0 or bv % _D:
        raise ValueError(f"block_values must be a positive multiple of {_D} for E8, got {block_values}")
    if int(n) % _D:
        raise ValueError(f"{n} coordinates is not a multiple of the E8 dimension {_D}")
    nb = (int(n) + bv - 1) // bv
    if offsets.numel() != nb + 1 or ks.shape[0] != nb:
        raise RiceStreamError(f"stream index describes {offsets.numel() - 1} blocks, expected {nb}")
    tile = sub or _TUNE["sub"]
    if tile < _D or tile & (tile - 1):
        raise ValueError(f"sub must be a power of two of at least {_D} coordinates, got {sub}")
    cw = chunk_words or _TUNE["chunk_words"]
    if cw & (cw - 1):
        raise ValueError(f"chunk_words must be a power of two, got {chunk_words}")
    dev = words.device
    stats = bool(stats or check)
    out, amax, err = decode_buffers(n, nb, out, out_dtype, dev, stats)
    # the kernel stores a vector's 8 bytes at once: an output view off an 8-byte boundary decodes via a copy
    target = out if out.data_ptr() % 8 == 0 else torch.empty_like(out)
    err_arg = err if stats else stats_placeholder(dev)
    amax_arg = amax if stats else err_arg
    nprog = max(1, min(nb, programs or num_sms(dev.index or 0) * _TUNE["programs_per_sm"]))
    sg = min(_pow2_at_least(bv // _D), tile // _D)
    nt = -(-(bv // _D) // sg)
    srow = nt * sg + 1
    scratch = decode_scratch(dev, nprog * srow * 4, stream)[: nprog * srow * 4].view(torch.int32)
    if nb:
        _kernel()((nprog,), words, offsets, ks.reshape(-1), target, scratch, err_arg, amax_arg, int(n), nb, BV=bv,
                  SG=sg, NT=nt, NWU=cw, SROW=srow, OUT_FP8=out_dtype == torch.float8_e4m3fn, ESC_Q=ESCAPE_Q,
                  CHECK=stats, HWN=_pow2_at_least(-(-(bv // _D) // 32)), HW=not interpreting(),
                  num_warps=num_warps or _TUNE["num_warps"], stream=stream)
    if target is not out:
        out.copy_(target)
    if check and nb:
        raise_on_flags(err, amax, out_dtype, "Rice stream")
    return out, amax, err


#: the torch reference: the codec's decoder, clamped/cast like the kernel
rice_decode_reference = decode_reference
