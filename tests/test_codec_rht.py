"""Per-tile randomized Hadamard transform: orthogonality, inverse, and the matmul identity."""

import pytest
import torch

from hyperquant_diffusers.codec import fwht, inverse_rht, random_signs, rht
from hyperquant_diffusers.codec.hadamard import hadamard_matrix


@pytest.mark.parametrize("tile", [16, 128, 1024])
def test_fwht_equals_dense_orthonormal_hadamard(tile):
    h = hadamard_matrix(tile)  # float64 Sylvester construction
    assert torch.allclose(h @ h.T, torch.eye(tile, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 2 * tile, dtype=torch.float64)
    want = torch.cat([x[:, :tile] @ h.T, x[:, tile:] @ h.T], 1)
    assert torch.allclose(fwht(x, tile), want, atol=1e-12)


def test_rht_is_orthogonal_and_invertible():
    k, tile = 512, 128
    s = random_signs(k, seed=3).to(torch.float64)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    x = torch.randn(64, k, dtype=torch.float64)
    y = rht(x, s, tile)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-12)
    assert torch.allclose(inverse_rht(y, s, tile), x, atol=1e-12)
    # the transform matrix itself is orthogonal
    m = rht(torch.eye(k, dtype=torch.float64), s, tile)
    assert torch.allclose(m @ m.T, torch.eye(k, dtype=torch.float64), atol=1e-12)


def test_matmul_identity_float32():
    k, tile = 1024, 128
    s = random_signs(k, seed=11)
    x, w = torch.randn(32, k), torch.randn(48, k)
    ref = (x.double() @ w.double().T)
    got = rht(x, s, tile) @ rht(w, s, tile).T
    rel = (got.double() - ref).norm() / ref.norm()
    assert rel < 2e-6, float(rel)


def test_signs_are_seeded():
    assert torch.equal(random_signs(256, 5), random_signs(256, 5))
    assert not torch.equal(random_signs(256, 5), random_signs(256, 6))


@pytest.mark.parametrize("bad", [0, 8, 24, 100, 2048, 2.5])
def test_bad_tile_is_named(bad):
    with pytest.raises(ValueError, match="tile_size must be a power of two"):
        fwht(torch.zeros(1, 4096), bad)


def test_indivisible_axis_is_named():
    with pytest.raises(ValueError, match="not divisible by tile_size"):
        fwht(torch.zeros(2, 96), 64)


def test_fwht_row_passes_do_not_change_the_result(monkeypatch):
    """fwht transforms many rows in passes; the result is bitwise that of one pass."""
    from hyperquant_diffusers.codec import hadamard

    x = torch.randn(50, 512, generator=torch.Generator().manual_seed(3))
    one = hadamard.fwht(x, 128)
    monkeypatch.setattr(hadamard, "_CHUNK_VALUES", 3 * 512)
    assert torch.equal(hadamard.fwht(x, 128), one)


def test_rht_differentiates_on_cpu():
    """A float32 CPU input that requires grad keeps the torch code (the numba kernels build no autograd graph):
    the RHT is orthonormal, so the gradient of <rht(x), g> with respect to x is inverse_rht(g)."""
    torch.manual_seed(3)
    s = random_signs(256, 1)
    x = torch.randn(5, 256, requires_grad=True)
    g = torch.randn(5, 256)
    y = rht(x, s, 128)
    assert y.requires_grad
    (y * g).sum().backward()
    want = inverse_rht(g.double(), s.double(), 128)
    assert torch.allclose(x.grad.double(), want, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(rht(x, s, 128), y, atol=1e-6)


def test_lattice_linear_backward_on_cpu():
    """The float32 reference forward of a LatticeLinear differentiates in x: y = x @ W_hat.T + b, so dL/dx = g @ W_hat
    for the dequantized weight W_hat (float64 reference)."""
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(4)
    m = LatticeLinear.from_linear(torch.nn.Linear(256, 64), bits=4.0, residency="int8")
    x = torch.randn(3, 256, requires_grad=True)
    g = torch.randn(3, 64)
    (m(x) * g).sum().backward()
    want = g.double() @ m.dequantize(torch.float64)
    assert torch.allclose(x.grad.double(), want, atol=1e-4 * float(want.abs().max()))
