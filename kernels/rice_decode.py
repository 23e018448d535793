"""Parallel Rice block decode of E8 streams: the codec's bit-stripped block stream -> int8 (or fp8-e4m3) coordinates.

The stream layout is :mod:`hyperquant_diffusers.codec.stream`'s for E8: per block of ``block_values`` consecutive
coordinates of the row-major (out, in) weight, ``[parity head][low k_eff bits per value][unary q ones + a zero
per value][32-bit escapes][sign bits]``, LSB first in int32 words, each block starting at ``offsets[b]`` words.
The pair-rank-coded lattices (Z, D4, A2) have their own decoder, :mod:`.rank_decode`; :func:`rice_decode` routes
them there. E8 streams go to one of two kernels (``impl``): by default the one-lane-per-vector kernel of
:mod:`.rice_decode_vectors`, or this module's "units" kernel, the first design, kept as the measured reference
for the A/B bench (``bench_kernels.py --decoder-ab``).

In the units kernel one Triton program decodes one block at a time (a persistent grid walks the blocks), in two
passes:

* pass 1, the unary section -> one quotient ``q`` per value in a per-program scratch row (``unary_pass`` of
  :mod:`._bits`: units of ``unit_bits`` bits, one lane each, ``chunk_words`` words per step, each lane walking
  its unit's terminators; 16-bit units measured fastest), counting escapes (``q == ESCAPE_Q``) on the way;
* pass 2, tiles of ``sub`` values as (vectors, 8): the low bits of a vector are contiguous (value ``i`` at
  ``i*k`` minus the stripped values before it: the last coordinate of each even vector, counted by a prefix sum
  over the parity head), so one 32- or 64-bit window per vector holds them when ``8*k <= 64``; a vector's signs
  are consecutive in the tail, placed by a prefix count of present coordinates over vectors and a popcount within
  the vector; escapes (rare) only when the block has any; E8's parity rules rebuild the stripped bits exactly as
  the codec does.

Output: coordinates clamped to [-127, 127] as int8 (the codec's ``int8_codes`` contract: the cast is exact while
``|c| <= 127``), or cast to float8-e4m3 for the fp8 MMA; and per block ``max |c|`` so a caller can tell that a
clamp happened, and an error flag per block (1: unary section truncated, 2: escape or sign section past the
block's end, 4: unary run longer than the escape code) for malformed streams. No read leaves its block.
"""

from __future__ import annotations

import torch

from ..codec import constants as codec_constants
from ..codec.rice import RiceStreamError
from ._bits import (bit_helpers, decode_buffers, decode_reference, decode_scratch, raise_on_flags,
                    stats_placeholder)
from . import rice_decode_vectors
from ._launch import CachedLauncher
from ._triton import interpreting, jit_cache, num_sms, require_triton

ESCAPE_Q = codec_constants.ESCAPE_Q
ESCAPE_BITS = codec_constants.ESCAPE_BITS


