"""Parallel Rice block decode: the codec's bit-stripped block stream -> int8 (or fp8-e4m3) lattice coordinates.

The stream layout is :mod:`hyperquant_diffusers.codec.stream`'s: per block of ``block_values`` consecutive
coordinates of the row-major (out, in) weight, ``[parity head][low k_eff bits per value][unary q ones + a zero
per value][32-bit escapes][sign bits]``, LSB first in int32 words, each block starting at ``offsets[b]`` words.

One Triton program decodes one block at a time (a persistent grid walks the blocks), every value in parallel:

* the low bits sit at positions known from ``k`` alone: ``i*k`` minus the stripped values before ``i`` (E8: the
  last coordinate of each even vector, whose count before a group is a prefix count over the parity head;
  D4: the last coordinate of each vector, ``i // 4``);
* the unary section is scanned a word at a time: a prefix sum of per-word zero counts gives the rank of each
  word's first terminator, then each word walks its own zeros (lowest set bit of the inverted word) and scatters
  ``A_r = (position of terminator r) - r`` = ones before terminator ``r`` into a per-program scratch row;
  ``q_r = A_r - A_{r-1}``;
* escapes (``q == ESCAPE_Q``) and signs are placed by a two-level prefix count (per vector, then across vectors);
* the lattice's parity rules rebuild the stripped bits exactly as the codec does.

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
from ._triton import jit_cache, num_sms, require_triton

ESCAPE_Q = codec_constants.ESCAPE_Q
ESCAPE_BITS = codec_constants.ESCAPE_BITS
_LAT_CODE = {"Z": 0, "D4": 2, "E8": 3}
#: words of the unary section scanned per step (a block's unary section at 4 bps E8 is ~200 words)
_CHUNK_WORDS = 256


@jit_cache
def _kernel():
    # Triton resolves a jitted function's callees and ``tl`` through the module globals, so the helpers are bound
    # there (built lazily: importing this module never imports Triton).
    global tl, _popc, _read
    import triton
    import triton.language as tl

    @triton.jit
    def _popc(x):
        # population count of uint32 lanes (SWAR; portable to the interpreter, unlike libdevice.popc)
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
    def rice_decode_kernel(words_ptr, offs_ptr, ks_ptr, out_ptr, scratch_ptr, err_ptr, amax_ptr, n, nb,
                           BV: tl.constexpr, LAT: tl.constexpr, D: tl.constexpr, CW: tl.constexpr,
                           OUT_FP8: tl.constexpr, ESC_Q: tl.constexpr, CHECK: tl.constexpr,
                           UNARY: tl.constexpr, SUB: tl.constexpr, HWN: tl.constexpr):
        # The block-level unary scan fills the scratch row; the per-value work then runs over sub-chunks of SUB
        # values with scalar carries (even-vector count, escape rank, sign rank), which bounds register use.
        SG: tl.constexpr = SUB // D
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        gi = tl.arange(0, SG)
        pj = tl.arange(0, D)
        lidx = gi[:, None] * D + pj[None, :]                    # (SG, D) value index within a sub-chunk
        pos = lidx % D if LAT != 0 else lidx * 0                # coordinate index within its vector
        cw = tl.arange(0, CW)
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
            err = cnt * 0
            amax = cnt * 0
            if LAT == 3:
                # E8: one parity bit per vector in the head; even vectors strip their last magnitude's low bit
                ng = cnt // 8
                hw = tl.arange(0, HWN)
                hwv = tl.load(wp + hw, mask=hw * 32 < ng, other=0).to(tl.uint32, bitcast=True)
                nbits = tl.minimum(tl.maximum(ng - hw * 32, 0), 32)
                one = tl.full([HWN], 1, tl.uint32)
                hmask = tl.where(nbits >= 32, tl.full([HWN], 0xFFFFFFFF, tl.uint32),
                                 (one << tl.minimum(nbits, 31).to(tl.uint32)) - 1)
                n_even = ng - tl.sum(_popc(hwv & hmask), 0)
                head = ng
                total_low = cnt * k - kpos * n_even
            elif LAT == 2:
                head = cnt * 0
                total_low = cnt * k - kpos * (cnt // 4)
            else:
                head = cnt * 0
                total_low = cnt * k
            un_start = head + total_low
            # ---- unary section: scatter A_r = ones before terminator r ------------------------------------
            carry = cnt * 0
            wstart = un_start >> 5
            c = cnt * 0
            if UNARY == 2:
                hist = tl.zeros([BV], dtype=tl.int32)
            while (carry < cnt) & (wstart + c * CW < nwords):
                wi = wstart + c * CW + cw
                wm = wi < nwords
                w = tl.load(wp + wi, mask=wm, other=-1).to(tl.uint32, bitcast=True)
                sh = (un_start & 31).to(tl.uint32)
                first = tl.full([CW], 1, tl.uint32) << sh
                w = w | tl.where(wi == wstart, first - 1, 0)     # bits before the section are not terminators
                inv = w ^ 0xFFFFFFFF
                z = _popc(inv)
                zr = tl.cumsum(z, 0) - z + carry
                if UNARY == 0:
                    # walk each word's zeros: lowest set bit of the inverted word, up to the chunk's max count
                    maxz = tl.max(z, 0)
                    for j in range(0, maxz):
                        lowbit = inv & ((inv ^ 0xFFFFFFFF) + 1)
                        bp = _popc(lowbit - 1)
                        r = zr + j
                        ok = (inv != 0) & (r < cnt)
                        tl.store(sp + r, wi * 32 + bp - un_start - r, mask=ok)
                        inv = inv & (inv - 1)
                elif UNARY == 2:
                    # no scatter: each one-bit belongs to the value whose terminator comes next, i.e. to value
                    # (zeros before it); q = histogram of that index over the one-bits. Bits before the section,
                    # past the block or past the last terminator go to bin 0 and are subtracted again.
                    jj = tl.arange(0, 32)
                    zb = ((inv[:, None] >> jj[None, :].to(tl.uint32)) & 1).to(tl.int32)
                    r2 = zr[:, None] + tl.cumsum(zb, 1) - zb
                    bitpos = wi[:, None] * 32 + jj[None, :]
                    inc = (zb == 0) & (bitpos >= un_start) & (r2 < cnt) & wm[:, None]
                    n_out = CW * 32 - tl.sum(tl.sum(inc.to(tl.int32), 1), 0)
                    h = tl.histogram(tl.reshape(tl.where(inc, r2, 0), [CW * 32]), BV)
                    hist += tl.where(tl.arange(0, BV) == 0, h - n_out, h)
                else:
                    # every bit at once: (words, 32) zero indicators, rank = word rank + prefix within the word
                    jj = tl.arange(0, 32)
                    zb = ((inv[:, None] >> jj[None, :].to(tl.uint32)) & 1).to(tl.int32)
                    r2 = zr[:, None] + tl.cumsum(zb, 1) - zb
                    ok2 = (zb == 1) & (r2 < cnt)
                    tl.store(sp + r2, wi[:, None] * 32 + jj[None, :] - un_start - r2, mask=ok2)
                carry += tl.sum(z, 0)
                c += 1
            err = err | (carry < cnt).to(tl.int32)
            if UNARY == 2:
                # quotients straight from the histogram, stored coalesced for the per-value sub-chunks
                bi = tl.arange(0, BV)
                tl.store(sp + bi, hist)
                esc_start = un_start + cnt + tl.sum(tl.where(bi < cnt, hist, 0), 0)
                n_esc = tl.sum(((hist == ESC_Q) & (bi < cnt)).to(tl.int32), 0)
                tl.debug_barrier()
            else:
                tl.debug_barrier()
                a_last = tl.load(sp + tl.maximum(cnt - 1, 0))
                esc_start = un_start + a_last + cnt
                # escapes before the signs: count them first (q_r = A_r - A_{r-1} == ESC_Q)
                n_esc = cnt * 0
                for s0 in range(0, BV, SUB):
                    li = s0 + lidx
                    v = li < cnt
                    A = tl.load(sp + li, mask=v, other=0)
                    Ap = tl.load(sp + li - 1, mask=v & (li > 0), other=0)
                    n_esc += tl.sum(tl.sum((((A - Ap) == ESC_Q) & v).to(tl.int32), 1), 0)
            tail_start = esc_start + n_esc * 32
            ev_carry = cnt * 0
            esc_carry = cnt * 0
            sign_carry = cnt * 0
            for s0 in range(0, BV, SUB):
                idx = s0 + lidx
                valid = idx < cnt
                gg = s0 // D + gi
                if LAT == 3:
                    gmask = gg < ng
                    par = ((tl.load(wp + (gg >> 5), mask=gmask, other=0) >> (gg & 31)) & 1).to(tl.int32)
                    odd = par == 1
                    ev = (gmask & (par == 0)).to(tl.int32)
                    evens_before = ev_carry + tl.cumsum(ev, 0) - ev
                    ev_carry += tl.sum(ev, 0)
                    strip = (pos == 7) & (par[:, None] == 0)
                    low_pos = head + idx * k - kpos * evens_before[:, None]
                elif LAT == 2:
                    strip = pos == 3
                    low_pos = idx * k - kpos * gg[:, None]
                else:
                    strip = idx < 0
                    low_pos = idx * k
                keff = tl.maximum(k - strip.to(tl.int32), 0)
                if UNARY == 2:
                    q = tl.load(sp + idx, mask=valid, other=0)
                else:
                    A = tl.load(sp + idx, mask=valid, other=0)
                    Ap = tl.load(sp + idx - 1, mask=valid & (idx > 0), other=0)
                    q = A - Ap
                if CHECK:
                    err = err | (tl.max(tl.max(((q > ESC_Q) | (q < 0)) & valid, 1), 0).to(tl.int32) * 4)
                low = _read(wp, low_pos, keff, valid).to(tl.int32)
                m = (tl.minimum(q, ESC_Q - 1) << keff) | low
                esc = (q == ESC_Q) & valid
                e32 = esc.to(tl.int32)
                eg = tl.sum(e32, 1)
                n_e = tl.sum(eg, 0)
                if n_e > 0:
                    erank = esc_carry + (tl.cumsum(eg, 0) - eg)[:, None] + tl.cumsum(e32, 1) - e32
                    epos = esc_start + erank * 32
                    ev32 = _read(wp, epos, erank * 0 + 32, esc & (epos + 32 <= end_bit)).to(tl.int32)
                    if CHECK:
                        err = err | (tl.max(tl.max(esc & (epos + 32 > end_bit), 1), 0).to(tl.int32) * 2)
                    m = tl.where(esc, ev32, m)
                esc_carry += n_e
                # ---- rebuild stripped bits, signs -------------------------------------------------------
                if LAT == 3:
                    s7 = tl.sum(tl.where(pos < 7, m, 0), 1) & 1
                    mag = tl.where(strip, 2 * m + s7[:, None], m)
                    present = ((mag != 0) | odd[:, None]) & ~((pos == 7) & odd[:, None])
                elif LAT == 2:
                    s3 = tl.sum(tl.where(pos < 3, m, 0), 1) & 1
                    mag = tl.where(strip, 2 * m + s3[:, None], m)
                    present = mag != 0
                else:
                    mag = m
                    present = mag != 0
                present = present & valid
                p32 = present.to(tl.int32)
                pg = tl.sum(p32, 1)
                srank = sign_carry + (tl.cumsum(pg, 0) - pg)[:, None] + tl.cumsum(p32, 1) - p32
                sign_carry += tl.sum(pg, 0)
                spos = tail_start + srank
                sok = present & (spos < end_bit)
                if CHECK:
                    err = err | (tl.max(tl.max(present & (spos >= end_bit), 1), 0).to(tl.int32) * 2)
                sbit = (tl.load(wp + (spos >> 5), mask=sok, other=0) >> (spos & 31)) & 1
                neg = sok & (sbit == 1)
                if LAT == 3:
                    val = 2 * mag + par[:, None]
                    nneg = tl.sum(tl.where(pos < 7, neg.to(tl.int32), 0), 1)
                    neg7 = ((tl.sum(tl.where(valid, mag, 0), 1) - nneg) & 1) == 1
                    neg = tl.where((pos == 7) & odd[:, None], neg7[:, None], neg)
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
_TUNE = {"programs_per_sm": 8, "num_warps": 8, "unary": 0, "chunk_words": _CHUNK_WORDS, "sub": 2048}
_SCRATCH: dict = {}


def _scratch(device, nprog: int, bv: int) -> torch.Tensor:
    # one scratch area per stream: the compressed-residency prefetch decodes on a side stream concurrently
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), bv, stream)
    t = _SCRATCH.get(key)
    if t is None or t.numel() < nprog * bv:
        t = torch.empty(nprog * bv, dtype=torch.int32, device=device)
        _SCRATCH[key] = t
    return t


def rice_decode(words: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, n: int, lattice: str,
                block_values: int, *, out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.int8,
                check: bool = False, stats: bool = True, programs: int | None = None, num_warps: int | None = None,
                unary: int | None = None, chunk_words: int | None = None, sub: int | None = None):
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
                            UNARY=_TUNE["unary"] if unary is None else unary,
                            SUB=min(bv, sub or _TUNE["sub"]), HWN=max(1, bv // 256),
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
