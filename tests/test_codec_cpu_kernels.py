"""The numba CPU kernels (codec/cpu_kernels.py) against the torch reference: bit-identical coordinates, Rice
parameters, stream sizes, words and blobs, on random and adversarial inputs (ties, zeros, constant rows, values
that escape, magnitudes past the kernels' range), for every lattice. ``HYPERQUANT_CPU_KERNELS=0`` selects torch."""

import math

import pytest
import torch

pytest.importorskip("numba")

from hyperquant_diffusers.codec import cpu_kernels, quantize  # noqa: E402
from hyperquant_diffusers.codec.lattices import nearest_point  # noqa: E402
from hyperquant_diffusers.codec.rdo import rd_nearest_point  # noqa: E402
from hyperquant_diffusers.codec.stream import choose_ks, decode_coords, encode_coords, stream_bits  # noqa: E402

LATTICES = ("Z", "A2", "D4", "E8")


def _both(monkeypatch, fn):
    """(fast result, torch result) of ``fn()``."""
    monkeypatch.delenv("HYPERQUANT_CPU_KERNELS", raising=False)
    assert cpu_kernels.enabled()
    fast = fn()
    monkeypatch.setenv("HYPERQUANT_CPU_KERNELS", "0")
    assert not cpu_kernels.enabled()
    ref = fn()
    monkeypatch.delenv("HYPERQUANT_CPU_KERNELS")
    return fast, ref


