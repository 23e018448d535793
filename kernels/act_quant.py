"""Fused activation path: per-tile RHT of the activations + per-token int8 / fp8-e4m3 quantization.

``x`` (M, K) -> ``xq`` (M, K) int8 or float8_e4m3fn and ``sx`` float32 (M,) with ``xq * sx[:, None] ~= rht(x)``
(the codec's RHT: flip by ``signs``, then per-tile orthonormal Hadamard of ``tile`` values).

Kernels (``impl``):

* ``"onepass"`` (default where it applies): one program owns ``R`` whole rows (``R * K_pad`` = ``_TUNE["onepass_elems"]``
  values, ``K_pad`` = K rounded up to a power of two tiles) and holds them in registers: one load of ``x``, the
  RHT as one tensor-core product of the (R * tiles, T) view with the ±1 Sylvester matrix, the row maxima, the
  codes; HBM sees exactly one read of ``x`` and one write of the codes (the 2 + 1 bytes per value floor).
* ``"tma"`` (the default from ``_TUNE["large_min_values"]`` = 2^25 activation values, M x K, where it applies):
  the same one-pass computation with x and the codes viewed as (M * tiles, T) boxes moved by Hopper's TMA: a bulk
  copy per box into shared memory (pipelined, ``tma_stages`` deep), the product straight from there, a bulk store
  of the codes. Needs folded signs and contiguous rows of a power-of-two number of tiles; same bits as "onepass",
  8-10% less kernel time at K = 2048-4096 and 28-32% at K = 16384 on the H200, but ~12-25 µs more host time per
  call (two TMA descriptors), hence only for large activations.
* ``"fused"``: one program per ``BM`` rows walks the K tiles twice (max, then codes), for rows too long to hold.
  The second pass re-reads ``x``, from L2 when the row block is still there (the device profile found it mostly
  is not: 250 MB moved for 150 MB of data at 12288x4096; bench/RESULTS.md).
* ``"split"``: split-K over two launches, for few rows (more programs than one per row block).

Signs that repeat one flip ``d`` every tile (``codec.tile_signs``; the codec's default since 2026-12-02) are folded
into the product operand, ``diag(d) H`` (``signed_hadamard``, passed as ``hadamard``): the kernels then skip the
flip, which costs the one-pass kernel a second trip of every tile through shared memory (1.16-1.26x faster on the
H200 at K <= 4096, same bits; bench/RESULTS.md).

Rounding: int8 codes are ``v = y / sx`` rounded to nearest, ties to even (``sx = amax / 127``, so |v| <= 127);
fp8 codes are the round-to-nearest e4m3 cast of ``v`` with ``sx = amax / 448``.
"""

from __future__ import annotations

import math

import torch

from ._launch import CachedLauncher
from ._triton import interpreting, jit_cache, num_sms, require_triton

INT8_MAX = 127.0
FP8_MAX = 448.0


def _hadamard_pm1(tile: int, dtype, device) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < tile:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h.to(device=device, dtype=dtype).contiguous()


_H: dict = {}


def hadamard_pm1(tile: int, dtype, device) -> torch.Tensor:
    """Cached ±1 Sylvester Hadamard matrix (tile, tile) (exact in bf16/fp16)."""
    key = (tile, dtype, str(device))
    if key not in _H:
        _H[key] = _hadamard_pm1(tile, dtype, device)
    return _H[key]


def signed_hadamard(tile_signs: torch.Tensor, dtype, device) -> torch.Tensor:
    """``diag(d) · H`` (tile, tile) in ``dtype`` on ``device`` for the per-tile flip ``d`` (tile,) ±1 of signs that
    repeat every tile (``codec.tile_signs``): the product operand with the flip folded in, for ``rht_quantize``'s
    ``hadamard``. Cached per distinct ``d``. Exact in bf16/fp16 (entries ±1)."""
    d = tile_signs.to("cpu", torch.float32).reshape(-1)
    key = ("signed", dtype, str(device), d.numel(), bytes(d.to(torch.int8).numpy().tobytes()))
    if key not in _H:
        h = _hadamard_pm1(d.numel(), torch.float32, "cpu")
        _H[key] = (d[:, None] * h).to(device=device, dtype=dtype).contiguous()
    return _H[key]


