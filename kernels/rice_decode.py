"""Parallel Rice block decode: the codec's bit-stripped block stream -> int8 (or fp8-e4m3) lattice coordinates.

The stream layout is :mod:`hyperquant_diffusers.codec.stream`'s: per block of ``block_values`` consecutive
coordinates of the row-major (out, in) weight, ``[parity head][low k_eff bits per value][unary q ones + a zero
per value][32-bit escapes][sign bits]``, LSB first in int32 words, each block starting at ``offsets[b]`` words.

One Triton program decodes one block at a time (a persistent grid walks the blocks), in two passes:

* pass 1, the unary section: cut into units of ``unit_bits`` bits (one lane each, ``chunk_words`` words per
  step); a prefix sum of per-unit zero counts gives the rank ``r`` of each unit's first terminator, a max-scan of
  the previous units' last terminator gives the terminator before it, and each lane walks its unit's zeros
  (lowest set bit, two per step) and scatters ``q_r`` = ones between terminators ``r-1`` and ``r`` (int8) into a
  per-program scratch row, counting escapes (``q == ESCAPE_Q``) on the way. Short units keep the walk short
  (<= unit_bits steps) and give each thread several independent chains; 16-bit units measured fastest.
* pass 2, tiles of ``sub`` values as (vectors, D): the low bits of a vector are contiguous (value ``i`` at
  ``i*k`` minus the stripped values before it: E8 the last coordinate of each even vector, counted by a prefix
  sum over the parity head; D4 the last coordinate of each vector), so one 64-bit window per vector holds them
  when ``D*k <= 64``; a vector's signs are consecutive in the tail, placed by a prefix count of present
  coordinates over vectors and a popcount within the vector; escapes (rare) only when the block has any;
  the lattice's parity rules rebuild the stripped bits exactly as the codec does.

Bit tricks use the hardware popc/ffs/clz on a GPU and portable SWAR forms in Triton's CPU interpreter.

Output: coordinates clamped to [-127, 127] as int8 (the codec's ``int8_codes`` contract for Z/D4/E8: the cast is
exact while ``|c| <= 127``), or cast to float8-e4m3 for the fp8 MMA; and per block ``max |c|`` so a caller can
tell that a clamp happened, and an error flag per block (1: unary section truncated, 2: escape or sign section
past the block's end, 4: unary run longer than the escape code) for malformed streams.

A2 (irrational second axis, no integer code) is not decoded here: use the torch path.
"""

from __future__ import annotations

import torch

from ..codec import constants as codec_constants
from ..codec.rice import RiceStreamError
from ._triton import interpreting, jit_cache, num_sms, require_triton

ESCAPE_Q = codec_constants.ESCAPE_Q
ESCAPE_BITS = codec_constants.ESCAPE_BITS
_LAT_CODE = {"Z": 0, "D4": 2, "E8": 3}
#: words of the unary section scanned per step (a block's unary section at 4 bps E8 is ~200 words)
_CHUNK_WORDS = 256


