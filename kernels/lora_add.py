"""A LoRA adapter's low-rank product added into a layer's output in place: ``out += scale * (xa @ b.T)``.

``out`` (M, N) bfloat16 / float16, rows contiguous (the quantized layer's output); ``xa`` (M, R) = ``A x`` and ``b``
(N, R) = the adapter's ``lora_B`` weight, in ``out``'s dtype; R <= :data:`MAX_RANK`. One pass over ``out``: each
program multiplies a (BM, R) tile of ``xa`` by an (R, BN) tile of ``b.T`` on the tensor cores (float32 accumulate),
adds the ``out`` tile and stores it back. peft's own ``result + lora_B(xa) * scale`` writes the product, scales it
and adds it (three passes over an (M, N) tensor); cuBLAS ``addmm_`` with ``beta = 1`` does it in one but picks a slow
kernel for some shapes (bench/RESULTS.md: 2048x2048 at M = 12288).

References: :func:`lora_add_reference` (float64).
"""

from __future__ import annotations

import torch

from ._launch import CachedLauncher
from ._triton import interpreting, jit_cache, require_triton

#: largest adapter rank the kernel takes (one K step of the tile product); larger ranks take ``addmm_``
MAX_RANK = 128
#: (BM, BN, warps, N-major program order) of the launch; bench/bench_lora.py --sweep times the alternatives
CONFIG = (64, 128, 4, True)
DTYPES = (torch.bfloat16, torch.float16)


@jit_cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def lora_add_kernel(out_ptr, xa_ptr, b_ptr, M, N, R, stride_om, stride_xm, stride_bn, scale,
                        BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, N_MAJOR: tl.constexpr):
        # N_MAJOR: consecutive programs walk along a row block (contiguous memory) instead of down a column
        if N_MAJOR:
            pid_m, pid_n = tl.program_id(1), tl.program_id(0)
        else:
            pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        mm, mn, mr = rm < M, rn < N, rr < R
        xa = tl.load(xa_ptr + rm.to(tl.int64)[:, None] * stride_xm + rr[None, :], mask=mm[:, None] & mr[None, :],
                     other=0.0)
        b = tl.load(b_ptr + rn.to(tl.int64)[:, None] * stride_bn + rr[None, :], mask=mn[:, None] & mr[None, :],
                    other=0.0)
        # float32 operands: tf32 holds bf16 values exactly (the cost is nil in this memory-bound pass), and Triton's
        # CPU interpreter, which the CPU tests use, multiplies bf16 tiles wrongly
        prod = tl.dot(xa.to(tl.float32), tl.trans(b.to(tl.float32)))   # (BM, BN) float32
        ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        mask = mm[:, None] & mn[None, :]
        o = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (o + scale * prod).to(out_ptr.dtype.element_ty), mask=mask)

    return CachedLauncher(lora_add_kernel)


def serves(out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, allow_cpu: bool = False) -> bool:
    """True when :func:`lora_add_` takes these operands (CUDA -- or CPU tensors for Triton's interpreter with
    ``allow_cpu`` --, 2-D, one of :data:`DTYPES` throughout, rows contiguous, rank <= MAX_RANK)."""
    return ((out.is_cuda or allow_cpu) and out.dim() == 2 and xa.dim() == 2 and b.dim() == 2 and out.dtype in DTYPES
            and xa.dtype == out.dtype and b.dtype == out.dtype and xa.shape[0] == out.shape[0]
            and b.shape[0] == out.shape[1] and xa.shape[1] == b.shape[1] <= MAX_RANK
            and out.stride(1) == 1 and xa.stride(1) == 1 and b.stride(1) == 1)


def lora_add_(out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scale: float,
              config: tuple | None = None) -> torch.Tensor:
    """``out += scale * xa @ b.T`` in place (shapes and dtypes in the module docstring); returns ``out``.
    ``config``: (BM, BN, warps, N-major order) instead of :data:`CONFIG`."""
    require_triton()
    if not serves(out, xa, b, allow_cpu=interpreting()):
        raise ValueError(f"lora_add_: unsupported operands out {tuple(out.shape)} {out.dtype}, xa "
                         f"{tuple(xa.shape)} {xa.dtype}, b {tuple(b.shape)} {b.dtype} (see serves())")
    m, n = out.shape
    r = xa.shape[1]
    if m == 0 or n == 0:
        return out
    bm, bn, warps, n_major = config or CONFIG
    br = max(16, 1 << (r - 1).bit_length())   # tl.dot's K is at least 16
    grid = ((m + bm - 1) // bm, (n + bn - 1) // bn)
    if n_major:
        grid = grid[::-1]
    _kernel()(grid, out, xa, b, m, n, r, out.stride(0), xa.stride(0), b.stride(0), float(scale), BM=bm, BN=bn,
              BR=br, N_MAJOR=n_major, num_warps=warps, num_stages=1)
    return out


def lora_add_reference(out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 ``out + scale * xa @ b.T`` (a new tensor)."""
    return out.double() + scale * (xa.double() @ b.double().T)
