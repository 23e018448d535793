"""Nearest-point quantizers vs brute force, and Voronoi-cell second moments vs Conway & Sloane."""

import itertools
import math

import pytest
import torch

from hyperquant_diffusers.codec import coords_to_points, lattice_spec, nearest_point
from hyperquant_diffusers.codec.lattices import is_lattice_point


def _brute_force(lattice: str, x: torch.Tensor) -> torch.Tensor:
    """Nearest point by enumerating every integer coordinate vector in a box around x and keeping lattice members.

    x: (d,) float64 in lattice units. The box (±3 coordinate steps around the rounded stored coordinate)
    contains the Voronoi-relevant neighbourhood: every lattice here has covering radius < 1.5 stored steps.
    """
    spec = lattice_spec(lattice)
    d = spec.dim
    if lattice == "E8":
        centre = torch.round(2 * x)
    elif lattice == "A2":
        centre = torch.round(torch.stack((2 * x[0], 2 * x[1] / math.sqrt(3))))
    else:
        centre = torch.round(x)
    r = 2 if d == 8 else 3
    offs = torch.tensor(list(itertools.product(range(-r, r + 1), repeat=d)), dtype=torch.float64)
    cand = (centre.unsqueeze(0) + offs).to(torch.int64)
    cand = cand[is_lattice_point(lattice, cand)]
    pts = coords_to_points(lattice, cand, dtype=torch.float64).reshape(-1, d)
    dist = (pts - x.unsqueeze(0)).square().sum(1)
    return dist.min()


@pytest.mark.parametrize("lattice", ["Z", "A2", "D4", "E8"])
def test_nearest_point_matches_brute_force(lattice):
    spec = lattice_spec(lattice)
    gen = torch.Generator().manual_seed(1)
    n = 40 if lattice == "E8" else 300
    x = torch.randn(n, spec.dim, generator=gen, dtype=torch.float64) * 3.0
    c = nearest_point(lattice, x.reshape(1, -1)).reshape(n, spec.dim)
    assert bool(is_lattice_point(lattice, c).all())
    got = (coords_to_points(lattice, c, dtype=torch.float64) - x).square().sum(1)
    for i in range(n):
        best = _brute_force(lattice, x[i])
        assert float(got[i]) <= float(best) + 1e-9, (lattice, i, float(got[i]), float(best))


@pytest.mark.parametrize("lattice,expected", [("Z", 1 / 12), ("A2", 0.0801875), ("D4", 0.0766032), ("E8", 0.0716821)])
def test_normalized_second_moment_monte_carlo(lattice, expected):
    """G = E||x - Q(x)||^2 / (d V^(2/d)) for x uniform over many cells; within 1% of the known value."""
    spec = lattice_spec(lattice)
    gen = torch.Generator().manual_seed(7)
    n = 400_000 // spec.dim
    x = (torch.rand(n, spec.dim, generator=gen, dtype=torch.float64) - 0.5) * 200.0
    c = nearest_point(lattice, x.reshape(1, -1)).reshape(n, spec.dim)
    err = (coords_to_points(lattice, c, dtype=torch.float64) - x).square().sum(1).mean()
    g = float(err) / (spec.dim * spec.volume ** (2.0 / spec.dim))
    assert abs(g - expected) / expected < 0.01, g
    assert abs(spec.nsm - expected) / expected < 1e-4


def test_unknown_lattice_is_named():
    with pytest.raises(ValueError, match="unknown lattice 'E9'"):
        nearest_point("E9", torch.zeros(8))


@pytest.mark.parametrize("lattice", ["Z", "A2", "D4", "E8"])
def test_nearest_point_passes_do_not_change_the_result(lattice, monkeypatch):
    """nearest_point quantizes long inputs in passes of CHUNK_VALUES values: same result as one call."""
    from hyperquant_diffusers.codec import lattices
    from hyperquant_diffusers.codec.lattices import nearest_a2, nearest_d4, nearest_e8, nearest_z

    fn = {"Z": nearest_z, "A2": nearest_a2, "D4": nearest_d4, "E8": nearest_e8}[lattice]
    x = torch.randn(37, 1000, generator=torch.Generator().manual_seed(2)) * 4
    monkeypatch.setattr(lattices, "CHUNK_VALUES", 1000)
    assert torch.equal(nearest_point(lattice, x), fn(x))
