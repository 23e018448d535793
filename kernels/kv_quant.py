"""Fused K/V fake quantization: RHT -> per-vector step -> (dithered) nearest lattice point -> inverse RHT, one pass.

``x`` (R, D) bf16/fp16/fp32, one K or V vector (one token, one head) per row -> ``x_hat`` (R, D), same dtype:
the reconstruction that :meth:`hyperquant_diffusers.kv.quantizer.KVQuantizer.fake_quantize` computes with the
codec's torch operations, for lattices Z, D4 and E8 with subtractive dither (``dither=True``) or plain nearest
point. Per row, in float32:

* ``y = rht(x)``: flip by ``signs`` (D,), then the orthonormal Hadamard of every ``tile`` values (the codec's RHT);
* step code ``e = round(CPO * log2(alpha * rms(y)))`` clamped to int8, step ``s = 2^(e / CPO)`` (``CPO`` codes per
  octave: the K/V quantizer's ``STEP_CODES_PER_OCTAVE``, passed in so that it has one source);
* dither ``u`` uniform on the lattice's Voronoi cell: ``u = z0 - Q(z0)`` for ``z0`` uniform on [0, 2)^D (every one
  of the three lattices contains 2Z^D, so reducing a uniform point of that cube modulo the lattice is uniform on
  the cell), drawn with Triton's Philox generator from ``seed`` and the value's index;
* ``y_hat = (Q(y / s + u) - u) * s`` (``u = 0`` without dither), ``x_hat = inverse_rht(y_hat)``.

Why a kernel: the torch path is a few dozen elementwise launches over float32 temporaries, plus a second
nearest-point search for the dither, per K and per V tensor; on the full-size LTX-2 step it cost ~4.5 s
(bench/RESULTS.md, "Time saved per step"). This kernel reads ``x`` once and writes ``x_hat`` once.

Precision: the transforms are products with the ±1 block-diagonal Hadamard matrix whose sums are float32 sums of
exact products: the same transform as the codec's float32 butterfly up to summation order. Two ways
(``_TUNE["hadamard"]`` or ``kv_fake_quantize(..., hadamard=)``):

* ``"ieee"``: one float32 product (IEEE, no TF32), on the CUDA cores: ~512 flops per value for both transforms at
  D = 128, and the (D, D) float32 matrix held by every program;
* ``"bf16"``: the float32 operand split into bf16 parts (one for a bf16 input, two for fp16, three for float32
  and for the reconstruction), each multiplied on the tensor cores (exact:
  the matrix is ±1), the partial products summed in float32. Triton's CPU interpreter cannot multiply bf16
  operands, so there the parts are multiplied in float32: the split itself is what the CPU tests check.

The dither differs from the torch path's (Philox here, torch's generator there): same distribution, another draw.
``kv_fake_quantize_reference`` below is the torch reference, given the kernel's dither (``return_dither=True``).

A cache (the text K/V, stored across denoising steps) splits the same pass in two: :func:`kv_encode` stops at the
lattice point and writes the codec's coordinates and the step codes, :func:`kv_decode` redraws the dither from the
same seed and reconstructs. Both halves run the same kernel code as :func:`kv_fake_quantize` and choose the same
lattice points; in the interpreter a decoded entry equals the fake quantization bit for bit, while on the GPU, where
each op is compiled apart, the reconstruction may round differently (H200: 1 bf16 ulp in ~1 of 10^5 values; up to 4
float32 ulps of a vector's largest value in float32; not from fma contraction: compiling without it changed
nothing). Code that must reproduce a cache entry exactly encodes and decodes
(``KVQuantizer.fake_quantize_as_cached``).
"""

from __future__ import annotations

import math

import torch

from ._launch import CachedLauncher
from .act_quant import hadamard_pm1, triton_cdiv
from ._triton import interpreting, jit_cache, num_sms, require_triton