def _same(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    else:
        assert a == b


def _values(kind: str, n: int, seed: int) -> torch.Tensor:
    """Flat float32 inputs in lattice units that stress ties and rounding."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(n, generator=g) * 3.0
    if kind == "ties":  # multiples of 1/4: coordinates at .5 (rounding ties), equal distances between candidates
        return torch.randint(-24, 25, (n,), generator=g).float() * 0.25
    if kind == "flat":  # zeros, constant rows, -0.0, one huge vector, a spread of magnitudes
        x = torch.zeros(n)
        x[n // 4: n // 2] = 0.5
        x[n // 2: n // 2 + 64] = -0.0
        x[n // 2 + 64: 3 * n // 4] = -1.25
        x[3 * n // 4:] = torch.randn(n - 3 * n // 4, generator=g) * 10.0 ** torch.randint(-3, 4, (1,), generator=g)
        x[8:16] = 3000.0
        return x
    if kind == "outliers":  # escapes of the Rice code and of the rank tables, small blocks around them
        x = torch.randn(n, generator=g) * 0.4
        x[::97] = torch.randn(x[::97].shape, generator=g) * 2000.0
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("kind", ["gauss", "ties", "flat", "outliers"])
def test_points_match_torch(monkeypatch, lattice, kind):
    n = 3 * 1024 + 512  # a shorter last block
    y = _values(kind, n, seed=len(kind) + LATTICES.index(lattice))
    fast, ref = _both(monkeypatch, lambda: nearest_point(lattice, y.view(-1, 64)))
    _same(fast, ref)
    for bv in (256, 1024):
        fast, ref = _both(monkeypatch, lambda: rd_nearest_point(lattice, y.view(-1, 64), bv, rdo=True))
        _same(fast, ref)


@pytest.mark.parametrize("lattice", LATTICES)
def test_points_beyond_kernel_range_fall_back(monkeypatch, lattice):
    y = torch.randn(2048, generator=torch.Generator().manual_seed(3))
    y[5] = cpu_kernels.MAX_ABS_Y * 1.5  # past the kernels' exact range: the torch code runs
    assert cpu_kernels.nearest_point(lattice, y) is None
    y64 = y[:1024].double() * 1e-3  # float64 inputs: torch
    assert cpu_kernels.rd_nearest_point(lattice, y64, 256, 1.0) is None
    y[5] = 9000.0  # E8: past the RDO cost table (per-candidate costs in torch); others: the kernels
    fast, ref = _both(monkeypatch, lambda: rd_nearest_point(lattice, y, 256, rdo=True))
    _same(fast, ref)


def _coords(lattice: str, kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = _values(kind, n, seed)
    c = nearest_point(lattice, y).to(torch.int64)
    if kind == "outliers":  # points past the rank tables (radius 512) and the Rice escape threshold
        d = {"Z": 2, "A2": 2, "D4": 4, "E8": 8}[lattice]
        units = torch.randperm(n // d, generator=g)[: n // 64]
        far = torch.randn(units.numel(), d, generator=g) * 3e4
        c.view(-1, d)[units] = nearest_point(lattice, far.reshape(-1)).view(-1, d).to(torch.int64)
    return c


@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("kind", ["gauss", "flat", "outliers"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_stream_matches_torch(monkeypatch, lattice, kind, dtype):
    n = 5 * 512 + 256
    c = _coords(lattice, kind, n, seed=7 + LATTICES.index(lattice)).to(dtype)
    for bv in (256, 512):
        fast, ref = _both(monkeypatch, lambda: choose_ks(c, lattice, bv))
        _same(fast, ref)
        fast, ref = _both(monkeypatch, lambda: stream_bits(c, lattice, bv))
        _same(fast, ref)
        ks = choose_ks(c, lattice, bv)
        fast, ref = _both(monkeypatch, lambda: stream_bits(c, lattice, bv, ks))
        _same(fast, ref)
        fast, ref = _both(monkeypatch, lambda: encode_coords(c, lattice, bv, chunk_values=1024))
        _same(fast, ref)
        words, off, ks = fast
        back = decode_coords(words, off, ks, n, lattice, bv)
        assert torch.equal(back.to(torch.int64), c.to(torch.int64))


def test_stream_errors_match_torch(monkeypatch):
    c = torch.zeros(512, dtype=torch.int32)
    c[3] = 1  # a D4 vector of odd sum
    for env in ("1", "0"):
        monkeypatch.setenv("HYPERQUANT_CPU_KERNELS", env)
        with pytest.raises(ValueError, match="odd sum"):
            encode_coords(c, "D4", 256)
        with pytest.raises(ValueError, match="exceeds"):
            encode_coords(torch.full((512,), 1 << 30, dtype=torch.int32), "E8", 256)
        with pytest.raises(ValueError, match="odd"):
            encode_coords(torch.zeros(511, dtype=torch.int32), "Z", 256)


@pytest.mark.parametrize("lattice", LATTICES)
def test_quantize_blobs_match_torch(monkeypatch, lattice):
    g = torch.Generator().manual_seed(11)
    w = torch.distributions.StudentT(3.0).sample((96, 256))
    w[3] = 0.0
    w[4] = 2.5
    cases = [dict(bits=4.0), dict(bits=2.5, rdo=False), dict(bits=6.0, step_mode="tensor", tile_size=64),
             dict(bits=3.0, block_values=512)]
    for kw in cases:
        bits = kw.pop("bits")
        x = w if lattice != "A2" else torch.randn(96, 256, generator=g)
        fast, ref = _both(monkeypatch, lambda: quantize(x, bits, lattice=lattice, **kw).to_bytes())
        assert fast == ref, kw


def test_disabled_without_numba(monkeypatch):
    """Without numba (or with the kernels switched off) the torch path runs and gives the same blob."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    ref = quantize(w, 4.0).to_bytes()
    monkeypatch.setitem(cpu_kernels._state, "mods", None)
    assert not cpu_kernels.enabled()
    assert quantize(w, 4.0).to_bytes() == ref


def test_sum8_order_is_known():
    mods = cpu_kernels._load()
    assert mods is not None, "torch's float32 sum order of 8 values was not recognized: E8 kernels disabled"
    assert not math.isnan(float(mods[2]))


@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("kind", ["gauss", "ties", "flat", "outliers"])
def test_one_pass_quantize_matches_two_steps(monkeypatch, lattice, kind):
    """cpu_kernels.quantize_encode (values -> words in one pass, guessing each block's Rice parameter) against the
    reference's two steps, rd_nearest_point then encode_coords, in torch."""
    n = 3 * 1024 + 512
    y = _values(kind, n, seed=3 * len(kind) + LATTICES.index(lattice)).view(-1, 64)
    lam = __import__("hyperquant_diffusers.codec.rdo", fromlist=["rd_lambda"]).rd_lambda(lattice)
    for rdo in (True, False):
        for bv in (256, 1024):
            got = cpu_kernels.quantize_encode(lattice, y, bv, rdo, lam)
            assert got is not None or kind != "gauss", "the guessed Rice parameters fail on plain Gaussian values"
            monkeypatch.setenv("HYPERQUANT_CPU_KERNELS", "0")
            ref = encode_coords(rd_nearest_point(lattice, y, bv, rdo).reshape(-1), lattice, bv)
            monkeypatch.delenv("HYPERQUANT_CPU_KERNELS")
            if got is not None:  # None: a guess failed and quantize runs the two steps
                _same(got, ref)
    # the division by per-row steps of tensor.quantize, fused into the pass
    steps = torch.rand(y.shape[0], generator=torch.Generator().manual_seed(2)) + 0.3
    got = cpu_kernels.quantize_encode(lattice, y * 1.7, 512, True, lam, row_steps=steps)
    monkeypatch.setenv("HYPERQUANT_CPU_KERNELS", "0")
    ref = encode_coords(rd_nearest_point(lattice, y * 1.7 / steps.unsqueeze(1), 512, True).reshape(-1), lattice, 512)
    monkeypatch.delenv("HYPERQUANT_CPU_KERNELS")
    if got is not None:
        _same(got, ref)


def test_rice_parameter_guess_check():
    """_guess_holds replays best_rice_k's shared window: a block whose minimum sits on the first window's edge
    widens the window of every full block (but not of a shorter last block's own search)."""
    kt = torch.tensor([[3, 3, 3], [2, 4, 4], [5, 5, 6]]).numpy()  # what windows t = 0, 1, 2 give each block
    nsym = torch.tensor([8, 8, 4]).numpy()
    mask = torch.tensor([0, 1, 0]).numpy()  # block 1's first window minimum is on its edge: window 1 for 0 and 1
    assert cpu_kernels._guess_holds(kt, mask, nsym, 8, torch.tensor([3, 4, 5]).numpy())
    assert not cpu_kernels._guess_holds(kt, mask, nsym, 8, torch.tensor([3, 2, 5]).numpy())
    mask = torch.tensor([0, 0, 3]).numpy()  # the last block alone widens twice: window 2 for it
    assert cpu_kernels._guess_holds(kt, mask, nsym, 8, torch.tensor([3, 2, 6]).numpy())
    assert not cpu_kernels._guess_holds(kt, mask, nsym, 8, torch.tensor([3, 2, 5]).numpy())