@jit_cache
def _kernel():
    # Triton resolves a jitted function's callees and ``tl`` through the module globals, so the helpers are bound
    # there (built lazily: importing this module never imports Triton).
    global tl, _popc, _read, _unary_pass, _block_header, _e8_even_vectors, _e4m3x2_bits
    import triton
    import triton.language as tl

    h = bit_helpers()
    _popc, _read, _unary_pass = h.popc, h.read, h.unary_pass
    _block_header, _e8_even_vectors, _e4m3x2_bits = h.block_header, h.e8_even_vectors, h.e4m3x2_bits

    @triton.jit
    def rice_decode_kernel(words_ptr, offs_ptr, ks_ptr, out_ptr, scratch_ptr, err_ptr, amax_ptr, n, nb,
                           BV: tl.constexpr, CW: tl.constexpr,
                           OUT_FP8: tl.constexpr, ESC_Q: tl.constexpr, CHECK: tl.constexpr,
                           SUB: tl.constexpr, HWN: tl.constexpr, HW: tl.constexpr,
                           UB: tl.constexpr):
        # Pass 1 walks the block's unary section and scatters each value's quotient q (int8) into a per-program
        # scratch row, counting escapes on the way; pass 2 works on (vectors, 8) tiles of SUB values with scalar
        # carries (even-vector count, escape rank, sign rank) across tiles.
        D: tl.constexpr = 8
        SG: tl.constexpr = SUB // D
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        gi = tl.arange(0, SG)
        pj = tl.arange(0, D)
        lidx = gi[:, None] * D + pj[None, :]                    # (SG, D) value index within a tile
        NU: tl.constexpr = CW * (32 // UB)                      # units scanned per step
        sp = scratch_ptr + (pid + 0 * n).to(tl.int64) * BV
        out8 = out_ptr.to(tl.pointer_type(tl.uint8))            # int8 or e4m3 bytes
        for b in range(pid, nb, nprog):
            wp, nwords, end_bit, v0, cnt, k, kpos = _block_header(words_ptr, offs_ptr, ks_ptr, b, n, BV)
            ng = cnt // D                                        # vectors
            err = cnt * 0
            amax = cnt * 0
            # one parity bit per vector in the head; even vectors strip their last magnitude's low bit
            n_even = _e8_even_vectors(wp, ng, nwords, HWN, HW)
            head = ng
            un_start = head + cnt * k - kpos * n_even
            # ---- pass 1: the unary section -> q per value (int8) in this program's scratch row ------------------
            esc_start, n_esc, trunc = _unary_pass(wp, sp, un_start, cnt, nwords, NU, UB, ESC_Q, HW)
            err = err | trunc
            tail_start = esc_start + n_esc * 32
            if CHECK:
                err = err | ((tail_start > end_bit).to(tl.int32) * 2)
            # ---- pass 2: per (vector, coordinate) tile -----------------------------------------------------
            ev_carry = cnt * 0
            esc_carry = cnt * 0
            sign_carry = cnt * 0
            for s0 in range(0, BV, SUB):
                idx = s0 + lidx
                valid = idx < cnt
                gg = s0 // D + gi
                gmask = gg < ng
                par = ((tl.load(wp + (gg >> 5), mask=gmask, other=0) >> (gg & 31)) & 1).to(tl.int32)
                odd = par == 1
                ev = (gmask & (par == 0)).to(tl.int32)
                evens_before = ev_carry + tl.cumsum(ev, 0) - ev
                ev_carry += tl.sum(ev, 0)
                strip = (pj[None, :] == D - 1) & (par[:, None] == 0)
                lp = head + gg * (D * k) - kpos * evens_before
                keff = tl.maximum(k - strip.to(tl.int32), 0)
                q = tl.load(sp + idx, mask=valid, other=0).to(tl.int32)
                if CHECK:
                    err = err | (tl.max(tl.max(((q > ESC_Q) & valid).to(tl.int32), 1), 0) * 4)
                if k * D <= 32:
                    # a vector's low bits are contiguous: one 32-bit window per vector, then shifts
                    win32 = _read(wp, lp, lp * 0 + k * D, gmask)
                    fm32 = (tl.full([1, D], 1, tl.uint32) << keff.to(tl.uint32)) - 1
                    low = ((win32[:, None] >> (pj[None, :] * k).to(tl.uint32)) & fm32).to(tl.int32)
                elif k * D <= 64:
                    # the same with a 64-bit window
                    lw = lp >> 5
                    a = tl.load(wp + lw, mask=gmask & (lw < nwords), other=0).to(tl.uint32, bitcast=True)
                    bb = tl.load(wp + lw + 1, mask=gmask & (lw + 1 < nwords), other=0).to(tl.uint32, bitcast=True)
                    cc = tl.load(wp + lw + 2, mask=gmask & (lw + 2 < nwords), other=0).to(tl.uint32, bitcast=True)
                    off = (lp & 31).to(tl.uint64)
                    win = ((a.to(tl.uint64) | (bb.to(tl.uint64) << 32)) >> off) | ((cc.to(tl.uint64) << 32) << (32 - off))
                    fm = (tl.full([1, D], 1, tl.uint64) << keff.to(tl.uint64)) - 1
                    low = ((win[:, None] >> (pj[None, :] * k).to(tl.uint64)) & fm).to(tl.int32)
                else:
                    low = _read(wp, lp[:, None] + pj[None, :] * k, keff, valid).to(tl.int32)
                m = (tl.minimum(q, ESC_Q - 1) << keff) | low
                if n_esc > 0:
                    esc = (q == ESC_Q) & valid
                    e32 = esc.to(tl.int32)
                    eg = tl.sum(e32, 1)
                    erank = esc_carry + (tl.cumsum(eg, 0) - eg)[:, None] + tl.cumsum(e32, 1) - e32
                    epos = esc_start + erank * 32
                    ev32 = _read(wp, epos, erank * 0 + 32, esc & (epos + 32 <= end_bit)).to(tl.int32)
                    m = tl.where(esc, ev32, m)
                    esc_carry += tl.sum(eg, 0)
                # ---- rebuild stripped bits, signs -------------------------------------------------------
                s7 = tl.sum(tl.where(pj[None, :] < D - 1, m, 0), 1) & 1
                mag = tl.where(strip, 2 * m + s7[:, None], m)
                present = ((mag != 0) | odd[:, None]) & ~((pj[None, :] == D - 1) & odd[:, None]) & valid
                # signs of a vector are consecutive in the tail: one read per vector, then each present
                # coordinate takes the bit at its rank among the vector's present coordinates
                pm = tl.sum(tl.where(present, 1 << pj[None, :], 0), 1).to(tl.uint32)
                pg = _popc(pm, HW)
                sbase = tail_start + sign_carry + tl.cumsum(pg, 0) - pg
                sign_carry += tl.sum(pg, 0)
                sok = gmask & (pg > 0) & (sbase + pg <= end_bit)
                if CHECK:
                    err = err | (tl.max((gmask & (sbase + pg > end_bit)).to(tl.int32), 0) * 2)
                sw = _read(wp, sbase, pg, sok)
                srank = _popc(pm[:, None] & ((tl.full([1, D], 1, tl.uint32) << pj[None, :].to(tl.uint32)) - 1), HW)
                neg = present & (((sw[:, None] >> srank.to(tl.uint32)) & 1) == 1)
                val = 2 * mag + par[:, None]
                # an odd vector's last sign makes the sum 0 mod 4: parity of (sum of magnitudes - negatives)
                t = tl.sum(tl.where(valid, mag, 0) - tl.where(pj[None, :] < D - 1, neg.to(tl.int32), 0), 1)
                neg = tl.where((pj[None, :] == D - 1) & odd[:, None], ((t & 1) == 1)[:, None], neg)
                cval = tl.where(neg, -val, val)
                if CHECK:
                    amax = tl.maximum(amax, tl.max(tl.max(tl.where(valid, tl.abs(cval), 0), 1), 0))
                if OUT_FP8:
                    c8 = tl.minimum(tl.maximum(cval, -448), 448)
                    o = _e4m3x2_bits(tl.zeros_like(c8), c8, HW).to(tl.uint8)
                else:
                    o = tl.minimum(tl.maximum(cval, -127), 127).to(tl.int8).to(tl.uint8, bitcast=True)
                tl.store(out8 + v0 + idx, o, mask=valid)
            if CHECK:
                tl.store(amax_ptr + b, amax)
                tl.store(err_ptr + b, err)
            tl.debug_barrier()   # the next block reuses this program's scratch row

    return CachedLauncher(rice_decode_kernel)


#: launch shape (bench/bench_kernels.py sweeps it on the device; see bench/RESULTS.md)
_TUNE = {"programs_per_sm": 32, "num_warps": 2, "chunk_words": 32, "sub": 512, "unit_bits": 16, "impl": "vectors"}
#: the E8 decoders: this module's kernel (one lane per 16-bit unit of the unary section), and one lane per vector
IMPLS = ("units", "vectors")


def rice_decode(words: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, n: int, lattice: str,
                block_values: int, *, out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.int8,
                check: bool = False, stats: bool = True, programs: int | None = None, num_warps: int | None = None,
                chunk_words: int | None = None, lane_words: int | None = None, sub: int | None = None,
                unit_bits: int | None = None, stream=None, impl: str | None = None):
    """Decode a codec block stream on the GPU (or the Triton interpreter).

    ``words`` int32 (n_words,), ``offsets`` int32/int64 (n_blocks+1,) word offsets, ``ks`` uint8 (n_blocks, 1),
    ``n`` coordinates, ``lattice`` "E8" (or "Z", "D4", "A2": routed to :func:`.rank_decode.rank_decode`). Writes ``out`` (n,) of ``out_dtype`` (int8 or
    torch.float8_e4m3fn; a view of a reused buffer may be passed) and returns ``(out, amax, err)``: per block
    ``max |c|`` int32 (n_blocks,) and error flags int32 (n_blocks,), computed when ``stats`` (default) or
    ``check``; ``stats=False, check=False`` is the fast path for a stream already checked once (amax and err are
    then None). ``check=True`` synchronizes and raises ``RiceStreamError`` on any error flag and
    ``ValueError`` if a coordinate was clamped. ``stream``: a ``torch.cuda.Stream`` to decode on (default: the
    current stream). ``impl`` (E8 only): ``"vectors"`` (:mod:`.rice_decode_vectors`, the default in ``_TUNE``:
    1.5-1.7x faster on the H100, bench/RESULTS.md) or ``"units"`` (this module's kernel). Launch shape:
    ``programs``, ``num_warps``, ``chunk_words``, ``sub`` as the chosen kernel reads them (defaults in its
    ``_TUNE``); ``unit_bits`` for the units and rank kernels; ``lane_words`` for the vector kernel only (unary
    words per lane of its pass 1; ``chunk_words`` must then be a power of two times it).
    """
    require_triton()
    lat = str(lattice).upper()
    if impl is not None and lat != "E8":
        raise ValueError(f"impl chooses between the E8 decoders; a {lat} stream has one decoder (pass impl=None)")
    if lane_words is not None and (lat != "E8" or (impl or _TUNE["impl"]) != "vectors"):
        raise ValueError("lane_words is a launch parameter of the 'vectors' E8 decoder only")
    if lat in ("Z", "D4", "A2"):
        # pair-rank-coded streams have their own decoder
        from .rank_decode import rank_decode
        return rank_decode(words, offsets, ks, n, lat, block_values, out=out, out_dtype=out_dtype, check=check,
                           stats=stats, programs=programs, num_warps=num_warps, chunk_words=chunk_words, sub=sub,
                           unit_bits=unit_bits, stream=stream)
    if lat != "E8":
        raise ValueError(f"unknown lattice {lattice!r}; the GPU decoders handle E8, D4, Z and A2")
    impl = impl or _TUNE["impl"]
    if impl not in IMPLS:
        raise ValueError(f"unknown E8 decoder impl {impl!r}; choose one of {IMPLS}")

    bv = int(block_values)
    if bv <= 0 or bv % 8:
        raise ValueError(f"block_values must be a positive multiple of 8 for E8, got {block_values}")
    if int(n) % 8:
        raise ValueError(f"{n} coordinates is not a multiple of the E8 dimension 8")
    nb = (int(n) + bv - 1) // bv
    if offsets.numel() != nb + 1 or ks.shape[0] != nb:
        raise RiceStreamError(f"stream index describes {offsets.numel() - 1} blocks, expected {nb}")
    dev = words.device
    stats = bool(stats or check)
    out, amax, err = decode_buffers(n, nb, out, out_dtype, dev, stats)
    err_arg = err if stats else stats_placeholder(dev)
    amax_arg = amax if stats else err_arg
    if nb and impl == "vectors":
        # that kernel stores a vector's 8 bytes at once: an output view off an 8-byte boundary decodes via a copy
        target = out if out.data_ptr() % 8 == 0 else torch.empty_like(out)
        rice_decode_vectors.launch(words, offsets, ks, target, err_arg, amax_arg, int(n), nb, bv, ESCAPE_Q,
                                   stats=stats, programs=programs, num_warps=num_warps, chunk_words=chunk_words,
                                   lane_words=lane_words, sub=sub, stream=stream)
        if target is not out:
            out.copy_(target)
    elif nb:
        if bv & (bv - 1):
            raise ValueError(f"the units E8 decoder takes power-of-two block_values (as quantize writes), got {bv}; "
                             "impl='vectors' takes any multiple of 8")
        nprog = max(1, min(nb, programs or num_sms(dev.index or 0) * _TUNE["programs_per_sm"]))
        scratch = decode_scratch(dev, nprog * bv, stream)
        _kernel()((nprog,), words, offsets, ks.reshape(-1), out, scratch, err_arg, amax_arg, int(n), nb, BV=bv,
                  CW=chunk_words or _TUNE["chunk_words"],
                  OUT_FP8=out_dtype == torch.float8_e4m3fn, ESC_Q=ESCAPE_Q, CHECK=stats,
                  SUB=min(bv, sub or _TUNE["sub"]), HWN=max(1, bv // 256), HW=not interpreting(),
                  UB=unit_bits or _TUNE["unit_bits"],
                  num_warps=num_warps or _TUNE["num_warps"], stream=stream)
    if check and nb:
        raise_on_flags(err, amax, out_dtype, "Rice stream")
    return out, amax, err


#: the torch reference: the codec's decoder, clamped/cast like the kernel
rice_decode_reference = decode_reference
