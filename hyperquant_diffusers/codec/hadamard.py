"""Per-tile randomized Hadamard transform (RHT) along the last (contraction) axis.

``rht(x) = H_T · diag(s) · x`` on each tile of ``T`` consecutive values of the last axis, with ``H_T`` the
orthonormal Walsh–Hadamard matrix (Sylvester order) and ``s`` a seeded ±1 vector as long as the axis. Applied
to both operands of ``x @ W.T`` it leaves the product unchanged, because each tile's transform is orthogonal:
``rht(x) @ rht(W).T == x @ W.T``.
"""

from __future__ import annotations

import torch

from . import cpu_kernels
from .constants import check_tile_size


def random_signs(n: int, seed: int, period: int | None = None) -> torch.Tensor:
    """``n`` seeded random signs, shape ``(n,)``, dtype float32 on the CPU, values in {-1, +1}.

    Drawn with a private CPU generator so the same seed gives the same signs on every device; the codec stores
    the signs themselves in its blob, so a checkpoint never depends on this generator staying the same.
    ``period``: draw that many signs and repeat them (``n`` must be a multiple): with ``period`` = the RHT tile
    every tile gets the same flip ``d``, so the per-tile transform is the one matrix ``H·diag(d)`` and a GEMM-based
    kernel folds the flip into its Hadamard operand (see :func:`tile_signs`). Each tile's transform is still a
    uniformly random-sign RHT; only the tiles' flips are no longer independent of each other.
    """
    if period is not None:
        p = int(period)
        if p <= 0 or n % p:
            raise ValueError(f"sign period {period} must be positive and divide the length {n}")
        return random_signs(p, seed).repeat(int(n) // p)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    bits = torch.randint(0, 2, (int(n),), generator=gen, dtype=torch.int8)
    return bits.to(torch.float32).mul_(2.0).sub_(1.0)


def tile_signs(signs: torch.Tensor, tile_size: int) -> torch.Tensor | None:
    """The flip ``d`` (tile_size,) when ``signs`` (K,) repeats it on every tile, else None (signs of independent
    tiles, e.g. every checkpoint quantized before tile-periodic signs existed). Same dtype and device as
    ``signs``; reads them once (a device sync for CUDA signs)."""
    t = check_tile_size(tile_size)
    k = signs.numel()
    if k % t:
        raise ValueError(f"{k} signs do not split into tiles of {t}")
    tiles = signs.reshape(k // t, t)
    return tiles[0].clone() if bool((tiles == tiles[:1]).all()) else None


def fwht(x: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform of each tile of ``tile_size`` values along the last axis.

    ``x``: (..., K) with K divisible by ``tile_size``; any float dtype (computed in that dtype). Returns a new
    tensor of the same shape. The transform is its own inverse.
    """
    t = check_tile_size(tile_size)
    k = x.shape[-1]
    if k % t:
        raise ValueError(f"last dimension {k} is not divisible by tile_size {t}")
    lead = x.shape[:-1]
    if x.requires_grad and torch.is_grad_enabled():
        return _fwht_rows_autograd(x.reshape(-1, k), t).reshape(*lead, k)
    if cpu_kernels.usable(x):
        out = cpu_kernels.fwht(x, t)
        if out is not None:
            return out
    rows = x.reshape(-1, k)
    n_rows = rows.shape[0]
    per = max(1, _CHUNK_VALUES // k)
    if n_rows <= per or x.device.type != "cpu":
        return _fwht_rows(rows, t).reshape(*lead, k)
    out = torch.empty_like(rows)
    for s in range(0, n_rows, per):  # row chunks: a pass's temporaries stay in cache; rows are independent
        out[s: s + per] = _fwht_rows(rows[s: s + per], t)
    return out.reshape(*lead, k)


#: Values per pass of :func:`fwht` on the CPU (the result does not depend on it); other devices: one pass.
_CHUNK_VALUES = 1 << 20


def _fwht_rows(rows: torch.Tensor, t: int) -> torch.Tensor:
    """Orthonormal per-tile Walsh–Hadamard transform of the rows of ``rows`` (R, K): a new (R, K) tensor."""
    r, k = rows.shape
    src = rows.contiguous()
    bufs = (torch.empty_like(src), torch.empty_like(src) if t > 2 else None)
    h, i = 1, 0
    while h < t:  # butterflies of span h, written straight into the other buffer
        y = src.view(r, k // t, t // (2 * h), 2, h)
        dst = bufs[i].view(r, k // t, t // (2 * h), 2, h)
        torch.add(y[:, :, :, 0, :], y[:, :, :, 1, :], out=dst[:, :, :, 0, :])
        torch.sub(y[:, :, :, 0, :], y[:, :, :, 1, :], out=dst[:, :, :, 1, :])
        src, i, h = bufs[i], 1 - i, h * 2
    return src.view(r, k).mul_(t ** -0.5)


def _fwht_rows_autograd(rows: torch.Tensor, t: int) -> torch.Tensor:
    """:func:`_fwht_rows` without ``out=`` buffers, so autograd can differentiate it (same sums in the same order,
    so the same values)."""
    r, k = rows.shape
    y, h = rows, 1
    while h < t:
        v = y.reshape(r, k // t, t // (2 * h), 2, h)
        a, b = v[:, :, :, 0, :], v[:, :, :, 1, :]
        y, h = torch.stack((a + b, a - b), 3).reshape(r, k), h * 2
    return y * t ** -0.5


def rht(x: torch.Tensor, signs: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Forward RHT: flip signs, then per-tile orthonormal Hadamard. ``signs``: (K,), ±1."""
    s = signs.to(device=x.device, dtype=x.dtype)
    if cpu_kernels.usable(x):
        t = check_tile_size(tile_size)
        out = cpu_kernels.fwht(x, t, s) if x.shape[-1] % t == 0 and s.shape == x.shape[-1:] else None
        if out is not None:
            return out
    return fwht(x * s, tile_size)


def inverse_rht(y: torch.Tensor, signs: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Inverse of :func:`rht`: per-tile Hadamard (self-inverse), then the same sign flips."""
    return fwht(y, tile_size) * signs.to(device=y.device, dtype=y.dtype)


def hadamard_matrix(tile_size: int, dtype=torch.float64) -> torch.Tensor:
    """Dense orthonormal Sylvester Hadamard matrix, (T, T); for tests and for GEMM-based transforms."""
    t = check_tile_size(tile_size)
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < t:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h * (t ** -0.5)
