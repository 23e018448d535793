"""Nearest-point quantizers for the lattices Z, A2, D4 and E8 (Conway & Sloane, ch. 20), batched.

Every quantizer takes ``x`` of shape (..., n) in lattice units (step size already divided out), with n a
multiple of the lattice dimension d (consecutive groups of d values form one lattice vector), and returns the
lattice point as *integer coordinates* ``c`` (int32, same shape) in the representation the codec stores:

* Z:  point = c
* D4: point = c, with sum of each group of 4 even
* E8: point = c / 2, with ``c`` in 2·E8: all 8 entries of a group share one parity and sum to 0 mod 4
* A2: point = (c0 / 2, c1 · √3 / 2), with c0 ≡ c1 (mod 2) in each pair

:func:`coords_to_points` maps such integer coordinates back to points (float32, lattice units).
"""

from __future__ import annotations

import math

import torch

from . import cpu_kernels
from .constants import lattice_spec

_SQRT3 = math.sqrt(3.0)


def _groups(x: torch.Tensor, d: int) -> torch.Tensor:
    if x.shape[-1] % d:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the lattice dimension {d}")
    return x.reshape(-1, d)


def nearest_z(x: torch.Tensor) -> torch.Tensor:
    """Nearest integer point (Z^n). ``x``: (..., n) float; returns int32 (..., n)."""
    return torch.round(x).to(torch.int32)


def _nearest_dn(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of D_n for rows of ``x`` (M, n) float; returns float rows with even integer sums."""
    f = torch.round(x)
    odd = (f.sum(dim=1).remainder(2) != 0)
    # on the CPU skipping the fix when no row is odd saves work; on a GPU the test would cost a host sync per call
    # (K/V compression calls this every denoising step), and the fix is a no-op on even rows anyway
    if x.device.type != "cpu" or bool(odd.any()):
        err = x - f
        idx = err.abs().argmax(dim=1, keepdim=True)
        e = err.gather(1, idx)
        step = torch.where(e >= 0, torch.ones_like(e), -torch.ones_like(e))
        f = f.scatter_add(1, idx, step * odd.unsqueeze(1).to(f.dtype))
    return f


def nearest_d4(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of D4 (integer 4-vectors of even sum). ``x``: (..., 4m) float; returns int32 coords."""
    g = _groups(x, 4)
    return _nearest_dn(g).to(torch.int32).reshape(x.shape)


def nearest_e8(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of E8 = D8 ∪ (D8 + ½). ``x``: (..., 8m) float; returns int32 coords of 2·point."""
    g = _groups(x, 8)
    m = g.shape[0]
    # both cosets in one batch: rows of D8 (p0) and of D8 + 1/2 (p1)
    p = _nearest_dn(torch.cat((g, g - 0.5)))
    p0, p1 = p[:m], p[m:].add_(0.5)
    d0 = (g - p0).square_().sum(dim=1, keepdim=True)
    d1 = (g - p1).square_().sum(dim=1, keepdim=True)
    p = torch.where(d1 < d0, p1, p0)
    return p.mul_(2.0).to(torch.int32).reshape(x.shape)  # 2p is an integer: no rounding needed


def nearest_a2(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of the hexagonal lattice A2 (minimum distance 1) as the union of two rectangular cosets.

    ``x``: (..., 2m) float, pairs (u, v); returns int32 (c0, c1) with point = (c0/2, c1·√3/2).
    """
    g = _groups(x, 2)
    u, v = g[:, 0], g[:, 1] / _SQRT3
    i0, j0 = torch.round(u), torch.round(v)
    i1, j1 = torch.round(u - 0.5) + 0.5, torch.round(v - 0.5) + 0.5
    d0 = (u - i0).square() + 3.0 * (v - j0).square()
    d1 = (u - i1).square() + 3.0 * (v - j1).square()
    use1 = d1 < d0
    c0 = torch.round(2.0 * torch.where(use1, i1, i0))
    c1 = torch.round(2.0 * torch.where(use1, j1, j0))
    return torch.stack((c0, c1), dim=1).to(torch.int32).reshape(x.shape)


_NEAREST = {"Z": nearest_z, "A2": nearest_a2, "D4": nearest_d4, "E8": nearest_e8}


#: Values per pass of :func:`nearest_point` on the CPU (keeps the temporaries of a pass small; the result does not
#: depend on it: every lattice vector is quantized on its own). Other devices take the whole tensor at once.
CHUNK_VALUES = 1 << 20


def nearest_point(lattice: str, x: torch.Tensor) -> torch.Tensor:
    """Dispatch to the nearest-point quantizer of ``lattice`` (see module docstring for the coordinates)."""
    spec = lattice_spec(lattice)
    if cpu_kernels.usable(x):
        c = cpu_kernels.nearest_point(spec.name, x)
        if c is not None:
            return c
    fn = _NEAREST[spec.name]
    n = x.numel()
    if n <= CHUNK_VALUES or x.shape[-1] % spec.dim or x.device.type != "cpu":
        return fn(x)
    flat = x.reshape(-1)
    out = torch.empty(n, dtype=torch.int32, device=x.device)
    step = CHUNK_VALUES - CHUNK_VALUES % spec.dim
    for s in range(0, n, step):
        out[s: s + step] = fn(flat[s: s + step])
    return out.reshape(x.shape)


def coords_to_points(lattice: str, c: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Integer coordinates (..., n) -> lattice points in lattice units, ``dtype`` (default float32)."""
    spec = lattice_spec(lattice)
    p = c.to(dtype)
    if spec.name == "E8":
        return p * 0.5
    if spec.name == "A2":
        scale = torch.tensor([0.5, 0.5 * _SQRT3], dtype=dtype, device=c.device)
        return (p.reshape(-1, 2) * scale).reshape(c.shape)
    return p


def is_lattice_point(lattice: str, c: torch.Tensor) -> torch.Tensor:
    """Membership test of integer coordinates: bool per group of ``dim`` values, shape (numel // dim,)."""
    spec = lattice_spec(lattice)
    g = c.reshape(-1, spec.dim).to(torch.int64)
    if spec.name == "Z":
        return torch.ones(g.shape[0], dtype=torch.bool, device=c.device)
    if spec.name == "D4":
        return g.sum(1).remainder(2) == 0
    if spec.name == "A2":
        return (g[:, 0] - g[:, 1]).remainder(2) == 0
    par = g.remainder(2)
    same = (par == par[:, :1]).all(1)
    return same & (g.sum(1).remainder(4) == 0)
