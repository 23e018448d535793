"""Triton bit helpers shared by the block decoders (:mod:`.rice_decode`, :mod:`.rank_decode`).

* ``popc`` / ``msb`` / ``lowest``: population count, highest and lowest set bit of uint32 lanes -- the hardware
  instructions on a GPU (``HW=True``), portable SWAR forms in Triton's CPU interpreter;
* ``read``: up to 32 bits LSB-first at any bit position of an int32 word stream;
* ``unary_pass``: a block's unary section -> one quotient per symbol (int8) in a scratch row, with the escape count
  and the bit position after the last terminator;
* ``block_header``: a block's place in the stream (word pointer, sizes, Rice parameter); ``e8_even_vectors``: the
  even vectors of an E8 block, from its parity head;
* ``e4m3x2_bits``: the float8-e4m3fn bytes of two integers (|v| <= 448, rounded to nearest even as torch's
  cast rounds), so that the decoders' fp8 output is the same on the GPU, in the interpreter and in torch. On a
  GPU (``HW=True``) one PTX ``cvt.rn.satfinite.e4m3x2.f32`` converts both: the decoders are bound by the integer
  pipe, and the integer form costs ~15 operations per value (the instruction needs sm_89 or newer, as does the
  fp8 MMA these bytes feed). In the interpreter, whose float8 cast rounds ties away from zero, ``_e4m3_bits``
  computes each byte with integer arithmetic on the float32 bits: the same bytes, and the reference the tests
  hold the instruction to. No float8 type appears inside the kernels: a float8 bitcast inside the vector
  decoder's packing gave wrong bytes on the H100 with Triton 3.6 (bench/RESULTS.md).

Built on first use (importing this module never imports Triton); the kernels bind them into their own module
globals, where Triton resolves a jitted function's callees.

Host side, shared by both launchers: the per-stream scratch row, the output and statistics buffers, the check
that raises on flagged blocks, and the torch reference (the codec's own decoder, clamped and cast like the
kernels).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..codec.rice import RiceStreamError
from ._pools import outside_graph_pools
from ._triton import jit_cache

_SCRATCH: dict = {}


def decode_scratch(device, numel: int, stream=None) -> torch.Tensor:
    """An int8 scratch area of at least ``numel`` bytes, one per device and stream (``stream``: a
    ``torch.cuda.Stream``, default the current one): the compressed-residency prefetch decodes on a side stream
    concurrently, while launches on one stream run in order."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            # a CUDA graph is being captured: a temporary of the graph's own pool (a cached scratch allocated there
            # would outlive the capture, which torch.compile's CUDA graphs reject, and one cached before it is
            # memory the graph does not own)
            return torch.empty(numel, dtype=torch.int8, device=device)
        raw = (stream if stream is not None else torch.cuda.current_stream(device)).cuda_stream
    else:
        raw = 0
    key = (device.type, device.index, raw)
    t = _SCRATCH.get(key)
    if t is None or t.numel() < numel:
        _SCRATCH.pop(key, None)
        t = _SCRATCH[key] = outside_graph_pools(device, _empty_on, stream, numel, torch.int8, device)
    return t


def release_scratch() -> None:
    """Drop the cached scratch rows and placeholders (each is freed on the stream it was allocated on, so work still
    queued there finishes first)."""
    _SCRATCH.clear()


def _empty_on(stream, numel: int, dtype, device) -> torch.Tensor:
    # allocated on the stream that will use it: the caching allocator reuses a block only on its own stream
    if stream is None:
        return torch.empty(numel, dtype=dtype, device=device)
    with torch.cuda.stream(stream):
        return torch.empty(numel, dtype=dtype, device=device)


def decode_buffers(n: int, nb: int, out, out_dtype, device, stats: bool = True):
    """Validated output (n,) ``out_dtype`` (allocated when ``out`` is None) and per-block ``amax``/``err`` int32
    (n_blocks,). Without ``stats`` the kernel writes neither: both are then None, and the kernel is handed one
    shared placeholder per device instead (no allocation per call)."""
    if out_dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"out_dtype must be torch.int8 or torch.float8_e4m3fn, got {out_dtype}")
    if out is None:
        out = torch.empty(int(n), dtype=out_dtype, device=device)
    elif out.numel() != int(n) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of {n} elements")
    if not stats:
        return out, None, None
    amax = torch.empty(nb, dtype=torch.int32, device=device)
    err = torch.empty(nb, dtype=torch.int32, device=device)
    return out, amax, err


def stats_placeholder(device) -> torch.Tensor:
    """The int32 argument passed for ``amax``/``err`` when a decoder runs without statistics (never written)."""
    key = ("placeholder", device.type, device.index)
    t = _SCRATCH.get(key)
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.empty(1, dtype=torch.int32, device=device)   # a graph temporary, as decode_scratch's
        t = _SCRATCH[key] = outside_graph_pools(device, torch.zeros, 1, dtype=torch.int32, device=device)
    return t


def raise_on_flags(err: torch.Tensor, amax: torch.Tensor, out_dtype, what: str) -> None:
    """``check=True``: ``RiceStreamError`` naming the first flagged block, ``ValueError`` if a coordinate was
    clamped to the output type's range."""
    if int(err.max()) != 0:
        bad = int((err != 0).nonzero()[0])
        raise RiceStreamError(f"block {bad}: malformed {what} (flags {int(err[bad])})")
    lim = 127 if out_dtype == torch.int8 else 448
    if int(amax.max()) > lim:
        raise ValueError(f"lattice coordinates reach {int(amax.max())}, beyond the {out_dtype} range ±{lim}")