@jit_cache
def _kernel():
    global tl, libdevice, _rht_tile, _codes, _rows_codes
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _rht_tile(x_ptr, s_ptr, h, rows64, rmask, cols, stride_xm, IEEE: tl.constexpr, FOLD: tl.constexpr):
        # one (BM, T) tile of rht(x) * sqrt(T): sign flip, then a tensor-core product with the ±1 Hadamard matrix
        # (FOLD: the signs repeat every tile and are already in ``h`` = diag(d) H)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=rmask[:, None], other=0.0)
        if FOLD:
            xs = x
        else:
            s = tl.load(s_ptr + cols)
            xs = x * s[None, :]
        if IEEE:
            return tl.dot(xs, h, input_precision="ieee")
        return tl.dot(xs, h)

    @triton.jit
    def _codes(v, FP8: tl.constexpr, QMAX: tl.constexpr, HW: tl.constexpr):
        # int8: round to nearest even, one instruction and no clamp: |v| <= QMAX (1 + 2^-23) by construction, so
        # it rounds to at most QMAX (the half-up rounding with its clamp cost the pass 14-15%, bench/RESULTS.md).
        # The interpreter has no libdevice.rint: adding and subtracting 1.5 * 2^23 rounds the same way (IEEE float32
        # addition rounds to nearest even, and |v| < 2^22). fp8: clamp, then the round-to-nearest e4m3 cast
        if FP8:
            qv = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(tl.float8e4nv)
        elif HW:
            qv = libdevice.rint(v).to(tl.int8)
        else:
            qv = ((v + 12582912.0) - 12582912.0).to(tl.int8)
        return qv

    @triton.jit
    def _rows_codes(y, rb, sx_ptr, M, inv_sqrt_t, R: tl.constexpr, NT: tl.constexpr, FP8: tl.constexpr,
                    QMAX: tl.constexpr, HW: tl.constexpr):
        # y: the (R * NT, T) RHT view of row block rb (view row i = row i // NT, tile i % NT): stores the R rows'
        # scales, returns their codes in y's layout
        amax = tl.max(tl.reshape(tl.max(tl.abs(y), 1), (R, NT)), 1)
        amax = tl.where(amax > 0, amax, 1.0)
        rows = rb * R + tl.arange(0, R)
        tl.store(sx_ptr + rows, amax * inv_sqrt_t / QMAX, mask=rows < M)
        inv = tl.reshape(tl.broadcast_to((QMAX / amax)[:, None], (R, NT)), (R * NT,))
        return _codes(y * inv[:, None], FP8, QMAX, HW)

    @triton.jit
    def rht_quant_kernel(x_ptr, s_ptr, h_ptr, q_ptr, sx_ptr, M, K, stride_xm, stride_qm, inv_sqrt_t,
                         T: tl.constexpr, BM: tl.constexpr, FP8: tl.constexpr, QMAX: tl.constexpr,
                         IEEE: tl.constexpr, FOLD: tl.constexpr, HW: tl.constexpr):
        # programs walk row blocks (a persistent grid when launched with fewer programs than blocks: fewer row
        # blocks in flight keep the second pass's re-read of x inside L2)
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        tt = tl.arange(0, T)
        h = tl.load(h_ptr + tt[:, None] * T + tt[None, :])
        for rb in range(pid, tl.cdiv(M, BM), nprog):
            rows = rb * BM + tl.arange(0, BM)
            rmask = rows < M
            rows64 = rows.to(tl.int64)
            amax = tl.zeros([BM], dtype=tl.float32)
            for k0 in range(0, K, T):
                y = _rht_tile(x_ptr, s_ptr, h, rows64, rmask, k0 + tt, stride_xm, IEEE, FOLD)
                amax = tl.maximum(amax, tl.max(tl.abs(y), 1))
            amax_safe = tl.where(amax > 0, amax, 1.0)
            tl.store(sx_ptr + rows, amax_safe * inv_sqrt_t / QMAX, mask=rmask)
            inv = QMAX / amax_safe
            for k0 in range(0, K, T):
                cols = k0 + tt
                v = _rht_tile(x_ptr, s_ptr, h, rows64, rmask, cols, stride_xm, IEEE, FOLD) * inv[:, None]
                qv = _codes(v, FP8, QMAX, HW)
                tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], qv, mask=rmask[:, None])

    @triton.jit
    def rht_amax_split_kernel(x_ptr, s_ptr, h_ptr, amax_ptr, M, K, stride_xm, KC: tl.constexpr,
                              T: tl.constexpr, BM: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr):
        # split-K pass 1 (small M): partial row maxima of |rht(x)| * sqrt(T) over KC columns, atomically merged
        # (non-negative floats order like their int32 bit patterns)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        tt = tl.arange(0, T)
        h = tl.load(h_ptr + tt[:, None] * T + tt[None, :])
        rows64 = rows.to(tl.int64)
        amax = tl.zeros([BM], dtype=tl.float32)
        kb = tl.program_id(1) * KC
        for k0 in range(kb, kb + KC, T):
            y = _rht_tile(x_ptr, s_ptr, h, rows64, rmask, k0 + tt, stride_xm, IEEE, FOLD)
            amax = tl.maximum(amax, tl.max(tl.abs(y), 1))
        tl.atomic_max(amax_ptr + rows, amax.to(tl.int32, bitcast=True), mask=rmask)

    @triton.jit
    def rht_quant_split_kernel(x_ptr, s_ptr, h_ptr, amax_ptr, q_ptr, sx_ptr, M, K, stride_xm, stride_qm,
                               inv_sqrt_t, KC: tl.constexpr, T: tl.constexpr, BM: tl.constexpr,
                               FP8: tl.constexpr, QMAX: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr,
                               HW: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        tt = tl.arange(0, T)
        h = tl.load(h_ptr + tt[:, None] * T + tt[None, :])
        rows64 = rows.to(tl.int64)
        amax = tl.load(amax_ptr + rows, mask=rmask, other=0).to(tl.float32, bitcast=True)
        amax_safe = tl.where(amax > 0, amax, 1.0)
        if tl.program_id(1) == 0:
            tl.store(sx_ptr + rows, amax_safe * inv_sqrt_t / QMAX, mask=rmask)
        inv = QMAX / amax_safe
        kb = tl.program_id(1) * KC
        for k0 in range(kb, kb + KC, T):
            cols = k0 + tt
            v = _rht_tile(x_ptr, s_ptr, h, rows64, rmask, cols, stride_xm, IEEE, FOLD) * inv[:, None]
            qv = _codes(v, FP8, QMAX, HW)
            tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], qv, mask=rmask[:, None])

    @triton.jit
    def rht_quant_onepass_kernel(x_ptr, s_ptr, h_ptr, q_ptr, sx_ptr, M, K, stride_xm, stride_qm, inv_sqrt_t,
                                 T: tl.constexpr, R: tl.constexpr, NT: tl.constexpr, FP8: tl.constexpr,
                                 QMAX: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr, FOLD: tl.constexpr,
                                 HW: tl.constexpr):
        # (R rows x NT tiles) of T values in registers: view i = row * NT + tile, one (R*NT, T) @ (T, T) product.
        # Programs walk row blocks (a persistent grid when launched with fewer programs than blocks, so the loop's
        # software pipeline loads the next block while this one computes).
        i = tl.arange(0, R * NT)
        tt = tl.arange(0, T)
        col = (i % NT)[:, None] * T + tt[None, :]
        if not FOLD:
            s = tl.load(s_ptr + col, mask=col < K, other=0.0)
        h = tl.load(h_ptr + tt[:, None] * T + tt[None, :])
        for rb in tl.range(tl.program_id(0), tl.cdiv(M, R), tl.num_programs(0), num_stages=STAGES):
            row = rb * R + i // NT
            m = (row < M)[:, None] & (col < K)
            row64 = row.to(tl.int64)
            x = tl.load(x_ptr + row64[:, None] * stride_xm + col, mask=m, other=0.0)
            if not FOLD:
                # a flip per column sends every tile through shared memory twice (loaded into registers for the
                # product, stored again in the MMA operand layout); folded signs let the MMA read x as loaded
                x = x * s
            if IEEE:
                y = tl.dot(x, h, input_precision="ieee")
            else:
                y = tl.dot(x, h)
            qv = _rows_codes(y, rb, sx_ptr, M, inv_sqrt_t, R, NT, FP8, QMAX, HW)
            tl.store(q_ptr + row64[:, None] * stride_qm + col, qv, mask=m)

    @triton.jit
    def rht_quant_tma_kernel(x_desc, h_ptr, q_desc, sx_ptr, M, inv_sqrt_t, T: tl.constexpr, R: tl.constexpr,
                             NT: tl.constexpr, FP8: tl.constexpr, QMAX: tl.constexpr, STAGES: tl.constexpr,
                             HW: tl.constexpr):
        # the one-pass kernel with folded signs, its tiles through Hopper's TMA: x and the codes are viewed as
        # (M * NT, T) (contiguous rows of exactly NT tiles), so a program's R rows are one (R * NT, T) box that one
        # bulk copy brings into shared memory, where the product reads it; the codes leave by a bulk store
        tt = tl.arange(0, T)
        h = tl.load(h_ptr + tt[:, None] * T + tt[None, :])
        for rb in tl.range(tl.program_id(0), tl.cdiv(M, R), tl.num_programs(0), num_stages=STAGES):
            x = x_desc.load([rb * R * NT, 0])
            y = tl.dot(x, h)
            q_desc.store([rb * R * NT, 0], _rows_codes(y, rb, sx_ptr, M, inv_sqrt_t, R, NT, FP8, QMAX, HW))

    return tuple(CachedLauncher(f) for f in (rht_quant_kernel, rht_amax_split_kernel, rht_quant_split_kernel,
                                             rht_quant_onepass_kernel, rht_quant_tma_kernel))


