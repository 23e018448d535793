"""int8 lattice codes -> fp8-e4m3 codes for the fp8 MMA, one streaming pass.

``codes`` int8 (any shape, contiguous) -> float8_e4m3fn of the same shape: round to nearest even, exact for
|c| <= 16 (e4m3 has 3 mantissa bits; larger codes round, the fp8 path's extra weight error). An int8-resident layer
run with ``mma="fp8"`` needs this once per call: ``torch``'s own cast ran at ~0.6 TB/s on the H100 (0.054 ms per
16.7M codes, bench/RESULTS.md), this kernel moves the 2 bytes per code near copy speed.

Reference: :func:`codes_to_e4m3_reference` (``codes.to(torch.float8_e4m3fn)``); the GPU test compares all 255
code values and random tensors bit for bit.
"""

from __future__ import annotations

import torch

from ._launch import CachedLauncher
from ._triton import jit_cache, require_triton


@jit_cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def codes_to_e4m3_kernel(c_ptr, o_ptr, n, BLOCK: tl.constexpr):
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = off < n
        c = tl.load(c_ptr + off, mask=mask, other=0)
        tl.store(o_ptr + off, c.to(tl.float32).to(tl.float8e4nv), mask=mask)

    return CachedLauncher(codes_to_e4m3_kernel)


#: values per program, warps (H100 sweep in bench/bench_kernels.py, bench/RESULTS.md)
_TUNE = {"block": 8192, "warps": 8}


def codes_to_e4m3(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 ``codes`` (contiguous, CUDA) -> float8_e4m3fn tensor of the same shape (into ``out`` if given)."""
    require_triton()
    if codes.dtype != torch.int8:
        raise TypeError(f"codes_to_e4m3 expects int8 codes, got {codes.dtype}")
    if not codes.is_contiguous():
        raise ValueError("codes_to_e4m3 expects contiguous codes")
    if out is None:
        out = torch.empty(codes.shape, dtype=torch.float8_e4m3fn, device=codes.device)
    elif out.dtype != torch.float8_e4m3fn or out.numel() != codes.numel() or not out.is_contiguous():
        raise ValueError("out must be a contiguous float8_e4m3fn tensor with as many elements as codes")
    n = codes.numel()
    if n:
        blk = _TUNE["block"]
        _kernel()(((n + blk - 1) // blk,), codes, out, n, BLOCK=blk, num_warps=_TUNE["warps"])
    return out.view(codes.shape)


def codes_to_e4m3_reference(codes: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`codes_to_e4m3`."""
    return codes.to(torch.float8_e4m3fn)