def decode_reference(words, offsets, ks, n, lattice, block_values, out_dtype=torch.int8) -> torch.Tensor:
    """Torch reference: the codec's decoder, clamped/cast like the kernels. (n,) ``out_dtype``."""
    from ..codec.stream import decode_coords

    c = decode_coords(words, offsets.to(torch.int64), ks, int(n), lattice, int(block_values))
    if out_dtype == torch.int8:
        return c.clamp(-127, 127).to(torch.int8)
    return c.clamp(-448, 448).to(torch.float32).to(out_dtype)


@jit_cache
def bit_helpers() -> SimpleNamespace:
    global tl, libdevice, _popc, _read, _msb, _lowest, _max2, _unit_terminators, _e4m3_bits
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
    def unary_pass(wp, sp, un_start, cnt, nwords, NU: tl.constexpr, UB: tl.constexpr, ESC_Q: tl.constexpr,
                   HW: tl.constexpr):
        # The unary section (``cnt`` terminated runs of ones from bit ``un_start`` of the block at ``wp``, which
        # has ``nwords`` words) cut into units of UB bits, NU units (one lane each) per step. A prefix sum of
        # per-unit zero counts ranks each unit's first terminator, an inclusive max-scan over the previous units'
        # last terminator gives the terminator before it (carried across steps), and each lane walks its unit's
        # zeros, two per step, storing q_r = ones between terminators r-1 and r as int8 (saturated at ESC_Q + 1,
        # which callers flag) at ``sp + r``. Short units keep the walk short and give each thread several
        # independent chains. Returns (bit after the last terminator, number of q == ESC_Q, 1 if the section
        # is truncated else 0).
        cu = tl.arange(0, NU)
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
        tl.debug_barrier()   # the scratch row is read by other threads next
        return last + 1, n_esc, (carry < cnt).to(tl.int32)

    @triton.jit
    def block_header(words_ptr, offs_ptr, ks_ptr, b, n, BV: tl.constexpr):
        # Block ``b`` of a stream of ``n`` values in blocks of BV: its word pointer, words, bits, first value,
        # values, Rice parameter and whether that is positive (the low-bit sections strip bits only then)
        w0 = tl.load(offs_ptr + b).to(tl.int64)
        w1 = tl.load(offs_ptr + b + 1).to(tl.int64)
        nwords = (w1 - w0).to(tl.int32)
        v0 = (w0 * 0 + b) * BV
        k = tl.load(ks_ptr + b).to(tl.int32)
        return (words_ptr + w0, nwords, nwords * 32, v0, tl.minimum(n - v0, BV).to(tl.int32), k,
                (k > 0).to(tl.int32))

    @triton.jit
    def e8_even_vectors(wp, ng, nwords, HWN: tl.constexpr, HW: tl.constexpr):
        # even vectors among the ``ng`` of an E8 block: its head holds one parity bit per vector (HWN words,
        # a power of two >= ng / 32)
        hw = tl.arange(0, HWN)
        hwv = tl.load(wp + hw, mask=(hw * 32 < ng) & (hw < nwords), other=0).to(tl.uint32, bitcast=True)
        nbits = tl.minimum(tl.maximum(ng - hw * 32, 0), 32)
        hmask = tl.where(nbits >= 32, tl.full([HWN], 0xFFFFFFFF, tl.uint32),
                         (tl.full([HWN], 1, tl.uint32) << tl.minimum(nbits, 31).to(tl.uint32)) - 1)
        return ng - tl.sum(_popc(hwv & hmask, HW), 0)

    @triton.jit
    def _e4m3_bits(v):
        # int32 lanes, |v| <= 448 (callers clamp) -> the float8_e4m3fn byte (int32 in [0, 255]) of v. |v| is exact
        # in float32; its 23 mantissa bits are rounded to e4m3's 3 (nearest, ties to even: add 2**19 - 1 plus the
        # kept lowest bit, a carry moves into the exponent) and the exponent is rebiased from 127 to 7. Every
        # nonzero integer is a normal e4m3 number, and |v| <= 448 never rounds past e4m3's largest finite value.
        a = tl.abs(v)
        f = a.to(tl.float32).to(tl.int32, bitcast=True)
        mag = ((f + 0x7FFFF + ((f >> 20) & 1)) >> 20) - ((127 - 7) << 3)
        return tl.where(a == 0, 0, mag) | tl.where(v < 0, 0x80, 0)

    @triton.jit
    def e4m3x2_bits(hi, lo, HW: tl.constexpr):
        # int32 lanes, |hi|, |lo| <= 448 (callers clamp) -> the e4m3 bytes of ``hi`` (bits 8-15) and ``lo``
        # (bits 0-7) as int32. The instruction's first source is the upper byte. Integers this small are exact in
        # float32, the instruction rounds to nearest even as _e4m3_bits does, and satfinite never acts at <= 448;
        # a single value goes in ``lo`` with ``hi`` = 0 (e4m3 0 is the zero byte).
        if HW:
            p = tl.inline_asm_elementwise("cvt.rn.satfinite.e4m3x2.f32 $0, $1, $2;", "=h,f,f",
                                          [hi.to(tl.float32), lo.to(tl.float32)], dtype=tl.uint16, is_pure=True,
                                          pack=1)
            return p.to(tl.int32)
        else:
            return (_e4m3_bits(hi) << 8) | _e4m3_bits(lo)

    return SimpleNamespace(popc=_popc, read=_read, msb=_msb, lowest=_lowest, unary_pass=unary_pass,
                           block_header=block_header, e8_even_vectors=e8_even_vectors, e4m3x2_bits=e4m3x2_bits)