#: lattices the kernel quantizes to (their Triton nearest-point code), by the codec's name
LATTICE_IDS = {"Z": 0, "D4": 1, "E8": 2}
#: head dimensions it takes: powers of two from the 16 rows/columns a tensor-core product needs up to 256
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
#: values per launch: Philox offsets are int32 row * D + column, so larger tensors are cut into launches of
#: their own seeds
MAX_LAUNCH_VALUES = 1 << 30
#: launch shape per Hadamard mode: values per program (rows = values / D, at least 16), warps; programs per SM of
#: the persistent grid (each program loads the Hadamard operand once and walks row blocks); the default mode.
#: Timed on an H200 (bench/RESULTS.md, twentieth session): "bf16" at 1024 values and 4 warps is the fastest or within
#: 3% of it on every LTX-2 K/V shape (2 x 6144 x 32 x 128 E8: 0.786 ms, against 1.18 ms at 2048 values and 8
#: warps; 2048 values at 4 warps ties at D = 128 and is twice as slow at D = 64), with no register spills from bf16
#: input (tests/test_kernels_compile.py). "ieee" holds the (D, D) float32 matrix: at 4 warps it spilled 34 KB and
#: took 35 ms on that K, so it keeps 8 warps (640 B of spills compiled for sm_90).
_TUNE = {"bf16": {"block_values": 1024, "warps": 4}, "ieee": {"block_values": 2048, "warps": 8}, "pps": 4,
         "hadamard": "bf16"}
#: what a launch does (the kernel's MODE is the index): quantize and reconstruct; quantize to coordinates and step
#: codes; reconstruct them
OP_MODES = ("fake", "encode", "decode")
#: input dtypes, and the bf16 parts that hold each exactly (bf16: 8 significant bits, fp16: 11, float32: 24)
PARTS_IN = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
IN_DTYPES = tuple(PARTS_IN)
#: the ways of multiplying by the Hadamard matrix (module docstring)
HADAMARD_MODES = ("ieee", "bf16")


