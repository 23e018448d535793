"""Quantized matmul with the dequantization epilogue: ``y = (xq @ wq.T) * sx[:, None] * sw[None, :] + bias``.

``xq`` (M, K) int8 per-token codes with scale ``sx`` float32 (M,); ``wq`` (N, K) int8 lattice codes with per-row
scale ``sw`` float32 (N,); ``bias`` (N,) or None; output (M, N) in ``out_dtype``.

Paths (``bench/bench_kernels.py`` measures them; :func:`int8_linear` uses the faster):

* ``"triton"``: a Triton int8 x int8 -> int32 GEMM (tensor cores) with scales, bias and the output cast fused in
  its epilogue: the int32 accumulator never leaves registers.
* ``"tma"``: the same GEMM with operands through Hopper's TMA descriptors, one output tile per program.
* ``"persistent"``: a persistent TMA GEMM (one or two programs per SM walk the output tiles; TMA store of the
  output); the default of both operand types above 256 tokens on Hopper (``PERSISTENT``).
* ``"int_mm"``: ``torch._int_mm`` (cuBLAS) to an int32 (M, N) tensor, then one Triton epilogue pass.
* fp8: :func:`fp8_linear` -- ``torch._scaled_mm`` with row-wise scales (cuBLASLt), fp8-e4m3 operands.

References: :func:`quantized_linear_reference` (float64 product of the codes with the same scales).
"""

from __future__ import annotations

import warnings

import torch

from ._launch import CachedLauncher
from .cast import codes_to_e4m3
from ._triton import device_capability, jit_cache, num_sms, require_triton

_CONFIGS = {
    # (BM, BN, BK, GROUP_M, warps, stages): large tiles for the big-M case, small for M <= 256
    "large": (128, 256, 128, 8, 8, 3),
    "mid": (128, 128, 128, 8, 8, 4),
    "small": (64, 128, 128, 8, 4, 4),
}