#: launch shapes; ``bench/bench_kernels.py`` sweeps them on the device (results in bench/RESULTS.md).
#: onepass: R = onepass_elems / K_pad whole rows per program (K_pad <= onepass_max_k); fused: one program per BM
#: rows walking all of K twice; split: (rows / BM) x (K / KC) programs, two launches.
#: A row longer than onepass_elems takes one program per row (R = 1) with onepass_warps_long warps (a 16384-wide
#: row is a (128, 128) view: 64 float32 per thread at 8 warps). Until 2026-11-24 such rows fell to "fused" (two
#: reads of x) or "split"; the H100 sweep (bench_kernels.py --overlap, bench/RESULTS.md): 12288x16384 0.314 ms
#: (fused 0.405, the old default 0.426), 256x16384 0.014 ms (split 0.034); 12288x4096 0.072, 12288x2048 0.041 ms.
#: tma: the one-pass kernel's R rows per program through TMA (``impl="tma"``), tma_pps programs per SM, tma_stages
#: boxes in flight; ``large_m_impl`` is what "auto" takes for M x K >= large_min_values when the kernel can view
#: x (folded signs, contiguous rows of a power-of-two number of tiles). H200, 2026-12-02 (bench_kernels.py
#: --actq-tma, profiler kernel time, bit-identical codes): int8 / fp8, µs, one-pass -> TMA (2 per SM, 4 stages):
#: 12288x2048 25.4 / 23.9 -> 22.9 / 21.9; 12288x4096 46.5 / 45.1 -> 41.9 / 41.1; 12288x16384 249 / 244 -> 178 /
#: 166; 1024x4096 7.3 / 7.0 -> 6.2 / 5.7 (3 stages). But its two descriptors cost the host 12-25 µs more per call
#: (bench_host.per_call_us), so it pays only where the GPU, not the host, sets the pace. Eager int8-resident layers,
#: one-pass vs TMA (bench_kernels.py --actq-crossover, twelfth session): at K = 2048 the TMA pass made the 2048x2048
#: layer 14-25% slower at 8192-12288 tokens (host-bound) and 1-2% faster at 16384; at K = 4096 (4096x4096) a tie at
#: 6144 tokens and 0-3% faster from 8192; at K = 16384 (4096x16384) 3-5% faster from 2048 tokens, mixed at 1024.
#: M x K >= 2^25 matches every one of these (LTX-2 at batch 2 takes it for its 12288-token video passes, at batch 1
#: for the 16384-wide ones).
_TUNE = {"onepass_elems": 8192, "onepass_warps": 4, "onepass_warps_long": 8, "onepass_max_k": 16384,
         "onepass_pps": 2, "onepass_stages": 3, "onepass_stages_long": 1, "onepass_long_k": 4096,
         "fused_bm": 64, "fused_warps": 8, "fused_stages": 4, "fused_pps": 0, "split_max_m": 2048, "split_bm": 16,
         "split_kc": 256, "split_warps": 4, "tma_pps": 2, "tma_stages": 4,
         "large_m_impl": "tma", "large_min_values": 1 << 25}


