"""The fused K/V fake-quantization kernel (kernels/kv_quant.py) against the codec's torch operations.

On the CPU the kernel runs in Triton's interpreter; the ``gpu`` tests run it on CUDA against the same references.
Independent references: the codec's RHT and nearest-point search (given the kernel's own dither draw), the K/V
quantizer's torch path, and the closed-form moments of a dither uniform on the lattice's Voronoi cell.
"""

import math

import pytest
import torch

from hyperquant_diffusers.codec import nearest_point, random_signs, rht
from hyperquant_diffusers.kernels._triton import triton_available
from hyperquant_diffusers.kv import KVQuantConfig, KVQuantizer, dither_error_variance
from hyperquant_diffusers.kv import quantizer as kvq

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not triton_available(), reason="Triton (GPU or interpreter) not available")]

CPO = kvq.STEP_CODES_PER_OCTAVE
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _kernel():
    from hyperquant_diffusers.kernels import kv_quant
    return kv_quant


@pytest.fixture
def fused_always():
    before = (kvq.fused_kernel_mode(), kvq.fused_text_kernel())
    kvq.set_fused_kernel("always")
    yield
    kvq.set_fused_kernel(*before)


def _check_against_reference(x, signs, tile, alpha, lattice, dither, seed=123, hadamard=None):
    kq = _kernel()
    out, u, e = kq.kv_fake_quantize(x, signs, tile, alpha, lattice, dither=dither, seed=seed, codes_per_octave=CPO,
                                    return_dither=True, hadamard=hadamard)
    assert out.shape == x.shape and out.dtype == x.dtype
    _, e_ref = kq.kv_fake_quantize_reference(x, signs, tile, alpha, lattice, dither=u if dither else None)
    # a step code is a rounded log2: another log2 may round a code that sits on a boundary the other way
    assert int((e != e_ref).sum()) <= max(1, e.numel() // 100), (e, e_ref)
    ref, _ = kq.kv_fake_quantize_reference(x, signs, tile, alpha, lattice, dither=u if dither else None,
                                           step_codes=e)
    # the same lattice points; the transforms differ only in float32 summation order, so the outputs differ by at
    # most about one unit in the last place of the output dtype, except where the dithered point is a near-tie
    eps = torch.finfo(x.dtype).eps
    close = (out.float() - ref.float()).abs() <= eps * ref.float().abs() + 1e-5 * float(ref.float().abs().max())
    _assert_other_points_are_near_ties(x, out, ref, ~close.reshape(-1, x.shape[-1]).all(1), signs, tile, lattice,
                                       u, e)
    if dither:
        assert bool((nearest_point(lattice, u) == 0).all())      # inside the Voronoi cell of 0
        assert float(u.abs().max()) > 0.1
    else:
        assert not bool(u.any())
    return out, u, e


#: lattice dimension and coordinate grid (E8's points have all-integer or all-half-integer coordinates)
_GRID = {"E8": (8, 0.5), "D4": (4, 1.0), "Z": (1, 1.0)}


def _is_lattice_point(p, lattice):
    """(n, dim) float64 on the grid -> bool (n,): closed-form membership (E8 = D8 ∪ D8 + ½, D4 = even-sum Z^4)."""
    if lattice == "Z":
        return torch.ones(p.shape[0], dtype=torch.bool)
    frac = p - torch.floor(p)
    same_coset = (frac == 0).all(1) | (frac == 0.5).all(1)
    return same_coset & (torch.remainder(p.sum(1), 2) == 0)


def _assert_other_points_are_near_ties(x, out, ref, rows_off, signs, tile, lattice, u, e):
    """Vectors where the kernel's output is not the reference's within rounding (``rows_off``, bool (R,)): each
    lattice block where they chose different points must be a near-tie of the dithered point, recomputed in float64
    (the tensor cores' float32 sums round differently from the CPU's), and such vectors must be rare."""
    from hyperquant_diffusers.kv.quantizer import decode_log8

    d = x.shape[-1]
    n_off = int(rows_off.sum())
    if n_off == 0:
        return
    assert n_off <= max(1, rows_off.numel() // 10_000), f"{n_off} of {rows_off.numel()} vectors differ"
    idx = rows_off.nonzero().squeeze(1)
    s = signs.double().cpu()
    step = decode_log8(e[idx].cpu()).double().unsqueeze(1)
    dither = u[idx].double().cpu()
    z = rht(x.reshape(-1, d)[idx].double().cpu(), s, tile) / step + dither
    dim, grid = _GRID[lattice]

    def point(o):   # the lattice point an output reconstructs (its bf16 rounding is far below half a grid step)
        p = rht(o.reshape(-1, d)[idx].double().cpu(), s, tile) / step + dither
        return (torch.round(p / grid) * grid).reshape(-1, dim)

    pk, pr, zb = point(out), point(ref), z.reshape(-1, dim)
    assert bool(_is_lattice_point(pk, lattice).all() and _is_lattice_point(pr, lattice).all())
    diff = (pk != pr).any(1)
    assert bool(diff.any()), "the outputs differ but reconstruct the same lattice points"
    dk, dr = ((zb - pk) ** 2).sum(1)[diff], ((zb - pr) ** 2).sum(1)[diff]
    assert float((dk - dr).abs().max()) < 1e-3, (dk, dr)


def _assert_coordinates_differ_only_at_near_ties(c, c_ref, z, lattice):
    """The kernel's coordinates ``c`` against the codec's ``c_ref`` (int (R, D), codec convention) for the
    (dithered, scaled) rotated vectors ``z`` (float64 (R, D)): rare differing vectors, and in each differing
    lattice block both are lattice points equally near ``z`` to 1e-3 (the kernel's float32 transform put ``z`` on
    the other side of a near-tie)."""
    rows_off = (c != c_ref).any(1)
    n_off = int(rows_off.sum())
    assert n_off <= max(1, c.shape[0] // 10_000), f"{n_off} of {c.shape[0]} vectors differ"
    if n_off == 0:
        return
    dim = _GRID[lattice][0]
    half = 0.5 if lattice == "E8" else 1.0     # E8's coordinates are twice the point
    pk, pr = ((t[rows_off].double() * half).reshape(-1, dim) for t in (c, c_ref))
    zb = z[rows_off].reshape(-1, dim)
    assert bool(_is_lattice_point(pk, lattice).all() and _is_lattice_point(pr, lattice).all())
    diff = (pk != pr).any(1)
    dk, dr = ((zb - pk) ** 2).sum(1)[diff], ((zb - pr) ** 2).sum(1)[diff]
    assert float((dk - dr).abs().max()) < 1e-3, (dk, dr)


@pytest.mark.parametrize("lattice", ["E8", "D4", "Z"])
@pytest.mark.parametrize("head_dim,tile", [(16, 16), (64, 64), (128, 128), (128, 32)])
@pytest.mark.parametrize("dither", [True, False])
@pytest.mark.parametrize("hadamard", ["ieee", "bf16"])
def test_kernel_equals_the_codec_given_its_dither(lattice, head_dim, tile, dither, hadamard):
    gen = torch.Generator().manual_seed(head_dim + tile)
    # 37 rows: the last row block is partial; per-channel gains make the rows' steps differ
    x = (torch.randn(37, head_dim, generator=gen) * torch.exp(torch.randn(head_dim, generator=gen))).to(DEV)
    signs = random_signs(head_dim, 7)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        _check_against_reference(x.to(dtype), signs, tile, 0.6, lattice, dither, hadamard=hadamard)


def test_reference_is_the_quantizers_torch_path():
    # the reference above, given the torch path's own dither, is what KVQuantizer.fake_quantize computes
    kq = _kernel()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
    for method in ("dither", "none"):
        q = KVQuantizer(KVQuantConfig(bits=3.5, lattice="E8", method=method), 64, seed=9)
        got = q.fake_quantize(x, call_seed=77, fused=False)
        u = kvq.lattice_dither("E8", (15, 64), kvq._gen(77, "cpu"), "cpu") if method == "dither" else None
        ref, _ = kq.kv_fake_quantize_reference(x, q.signs, q.tile, q.alpha, "E8", dither=u)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("lattice", ["E8", "D4", "Z"])
def test_dither_is_uniform_on_the_voronoi_cell(lattice):
    kq = _kernel()
    x = torch.randn(512, 64, device=DEV)
    _, u, _ = kq.kv_fake_quantize(x, random_signs(64, 1), 64, 0.5, lattice, dither=True, seed=5,
                                  codes_per_octave=CPO, return_dither=True)
    u = u.double().cpu()
    n = u.numel()
    var = dither_error_variance(lattice)          # G V^(2/d): second moment of the cell, per coordinate
    # mean: 4 standard errors; second moment: the estimate's relative std is below 1 % at 32768 values
    assert float(u.mean().abs()) < 4 * math.sqrt(var / n)
    assert abs(float(u.square().mean()) / var - 1) < 0.05
    # the cell's covariance is isotropic for Z, D4 and E8: no coordinate of a lattice vector is special
    per_coord = u.reshape(-1, 8).square().mean(0) / var
    assert float((per_coord - 1).abs().max()) < 0.1, per_coord
    # the whole distribution: the norms of the lattice vectors' dither against the torch path's draw (uniform on
    # the cell by construction, tests/test_kv_quantizer.py), two-sample Kolmogorov-Smirnov at the 0.1 % level
    dim = {"E8": 8, "D4": 4, "Z": 1}[lattice]
    a = u.reshape(-1, dim).square().sum(1)
    u_torch = kvq.lattice_dither(lattice, (512, 64), torch.Generator().manual_seed(3), "cpu").double()
    b = u_torch.reshape(-1, dim).square().sum(1)
    grid = torch.cat((a, b)).sort().values
    ks = float(((torch.searchsorted(a.sort().values, grid, right=True) / a.numel())
                - (torch.searchsorted(b.sort().values, grid, right=True) / b.numel())).abs().max())
    assert ks < 1.95 * math.sqrt(2.0 / a.numel()), ks
    # norms cannot tell the cell from half of it (D4: a sign flip maps one half onto the other); which half a
    # point lies in is the parity of the sum of its coordinates' floors: as often odd as in the torch draw
    def odd(t):
        return float((torch.floor(t).reshape(-1, dim).sum(1) % 2).mean())

    p_a, p_b = odd(u), odd(u_torch)
    assert abs(p_a - p_b) < 4 * math.sqrt(2 * p_b * (1 - p_b) / a.numel()) + 1e-9, (p_a, p_b)


@pytest.mark.parametrize("lattice", ["E8", "D4", "Z"])
def test_fused_fake_quantization_is_unbiased_with_the_closed_form_variance(lattice, fused_always):
    # the K/V quantizer's own unbiasedness test (test_kv_quantizer.py), through the kernel
    d, draws = 128, 2048
    gen = torch.Generator().manual_seed(1)
    k = (torch.randn(d, generator=gen) * torch.exp(torch.randn(d, generator=gen))).to(DEV)
    quant = KVQuantizer(KVQuantConfig(bits=3.0, lattice=lattice, method="dither"), d, seed=3)
    q = torch.randn(d, generator=gen, dtype=torch.float64).to(DEV)
    truth = float(q @ k.double())
    xs = quant.fake_quantize(k.expand(draws, d).contiguous(), call_seed=11)
    assert not torch.equal(xs[0], xs[1])            # an independent draw per row
    ips = xs.double() @ q
    y = rht(k[None].float().cpu(), quant.signs, quant.tile)
    step = float(kvq.decode_log8(kvq.encode_log8(y.square().mean(1).sqrt() * quant.alpha)))
    var_th = float(q.square().sum()) * step ** 2 * dither_error_variance(lattice)
    # sample variance of 2048 draws: relative std sqrt(2/2048) = 3.1 %
    assert abs(float(ips.var()) / var_th - 1) < 0.13, (float(ips.var()), var_th)
    assert abs(float(ips.mean()) - truth) < 4 * math.sqrt(var_th / draws)


def test_seeds_and_launches():
    kq = _kernel()
    x = torch.randn(100, 32, device=DEV)
    s = random_signs(32, 2)

    def run(seed):
        return kq.kv_fake_quantize(x, s, 32, 0.5, "E8", dither=True, seed=seed, codes_per_octave=CPO,
                                   return_dither=True)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # seeds beyond 62 bits are reduced, not refused
    run(2 ** 70 + 3)
    # a tensor cut into several launches: each launch its own rows and its own draws
    before = kq.MAX_LAUNCH_VALUES
    kq.MAX_LAUNCH_VALUES = 32 * 32
    try:
        out, u, _ = _check_against_reference(x, s, 32, 0.5, "E8", True, seed=1)
    finally:
        kq.MAX_LAUNCH_VALUES = before
    assert not torch.equal(u[:32], u[32:64])
    assert not torch.equal(out, a[0])


def _assert_same_up_to_reconstruction_rounding(out, fq):
    """``out`` (the kernel's decode) is ``fq`` (its fake quantization of the same input, same seed): bit for bit in
    the interpreter; on the GPU within one unit in the last place of each value in ``fq``'s dtype, plus 8 float32
    units of the vector's largest value (the float32 sums of the inverse transform, rounded apart)."""
    if out.device.type == "cpu":
        assert torch.equal(out, fq)
        return
    o, f = out.float().reshape(-1, out.shape[-1]), fq.float().reshape(-1, fq.shape[-1])
    tol = torch.finfo(fq.dtype).eps * f.abs() + 8 * torch.finfo(torch.float32).eps * f.abs().amax(1, keepdim=True)
    assert bool(((o - f).abs() <= tol).all()), float(((o - f).abs() / tol).max())


@pytest.mark.parametrize("lattice", ["E8", "D4", "Z"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dither", [True, False])
def test_encode_then_decode_matches_the_fake_quantization(lattice, dtype, dither):
    # the cache's path through the kernel: encode to coordinates and step codes, decode them. The same draw, the
    # same points and the same reconstruction operations as kv_fake_quantize: bit for bit its output in the
    # interpreter; on the GPU, where each op is compiled apart, the reconstruction may round differently (H200:
    # 1 bf16 ulp in ~1 of 10^5 values, up to 4 float32 ulps of the vector's largest value in float32). The
    # coordinates are the codec's nearest point of the dithered vector (codec.nearest_point, float64 transform)
    kq = _kernel()
    q = KVQuantizer(KVQuantConfig(bits=4.0, lattice=lattice, method="dither" if dither else "none"), 64, seed=4)
    x = (torch.randn(3, 50, 2, 64, generator=torch.Generator().manual_seed(5)) * 3.0).to(device=DEV, dtype=dtype)
    call = dict(dither=dither, seed=77, codes_per_octave=CPO)
    c, e = kq.kv_encode(x, q.signs, q.tile, q.alpha, lattice, **call)
    assert c.dtype == torch.int32 and c.shape == (300, 64) and e.dtype == torch.int8 and e.shape == (300,)
    fq, u, e_fq = kq.kv_fake_quantize(x, q.signs, q.tile, q.alpha, lattice, return_dither=True, **call)
    assert torch.equal(e, e_fq)
    out = kq.kv_decode(c, e, x.shape, dtype, q.signs, q.tile, lattice, **call)
    assert out.dtype == dtype
    _assert_same_up_to_reconstruction_rounding(out, fq)
    # narrower integer coordinates (the int8 cache) decode the same
    assert int(c.abs().max()) <= 127
    assert torch.equal(kq.kv_decode(c.to(torch.int8), e, x.shape, dtype, q.signs, q.tile, lattice, **call), out)
    y = rht(x.reshape(-1, 64).double().cpu(), q.signs.double(), q.tile)
    z = y / kvq.decode_log8(e.cpu()).double().unsqueeze(1) + u.double().cpu()
    _assert_coordinates_differ_only_at_near_ties(c.cpu(), nearest_point(lattice, z), z, lattice)
    # another seed: another draw (with dither), the same points without
    c2, _ = kq.kv_encode(x, q.signs, q.tile, q.alpha, lattice, **dict(call, seed=78))
    assert torch.equal(c2, c) != dither


def test_encode_and_decode_cut_into_launches_alike():
    kq = _kernel()
    x = torch.randn(100, 32, device=DEV)
    s = random_signs(32, 2)
    call = dict(dither=True, seed=5, codes_per_octave=CPO)
    before = kq.MAX_LAUNCH_VALUES
    kq.MAX_LAUNCH_VALUES = 32 * 32
    try:
        c, e = kq.kv_encode(x, s, 32, 0.5, "E8", **call)
        fq = kq.kv_fake_quantize(x, s, 32, 0.5, "E8", **call)
        _assert_same_up_to_reconstruction_rounding(kq.kv_decode(c, e, x.shape, x.dtype, s, 32, "E8", **call), fq)
    finally:
        kq.MAX_LAUNCH_VALUES = before
    assert not torch.equal(fq, kq.kv_fake_quantize(x, s, 32, 0.5, "E8", **call))


@pytest.mark.parametrize("fmt", ["rice", "int8"])
def test_compressed_kv_through_the_kernel(fused_always, fmt):
    q = KVQuantizer(KVQuantConfig(bits=4.0, lattice="E8", method="dither"), 64, seed=2)
    x = torch.randn(40, 3, 64, device=DEV, dtype=torch.bfloat16)
    ck = q.compress(x, 11, fmt, fused=True)
    assert ck.kernel
    assert torch.equal(ck.dequantize(), q.fake_quantize_as_cached(x, 11, fused=True))
    _assert_same_up_to_reconstruction_rounding(ck.dequantize(), q.fake_quantize(x, 11))
    # fused=False (or the kernel off): the torch path's draw, as before
    ct = q.compress(x, 11, fmt)
    assert not ct.kernel and torch.equal(ct.dequantize(), q.fake_quantize(x, 11, fused=False))
    assert torch.equal(q.fake_quantize_as_cached(x, 11, fused=False), q.fake_quantize(x, 11, fused=False))
    kvq.set_fused_kernel("off")
    assert not q.compress(x, 11, fmt, fused=True).kernel
    # the same codes are stored either way: one step code per vector, the rate of the torch path's entry
    assert abs(ck.bits_per_value - ct.bits_per_value) < 0.1


def test_bad_arguments_are_named():
    kq = _kernel()
    x = torch.randn(4, 64)
    call = dict(dither=True, seed=0, codes_per_octave=CPO)
    s = random_signs(64, 0)
    c = torch.zeros(4, 64, dtype=torch.int32)
    e = torch.zeros(4, dtype=torch.int8)
    with pytest.raises(ValueError, match="integer coordinates"):
        kq.kv_decode(c.float(), e, (4, 64), torch.bfloat16, s, 64, "E8", **call)
    with pytest.raises(ValueError, match="int8 step codes"):
        kq.kv_decode(c, e.to(torch.int32), (4, 64), torch.bfloat16, s, 64, "E8", **call)
    with pytest.raises(ValueError, match=r"step codes \(R,\)"):
        kq.kv_decode(c, e[:3], (4, 64), torch.bfloat16, s, 64, "E8", **call)
    with pytest.raises(ValueError, match=r"shape \(2, 64\) does not hold 4 vectors"):
        kq.kv_decode(c, e, (2, 64), torch.bfloat16, s, 64, "E8", **call)
    with pytest.raises(ValueError, match="writes bf16, fp16 or float32"):
        kq.kv_decode(c, e, (4, 64), torch.float64, s, 64, "E8", **call)
    with pytest.raises(ValueError, match="kv_encode cannot take lattice 'A2'"):
        kq.kv_encode(x, s, 64, 0.5, "A2", **call)
    with pytest.raises(ValueError, match="text must be True, False or None"):
        kvq.set_fused_kernel("cuda", text="yes")
    with pytest.raises(ValueError, match="lattice 'A2'"):
        kq.kv_fake_quantize(x, random_signs(64, 0), 64, 0.5, "A2", **call)
    with pytest.raises(ValueError, match="head dimension 24"):
        kq.kv_fake_quantize(torch.randn(4, 24), random_signs(24, 0), 8, 0.5, "E8", **call)
    with pytest.raises(ValueError, match="RHT tile 48"):
        kq.kv_fake_quantize(x, random_signs(64, 0), 48, 0.5, "E8", **call)
    with pytest.raises(ValueError, match="bf16, fp16 or float32"):
        kq.kv_fake_quantize(x.double(), random_signs(64, 0), 64, 0.5, "E8", **call)
    with pytest.raises(ValueError, match=r"signs must be \(64,\)"):
        kq.kv_fake_quantize(x, random_signs(32, 0), 64, 0.5, "E8", **call)
    with pytest.raises(ValueError, match="hadamard must be one of"):
        kq.kv_fake_quantize(x, random_signs(64, 0), 64, 0.5, "E8", hadamard="fp8", **call)
    with pytest.raises(ValueError, match="fused K/V kernel mode must be one of"):
        kvq.set_fused_kernel("gpu")


def test_fake_quantize_takes_the_kernel_where_set(fused_always):
    kq = _kernel()
    x = torch.randn(2, 6, 4, 64, device=DEV, dtype=torch.bfloat16)
    q = KVQuantizer(KVQuantConfig(bits=4.0, lattice="E8", method="dither"), 64, seed=3)
    direct = kq.kv_fake_quantize(x, q.signs, q.tile, q.alpha, "E8", dither=True, seed=21, codes_per_octave=CPO)
    assert torch.equal(q.fake_quantize(x, 21), direct)
    torch_path = q.fake_quantize(x, 21, fused=False)
    assert not torch.equal(torch_path, direct)       # another dither draw
    kvq.set_fused_kernel("off")
    assert torch.equal(q.fake_quantize(x, 21), torch_path)
    kvq.set_fused_kernel("always")
    # what the kernel does not take keeps the torch path: A2, QJL
    for cfg in (KVQuantConfig(bits=4.0, lattice="A2"), KVQuantConfig(bits=5.0, method="qjl")):
        qq = KVQuantizer(cfg, 64, seed=3)
        assert qq.fused_unsupported is not None or cfg.method == "qjl"
        assert torch.equal(qq.fake_quantize(x, 5), qq.fake_quantize(x, 5, fused=False))
    with pytest.raises(ValueError, match="expected K/V vectors of 64"):
        q.fake_quantize(torch.randn(3, 32, device=DEV), 0)


def test_tiny_ltx2_through_the_kernel(fused_always):
    from test_kv_processors import _ltx2, _ltx2_inputs, _maxdiff, _run

    from hyperquant_diffusers.kv import disable_kv_compression, enable_kv_compression

    m = _ltx2().to(DEV)
    inp = {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in _ltx2_inputs().items()}

    def run(mode, **kw):
        kvq.set_fused_kernel(mode)
        enable_kv_compression(m, kv_bits=4.0, **kw)
        try:
            return _run(m, inp)
        finally:
            disable_kv_compression(m)

    # plain nearest point: no draw, so the kernel and the torch path compute the same model output
    assert _maxdiff(run("always", bias_correction="none"), run("off", bias_correction="none")) < 1e-4
    # dithered: another draw, as far from the torch path's output as another seed of the torch path
    fused, torch_a = run("always"), run("off")
    torch_b = run("off", seed=1)
    d_fused, d_seed = _maxdiff(fused, torch_a), _maxdiff(torch_b, torch_a)
    assert 0 < d_fused < 3 * d_seed and d_seed > 0, (d_fused, d_seed)
    # the text K/V on the torch path (text=False): cached and uncached agree with the kernel on for the rest
    kvq.set_fused_kernel("always", text=False)
    text_torch = run("always", cache_text_kv=True)
    assert _maxdiff(text_torch, run("always", cache_text_kv=False)) < 1e-5
    # the text K/V through the kernel: the cache decodes to exactly what the uncached path computes
    kvq.set_fused_kernel("always", text=True)
    text_kernel = run("always", cache_text_kv=True)
    assert _maxdiff(text_kernel, run("always", cache_text_kv=False)) == 0
    assert _maxdiff(text_kernel, run("always", cache_text_kv=True, cache_format="int8")) == 0
    assert 0 < _maxdiff(text_kernel, text_torch) < 3 * d_seed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("hadamard", ["ieee", "bf16"])
def test_gpu_kernel_at_ltx2_head_shapes(hadamard):
    # LTX-2's video (32 heads of 128) and audio (32 of 64) self-attention K at batch 2, bf16, E8, 4 bps
    for tokens, d in ((6144, 128), (126, 64)):
        q = KVQuantizer(KVQuantConfig(bits=4.0, lattice="E8", method="dither"), d, seed=3)
        x = torch.randn(2, tokens, 32, d, device="cuda", dtype=torch.bfloat16)
        out, _, _ = _check_against_reference(x, q.signs, q.tile, q.alpha, "E8", True, seed=99, hadamard=hadamard)
        rel = float((out.float() - x.float()).square().mean() / x.float().square().mean())
        assert 0 < rel < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_gpu_text_cache_through_the_kernel_at_ltx2_shapes():
    # one LTX-2 prompt row's text K, video (32 x 128) and audio (32 x 64), 1024 tokens, bf16: the cache entry (Rice
    # stream decoded by the Triton decoder, or int8 codes) decodes to exactly what the uncached text path computes,
    # and within reconstruction rounding to the one-launch fake quantization
    for d in (128, 64):
        q = KVQuantizer(KVQuantConfig(bits=4.0, lattice="E8", method="dither"), d, seed=3)
        x = torch.randn(1024, 32, d, device="cuda", dtype=torch.bfloat16)
        want = q.fake_quantize_as_cached(x, 7, fused=True)
        _assert_same_up_to_reconstruction_rounding(want, q.fake_quantize(x, 7))
        for fmt in ("rice", "int8"):
            ck = q.compress(x, 7, fmt, fused=True)
            assert ck.kernel
            assert torch.equal(ck.dequantize(), want) and torch.equal(ck.dequantize(), want)   # checked, unchecked


def _two_ints(p, seed, n):   # a kernel signature for the launcher test below (never run)
    pass


def test_cached_launcher_keys_free_seeds_by_their_range():
    # the kernel's seeds change on every call: the launch cache keys them by their 32-bit range (all that Triton
    # specializes a do_not_specialize integer on), so one compiled entry serves every seed
    from triton.runtime.jit import JITFunction

    from hyperquant_diffusers.kernels._launch import CachedLauncher, launch_key

    launcher = CachedLauncher(JITFunction(_two_ints, do_not_specialize=["seed"]), free_ints=("seed",))
    t = torch.zeros(4)

    def key(seed, n=16):
        return launch_key(launcher._key_args((t, seed, n)), {}, 0)

    assert key(5) == key(2**31 - 1) == key(0) == key(1)
    assert key(5) != key(2**31) and key(5) != key(5, n=17)      # out of the range; another specialized value
    with pytest.raises(ValueError, match="n must be do_not_specialize"):
        CachedLauncher(JITFunction(_two_ints, do_not_specialize=["seed"]), free_ints=("n",))
    # the kernel's own launcher frees both seed halves
    l = _kernel()._kernel()
    assert [l.names[i] for i in l.free] == ["seed_lo", "seed_hi"]
