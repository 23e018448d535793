"""nvfp4 / mxfp4 storage of the lattice output (emulated: the H100 has no fp4 tensor cores).

Both formats store e2m1 elements (4 bits: sign + one of 0, 0.5, 1, 1.5, 2, 3, 4, 6), two per byte (low nibble
first), with a scale per block of consecutive values along K:

* mxfp4 (OCP Microscaling): blocks of 32, scale a power of two stored as an E8M0 byte (biased exponent 127),
  ``2 ** (floor(log2(amax)) - 2)`` so the block maximum lands in [4, 8) before rounding (elements clip at 6).
* nvfp4: blocks of 16, scale stored as float8-e4m3 = ``amax / 6`` relative to a per-tensor float32 scale
  ``amax_tensor / (448 * 6)`` that keeps the block scales inside e4m3's range.

The input is the lattice output as the matmul sees it (the rotated weight, ``codes * scale``), so the
reported error is the extra error of the fp4 cast on top of the lattice quantization. Element rounding is to the
nearest e2m1 value; an exact tie goes to the smaller magnitude.
"""

from __future__ import annotations

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = E2M1[-1]
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max     # 448: nvfp4's block scales are e4m3
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """float32 values already divided by their scale -> uint8 nibble codes (bit 3 sign, bits 0-2 magnitude)."""
    b = torch.tensor(_BOUNDS, dtype=v.dtype, device=v.device)
    mag = torch.bucketize(v.abs().clamp(max=E2M1_MAX), b, right=False).to(torch.uint8)
    return mag | ((v < 0).to(torch.uint8) << 3)


def _e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1, dtype=torch.float32, device=codes.device)
    v = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -v, v)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    c = codes.reshape(*codes.shape[:-1], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), -1).reshape(*packed.shape[:-1], -1)


def mxfp4_quantize(w: torch.Tensor) -> dict:
    """(N, K) float, K % 32 == 0 -> {"packed": uint8 (N, K/2), "scale_e8m0": uint8 (N, K/32)}."""
    if w.shape[-1] % 32:
        raise ValueError(f"mxfp4 needs K divisible by 32, got {w.shape[-1]}")
    x = w.to(torch.float32).reshape(w.shape[0], -1, 32)
    amax = x.abs().amax(-1, keepdim=True)
    e = torch.floor(torch.log2(amax.clamp_min(2.0 ** -127))) - 2
    e = e.clamp(-127, 127)
    codes = _e2m1_codes(x / torch.exp2(e))
    return {"packed": _pack(codes.reshape(w.shape[0], -1)), "scale_e8m0": (e.squeeze(-1) + 127).to(torch.uint8)}


def mxfp4_dequantize(q: dict) -> torch.Tensor:
    v = _e2m1_values(_unpack(q["packed"]))
    n = v.shape[0]
    s = torch.exp2(q["scale_e8m0"].to(torch.float32) - 127)
    return (v.reshape(n, -1, 32) * s.unsqueeze(-1)).reshape(n, -1)


def nvfp4_quantize(w: torch.Tensor) -> dict:
    """(N, K) float, K % 16 == 0 -> {"packed": uint8 (N, K/2), "scale_e4m3": float8 (N, K/16), "global": f32}."""
    if w.shape[-1] % 16:
        raise ValueError(f"nvfp4 needs K divisible by 16, got {w.shape[-1]}")
    x = w.to(torch.float32).reshape(w.shape[0], -1, 16)
    g = (x.abs().amax() / (E4M3_MAX * E2M1_MAX)).clamp_min(1e-30)
    bs = (x.abs().amax(-1, keepdim=True) / E2M1_MAX / g).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    eff = bs.to(torch.float32) * g
    codes = _e2m1_codes(torch.where(eff > 0, x / eff, torch.zeros_like(x)))
    return {"packed": _pack(codes.reshape(w.shape[0], -1)), "scale_e4m3": bs.squeeze(-1), "global": g.reshape(1)}


def nvfp4_dequantize(q: dict) -> torch.Tensor:
    v = _e2m1_values(_unpack(q["packed"]))
    n = v.shape[0]
    s = q["scale_e4m3"].to(torch.float32) * q["global"]
    return (v.reshape(n, -1, 16) * s.unsqueeze(-1)).reshape(n, -1)


def fp4_storage_bits(fmt: str) -> float:
    """Stored bits per value including block scales (nvfp4: 4 + 8/16; mxfp4: 4 + 8/32)."""
    return {"nvfp4": 4.0 + 8.0 / 16, "mxfp4": 4.0 + 8.0 / 32}[fmt]


def fp4_cast_error(rotated: torch.Tensor, fmt: str) -> float:
    """Relative L2 error ||fp4(W) - W|| / ||W|| of casting the lattice output ``rotated`` (N, K) to ``fmt``."""
    if fmt == "nvfp4":
        back = nvfp4_dequantize(nvfp4_quantize(rotated))
    elif fmt == "mxfp4":
        back = mxfp4_dequantize(mxfp4_quantize(rotated))
    else:
        raise ValueError(f"fmt must be 'nvfp4' or 'mxfp4', got {fmt!r}")
    r = rotated.to(torch.float64)
    return float((back.double() - r).norm() / r.norm().clamp_min(1e-300))