@jit_cache
def _kernel():
    # the helpers are module globals: a @triton.jit function resolves the functions it calls there
    global tl, libdevice, _rint, _nearest_dn, _nearest, _dither, _times_hadamard, _log2, _exp2
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _rint(v, HW: tl.constexpr):
        # round half to even, like torch.round. The interpreter has no libdevice.rint: adding and subtracting
        # 1.5 * 2^23 rounds the same way for |v| < 2^22 (lattice units: far beyond any reachable coordinate)
        if HW:
            return libdevice.rint(v)
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _nearest_dn(g, N: tl.constexpr, HW: tl.constexpr):
        # g (G, N): nearest point of D_N per row (Conway & Sloane): round, and where the sum is odd move the
        # coordinate with the largest rounding error (first one on ties, as torch.argmax) one step towards g
        f = _rint(g, HW)
        s = tl.sum(f, axis=1)
        odd = (s - 2.0 * tl.floor(s * 0.5)) != 0.0
        err = g - f
        idx = tl.argmax(tl.abs(err), axis=1, tie_break_left=True)
        pick = (tl.arange(0, N)[None, :] == idx[:, None]) & odd[:, None]
        return f + tl.where(pick, tl.where(err >= 0.0, 1.0, -1.0), 0.0)

    @triton.jit
    def _nearest(v, BR: tl.constexpr, D: tl.constexpr, LAT: tl.constexpr, HW: tl.constexpr):
        # v (BR, D) float32 in lattice units -> nearest lattice point (BR, D) float32, groups of the lattice's
        # dimension along D
        if LAT == 0:
            return _rint(v, HW)
        elif LAT == 1:
            g = tl.reshape(v, (BR * D // 4, 4))
            return tl.reshape(_nearest_dn(g, 4, HW), (BR, D))
        else:
            # E8 = D8 u (D8 + 1/2): the nearer of the two cosets' points
            g = tl.reshape(v, (BR * D // 8, 8))
            p0 = _nearest_dn(g, 8, HW)
            p1 = _nearest_dn(g - 0.5, 8, HW) + 0.5
            d0 = tl.sum((g - p0) * (g - p0), axis=1)
            d1 = tl.sum((g - p1) * (g - p1), axis=1)
            return tl.reshape(tl.where((d1 < d0)[:, None], p1, p0), (BR, D))

    @triton.jit
    def _dither(seed, offs, BR: tl.constexpr, D: tl.constexpr, LAT: tl.constexpr, HW: tl.constexpr):
        # uniform on the Voronoi cell: z0 uniform on [0, 2)^D (Philox, keyed by the value's index) minus its
        # nearest lattice point
        z0 = 2.0 * tl.rand(seed, offs)
        return z0 - _nearest(z0, BR, D, LAT, HW)

    @triton.jit
    def _times_hadamard(a, h, PARTS: tl.constexpr, SPLIT: tl.constexpr, MMA_BF16: tl.constexpr):
        # a (BR, D) float32 @ h (D, D) ±1/0. SPLIT: a as PARTS bf16 parts (their products with ±1 are exact),
        # multiplied in bf16 on the tensor cores (MMA_BF16, h bf16) or in float32 (h float32); else one IEEE
        # float32 product (no TF32 rounding of a)
        if not SPLIT:
            return tl.dot(a, h, input_precision="ieee")
        hi = a.to(tl.bfloat16)
        r = a - hi.to(tl.float32)
        if MMA_BF16:
            acc = tl.dot(hi, h, out_dtype=tl.float32)
        else:
            acc = tl.dot(hi.to(tl.float32), h, input_precision="ieee")
        if PARTS > 1:
            mid = r.to(tl.bfloat16)
            r = r - mid.to(tl.float32)
            if MMA_BF16:
                acc = tl.dot(mid, h, acc, out_dtype=tl.float32)
            else:
                acc = tl.dot(mid.to(tl.float32), h, acc, input_precision="ieee")
        if PARTS > 2:
            lo = r.to(tl.bfloat16)
            if MMA_BF16:
                acc = tl.dot(lo, h, acc, out_dtype=tl.float32)
            else:
                acc = tl.dot(lo.to(tl.float32), h, acc, input_precision="ieee")
        return acc

    @triton.jit
    def _log2(v, HW: tl.constexpr):
        # the correctly rounded libdevice functions on the GPU (tl.log2 / tl.exp2 are the approximate
        # instructions there); the interpreter has no libdevice
        if HW:
            return libdevice.log2(v)
        return tl.log2(v)

    @triton.jit
    def _exp2(v, HW: tl.constexpr):
        if HW:
            return libdevice.exp2(v)
        return tl.exp2(v)

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def kv_fake_quant_kernel(x_ptr, out_ptr, s_ptr, h_ptr, u_ptr, e_ptr, c_ptr, R, seed_lo, seed_hi, alpha,
                             inv_sqrt_t, D: tl.constexpr, BR: tl.constexpr, LAT: tl.constexpr,
                             DITHER: tl.constexpr, CPO: tl.constexpr, DEBUG: tl.constexpr, HW: tl.constexpr,
                             PARTS_IN: tl.constexpr, PARTS_OUT: tl.constexpr, SPLIT: tl.constexpr,
                             MMA_BF16: tl.constexpr, MODE: tl.constexpr):
        # MODE (OP_MODES): 0 quantize and reconstruct x -> out; 1 quantize x -> codec coordinates c (int32) and
        # step codes e (int8); 2 reconstruct c and e -> out. Modes 0 and 2 share the reconstruction's operations,
        # so decode(encode(x)) is the fake quantization of x with the same seed (to rounding on the GPU: module doc)
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, D)
        h = tl.load(h_ptr + cols[:, None] * D + cols[None, :])
        signs = tl.load(s_ptr + cols)
        seed = (seed_hi.to(tl.uint64) << 31) | seed_lo.to(tl.uint64)
        for rb in range(pid, tl.cdiv(R, BR), nprog):
            rows = rb * BR + tl.arange(0, BR)
            rmask = rows < R
            offs = rows[:, None] * D + cols[None, :]
            m2 = rmask[:, None]
            if MODE == 2:
                c = tl.load(c_ptr + offs, mask=m2, other=0).to(tl.float32)
                if LAT == 2:
                    p = c * 0.5   # E8 coordinates are twice the point
                else:
                    p = c
                e = tl.load(e_ptr + rows, mask=rmask, other=0).to(tl.float32)
                step = _exp2(e / CPO, HW)
                if DITHER:
                    u = _dither(seed, offs, BR, D, LAT, HW)
            else:
                x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
                y = _times_hadamard(x * signs[None, :], h, PARTS_IN, SPLIT, MMA_BF16) * inv_sqrt_t
                rms = tl.sqrt(tl.sum(y * y, axis=1) / D)
                e = _rint(_log2(tl.maximum(rms * alpha, 1e-30), HW) * CPO, HW)
                e = tl.minimum(tl.maximum(e, -128.0), 127.0)
                step = _exp2(e / CPO, HW)
                z = tl.math.div_rn(y, step[:, None])
                if DITHER:
                    u = _dither(seed, offs, BR, D, LAT, HW)
                    p = _nearest(z + u, BR, D, LAT, HW)
                    if DEBUG:
                        tl.store(u_ptr + offs, u, mask=m2)
                else:
                    p = _nearest(z, BR, D, LAT, HW)
                if DEBUG or MODE == 1:
                    tl.store(e_ptr + rows, e.to(tl.int8), mask=rmask)
                if MODE == 1:
                    if LAT == 2:
                        tl.store(c_ptr + offs, (p * 2.0).to(tl.int32), mask=m2)
                    else:
                        tl.store(c_ptr + offs, p.to(tl.int32), mask=m2)
            if MODE != 1:
                if DITHER:
                    yh = (p - u) * step[:, None]
                else:
                    yh = p * step[:, None]
                xh = _times_hadamard(yh, h, PARTS_OUT, SPLIT, MMA_BF16) * inv_sqrt_t * signs[None, :]
                tl.store(out_ptr + offs, xh.to(out_ptr.dtype.element_ty), mask=m2)

    return CachedLauncher(kv_fake_quant_kernel, free_ints=("seed_lo", "seed_hi"))


_H: dict = {}


def block_hadamard_pm1(head_dim: int, tile: int, device, dtype=torch.float32) -> torch.Tensor:
    """The ±1 block-diagonal Sylvester Hadamard matrix (head_dim, head_dim) in ``dtype`` (exact in bf16 too), one
    (tile, tile) block per tile (unnormalized: the kernel scales by 1/sqrt(tile)); cached per argument."""
    key = (int(head_dim), int(tile), str(device), dtype)
    if key not in _H:
        h = hadamard_pm1(int(tile), torch.float32, "cpu")
        _H[key] = torch.block_diag(*([h] * (head_dim // tile))).to(device=device, dtype=dtype).contiguous()
    return _H[key]


_UNUSED: dict = {}


def _unused(device, dtype) -> torch.Tensor:
    key = (str(device), dtype)
    if key not in _UNUSED:
        _UNUSED[key] = torch.empty(1, device=device, dtype=dtype)
    return _UNUSED[key]


def check_kv_kernel_args(head_dim: int, tile: int, lattice: str) -> str | None:
    """None when the kernel takes vectors of ``head_dim`` values, RHT ``tile`` and ``lattice``; else why not."""
    d, t = int(head_dim), int(tile)
    if lattice not in LATTICE_IDS:
        return f"lattice {lattice!r} (the kernel quantizes to {sorted(LATTICE_IDS)})"
    if d & (d - 1) or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        return f"head dimension {d} (the kernel takes powers of two from {MIN_HEAD_DIM} to {MAX_HEAD_DIM})"
    if t & (t - 1) or d % t or t < 1:
        return f"RHT tile {t} (a power of two dividing the head dimension {d})"
    return None


def _seed_halves(seed: int) -> tuple[int, int]:
    # 62 bits of seed as two non-negative int32 halves (one kernel signature for every seed)
    s = int(seed) & ((1 << 62) - 1)
    return s & 0x7FFF_FFFF, s >> 31


def _launch_seed(seed: int, i: int) -> int:
    # launch i > 0 of a tensor cut into several: its own Philox key (golden-ratio increments of the 62-bit seed)
    return (int(seed) + i * 0x9E37_79B9_7F4A_7C15) & ((1 << 62) - 1)


def _hadamard_mode(hadamard: str | None) -> str:
    mode = _TUNE["hadamard"] if hadamard is None else hadamard
    if mode not in HADAMARD_MODES:
        raise ValueError(f"hadamard must be one of {HADAMARD_MODES}, got {mode!r}")
    return mode


def _check_signs(signs: torch.Tensor, d: int, dev) -> torch.Tensor:
    s = signs.to(device=dev, dtype=torch.float32).contiguous()
    if tuple(s.shape) != (d,):
        raise ValueError(f"signs must be ({d},), got {tuple(s.shape)}")
    return s


def _launch(op: int, rows: int, d: int, dev, *, x, out, c, u, e, signs, tile: int, alpha: float, lattice: str,
            dither: bool, seed: int, codes_per_octave: int, debug: bool, parts_in: int, mode: str) -> None:
    """Launch the kernel over ``rows`` vectors of ``d`` values (op: an index of :data:`OP_MODES`); an argument the
    op does not touch is a cached one-element tensor. Tensors of more than ``MAX_LAUNCH_VALUES`` values are cut
    into launches with their own Philox keys, the same cut for every op."""
    split = mode == "bf16"
    mma_bf16 = split and not interpreting()
    h = block_hadamard_pm1(d, tile, dev, torch.bfloat16 if mma_bf16 else torch.float32)
    kern = _kernel()
    shape = _TUNE[mode]
    br = max(16, shape["block_values"] // d)
    per_launch = max(br, (MAX_LAUNCH_VALUES // d) // br * br)
    sms = num_sms(dev.index or 0)

    def part(t, r0):   # rows from r0 on (every tensor here is indexed by row first); not the one-element stand-ins
        return t[r0:] if t.numel() > 1 else t

    for i, r0 in enumerate(range(0, rows, per_launch)):
        n = min(per_launch, rows - r0)
        lo, hi = _seed_halves(_launch_seed(seed, i))
        grid = (max(1, min(triton_cdiv(n, br), sms * _TUNE["pps"])),)
        # bf16 parts of the reconstruction's float32 operand: three (with two, an output much smaller than the
        # vector's other values, after the sum's cancellation, was off by up to 16 bf16 units in its last place)
        kern(grid, part(x, r0), part(out, r0), signs, h, part(u, r0), part(e, r0), part(c, r0), n, lo,
             hi, float(alpha), 1.0 / math.sqrt(tile), D=d, BR=br, LAT=LATTICE_IDS[lattice], DITHER=bool(dither),
             CPO=int(codes_per_octave), DEBUG=bool(debug), HW=not interpreting(), PARTS_IN=parts_in, PARTS_OUT=3,
             SPLIT=split, MMA_BF16=mma_bf16, MODE=op, num_warps=shape["warps"])


def _check_input(x: torch.Tensor, tile: int, lattice: str, what: str) -> torch.Tensor:
    require_triton()
    d = x.shape[-1]
    why = check_kv_kernel_args(d, tile, lattice)
    if why is not None:
        raise ValueError(f"{what} cannot take {why}")
    if x.dtype not in IN_DTYPES:
        raise ValueError(f"{what} takes bf16, fp16 or float32 K/V, got {x.dtype}")
    xr = x.reshape(-1, d)
    return xr if xr.is_contiguous() else xr.contiguous()


def kv_fake_quantize(x: torch.Tensor, signs: torch.Tensor, tile: int, alpha: float, lattice: str, *,
                     dither: bool, seed: int, codes_per_octave: int, return_dither: bool = False,
                     hadamard: str | None = None):
    """Quantize and reconstruct K or V vectors in one pass (module docstring).

    ``x`` (..., D) bf16/fp16/fp32; ``signs`` (D,) ±1 RHT signs; ``tile`` the RHT tile (divides D); ``alpha`` the
    step multiplier (per-vector step = alpha * rms of the rotated vector, before log coding); ``lattice`` "Z",
    "D4" or "E8"; ``dither`` subtractive dither drawn from ``seed`` (any int; 62 bits are used) or plain nearest
    point; ``codes_per_octave`` of the int8 step codes. Returns ``x_hat`` (x's shape and dtype); with
    ``return_dither`` also the dither (R, D) float32 (zeros without dither) and the step codes (R,) int8, for
    checking against :func:`kv_fake_quantize_reference`. ``hadamard``: how the transforms multiply, one of
    :data:`HADAMARD_MODES` (default ``_TUNE["hadamard"]``).
    """
    xr = _check_input(x, tile, lattice, "kv_fake_quantize")
    mode = _hadamard_mode(hadamard)
    rows, d, dev = xr.shape[0], xr.shape[1], x.device
    out = torch.empty_like(xr)
    if return_dither:
        u = torch.zeros((rows, d), device=dev, dtype=torch.float32)
        e = torch.zeros((rows,), device=dev, dtype=torch.int8)
    else:   # never touched (DEBUG off): cached, so a call allocates and fills nothing besides its output
        u, e = _unused(dev, torch.float32), _unused(dev, torch.int8)
    _launch(OP_MODES.index("fake"), rows, d, dev, x=xr, out=out, c=_unused(dev, torch.int32), u=u, e=e,
            signs=_check_signs(signs, d, dev), tile=tile, alpha=alpha, lattice=lattice, dither=dither, seed=seed,
            codes_per_octave=codes_per_octave, debug=return_dither, parts_in=PARTS_IN[x.dtype], mode=mode)
    out = out.reshape(x.shape)
    return (out, u, e) if return_dither else out


def kv_encode(x: torch.Tensor, signs: torch.Tensor, tile: int, alpha: float, lattice: str, *, dither: bool,
              seed: int, codes_per_octave: int, hadamard: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize K or V vectors to what a cache stores: the same quantization as :func:`kv_fake_quantize` with the
    same arguments (the same dither draw), stopped at the lattice point.

    ``x`` (..., D) -> (coordinates int32 (R, D) in the codec's convention, ``codec.nearest_point``'s: E8 twice the
    point, D4 and Z the point; step codes int8 (R,)), R = numel / D."""
    xr = _check_input(x, tile, lattice, "kv_encode")
    mode = _hadamard_mode(hadamard)
    rows, d, dev = xr.shape[0], xr.shape[1], x.device
    c = torch.empty((rows, d), device=dev, dtype=torch.int32)
    e = torch.empty((rows,), device=dev, dtype=torch.int8)
    _launch(OP_MODES.index("encode"), rows, d, dev, x=xr, out=_unused(dev, x.dtype), c=c,
            u=_unused(dev, torch.float32), e=e, signs=_check_signs(signs, d, dev), tile=tile, alpha=alpha,
            lattice=lattice, dither=dither, seed=seed, codes_per_octave=codes_per_octave, debug=False,
            parts_in=PARTS_IN[x.dtype], mode=mode)
    return c, e


def kv_decode(coords: torch.Tensor, step_codes: torch.Tensor, shape: tuple, dtype: torch.dtype,
              signs: torch.Tensor, tile: int, lattice: str, *, dither: bool, seed: int, codes_per_octave: int,
              hadamard: str | None = None) -> torch.Tensor:
    """Reconstruct what :func:`kv_encode` returned: ``coords`` int32 (R, D) (or any integer dtype: int8 and int16
    caches are widened), ``step_codes`` int8 (R,); ``dither`` and ``seed`` as given to the encode. Returns
    ``x_hat`` of ``shape`` (R * D values) and ``dtype``: :func:`kv_fake_quantize`'s output for the encoded input
    with the same arguments (bit for bit in the interpreter, to reconstruction rounding on the GPU: module doc)."""
    require_triton()
    if coords.dim() != 2 or step_codes.shape != coords.shape[:1]:
        raise ValueError(f"kv_decode takes coordinates (R, D) and step codes (R,), got {tuple(coords.shape)} and "
                         f"{tuple(step_codes.shape)}")
    rows, d = coords.shape
    why = check_kv_kernel_args(d, tile, lattice)
    if why is not None:
        raise ValueError(f"kv_decode cannot take {why}")
    if coords.is_floating_point() or coords.dtype == torch.bool or step_codes.dtype != torch.int8:
        raise ValueError(f"kv_decode takes integer coordinates and int8 step codes, got {coords.dtype} and "
                         f"{step_codes.dtype}")
    if dtype not in IN_DTYPES:
        raise ValueError(f"kv_decode writes bf16, fp16 or float32, got {dtype}")
    if math.prod(shape) != rows * d or shape[-1] != d:
        raise ValueError(f"kv_decode: shape {tuple(shape)} does not hold {rows} vectors of {d} values")
    dev = coords.device
    c = coords.to(torch.int32).contiguous()
    out = torch.empty((rows, d), device=dev, dtype=dtype)
    _launch(OP_MODES.index("decode"), rows, d, dev, x=_unused(dev, dtype), out=out, c=c,
            u=_unused(dev, torch.float32), e=step_codes.to(dev).contiguous(), signs=_check_signs(signs, d, dev),
            tile=tile, alpha=1.0, lattice=lattice, dither=dither, seed=seed, codes_per_octave=codes_per_octave,
            debug=False, parts_in=1, mode=_hadamard_mode(hadamard))
    return out.reshape(shape)


def kv_fake_quantize_reference(x: torch.Tensor, signs: torch.Tensor, tile: int, alpha: float, lattice: str, *,
                               dither: torch.Tensor | None, step_codes: torch.Tensor | None = None):
    """Torch reference of :func:`kv_fake_quantize`: the codec's RHT and nearest point and the K/V quantizer's step
    codes (``kv.quantizer.encode_log8``), float32.

    ``dither`` (R, D) float32 or None; ``step_codes`` (R,) int8 to use instead of recomputing them (a step code is a
    rounded log2: a vector whose code sits on a rounding boundary may round either way in another log2).
    Returns (x_hat in x's shape and dtype, step codes int8 (R,))."""
    from hyperquant_diffusers.codec import coords_to_points, inverse_rht, nearest_point, rht
    from hyperquant_diffusers.kv.quantizer import decode_log8, encode_log8

    d = x.shape[-1]
    s = signs.to(device=x.device, dtype=torch.float32)
    y = rht(x.reshape(-1, d).to(torch.float32), s, tile)
    if step_codes is None:
        step_codes = encode_log8(y.square().mean(1).sqrt() * alpha)
    step = decode_log8(step_codes).unsqueeze(1)
    z = y / step
    u = dither if dither is not None else torch.zeros_like(z)
    y_hat = (coords_to_points(lattice, nearest_point(lattice, z + u)) - u) * step
    return inverse_rht(y_hat, s, tile).reshape(x.shape).to(x.dtype), step_codes
