"""Rate–distortion optimized point choice (codec/rdo.py) against brute force over lattice points."""

import itertools

import pytest
import torch

from hyperquant_diffusers.codec.lattices import coords_to_points, is_lattice_point, nearest_point
from hyperquant_diffusers.codec.rdo import rd_lambda, rd_point
from hyperquant_diffusers.codec.stream import choose_ks, vector_bits

BV = 256


def _lagrangian(lattice, c, y, ks, lam):
    """J per vector from the stream's own bit accounting (stream.vector_bits) and float64 distortion."""
    d = {"Z": 1, "A2": 2, "D4": 4, "E8": 8}[lattice]
    dist = (coords_to_points(lattice, c, torch.float64) - y.double()).reshape(-1, d).square().sum(1)
    return dist + lam * vector_bits(c.reshape(-1), lattice, ks, BV).double()


def _box(lattice, c0, radius):
    """All lattice points (integer coordinates) within ``radius`` class steps of c0 in every coordinate."""
    d = c0.numel()
    if lattice == "E8":  # doubled coordinates: both parities, steps of 2
        out = []
        for par in (0, 1):
            base = (c0 // 2) * 2 + par
            rng = [base[i] + 2 * torch.arange(-radius, radius + 1) for i in range(d)]
            out.append(torch.cartesian_prod(*rng))
        pts = torch.cat(out)
    else:
        rng = [c0[i] + torch.arange(-radius, radius + 1) for i in range(d)]
        pts = torch.cartesian_prod(*rng).reshape(-1, d)
    return pts[is_lattice_point(lattice, pts.reshape(-1))]


@pytest.mark.parametrize("lattice,radius,n_vec", [("Z", 4, 256), ("A2", 4, 128), ("D4", 3, 48), ("E8", 2, 6)])
@pytest.mark.parametrize("lam_scale", [1.0, 6.0])
def test_rd_point_is_the_exact_minimizer(lattice, radius, n_vec, lam_scale):
    d = {"Z": 1, "A2": 2, "D4": 4, "E8": 8}[lattice]
    g = torch.Generator().manual_seed(d)
    # a block of BV values with a spread of a few lattice units, so Rice parameters are > 0 and escapes absent
    y = torch.randn(BV, generator=g) * 3.0
    c0 = nearest_point(lattice, y)
    ks = choose_ks(c0, lattice, BV)
    lam = rd_lambda(lattice) * lam_scale
    c = rd_point(lattice, y, ks, BV, lam)
    assert bool(is_lattice_point(lattice, c).all())
    j = _lagrangian(lattice, c, y, ks, lam)
    assert bool((j <= _lagrangian(lattice, c0, y, ks, lam) + 1e-9).all())
    # brute force: every lattice point in a box around the nearest point, for the first n_vec vectors
    cv, yv = c0.view(-1, d), y.view(-1, d)
    for v in range(min(n_vec, cv.shape[0])):
        pts = _box(lattice, cv[v], radius)
        # the stream's bits of each candidate: one block's Rice parameters (y is a single block)
        flat = pts.to(torch.int32).reshape(-1)
        nb = (flat.numel() + BV - 1) // BV
        dist = (coords_to_points(lattice, pts, torch.float64).reshape(-1, d) - yv[v].double()).square().sum(1)
        bits = vector_bits(flat, lattice, ks[:1].expand(nb, -1), BV).double()
        best = float((dist + lam * bits).min())
        assert float(j[v]) <= best + 1e-9, (lattice, v, float(j[v]), best)
    if lam_scale > 1:  # a large lambda really moves points away from the nearest ones
        assert bool((c != c0).any())
