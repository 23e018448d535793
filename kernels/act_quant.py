"""Fused activation path: per-tile RHT of the activations + per-token int8 / fp8-e4m3 quantization.

``x`` (M, K) -> ``xq`` (M, K) int8 or float8_e4m3fn and ``sx`` float32 (M,) with ``xq * sx[:, None] ~= rht(x)``
(the codec's RHT: flip by ``signs``, then per-tile orthonormal Hadamard of ``tile`` values).

Kernel: one program per ``BM`` rows. It walks the row block's K tiles twice: the first pass computes the
transformed tiles (a tensor-core product with the ±1 Sylvester matrix, scaled by 1/sqrt(T) afterwards) and their
running absolute maximum; the second recomputes them and writes the codes. The second read of ``x`` hits L2
(a row block is BM*K*2 bytes), so HBM sees one read of ``x`` and one write of the codes, and no rotated copy of
the activations is ever stored.

Rounding: int8 codes are ``clamp(floor(v + 0.5), -127, 127)`` with ``v = y / sx``; fp8 codes are the
round-to-nearest e4m3 cast of ``v`` with ``sx = amax / 448``.
"""

from __future__ import annotations

import math

import torch

from ._triton import jit_cache, require_triton

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


@jit_cache
def _kernel():
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def rht_quant_kernel(x_ptr, s_ptr, h_ptr, q_ptr, sx_ptr, M, K, stride_xm, stride_qm, inv_sqrt_t,
                         T: tl.constexpr, BM: tl.constexpr, FP8: tl.constexpr, QMAX: tl.constexpr,
                         IEEE: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < M
        tt = tl.arange(0, T)
        h = tl.load(h_ptr + tt[:, None] * T + tt[None, :])
        rows64 = rows.to(tl.int64)
        amax = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, T):
            cols = k0 + tt
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=rmask[:, None], other=0.0)
            s = tl.load(s_ptr + cols)
            xs = x * s[None, :]
            if IEEE:
                y = tl.dot(xs, h, input_precision="ieee")
            else:
                y = tl.dot(xs, h)
            amax = tl.maximum(amax, tl.max(tl.abs(y), 1))
        amax_safe = tl.where(amax > 0, amax, 1.0)
        tl.store(sx_ptr + rows, amax_safe * inv_sqrt_t / QMAX, mask=rmask)
        inv = QMAX / amax_safe
        for k0 in range(0, K, T):
            cols = k0 + tt
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=rmask[:, None], other=0.0)
            s = tl.load(s_ptr + cols)
            xs = x * s[None, :]
            if IEEE:
                y = tl.dot(xs, h, input_precision="ieee")
            else:
                y = tl.dot(xs, h)
            v = y * inv[:, None]
            if FP8:
                qv = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(tl.float8e4nv)
            else:
                qv = tl.minimum(tl.maximum(tl.floor(v + 0.5), -QMAX), QMAX).to(tl.int8)
            tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], qv, mask=rmask[:, None])

    return rht_quant_kernel


def rht_quantize(x: torch.Tensor, signs: torch.Tensor, tile: int, fmt: str = "int8", *,
                 signs_cast: torch.Tensor | None = None):
    """Fused RHT + per-token quantization. ``x`` (M, K) bf16/fp16/fp32 (row stride free, unit column stride),
    ``signs`` ±1 (K,); ``fmt`` "int8" or "fp8". Returns (codes (M, K) int8 / float8_e4m3fn, scale float32 (M,)).
    ``signs_cast``: the signs already in x's dtype on x's device (avoids a per-call cast)."""
    require_triton()
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("rht_quantize expects a 2-D activation with unit stride along K")
    m, k = x.shape
    if k % tile:
        raise ValueError(f"K={k} is not a multiple of the RHT tile {tile}")
    if fmt not in ("int8", "fp8"):
        raise ValueError(f"fmt must be 'int8' or 'fp8', got {fmt!r}")
    fp8 = fmt == "fp8"
    s = signs_cast if signs_cast is not None else signs.to(device=x.device, dtype=x.dtype)
    h = hadamard_pm1(tile, x.dtype, x.device)
    q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    sx = torch.empty(m, device=x.device, dtype=torch.float32)
    bm = 16 if m <= 4096 else 64
    if tile >= 512:
        bm = 16
    grid = (triton_cdiv(m, bm),)
    _kernel()[grid](x, s, h, q, sx, m, k, x.stride(0), q.stride(0), 1.0 / math.sqrt(tile), T=tile, BM=bm,
                    FP8=fp8, QMAX=FP8_MAX if fp8 else INT8_MAX, IEEE=x.dtype == torch.float32,
                    num_warps=4 if bm == 16 else 8)
    return q, sx


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
    return torch.floor(v + 0.5).clamp(-qmax, qmax).to(torch.int8), sx
