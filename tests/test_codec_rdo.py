"""Rate–distortion optimized point choice (codec/rdo.py) against brute force over lattice points."""

import pytest
import torch

from hyperquant_diffusers.codec.lattices import coords_to_points, is_lattice_point, nearest_point
from hyperquant_diffusers.codec.rdo import rd_lambda, rd_point
from hyperquant_diffusers.codec.stream import choose_ks, vector_bits

BV = 256
#: coordinates per coding unit: the lattice vector, but a coordinate pair for Z (pairs are rank-coded jointly)
_UNIT = {"Z": 2, "A2": 2, "D4": 4, "E8": 8}


def _lagrangian(lattice, c, y, ks, lam):
    """J per coding unit (vector; Z: coordinate pair) from the stream's own bit accounting (stream.vector_bits)
    and float64 distortion."""
    d = _UNIT[lattice]
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
    return pts[is_lattice_point(lattice, pts.reshape(-1)).view(pts.shape[0], -1).all(1)]


@pytest.mark.parametrize("lattice,radius,n_vec", [("Z", 4, 256), ("A2", 4, 128), ("D4", 3, 48), ("E8", 2, 6)])
@pytest.mark.parametrize("lam_scale", [1.0, 6.0])
def test_rd_point_is_the_exact_minimizer(lattice, radius, n_vec, lam_scale):
    d = _UNIT[lattice]
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


@pytest.mark.parametrize("scale", [0.3, 3.0, 40.0, 3e4])
def test_e8_cost_table_path_equals_direct_costs(scale):
    """The E8 RDO looks the candidates' bit costs up in a table; computing them per candidate (the path taken
    for coordinates beyond the table) gives the same points, ties included (half-integer inputs)."""
    from hyperquant_diffusers.codec.rdo import _rd_e8, _rd_e8_direct

    g = torch.Generator().manual_seed(int(scale * 10))
    y = torch.randn(3000, 8, generator=g) * scale
    y[::3] = torch.round(y[::3] * 2) / 2  # exact candidate ties
    k = torch.randint(0, 25 if scale > 100 else 6, (3000, 1), generator=g).expand(3000, 8).to(torch.int32)
    for lam in (rd_lambda("E8"), 6 * rd_lambda("E8"), 100.0):
        c = _rd_e8(y, k, lam, torch.float32)
        assert torch.equal(c, _rd_e8_direct(y, k, lam, torch.float32))
        assert bool(is_lattice_point("E8", c.reshape(-1)).all())


def test_rd_point_does_not_depend_on_the_chunk():
    from hyperquant_diffusers.codec.rdo import rd_point

    g = torch.Generator().manual_seed(4)
    y = torch.randn(4 * BV, generator=g) * 3
    ks = choose_ks(nearest_point("E8", y), "E8", BV)
    assert torch.equal(rd_point("E8", y, ks, BV, chunk_values=BV), rd_point("E8", y, ks, BV, chunk_values=1 << 20))