@jit_cache
def _kernels():
    global tl, _tile_coords, _scaled_store, _zero_acc, _mma
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_coords(tile, group, num_m, GROUP_M: tl.constexpr):
        # (row tile, column tile) of output tile number ``tile`` in grouped order: GROUP_M row tiles share each
        # column tile's weight block while it is in L2
        gid = tile // group
        first_m = gid * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % group) % gsize, (tile % group) // gsize

    @triton.jit
    def _zero_acc(BM: tl.constexpr, BN: tl.constexpr, FP8: tl.constexpr):
        # the tensor-core accumulator: float32 for e4m3 operands, int32 (exact) for int8
        if FP8:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        return acc

    @triton.jit
    def _mma(a, b, acc, FP8: tl.constexpr):
        # acc += a @ b.T on the tensor cores (b is a (BN, BK) tile of the row-major weight)
        if FP8:
            acc = tl.dot(a, b.T, acc)
        else:
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        return acc

    @triton.jit
    def int8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                         HAS_BIAS: tl.constexpr):
        pid_m, pid_n = _tile_coords(tl.program_id(0), GROUP_M * tl.cdiv(N, BN), tl.cdiv(M, BM), GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        ram = tl.max_contiguous(tl.multiple_of(rm % M, BM), BM)
        rbn = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
        a_ptrs = a_ptr + ram.to(tl.int64)[:, None] * stride_am + rk[None, :]
        b_ptrs = b_ptr + rbn.to(tl.int64)[None, :] * stride_bn + rk[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BK
            b_ptrs += BK
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def epilogue_kernel(acc_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr,
                        HAS_BIAS: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        off = rm.to(tl.int64)[:, None] * N + rn[None, :]
        acc = tl.load(acc_ptr + off, mask=mask, other=0)
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + off, y.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def int8_gemm_tma_kernel(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, stride_cm,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                             HAS_BIAS: tl.constexpr, STAGES: tl.constexpr, FP8: tl.constexpr = False,
                             WS: tl.constexpr = False):
        # same tiling, operands through Hopper's tensor-memory-accelerator descriptors (bulk async copies).
        # FP8: e4m3 operands, float32 accumulator. (Casting int8 weight codes to e4m3 inside this loop was tried:
        # 2.5x slower than a separate cast pass, bench/RESULTS.md.)
        pid_m, pid_n = _tile_coords(tl.program_id(0), GROUP_M * tl.cdiv(N, BN), tl.cdiv(M, BM), GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        acc = _zero_acc(BM, BN, FP8)
        for k0 in tl.range(0, K, BK, num_stages=STAGES, warp_specialize=WS):
            acc = _mma(a_desc.load([om, k0]), b_desc.load([on, k0]), acc, FP8)
        rm = om + tl.arange(0, BM)
        rn = on + tl.arange(0, BN)
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def _scaled_store(c_desc, acc, sa, sb_ptr, bias_ptr, om, on, N, BN: tl.constexpr, HAS_BIAS: tl.constexpr):
        rn = on + tl.arange(0, BN)
        sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([om, on], y.to(c_desc.dtype))

    @triton.jit
    def gemm_persistent_kernel(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, bias_ptr, M, N, K,
                               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                               HAS_BIAS: tl.constexpr, STAGES: tl.constexpr, PROGRAMS: tl.constexpr,
                               FP8: tl.constexpr, SUBTILE: tl.constexpr, FLATTEN: tl.constexpr):
        # Persistent TMA GEMM (the schedule of Triton's tutorial 09): PROGRAMS programs walk the output tiles in
        # grouped order, so the next tile's loads are issued while this tile's epilogue runs (FLATTEN pipelines the
        # tile loop and the K loop as one), and the output leaves through a TMA store, in two halves with SUBTILE
        # (half the registers and shared memory for the bf16 staging). Why: at K = 2048 a tile's K loop is only
        # 16 steps, and the one-tile-per-program kernel above leaves the tensor cores idle through every prologue
        # and epilogue.
        start = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        group = GROUP_M * num_n
        # the epilogue's tile index runs as its own counter, so it does not depend on the loop's (lets the
        # compiler pipeline across tiles)
        tile_c = start - PROGRAMS
        for tile in tl.range(start, num_m * num_n, PROGRAMS, flatten=FLATTEN):
            pid_m, pid_n = _tile_coords(tile, group, num_m, GROUP_M)
            om = pid_m * BM
            on = pid_n * BN
            acc = _zero_acc(BM, BN, FP8)
            for ki in tl.range(k_tiles, num_stages=STAGES):
                acc = _mma(a_desc.load([om, ki * BK]), b_desc.load([on, ki * BK]), acc, FP8)
            tile_c += PROGRAMS
            pid_m, pid_n = _tile_coords(tile_c, group, num_m, GROUP_M)
            om = pid_m * BM
            on = pid_n * BN
            rm = om + tl.arange(0, BM)
            sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
            if SUBTILE:
                acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
                _scaled_store(c_desc, acc0, sa, sb_ptr, bias_ptr, om, on, N, BN // 2, HAS_BIAS)
                _scaled_store(c_desc, acc1, sa, sb_ptr, bias_ptr, om, on + BN // 2, N, BN // 2, HAS_BIAS)
            else:
                _scaled_store(c_desc, acc, sa, sb_ptr, bias_ptr, om, on, N, BN, HAS_BIAS)

    return tuple(CachedLauncher(f) for f in (int8_gemm_kernel, epilogue_kernel, int8_gemm_tma_kernel,
                                             gemm_persistent_kernel))


def _pick(m: int, n: int) -> tuple:
    if m <= 256:
        return _CONFIGS["small"]
    if m * n >= (1 << 24):
        return _CONFIGS["large"]
    return _CONFIGS["mid"]


def int8_gemm_triton(xq, sx, wq, sw, bias, out_dtype=torch.bfloat16, config: tuple | None = None):
    """Triton int8 GEMM with fused epilogue. K must be a multiple of the K tile (128)."""
    require_triton()
    m, k = xq.shape
    n = wq.shape[0]
    bm, bn, bk, gm, warps, stages = config or _pick(m, n)
    if k % bk:
        raise ValueError(f"K={k} must be a multiple of {bk} for the Triton int8 GEMM")
    out = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    grid = (((m + bm - 1) // bm) * ((n + bn - 1) // bn),)
    _kernels()[0](grid, xq, wq, out, sx, sw, bias if bias is not None else sx, m, n, k, xq.stride(0),
                        wq.stride(0), out.stride(0), BM=bm, BN=bn, BK=bk, GROUP_M=gm, HAS_BIAS=bias is not None,
                        num_warps=warps, num_stages=stages)
    return out


#: tiles of the TMA GEMM (best of the bench/bench_kernels.py sweep on the H100 at M = 12288: 0.343 ms, 1.20 POPS
#: for 12288x4096x4096), and for M <= 256
_TMA = {"config": (128, 256, 128, 8, 8, 4), "small": (64, 128, 128, 8, 4, 4), "fp8": (128, 256, 128, 8, 8, 4),
        "warp_specialize": False}


def _gemm_tma(a, sx, wq, sw, bias, out_dtype, config: tuple | None, fp8: bool):
    require_triton()
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = a.shape
    n = wq.shape[0]
    bm, bn, bk, gm, warps, stages = config or (_TMA["small"] if m <= 256 else _TMA["fp8" if fp8 else "config"])
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(wq, [bn, bk])
    out = torch.empty(m, n, device=a.device, dtype=out_dtype)
    grid = (((m + bm - 1) // bm) * ((n + bn - 1) // bn),)
    _kernels()[2](grid, a_desc, b_desc, out, sx, sw, bias if bias is not None else sx, m, n, k, out.stride(0),
                        BM=bm, BN=bn, BK=bk, GROUP_M=gm, HAS_BIAS=bias is not None, STAGES=stages, FP8=fp8,
                        WS=_TMA["warp_specialize"] and m > 256, num_warps=warps)
    return out


#: the persistent GEMM's launch, (BM, BN, BK, GROUP_M, warps, stages, SUBTILE, FLATTEN, programs per SM), per
#: operand type; its programs are min(tiles, SMs x programs per SM) (an 8-element config: one per SM). ``use``: the
#: operand types whose M > 256 GEMM it serves under the "auto" path. H200, 2026-12-02 (bench/RESULTS.md):
#: bench_kernels.py --gemm-sweep at M = 12288, the fp8 GEMM alone 5-9% faster than the one-tile-per-program TMA
#: kernel on all four LTX-2 shapes (4096²: 0.316 vs 0.333 ms, 2048²: 0.085 vs 0.093 ms). Its launch costs ~6 µs
#: more host time (33 vs 27 µs, --host-gemm: a third TMA descriptor).
#: int8: two programs per SM of 128x128 tiles (115 KB of shared memory each). Triton's pipeliner keeps a wgmma
#: with an int32 accumulator synchronous (only fp32-accumulator dots become "properly async"), so one int8 program
#: per SM leaves the tensor cores idle while each K step's MMAs drain; a second program issues its MMAs meanwhile.
#: bench_kernels.py --gemm-occupancy (thirteenth session, do_bench ms, L2 flushed, bit-identical outputs): 2048²
#: 0.0989 -> 0.0829, 4096² 0.351 -> 0.308, 16384x4096 1.380 -> 1.202, 4096x16384 1.308 -> 1.176, against the
#: earlier (256, 128) tiles at one per SM; the int8 GEMM now runs as fast as the fp8 one (0.082-0.085 ms at 2048²).
#: fp8 (async MMAs already) gains nothing from two per SM: its (128, 256) tiles at one per SM stay best.
PERSISTENT = {"int8": (128, 128, 128, 16, 4, 3, True, True, 2), "fp8": (128, 256, 128, 16, 8, 3, True, True, 1),
              "use": ("int8", "fp8")}


def _persistent_serves(fmt: str, m: int) -> bool:
    return fmt in PERSISTENT["use"] and m > 256


def _gemm_persistent(a, sx, wq, sw, bias, out_dtype, config: tuple | None, fp8: bool,
                     programs: int | None = None):
    require_triton()
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = a.shape
    n = wq.shape[0]
    config = tuple(config or PERSISTENT["fp8" if fp8 else "int8"])
    if len(config) not in (8, 9):
        raise ValueError("persistent GEMM config is (BM, BN, BK, GROUP_M, warps, stages, SUBTILE, FLATTEN[, programs "
                         f"per SM]), got {config!r}")
    bm, bn, bk, gm, warps, stages, subtile, flatten = config[:8]
    per_sm = config[8] if len(config) == 9 else 1
    if not isinstance(per_sm, int) or per_sm < 1:
        raise ValueError(f"persistent GEMM config: programs per SM must be a positive integer, got {per_sm!r}")
    if k % bk:
        raise ValueError(f"K={k} must be a multiple of {bk} for the persistent GEMM")
    out = torch.empty(m, n, device=a.device, dtype=out_dtype)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(wq, [bn, bk])
    c_desc = TensorDescriptor.from_tensor(out, [bm, bn // 2 if subtile else bn])
    tiles = ((m + bm - 1) // bm) * ((n + bn - 1) // bn)
    if programs is None:
        programs = num_sms(a.device.index or 0) * per_sm
    programs = max(1, min(tiles, programs))
    _kernels()[3]((programs,), a_desc, b_desc, c_desc, sx, sw, bias if bias is not None else sx, m, n, k,
                  BM=bm, BN=bn, BK=bk, GROUP_M=gm, HAS_BIAS=bias is not None, STAGES=stages, PROGRAMS=programs,
                  FP8=fp8, SUBTILE=subtile, FLATTEN=flatten, num_warps=warps)
    return out


def int8_gemm_persistent(xq, sx, wq, sw, bias, out_dtype=torch.bfloat16, config: tuple | None = None,
                         programs: int | None = None):
    """Persistent Triton int8 GEMM: TMA loads and stores, programs that walk the output tiles (two per SM at the
    default launch, ``PERSISTENT["int8"]``), the same epilogue."""
    return _gemm_persistent(xq, sx, wq, sw, bias, out_dtype, config, False, programs)


def fp8_gemm_persistent(xq8, sx, wq, sw, bias, out_dtype=torch.bfloat16, config: tuple | None = None,
                        programs: int | None = None):
    """The persistent GEMM with fp8-e4m3 operands (float32 accumulator)."""
    return _gemm_persistent(xq8, sx, wq, sw, bias, out_dtype, config, True, programs)


def int8_gemm_tma(xq, sx, wq, sw, bias, out_dtype=torch.bfloat16, config: tuple | None = None):
    """Triton int8 GEMM with TMA descriptor loads (Hopper) and the same fused epilogue."""
    return _gemm_tma(xq, sx, wq, sw, bias, out_dtype, config, fp8=False)


def fp8_gemm_tma(xq8, sx, wq, sw, bias, out_dtype=torch.bfloat16, config: tuple | None = None):
    """The TMA GEMM with fp8-e4m3 operands: activations ``xq8`` (M, K), weight codes ``wq`` (N, K)."""
    return _gemm_tma(xq8, sx, wq, sw, bias, out_dtype, config, fp8=True)


def int8_gemm_int_mm(xq, sx, wq, sw, bias, out_dtype=torch.bfloat16):
    """``torch._int_mm`` (cuBLAS, int32 out) + one Triton epilogue pass (scales, bias, cast)."""
    require_triton()
    m = xq.shape[0]
    n = wq.shape[0]
    if m <= 16:  # _int_mm needs M > 16
        xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - m))
    acc = torch._int_mm(xq, wq.t())[:m]
    out = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    bm, bn = 64, 128
    _kernels()[1](((m + bm - 1) // bm, (n + bn - 1) // bn), acc, out, sx, sw, bias if bias is not None else sx,
                                                            m, n, BM=bm, BN=bn, HAS_BIAS=bias is not None)
    return out


#: which int8 path :func:`int8_linear` uses. "auto": on Hopper the persistent GEMM above 256 tokens (``PERSISTENT``;
#: the one-tile-per-program TMA GEMM before 2026-12-02), the pointer GEMM at or below, and before Hopper the pointer
#: GEMM everywhere (bench/RESULTS.md); on a GPU where a Triton GEMM runs out of shared memory, ``torch._int_mm``
#: (``_portable_after``). Switch with ``set_int8_path`` (an explicit path has no fallback).
_INT8_PATH = {"path": "auto"}


def set_int8_path(path: str) -> None:
    if path not in ("auto", "triton", "int_mm", "tma", "persistent"):
        raise ValueError(f"int8 path must be 'auto', 'triton', 'tma', 'persistent' or 'int_mm', got {path!r}")
    _INT8_PATH["path"] = path


#: device indices where a Triton GEMM launch ran out of shared memory (a GPU that passes the capability test with
#: less of it per SM than the H100's, such as consumer Blackwell's ~100 KB): their "auto" paths take cuBLAS from then
#: on (``_portable_after``)
_TRITON_GEMMS_TOO_BIG: set = set()


def _hopper(t: torch.Tensor) -> bool:
    return device_capability(t.device.index or 0) >= (9, 0)


def _triton_gemms_fit(t: torch.Tensor) -> bool:
    return (t.device.index or 0) not in _TRITON_GEMMS_TOO_BIG


def _portable_after(err: Exception, device: torch.device) -> None:
    """Re-raise ``err`` unless it is Triton's out-of-resources error, raised on the host at the launch of a kernel
    whose shared memory (or registers) the GPU cannot give it, before anything was enqueued. Then remember the device
    (its "auto" GEMM paths become cuBLAS's: ``torch._int_mm`` / ``torch._scaled_mm``) and warn once."""
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:              # no Triton: the error cannot be Triton's
        raise err from None
    if not isinstance(err, OutOfResources):
        raise err
    idx = device.index or 0
    if idx not in _TRITON_GEMMS_TOO_BIG:
        _TRITON_GEMMS_TOO_BIG.add(idx)
        warnings.warn(f"HyperQuant: the Triton GEMM does not fit this GPU ({err}); the quantized layers on cuda:{idx} "
                      "use cuBLAS (torch._int_mm / torch._scaled_mm) instead", RuntimeWarning, stacklevel=3)


def require_fp8_mma(device: torch.device) -> None:
    """Raise a RuntimeError naming the GPU's compute capability when it has no fp8 tensor cores (before 8.9)."""
    cap = device_capability(device.index or 0)
    if cap < (8, 9):
        raise RuntimeError(f"mma='fp8' needs fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); this "
                           f"GPU is sm_{cap[0]}{cap[1]}. Use mma='int8'")


def int8_linear(xq, sx, wq, sw, bias, out_dtype=torch.bfloat16):
    """int8 GEMM with the per-token x per-row scales, bias and output cast fused (see ``set_int8_path``). Before
    Hopper the "auto" path is the pointer GEMM everywhere (the TMA kernels need compute capability 9.0)."""
    path, m = _INT8_PATH["path"], xq.shape[0]
    if path == "int_mm" or (path == "auto" and not _triton_gemms_fit(xq)):
        return int8_gemm_int_mm(xq, sx, wq, sw, bias, out_dtype)
    if path == "persistent":
        return int8_gemm_persistent(xq, sx, wq, sw, bias, out_dtype)
    if path == "tma":
        return int8_gemm_tma(xq, sx, wq, sw, bias, out_dtype)
    if path == "triton":
        return int8_gemm_triton(xq, sx, wq, sw, bias, out_dtype)
    try:                # "auto"; a GPU whose shared memory a Triton GEMM outgrows falls back to cuBLAS
        if _hopper(xq) and _persistent_serves("int8", m):
            return int8_gemm_persistent(xq, sx, wq, sw, bias, out_dtype)
        if _hopper(xq) and m > 256:
            return int8_gemm_tma(xq, sx, wq, sw, bias, out_dtype)
        return int8_gemm_triton(xq, sx, wq, sw, bias, out_dtype)
    except Exception as e:  # noqa: BLE001 -- anything but Triton's out-of-resources error is re-raised
        _portable_after(e, xq.device)
    return int8_gemm_int_mm(xq, sx, wq, sw, bias, out_dtype)


#: which fp8 path :func:`fp8_linear` uses: "scaled_mm" (cuBLASLt row-wise), "tma" (the Triton TMA GEMM, 12-15%
#: faster at M = 12288 on the H100) or "persistent"; "auto": above 256 tokens the persistent GEMM where
#: ``PERSISTENT["use"]`` names fp8 (the default), else tma (bench/RESULTS.md)
_FP8_PATH = {"path": "auto"}


def set_fp8_path(path: str) -> None:
    if path not in ("auto", "scaled_mm", "tma", "persistent"):
        raise ValueError(f"fp8 path must be 'auto', 'scaled_mm', 'tma' or 'persistent', got {path!r}")
    _FP8_PATH["path"] = path


def fp8_linear(xq8, sx, wq8, sw, bias, out_dtype=torch.bfloat16):
    """fp8-e4m3 GEMM; ``wq8`` (N, K) float8_e4m3fn (or int8 codes, cast to e4m3 first). Output ``out_dtype``.
    Needs compute capability 8.9 (RuntimeError before); on Ada the "auto" path is ``torch._scaled_mm``."""
    m = xq8.shape[0]
    require_fp8_mma(xq8.device)
    if wq8.dtype == torch.int8:
        wq8 = codes_to_e4m3(wq8.contiguous())
    path = _FP8_PATH["path"]
    if path == "persistent":
        return fp8_gemm_persistent(xq8, sx, wq8, sw, bias, out_dtype)
    if path == "tma":
        return fp8_gemm_tma(xq8, sx, wq8, sw, bias, out_dtype)
    if path == "auto" and _hopper(xq8) and m > 256 and _triton_gemms_fit(xq8):
        try:            # a GPU whose shared memory the Triton GEMM outgrows falls back to cuBLAS below
            if _persistent_serves("fp8", m):
                return fp8_gemm_persistent(xq8, sx, wq8, sw, bias, out_dtype)
            return fp8_gemm_tma(xq8, sx, wq8, sw, bias, out_dtype)
        except Exception as e:  # noqa: BLE001 -- anything but Triton's out-of-resources error is re-raised
            _portable_after(e, xq8.device)
    kw = dict(scale_a=sx.reshape(m, 1), scale_b=sw.reshape(1, -1), out_dtype=out_dtype)
    if bias is not None and bias.dtype == out_dtype and out_dtype == torch.bfloat16:
        return torch._scaled_mm(xq8, wq8.t(), bias=bias, **kw)
    y = torch._scaled_mm(xq8, wq8.t(), **kw)
    return y + bias.to(out_dtype) if bias is not None else y


def quantized_linear_reference(xq, sx, wq, sw, bias, out_dtype=torch.float64):
    """float64 reference of the quantized product (codes x scales + bias): (M, N) in ``out_dtype``."""
    y = (xq.to(torch.float64) @ wq.to(torch.float64).T) * sx.double()[:, None] * sw.double()[None, :]
    if bias is not None:
        y = y + bias.double()[None, :]
    return y.to(out_dtype)
