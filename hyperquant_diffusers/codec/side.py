"""Compact serialized form of a LatticeTensor's side arrays (row steps, Rice parameters, block offsets).

In memory the codec keeps float32 steps (rows,), uint8 ks (n_blocks, classes) and int64 word offsets
(n_blocks+1,), which the GPU kernels consume. A blob stores them in the smallest of these forms that is exact,
named in its header (``layout``):

* ``scales``: "log8" (one byte per row: ``step = base * STEP_MANTISSAS[c % 16] * 2 ** (c // 16)``, the base in
  the header; ``quantize`` rounds its steps to this grid), else "bfloat16", else "float32";
* ``ks``: "u4" (two per byte, when every k <= 15), else "u8";
* ``offsets``: "len8" (each block's length in words minus the smallest, one byte, when they span < 256), else
  "len16" (uint16 lengths), else "int32" (the offsets themselves); lengths are summed back into offsets.
"""

from __future__ import annotations

import numpy as np
import torch

from .constants import STEP_MANTISSAS


def _log8_decode(codes: torch.Tensor, base: float) -> torch.Tensor:
    """uint8/int codes (rows,) -> float32 steps; exact IEEE float32 arithmetic, the same on every device."""
    c = codes.to(torch.int64)
    mant = torch.tensor(STEP_MANTISSAS, dtype=torch.float32, device=c.device)[c & 15]
    b = torch.tensor(base, dtype=torch.float32, device=c.device)
    pow2 = torch.tensor([float(1 << e) for e in range(16)], dtype=torch.float32, device=c.device)
    return (b * mant) * pow2[c >> 4]  # one rounding in b * mant; the power of two is exact


def log8_steps(steps: torch.Tensor) -> torch.Tensor:
    """Round positive float32 steps (rows,) to the "log8" grid based at their minimum (nearest in log scale);
    steps spanning more than 16 octaves are rounded to bfloat16 instead (stored as "bfloat16")."""
    s = steps.to(torch.float32)
    base = float(s.min())
    code = torch.round(torch.log2(s.double() / base) * 16.0)
    if float(code.max()) > 255:
        return s.to(torch.bfloat16).to(torch.float32)
    return _log8_decode(code, base)


def _scales_layout(scales: torch.Tensor):
    """(name, payload numpy array, header extras) for the row steps."""
    s = scales.detach().to(torch.float32).cpu()
    if s.numel() and bool((s > 0).all()) and bool(torch.isfinite(s).all()):
        base = float(s.min())
        code = torch.round(torch.log2(s.double() / base) * 16.0)
        if float(code.max()) <= 255 and torch.equal(_log8_decode(code, base), s):
            return "log8", code.to(torch.uint8).numpy(), {"scale_base": base}
    if torch.equal(s.to(torch.bfloat16).to(torch.float32), s):
        return "bfloat16", s.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), {}
    return "float32", s.numpy(), {}


def encode_side(scales: torch.Tensor, ks: torch.Tensor, offsets: torch.Tensor) -> tuple[dict, list[bytes]]:
    """Side arrays -> (layout dict for the header, [scales bytes, ks bytes, offsets bytes]) (little-endian)."""
    sname, spay, extra = _scales_layout(scales)
    k = ks.detach().cpu().to(torch.uint8).reshape(-1).numpy()
    if k.size == 0 or int(k.max()) <= 15:
        kname = "u4"
        kp = np.zeros(2 * ((k.size + 1) // 2), dtype=np.uint8)
        kp[: k.size] = k
        kpay = (kp[0::2] | (kp[1::2] << 4)).astype(np.uint8)
    else:
        kname, kpay = "u8", k
    o = offsets.detach().cpu().to(torch.int64).numpy()
    lens = o[1:] - o[:-1]
    lo = int(lens.min()) if lens.size else 0
    if lens.size == 0 or int(lens.max()) - lo < 256:
        oname, opay, extra["len_base"] = "len8", (lens - lo).astype(np.uint8), lo
    elif int(lens.max()) < (1 << 16):
        oname, opay = "len16", lens.astype("<u2")
    else:
        oname, opay = "int32", o.astype("<i4")
    layout = {"scales": sname, "ks": kname, "offsets": oname, **extra}
    return layout, [spay.astype(spay.dtype.newbyteorder("<")).tobytes(), kpay.tobytes(), opay.tobytes()]


#: bytes per row scale of each scale encoding a layout may name
SCALE_BYTES = {"log8": 1, "bfloat16": 2, "float32": 4}


def side_nbytes(layout: dict, rows: int, n_blocks: int, classes: int) -> int:
    """Bytes the three side arrays take in a blob of this ``layout``."""
    sb = SCALE_BYTES[layout["scales"]] * rows
    nk = n_blocks * classes
    kb = (nk + 1) // 2 if layout["ks"] == "u4" else nk
    ob = {"len8": n_blocks, "len16": 2 * n_blocks, "int32": 4 * (n_blocks + 1)}[layout["offsets"]]
    return sb + kb + ob


def decode_side(layout: dict, blob: bytes, pos: int, rows: int, n_blocks: int, classes: int, error):
    """Read the side arrays at ``pos`` -> (scales float32 (rows,), ks uint8 (n_blocks, classes), offsets int64
    (n_blocks+1,), new pos). ``error`` is the exception class raised for a bad layout or a truncated blob."""
    try:
        sname, kname, oname = layout["scales"], layout["ks"], layout["offsets"]
        if sname not in SCALE_BYTES:
            raise KeyError(sname)
        if kname not in ("u4", "u8") or oname not in ("len8", "len16", "int32"):
            raise KeyError(kname if kname not in ("u4", "u8") else oname)
        base = float(layout["scale_base"]) if sname == "log8" else None
        lbase = int(layout["len_base"]) if oname == "len8" else 0
    except (KeyError, TypeError, ValueError) as e:
        raise error(f"unknown or incomplete lattice tensor array layout {layout!r}: {e!r}") from None
    if side_nbytes(layout, rows, n_blocks, classes) > len(blob) - pos:
        raise error("truncated lattice tensor blob (side arrays)")

    def take(dtype, count):
        nonlocal pos
        arr = np.frombuffer(blob, dtype=np.dtype(dtype), count=count, offset=pos)
        pos += arr.nbytes
        return arr

    if sname == "log8":
        scales = _log8_decode(torch.from_numpy(take(np.uint8, rows).astype(np.int64)), base)
    elif sname == "bfloat16":
        scales = torch.from_numpy(take("<u2", rows).view(np.int16).astype(np.int16)).view(torch.bfloat16)
        scales = scales.to(torch.float32)
    else:
        scales = torch.from_numpy(take("<f4", rows).astype(np.float32))
    nk = n_blocks * classes
    if kname == "u4":
        kp = take(np.uint8, (nk + 1) // 2)
        k = np.stack((kp & 15, kp >> 4), 1).reshape(-1)[:nk]
    else:
        k = take(np.uint8, nk)
    ks = torch.from_numpy(k.astype(np.uint8).copy()).reshape(n_blocks, classes)
    if oname == "int32":
        offsets = torch.from_numpy(take("<i4", n_blocks + 1).astype(np.int64))
    else:
        lens = take(np.uint8, n_blocks).astype(np.int64) + lbase if oname == "len8" else take("<u2", n_blocks).astype(np.int64)
        offsets = torch.from_numpy(np.concatenate(([0], np.cumsum(lens))).astype(np.int64))
    return scales, ks, offsets, pos
