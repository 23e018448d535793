"""CUDA forward of ``LatticeLinear``: fused activation RHT + quantization, weight codes, quantized GEMM.

``cuda_forward(module, x)`` is what ``hyperquant_diffusers.nn.LatticeLinear.forward`` calls on CUDA tensors:

1. ``xq, sx = rht_quantize(x)`` -- one Triton pass: per-tile RHT of the activations and per-token int8 or
   fp8-e4m3 codes (:mod:`.act_quant`).
2. Weight codes in the MMA's type:
   * int8 residency: the module's resident ``codes`` (int8, (out, in)); for the fp8 MMA they are cast to e4m3
     per call (exact for |c| <= 16, rounded to 3 mantissa bits above: the fp8 path's extra weight error).
   * compressed residency: the Rice stream is decoded by the Triton block decoder (:mod:`.rice_decode`) straight
     into a buffer shared by all layers on the device (grown to the largest layer, reused: layers run one after
     another on one stream), in int8 or e4m3 as the MMA needs.
3. The GEMM with per-token x per-row scales, bias and the output cast in its epilogue (:mod:`.int8_gemm`), or
   ``torch._scaled_mm`` for fp8.

Falls back to ``module.reference_forward`` (float32 torch) for A2 (no integer code), an MMA type other than
int8/fp8, or when Triton cannot run. A compressed layer whose coordinates exceed the code range (checked once per
layer on its first call) uses ``module.int8_weight()`` (the codec's rescaling path) instead of the kernel.
"""

from __future__ import annotations

import torch

from ._triton import triton_available
from .act_quant import rht_quantize
from .int8_gemm import fp8_linear, int8_linear
from .rice_decode import rice_decode

_KERNEL_LATTICES = ("Z", "D4", "E8")
_BUFFERS: dict = {}


def _decode_buffer(device, dtype, n: int) -> torch.Tensor:
    """The shared just-in-time decode buffer of ``device``/``dtype``, at least ``n`` elements (grown, reused)."""
    key = (str(device), dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        _BUFFERS.pop(key, None)
        buf = torch.empty(n, dtype=dtype, device=device)
        _BUFFERS[key] = buf
    return buf[:n]


def decode_buffer_nbytes() -> int:
    """Bytes held by the shared decode buffers (counted in the compressed-residency memory reports)."""
    return sum(b.numel() * b.element_size() for b in _BUFFERS.values())


def release_decode_buffers() -> None:
    _BUFFERS.clear()


def _cache(module) -> dict:
    c = module.__dict__.get("_hq_kernel_cache")
    if c is None:
        c = {}
        module.__dict__["_hq_kernel_cache"] = c
    return c


def _code_scale_compressed(module) -> torch.Tensor:
    unit = 0.5 if module.lattice == "E8" else 1.0  # E8 coordinates are stored doubled (codec contract)
    return (module.hq_scales.view(torch.float32) * unit).contiguous()


def weight_codes(module, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, in) int8 or float8_e4m3fn, float32 scale (out,)) of a LatticeLinear for MMA ``fmt``."""
    wdtype = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
    if getattr(module, "codes", None) is not None:
        codes, scale = module.codes, module.code_scale
        return (codes.to(wdtype) if fmt == "fp8" else codes), scale
    cache = _cache(module)
    n = module.out_features * module.in_features
    if cache.get("fallback"):
        codes, scale = module.int8_weight()
        return (codes.to(wdtype) if fmt == "fp8" else codes), scale
    if "sw" not in cache:
        cache["sw"] = _code_scale_compressed(module)
    buf = _decode_buffer(module.hq_words.device, wdtype, n)
    first = not cache.get("checked")
    try:
        rice_decode(module.hq_words, module.hq_offsets, module.hq_ks, n, module.lattice, module.block_values,
                    out=buf, out_dtype=wdtype, check=first, stats=first)
    except ValueError:
        if not first:
            raise
        cache["fallback"] = True  # coordinates beyond the code range: the codec's rescaling path, once per call
        return weight_codes(module, fmt)
    cache["checked"] = True
    return buf.view(module.out_features, module.in_features), cache["sw"]


#: the Triton GEMMs step K by 128; _scaled_mm needs N % 16. Smaller layers take the torch reference path on CUDA
#: (found by tests/test_backend.py on the device: a tiny T5's 64-wide layers).
GEMM_K_MULTIPLE, GEMM_N_MULTIPLE = 128, 16


def supports(module, x: torch.Tensor) -> bool:
    return (x.is_cuda and module.lattice in _KERNEL_LATTICES and module.mma in ("int8", "fp8")
            and module.in_features % GEMM_K_MULTIPLE == 0 and module.out_features % GEMM_N_MULTIPLE == 0
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton_available())


def cuda_forward(module, x: torch.Tensor) -> torch.Tensor:
    """``LatticeLinear`` forward on CUDA: (..., in_features) -> (..., out_features) in x's dtype."""
    if not supports(module, x):
        return module.reference_forward(x)
    k, n = module.in_features, module.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    cache = _cache(module)
    skey = ("signs", x.dtype, x.device)
    s = cache.get(skey)
    if s is None:
        s = module.signs.to(device=x.device, dtype=x.dtype).contiguous()
        cache[skey] = s
    fmt = module.mma
    xq, sx = rht_quantize(x2, s, module.tile_size, fmt, signs_cast=s)
    wq, sw = weight_codes(module, fmt)
    bias = module.bias
    if fmt == "int8":
        y = int8_linear(xq, sx, wq, sw, bias, out_dtype=x.dtype)
    else:
        out_dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
        bb = bias.to(out_dtype) if bias is not None and bias.dtype != out_dtype else bias
        y = fp8_linear(xq, sx, wq, sw, bb, out_dtype=out_dtype).to(x.dtype)
    return y.reshape(*lead, n)


def make_int8_resident(module) -> bool:
    """Decode a compressed-resident LatticeLinear's stream once with the GPU decoder and keep int8 codes (what
    ``LatticeLinear.finalize`` does for ``residency="int8"``, without the torch decoder). Returns False (layer left
    compressed) if a coordinate exceeds ±127."""
    n = module.out_features * module.in_features
    try:
        codes, _, _ = rice_decode(module.hq_words, module.hq_offsets, module.hq_ks, n, module.lattice,
                                  module.block_values, check=True)
    except ValueError:
        return False
    scale = _code_scale_compressed(module)
    module.codes = codes.view(module.out_features, module.in_features)
    module.code_scale = scale
    for name in ("hq_signs", "hq_scales", "hq_ks", "hq_offsets", "hq_words"):
        setattr(module, name, None)
    module.residency = "int8"
    _cache(module).clear()
    return True