def rht_quantize(x: torch.Tensor, signs: torch.Tensor, tile: int, fmt: str = "int8", *,
                 signs_cast: torch.Tensor | None = None, hadamard: torch.Tensor | None = None, impl: str = "auto"):
    """Fused RHT + per-token quantization. ``x`` (M, K) bf16/fp16/fp32 (row stride free, unit column stride),
    ``signs`` ±1 (K,); ``fmt`` "int8" or "fp8". Returns (codes (M, K) int8 / float8_e4m3fn, scale float32 (M,)).
    ``signs_cast``: the signs already in x's dtype on x's device (avoids a per-call cast). ``hadamard``: when
    ``signs`` repeat one flip ``d`` every tile, ``signed_hadamard(d, x.dtype, x.device)``; the kernels then skip
    the flip (``signs`` is not read). The caller vouches that it matches ``signs``. ``impl``: "onepass"
    (rows held in registers, one read of x), "fused" (one launch, two passes over each row block), "split"
    (split-K in two launches: more programs for small M), "tma" (onepass through TMA boxes: folded signs,
    contiguous rows, a power-of-two number of tiles), "auto" (tma from ``large_min_values`` values M x K where it
    applies, else onepass when the padded row fits ``onepass_max_k``, else split for few rows and fused for
    many)."""
    require_triton()
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("rht_quantize expects a 2-D activation with unit stride along K")
    m, k = x.shape
    if k % tile:
        raise ValueError(f"K={k} is not a multiple of the RHT tile {tile}")
    if fmt not in ("int8", "fp8"):
        raise ValueError(f"fmt must be 'int8' or 'fp8', got {fmt!r}")
    fp8 = fmt == "fp8"
    fold = hadamard is not None
    if fold:
        if tuple(hadamard.shape) != (tile, tile) or hadamard.dtype != x.dtype or hadamard.device != x.device:
            raise ValueError(f"hadamard must be ({tile}, {tile}) {x.dtype} on {x.device}, got "
                             f"{tuple(hadamard.shape)} {hadamard.dtype} on {hadamard.device}")
        s, h = hadamard, hadamard          # s: any tensor of x's device (never read)
    else:
        s = signs_cast if signs_cast is not None else signs.to(device=x.device, dtype=x.dtype)
        h = hadamard_pm1(tile, x.dtype, x.device)
    q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    sx = torch.empty(m, device=x.device, dtype=torch.float32)
    qmax = FP8_MAX if fp8 else INT8_MAX
    ieee = x.dtype == torch.float32
    hw = not interpreting()
    fused, amax_k, quant_k, onepass_k, tma_k = _kernel()
    tu = _TUNE
    nt = 1 << max(0, (k // tile - 1).bit_length())     # tiles per row, rounded up to a power of two
    rows_per_prog = tu["onepass_elems"] // (nt * tile)
    if impl == "auto":
        if nt * tile <= tu["onepass_max_k"]:
            impl = "onepass"
            if (tu["large_m_impl"] == "tma" and m * k >= tu["large_min_values"]
                    and _tma_viewable(x, fold, nt * tile)):
                impl = "tma"
        else:
            impl = "split" if m <= tu["split_max_m"] else "fused"
    if impl == "tma":
        if not _tma_viewable(x, fold, nt * tile) or k > tu["onepass_max_k"]:
            raise ValueError("the TMA activation kernel needs folded signs (hadamard=...), contiguous rows, K a "
                             f"power of two number of tiles <= {tu['onepass_max_k']}, a 16-byte aligned x and at "
                             f"least one row; got K={k}, row stride {x.stride(0)}, folded={fold}, address "
                             f"{x.data_ptr()} ({x.data_ptr() % 16} mod 16), {m} rows")
        from triton.tools.tensor_descriptor import TensorDescriptor

        r = _onepass_rows(rows_per_prog, nt)
        x_desc = TensorDescriptor.from_tensor(x.view(m * nt, tile), [r * nt, tile])
        q_desc = TensorDescriptor.from_tensor(q.view(m * nt, tile), [r * nt, tile])
        nblk = triton_cdiv(m, r)
        pps = tu["tma_pps"]
        grid = (min(nblk, num_sms(x.device.index or 0) * pps),)
        tma_k(grid, x_desc, h, q_desc, sx, m, 1.0 / math.sqrt(tile), T=tile, R=r, NT=nt, FP8=fp8, QMAX=qmax, HW=hw,
              STAGES=tu["tma_stages"], num_warps=tu["onepass_warps"] if rows_per_prog >= 1 else tu["onepass_warps_long"])
        return q, sx
    if impl == "onepass":
        r = _onepass_rows(rows_per_prog, nt)
        nblk = triton_cdiv(m, r)
        pps = tu["onepass_pps"]  # programs per SM of a persistent grid; 0: one program per row block
        grid = (min(nblk, num_sms(x.device.index or 0) * pps) if pps else nblk,)
        onepass_k(grid, x, s, h, q, sx, m, k, x.stride(0), q.stride(0), 1.0 / math.sqrt(tile), T=tile, R=r,
                        NT=nt, FP8=fp8, QMAX=qmax, IEEE=ieee, FOLD=fold, HW=hw,
                        STAGES=tu["onepass_stages"] if nt * tile <= tu["onepass_long_k"] else tu["onepass_stages_long"],
                        num_warps=tu["onepass_warps"] if rows_per_prog >= 1 else tu["onepass_warps_long"])
        return q, sx
    if impl == "split":
        kc = max(tile, min(tu["split_kc"], k))
        while k % kc:
            kc //= 2
        bm = tu["split_bm"]
        grid = (triton_cdiv(m, bm), k // kc)
        amax = torch.zeros(m, device=x.device, dtype=torch.int32)
        amax_k(grid, x, s, h, amax, m, k, x.stride(0), KC=kc, T=tile, BM=bm, IEEE=ieee, FOLD=fold,
               num_warps=tu["split_warps"])
        quant_k(grid, x, s, h, amax, q, sx, m, k, x.stride(0), q.stride(0), 1.0 / math.sqrt(tile), KC=kc, T=tile,
                      BM=bm, FP8=fp8, QMAX=qmax, IEEE=ieee, FOLD=fold, HW=hw, num_warps=tu["split_warps"])
        return q, sx
    bm = tu["fused_bm"] if tile < 512 else 16
    nrb = triton_cdiv(m, bm)
    pps = tu.get("fused_pps", 0)  # programs per SM of a persistent grid; 0: one program per row block
    grid = (min(nrb, num_sms(x.device.index or 0) * pps) if pps else nrb,)
    fused(grid, x, s, h, q, sx, m, k, x.stride(0), q.stride(0), 1.0 / math.sqrt(tile), T=tile,
                                 BM=bm, FP8=fp8, QMAX=qmax, IEEE=ieee, FOLD=fold, HW=hw,
                                 num_warps=tu["fused_warps"],
                                 num_stages=tu["fused_stages"])
    return q, sx


def _onepass_rows(rows_per_prog: int, nt: int) -> int:
    """Rows R per program of the one-pass and TMA kernels: ``rows_per_prog``, at least 1, and enough that the
    (R * nt, T) view has the 16 rows the tensor-core product needs."""
    r = max(1, rows_per_prog)
    return 16 // nt if r * nt < 16 else r


def _tma_viewable(x: torch.Tensor, fold: bool, k_pad: int) -> bool:
    """Whether the TMA kernel can view ``x`` (M, K) as (M * tiles, T) boxes: folded signs, K exactly the padded
    width (a power-of-two number of tiles), contiguous rows, a 16-byte aligned base (TMA's rule) and rows."""
    m, k = x.shape
    return fold and k == k_pad and x.stride(0) == k and x.data_ptr() % 16 == 0 and m > 0


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def rht_quantize_reference(x: torch.Tensor, signs: torch.Tensor, tile: int, fmt: str = "int8"):
    """Torch reference of :func:`rht_quantize` (float32 math, the codec's RHT). Same outputs."""
    from hyperquant_diffusers.codec import rht

    y = rht(x.to(torch.float32), signs.to(x.device, torch.float32), tile)
    amax = y.abs().amax(1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    qmax = FP8_MAX if fmt == "fp8" else INT8_MAX
    sx = amax / qmax
    v = y / sx.unsqueeze(1)
    if fmt == "fp8":
        return v.clamp(-qmax, qmax).to(torch.float8_e4m3fn), sx
    return torch.round(v).clamp(-qmax, qmax).to(torch.int8), sx