@jit_cache
def _kernel():
    # Triton resolves a jitted function's callees and ``tl`` through the module globals, so the helpers are bound
    # there (built lazily: importing this module never imports Triton).
    global tl, libdevice, _popc, _read, _msb, _lowest, _max2, _unit_terminators
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _popc(x, HW: tl.constexpr):
        # population count of uint32 lanes: the hardware instruction on a GPU, SWAR in the interpreter
        if HW:
            return libdevice.popc(x.to(tl.int32, bitcast=True))
        else:
            x = x - ((x >> 1) & 0x55555555)
            x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
            x = (x + (x >> 4)) & 0x0F0F0F0F
            return ((x * 0x01010101) >> 24).to(tl.int32)

    @triton.jit
    def _read(wp, pos, nbits, mask):
        # ``nbits`` (0..32) bits LSB-first at bit ``pos`` (int32, relative to word pointer ``wp``) as uint32
        wi = pos >> 5
        off = (pos & 31).to(tl.uint32)
        lo = tl.load(wp + wi, mask=mask, other=0).to(tl.uint32, bitcast=True)
        need_hi = mask & ((pos & 31) + nbits > 32)
        hi = tl.load(wp + wi + 1, mask=need_hi, other=0).to(tl.uint32, bitcast=True)
        v = (lo >> off) | ((hi << 1) << (31 - off))
        one = tl.full(v.shape, 1, tl.uint32)
        m = tl.where(nbits >= 32, tl.full(v.shape, 0xFFFFFFFF, tl.uint32), (one << tl.minimum(nbits, 31).to(tl.uint32)) - 1)
        return v & m

    @triton.jit
    def _msb(x, HW: tl.constexpr):
        # index of the highest set bit of nonzero uint32 lanes (0 for x == 0)
        if HW:
            return tl.maximum(31 - libdevice.clz(x.to(tl.int32, bitcast=True)), 0)
        else:
            r = tl.zeros(x.shape, tl.int32)
            for s in tl.static_range(5):
                sh: tl.constexpr = 16 >> s
                t = x >> sh
                c = t != 0
                r += tl.where(c, sh, 0)
                x = tl.where(c, t, x)
            return r

    @triton.jit
    def _lowest(x, HW: tl.constexpr):
        # index of the lowest set bit of nonzero uint32 lanes
        if HW:
            return libdevice.ffs(x.to(tl.int32, bitcast=True)) - 1
        else:
            return _popc((x & ((x ^ 0xFFFFFFFF) + 1)) - 1, HW)

    @triton.jit
    def _max2(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _unit_terminators(wp, u, ustart, nwords, un_start, UB: tl.constexpr, HW: tl.constexpr):
        # the unary section cut into units of UB bits (unit u = bits [u*UB, (u+1)*UB) of the block): inverted
        # bits (one-bits = terminators) of units ``u`` and the absolute bit position of each unit's last
        # terminator (-1: none); units before the section start or past the block have none
        NPW: tl.constexpr = 32 // UB
        UMASK: tl.constexpr = (1 << UB) - 1 if UB < 32 else 0xFFFFFFFF
        wi = u // NPW
        wm = (wi < nwords) & (u >= ustart)
        w = tl.load(wp + wi, mask=wm, other=-1).to(tl.uint32, bitcast=True)
        x = (w >> ((u % NPW) * UB).to(tl.uint32)) & UMASK
        first = tl.full(u.shape, 1, tl.uint32) << (un_start - ustart * UB).to(tl.uint32)
        x = x | tl.where(u == ustart, first - 1, 0)          # bits before the section are not terminators
        inv = x ^ UMASK
        hpos = tl.where(inv != 0, u * UB + _msb(inv, HW), -1)
        return inv, hpos

    @triton.jit
    def rice_decode_kernel(words_ptr, offs_ptr, ks_ptr, out_ptr, scratch_ptr, err_ptr, amax_ptr, n, nb,
                           BV: tl.constexpr, LAT: tl.constexpr, D: tl.constexpr, CW: tl.constexpr,
                           OUT_FP8: tl.constexpr, ESC_Q: tl.constexpr, CHECK: tl.constexpr,
                           SUB: tl.constexpr, HWN: tl.constexpr, HW: tl.constexpr,
                           UB: tl.constexpr):
        # Pass 1 walks the block's unary section and scatters each value's quotient q (int8) into a per-program
        # scratch row, counting escapes on the way; pass 2 works on (vectors, D) tiles of SUB values with scalar
        # carries (even-vector count, escape rank, sign rank) across tiles.
        SG: tl.constexpr = SUB // D
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        gi = tl.arange(0, SG)
        pj = tl.arange(0, D)
        lidx = gi[:, None] * D + pj[None, :]                    # (SG, D) value index within a tile
        NU: tl.constexpr = CW * (32 // UB)                      # units scanned per step
        cu = tl.arange(0, NU)
        sp = scratch_ptr + (pid + 0 * n).to(tl.int64) * BV
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
            ng = (cnt + D - 1) // D                              # vectors (Z: groups of D, the last may be short)
            err = cnt * 0
            amax = cnt * 0
            if LAT == 3:
                # E8: one parity bit per vector in the head; even vectors strip their last magnitude's low bit
                hw = tl.arange(0, HWN)
                hwv = tl.load(wp + hw, mask=hw * 32 < ng, other=0).to(tl.uint32, bitcast=True)
                nbits = tl.minimum(tl.maximum(ng - hw * 32, 0), 32)
                one = tl.full([HWN], 1, tl.uint32)
                hmask = tl.where(nbits >= 32, tl.full([HWN], 0xFFFFFFFF, tl.uint32),
                                 (one << tl.minimum(nbits, 31).to(tl.uint32)) - 1)
                n_even = ng - tl.sum(_popc(hwv & hmask, HW), 0)
                head = ng
                total_low = cnt * k - kpos * n_even
            elif LAT == 2:
                head = cnt * 0
                total_low = cnt * k - kpos * ng
            else:
                head = cnt * 0
                total_low = cnt * k
            un_start = head + total_low
            # ---- pass 1: q_r = ones between terminators r-1 and r ------------------------------------------
            # A word's first terminator needs the previous one, the last terminator of any earlier word: an
            # inclusive max-scan over the previous words' last-terminator positions (carried across chunks).
            carry = cnt * 0
            last = un_start - 1
            ustart = un_start // UB
            nunits = nwords * (32 // UB)
            c = cnt * 0
            n_esc = cnt * 0
            while (carry < cnt) & (ustart + c * NU < nunits):
                ui = ustart + c * NU + cu
                inv, _ = _unit_terminators(wp, ui, ustart, nwords, un_start, UB, HW)
                _, hprev = _unit_terminators(wp, ui - 1, ustart, nwords, un_start, UB, HW)
                prev = tl.maximum(tl.associative_scan(hprev, 0, _max2), last)
                z = _popc(inv, HW)
                zr = tl.cumsum(z, 0) - z + carry
                nesc_l = z * 0
                had = z < 0
                maxz = tl.max(z, 0)
                for j in range(0, maxz, 2):
                    # two terminators per step: independent work for the scheduler between dependent bit ops
                    inv1 = inv & (inv - 1)
                    pos0 = ui * UB + _lowest(inv, HW)
                    pos1 = ui * UB + _lowest(inv1, HW)
                    ok0 = (inv != 0) & (zr + j < cnt)
                    ok1 = (inv1 != 0) & (zr + j + 1 < cnt)
                    q0 = pos0 - prev - 1
                    q1 = pos1 - pos0 - 1
                    tl.store(sp + zr + j, tl.minimum(q0, ESC_Q + 1).to(tl.int8), mask=ok0)
                    tl.store(sp + zr + j + 1, tl.minimum(q1, ESC_Q + 1).to(tl.int8), mask=ok1)
                    nesc_l += (ok0 & (q0 == ESC_Q)).to(tl.int32) + (ok1 & (q1 == ESC_Q)).to(tl.int32)
                    prev = tl.where(ok1, pos1, tl.where(ok0, pos0, prev))
                    had = had | ok0
                    inv = inv1 & (inv1 - 1)
                n_esc += tl.sum(nesc_l, 0)
                last = tl.maximum(last, tl.max(tl.where(had, prev, -1), 0))
                carry += tl.sum(z, 0)
                c += 1
            err = err | (carry < cnt).to(tl.int32)
            tl.debug_barrier()
            esc_start = last + 1                                 # escapes follow the last terminator
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
                if LAT == 3:
                    par = ((tl.load(wp + (gg >> 5), mask=gmask, other=0) >> (gg & 31)) & 1).to(tl.int32)
                    odd = par == 1
                    ev = (gmask & (par == 0)).to(tl.int32)
                    evens_before = ev_carry + tl.cumsum(ev, 0) - ev
                    ev_carry += tl.sum(ev, 0)
                    strip = (pj[None, :] == D - 1) & (par[:, None] == 0)
                    lp = head + gg * (D * k) - kpos * evens_before
                elif LAT == 2:
                    strip = (pj[None, :] == D - 1) & (gi[:, None] >= 0)
                    lp = gg * (D * k) - kpos * gg
                else:
                    strip = (pj[None, :] < 0) & (gi[:, None] >= 0)
                    lp = gg * (D * k)
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
                if LAT == 3:
                    s7 = tl.sum(tl.where(pj[None, :] < D - 1, m, 0), 1) & 1
                    mag = tl.where(strip, 2 * m + s7[:, None], m)
                    present = ((mag != 0) | odd[:, None]) & ~((pj[None, :] == D - 1) & odd[:, None])
                elif LAT == 2:
                    s3 = tl.sum(tl.where(pj[None, :] < D - 1, m, 0), 1) & 1
                    mag = tl.where(strip, 2 * m + s3[:, None], m)
                    present = mag != 0
                else:
                    mag = m
                    present = mag != 0
                present = present & valid
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
                if LAT == 3:
                    val = 2 * mag + par[:, None]
                    # an odd vector's last sign makes the sum 0 mod 4: parity of (sum of magnitudes - negatives)
                    t = tl.sum(tl.where(valid, mag, 0) - tl.where(pj[None, :] < D - 1, neg.to(tl.int32), 0), 1)
                    neg = tl.where((pj[None, :] == D - 1) & odd[:, None], ((t & 1) == 1)[:, None], neg)
                else:
                    val = mag
                cval = tl.where(neg, -val, val)
                if CHECK:
                    amax = tl.maximum(amax, tl.max(tl.max(tl.where(valid, tl.abs(cval), 0), 1), 0))
                if OUT_FP8:
                    o = tl.minimum(tl.maximum(cval, -448), 448).to(tl.float32).to(tl.float8e4nv)
                else:
                    o = tl.minimum(tl.maximum(cval, -127), 127).to(tl.int8)
                tl.store(out_ptr + v0 + idx, o, mask=valid)
            if CHECK:
                tl.store(amax_ptr + b, amax)
                tl.store(err_ptr + b, err)
            tl.debug_barrier()   # the next block reuses this program's scratch row

    return rice_decode_kernel


#: launch shape (bench/bench_kernels.py sweeps it on the device; see bench/RESULTS.md)
_TUNE = {"programs_per_sm": 32, "num_warps": 2, "chunk_words": 32, "sub": 512, "unit_bits": 16}
_SCRATCH: dict = {}


def _scratch(device, nprog: int, bv: int) -> torch.Tensor:
    # one scratch area per stream: the compressed-residency prefetch decodes on a side stream concurrently
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), bv, stream)
    t = _SCRATCH.get(key)
    if t is None or t.numel() < nprog * bv:
        t = torch.empty(nprog * bv, dtype=torch.int8, device=device)
        _SCRATCH[key] = t
    return t


def rice_decode(words: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, n: int, lattice: str,
                block_values: int, *, out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.int8,
                check: bool = False, stats: bool = True, programs: int | None = None, num_warps: int | None = None,
                chunk_words: int | None = None, sub: int | None = None, unit_bits: int | None = None):
    """Decode a codec block stream on the GPU (or the Triton interpreter).

    ``words`` int32 (n_words,), ``offsets`` int32/int64 (n_blocks+1,) word offsets, ``ks`` uint8 (n_blocks, 1),
    ``n`` coordinates, ``lattice`` in {"Z", "D4", "E8"}. Writes ``out`` (n,) of ``out_dtype`` (int8 or
    torch.float8_e4m3fn; a view of a reused buffer may be passed) and returns ``(out, amax, err)``: per block
    ``max |c|`` int32 (n_blocks,) and error flags int32 (n_blocks,), computed when ``stats`` (default) or
    ``check``; ``stats=False, check=False`` is the fast path for a stream already checked once (amax and err are
    then left unwritten). ``check=True`` synchronizes and raises ``RiceStreamError`` on any error flag and
    ``ValueError`` if a coordinate was clamped.
    """
    require_triton()
    lat = str(lattice).upper()
    if lat not in _LAT_CODE:
        raise ValueError(f"the Triton Rice decoder handles lattices Z, D4 and E8, not {lattice!r}; use the torch path")
    if out_dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"out_dtype must be torch.int8 or torch.float8_e4m3fn, got {out_dtype}")
    bv = int(block_values)
    nb = (int(n) + bv - 1) // bv
    if offsets.numel() != nb + 1 or ks.shape[0] != nb:
        raise RiceStreamError(f"stream index describes {offsets.numel() - 1} blocks, expected {nb}")
    dev = words.device
    if out is None:
        out = torch.empty(int(n), dtype=out_dtype, device=dev)
    elif out.numel() != int(n) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of {n} elements")
    nprog = max(1, min(nb, programs or num_sms(dev.index or 0) * _TUNE["programs_per_sm"]))
    scratch = _scratch(dev, nprog, bv)
    amax = torch.empty(nb, dtype=torch.int32, device=dev)
    err = torch.empty(nb, dtype=torch.int32, device=dev)
    d = {"E8": 8, "D4": 4, "Z": 8}[lat]
    if nb:
        _kernel()[(nprog,)](words, offsets, ks.reshape(-1), out, scratch, err, amax, int(n), nb, BV=bv,
                            LAT=_LAT_CODE[lat], D=d, CW=chunk_words or _TUNE["chunk_words"],
                            OUT_FP8=out_dtype == torch.float8_e4m3fn, ESC_Q=ESCAPE_Q, CHECK=bool(stats or check),
                            SUB=min(bv, sub or _TUNE["sub"]), HWN=max(1, bv // 256), HW=not interpreting(),
                            UB=unit_bits or _TUNE["unit_bits"],
                            num_warps=num_warps or _TUNE["num_warps"])
    if check and nb:
        if int(err.max()) != 0:
            bad = int((err != 0).nonzero()[0])
            raise RiceStreamError(f"block {bad}: malformed Rice stream (flags {int(err[bad])})")
        lim = 127 if out_dtype == torch.int8 else 448
        if int(amax.max()) > lim:
            raise ValueError(f"lattice coordinates reach {int(amax.max())}, beyond the {out_dtype} range ±{lim}")
    return out, amax, err


def rice_decode_reference(words, offsets, ks, n, lattice, block_values, out_dtype=torch.int8) -> torch.Tensor:
    """Torch reference: the codec's decoder, clamped/cast like the kernel. (n,) ``out_dtype``."""
    from hyperquant_diffusers.codec.stream import decode_coords

    c = decode_coords(words, offsets.to(torch.int64), ks, int(n), lattice, int(block_values))
    if out_dtype == torch.int8:
        return c.clamp(-127, 127).to(torch.int8)
    return c.clamp(-448, 448).to(torch.float32).to(out_dtype)
