"""quantize / LatticeTensor: rate accounting, round trips, targets, int8 codes, and named errors."""

import math

import pytest
import torch

from hyperquant_diffusers.codec.stream import code_floor_bits
from hyperquant_diffusers.codec import FormatError, LatticeTensor, coords_to_points, inverse_rht, quantize
from hyperquant_diffusers.codec.constants import FORMAT_VERSION, lattice_spec
from hyperquant_diffusers.codec.lattices import is_lattice_point

LATTICES = ["Z", "A2", "D4", "E8"]


def _snr_db(w, w_hat):
    return 10 * math.log10(float(w.double().square().sum() / (w.double() - w_hat.double()).square().sum()))


@pytest.fixture(scope="module")
def gauss():
    return torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("lattice", LATTICES)
def test_blob_round_trip_and_rate_accounting(gauss, lattice):
    q = quantize(gauss, bits=4.0, lattice=lattice, tile_size=128, seed=3)
    blob = q.to_bytes()
    assert q.bits_per_scalar == len(blob) * 8 / gauss.numel()
    assert abs(q.bits_per_scalar - 4.0) < 0.02
    q2 = LatticeTensor.from_bytes(blob)
    assert torch.equal(q2.decode_coords(), q.decode_coords())
    assert torch.equal(q2.dequantize(), q.dequantize())
    assert q2.to_bytes() == blob
    # the stored coordinates are lattice points, and dequantize is exactly inverse-RHT of points * step
    c = q.decode_coords()
    assert bool(is_lattice_point(lattice, c).all())
    manual = inverse_rht(coords_to_points(lattice, c) * q.scales[:, None], q.signs, 128)
    assert torch.equal(manual, q.dequantize())


@pytest.mark.parametrize("lattice", LATTICES)
def test_distortion_matches_high_rate_theory(gauss, lattice):
    """At 6 bps the lattice noise is uniform over the Voronoi cell: MSE = G V^(2/d) step^2 per value (±5%)."""
    spec = lattice_spec(lattice)
    q = quantize(gauss, bits=6.0, lattice=lattice)
    mse = float((q.dequantize().double() - gauss.double()).square().mean())
    theory = float((spec.nsm * spec.volume ** (2 / spec.dim) * q.scales.double().square()).mean())
    assert abs(mse / theory - 1) < 0.05, (mse, theory)


def test_snr_rises_about_6db_per_bit(gauss):
    snrs = [_snr_db(gauss, quantize(gauss, bits=b, lattice="E8").dequantize()) for b in (3.0, 4.0, 5.0, 6.0)]
    steps = [b - a for a, b in zip(snrs, snrs[1:])]
    assert all(5.5 < s < 6.6 for s in steps), snrs
    assert snrs[1] > 21.5, snrs  # E8 at 4 bps on a small Gaussian (side information is ~0.05 bps here)


def test_snr_target(gauss):
    q = quantize(gauss, snr_db=24.0, lattice="D4")
    assert abs(_snr_db(gauss, q.dequantize()) - 24.0) < 0.15


def test_rows_and_shapes_and_dtypes():
    w = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    q = quantize(w, bits=5.0, lattice="E8", tile_size=64)
    out = q.dequantize()
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    assert q.rows == 15 and q.in_features == 256


def test_zero_rows_survive():
    w = torch.randn(64, 1024)
    w[3] = 0
    q = quantize(w, bits=4.0, lattice="E8")
    out = q.dequantize()
    assert torch.equal(out[3], torch.zeros(1024))
    assert _snr_db(w, out) > 20


def test_step_mode_tensor_uses_one_step():
    w = torch.randn(64, 512) * torch.linspace(0.1, 3, 64)[:, None]
    q = quantize(w, bits=4.0, lattice="E8", step_mode="tensor")
    assert torch.allclose(q.scales, q.scales[0].expand_as(q.scales))


@pytest.mark.parametrize("lattice", ["Z", "D4", "E8"])
def test_int8_codes_are_exact(gauss, lattice):
    q = quantize(gauss, bits=4.0, lattice=lattice)
    codes, scale = q.int8_codes()
    assert codes.dtype == torch.int8
    assert torch.equal(codes.float() * scale[:, None], q.rotated())


def test_int8_overflow_is_named_and_rescale_is_bounded(gauss):
    q = quantize(gauss, bits=8.0, lattice="E8")
    assert int(q.decode_coords().abs().max()) > 127
    with pytest.raises(ValueError, match="beyond ±127"):
        q.int8_codes()
    codes, scale = q.int8_codes(on_overflow="rescale")
    err = (codes.float() * scale[:, None] - q.rotated()).abs()
    assert q.last_int8_rescaled_rows > 0
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())


def test_a2_int8_cast_error_is_half_a_grid_step(gauss):
    q = quantize(gauss, bits=4.0, lattice="A2")
    codes, scale = q.int8_codes()
    err = (codes.float() * scale[:, None] - q.rotated()).abs()
    assert bool((err <= scale[:, None] * 0.5 + 1e-6).all())
    assert int(codes.abs().max()) == 127


def test_bad_inputs_are_named():
    w = torch.randn(8, 256)
    with pytest.raises(ValueError, match="unknown lattice"):
        quantize(w, lattice="E7")
    with pytest.raises(ValueError, match=r"bits must be in \[1.0, 8.0\]"):
        quantize(w, bits=0.5)
    with pytest.raises(ValueError, match=r"bits must be in"):
        quantize(w, bits=9)
    with pytest.raises(ValueError, match="power of two"):
        quantize(w, tile_size=96)
    with pytest.raises(ValueError, match="not divisible by tile_size 128.*pad"):
        quantize(torch.randn(4, 200))
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(bad)
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(4, 128, dtype=torch.int32))


def test_code_floor_is_the_all_zero_stream():
    """Closed form of the cheapest stream: E8 stores a parity bit per 8-vector and one unary bit per magnitude
    (9 bits per 8 values); the pair-coded lattices one unary bit per pair of values. Word padding adds nothing at
    these block sizes."""
    for bv in (256, 4096, 1 << 20):
        assert code_floor_bits("E8", bv) == 9 / 8
        assert code_floor_bits("Z", bv) == code_floor_bits("D4", bv) == code_floor_bits("A2", bv) == 0.5


@pytest.mark.parametrize("lattice", LATTICES)
def test_a_rate_below_what_the_codes_can_reach_is_refused_by_name(lattice):
    """A rate that leaves no more than the all-zero stream's cost after the side information cannot be reached by
    any step: refused with both numbers. Before, the rate search ran the step multiplier off to infinity (an
    IndexError in the step grid, an OverflowError, or, for some draws, a result off target). 2 rows of 256 at
    4 bps: the side information alone exceeds it; 3 rows: it leaves less than the floor; 4 rows land on 4 bps.
    E8 on a large tensor: 1.1 bps is below its 1.125 floor, 1.2 lands on target; the pair-coded lattices reach
    1.0."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"2x256 tensor is too small for 4.0 bits per scalar: its side information "
                                         r"alone takes 5\.5"):
        quantize(torch.randn(2, 256), bits=4.0, lattice=lattice)
    floor = code_floor_bits(lattice, 4096)
    with pytest.raises(ValueError, match=rf"4.0 bits per scalar is too few for a 3x256 tensor with {lattice}: its side "
                                         rf"information takes 3\.[67]\d and Rice-coded {lattice} coordinates at least "
                                         rf"{floor:.3f} more"):
        quantize(torch.randn(3, 256), bits=4.0, lattice=lattice)
    q = quantize(torch.randn(4, 256), bits=4.0, lattice=lattice)
    assert 3.9 < q.bits_per_scalar <= 4.05
    w = torch.randn(256, 1024)
    if lattice == "E8":
        with pytest.raises(ValueError, match=r"1.1 bits per scalar is too few .* at least 1\.125 more .* pair-coded"):
            quantize(w, bits=1.1, lattice=lattice)
    low = 1.2 if lattice == "E8" else 1.0
    assert abs(quantize(w, bits=low, lattice=lattice).bits_per_scalar - low) < 0.015   # the search's sample


def test_blob_errors_are_named(gauss):
    blob = quantize(gauss[:8], bits=4.0).to_bytes()
    with pytest.raises(FormatError, match="bad magic"):
        LatticeTensor.from_bytes(b"XXXX" + blob[4:])
    other = bytearray(blob)
    other[4] = FORMAT_VERSION + 1
    with pytest.raises(FormatError, match=f"version {FORMAT_VERSION + 1} is not supported"):
        LatticeTensor.from_bytes(bytes(other))
    with pytest.raises(FormatError, match="truncated"):
        LatticeTensor.from_bytes(blob[:-5])
    with pytest.raises(FormatError, match="trailing"):
        LatticeTensor.from_bytes(blob + b"\0")


def test_corrupt_stream_raises_not_garbage(gauss):
    q = quantize(gauss[:16], bits=4.0, lattice="E8")
    words = q.words.clone()
    words[:] = -1  # all ones: no unary terminator anywhere
    bad = LatticeTensor(q.shape, q.dtype, q.lattice, q.tile_size, q.block_values, q.seed, q.step_mode, q.signs,
                        q.scales, words, q.offsets, q.ks)
    from hyperquant_diffusers.codec import RiceStreamError
    with pytest.raises(RiceStreamError):
        bad.decode_coords()


def test_rdo_lowers_the_lagrangian_and_helps_at_equal_rate(gauss):
    from hyperquant_diffusers.codec.rdo import rd_lambda, rd_nearest_point
    from hyperquant_diffusers.codec.stream import choose_ks, vector_bits
    from hyperquant_diffusers.codec.lattices import nearest_point

    y = gauss[:32] / 0.3
    c0 = nearest_point("E8", y.reshape(-1))
    c1 = rd_nearest_point("E8", y, 4096).reshape(-1)
    assert bool(is_lattice_point("E8", c1).all())
    ks = choose_ks(c0, "E8", 4096)
    lam = rd_lambda("E8")

    def j(c):
        d = (coords_to_points("E8", c) - y.reshape(-1)).view(-1, 8).square().sum(1)
        return d + lam * vector_bits(c, "E8", ks, 4096)

    assert bool((j(c1) <= j(c0) + 1e-5).all())
    assert float(j(c1).sum()) < float(j(c0).sum())
    snr_near = _snr_db(gauss, quantize(gauss, bits=3.0, lattice="E8", rdo=False).dequantize())
    q = quantize(gauss, bits=3.0, lattice="E8", rdo=True)
    assert abs(q.bits_per_scalar - 3.0) < 0.02
    assert _snr_db(gauss, q.dequantize()) > snr_near + 0.1


def test_blob_side_arrays_are_compact_and_exact(gauss):
    """1-byte log-coded row steps, 4-bit ks, 1-byte block lengths in the blob; byte count from first principles."""
    import json

    from hyperquant_diffusers.codec.constants import STEP_MANTISSAS

    assert all(abs(m - 2 ** (j / 16)) < 2 ** -22 for j, m in enumerate(STEP_MANTISSAS))
    q = quantize(gauss, bits=4.0, lattice="E8")
    blob = q.to_bytes()
    hlen = int.from_bytes(blob[6:10], "little")
    lay = json.loads(blob[10:10 + hlen])["layout"]
    assert (lay["scales"], lay["ks"], lay["offsets"]) == ("log8", "u4", "len8")
    # every row step is on the 1/16-octave grid above the smallest one (float64 check of the float32 values)
    r = torch.log2(q.scales.double() / lay["scale_base"]) * 16
    assert float((r - r.round()).abs().max()) < 1e-5 and float(r.min()) == 0.0
    nb = q.numel // q.block_values
    expect = 10 + hlen + 1024 // 8 + 64 + (nb + 1) // 2 + nb + 4 * q.words.numel()
    assert len(blob) == expect == q.nbytes
    q2 = LatticeTensor.from_bytes(blob)
    assert torch.equal(q2.scales, q.scales) and torch.equal(q2.offsets, q.offsets) and torch.equal(q2.ks, q.ks)
    # steps off the grid but bfloat16, then arbitrary float32 steps, Rice parameters above 15: wider forms, exact
    for scales, ks, s_form, k_form, extra in (
            (q.scales.to(torch.bfloat16).to(torch.float32) * 1.01, q.ks, "bfloat16", "u4", 64),
            # every other row nudged by 2^-20: rows sharing a grid step then differ, so no grid holds them all
            (q.scales * (1 + 2.0 ** -20 * (torch.arange(q.scales.numel()) % 2)), q.ks + 16, "float32", "u8",
             3 * 64 + nb - (nb + 1) // 2)):
        scales = scales.to(torch.bfloat16).to(torch.float32) if s_form == "bfloat16" else scales
        odd = LatticeTensor(q.shape, q.dtype, q.lattice, q.tile_size, q.block_values, q.seed, q.step_mode, q.signs,
                            scales, q.words, q.offsets, ks)
        b2 = odd.to_bytes()
        h2 = int.from_bytes(b2[6:10], "little")
        lay2 = json.loads(b2[10:10 + h2])["layout"]
        assert (lay2["scales"], lay2["ks"]) == (s_form, k_form)
        assert len(b2) == odd.nbytes == expect + extra + h2 - hlen
        back = LatticeTensor.from_bytes(b2)
        assert torch.equal(back.scales, odd.scales) and torch.equal(back.ks, odd.ks)
    # the header must name a known layout
    bad = blob[:10] + blob[10:10 + hlen].replace(b'"len8"', b'"len9"') + blob[10 + hlen:]
    with pytest.raises(FormatError, match="array layout"):
        LatticeTensor.from_bytes(bad)
    with pytest.raises(FormatError, match="truncated"):
        LatticeTensor.from_bytes(blob[:10 + hlen + 100])


@pytest.mark.parametrize("block_values,form", [(4096, "len16"), (1 << 19, "int32")])
def test_uneven_or_long_blocks_store_wider_offsets(block_values, form):
    """Block lengths spanning >= 256 words need uint16; a block of >= 65536 words needs int32 offsets."""
    w = torch.randn(256, 4096, generator=torch.Generator().manual_seed(1))
    w[128:] = 0.0  # zero rows: blocks of ~1 bit per value next to blocks of ~8
    q = quantize(w, bits=8.0, lattice="Z", block_values=block_values)
    lens = q.offsets[1:] - q.offsets[:-1]
    assert int(lens.max() - lens.min()) >= 256
    assert (int(lens.max()) >= 1 << 16) == (form == "int32")
    assert q._blob_side()[0]["offsets"] == form
    blob = q.to_bytes()
    assert len(blob) == q.nbytes
    q2 = LatticeTensor.from_bytes(blob)
    assert torch.equal(q2.offsets, q.offsets) and torch.equal(q2.decode_coords(), q.decode_coords())


def test_alpha_hint_only_moves_where_the_rate_search_starts():
    """A hint (the step multiplier an earlier result found) gives the same rate on target; a wildly wrong hint
    still converges; a non-positive hint is refused."""
    torch.manual_seed(21)
    w = torch.randn(256, 512)
    q0 = quantize(w, bits=4.0)
    assert q0.search_alpha > 0
    q1 = quantize(w, bits=4.0, alpha_hint=q0.search_alpha)
    assert torch.equal(q1.decode_coords(), q0.decode_coords()) and torch.equal(q1.scales, q0.scales)
    q2 = quantize(w, bits=4.0, alpha_hint=q0.search_alpha * 8)
    assert abs(q2.bits_per_scalar - q0.bits_per_scalar) < 0.03
    with pytest.raises(ValueError, match="alpha_hint"):
        quantize(w, bits=4.0, alpha_hint=0.0)


def test_pieces_must_divide_the_rows_of_a_2d_weight():
    """``pieces`` (stacked weights stored one blob each) is refused by name when it does not split the rows."""
    w = torch.randn(24, 128)      # 6 rows would be too small for 4 bps (test_a_tensor_too_small_...)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="pieces"):
            quantize(w, bits=4.0, pieces=bad)
    with pytest.raises(ValueError, match="pieces"):
        quantize(torch.randn(2, 6, 128), bits=4.0, pieces=2)
    # one piece is the plain quantization, bit for bit
    q, q1 = quantize(w, bits=4.0), quantize(w, bits=4.0, pieces=1)
    assert torch.equal(q.words, q1.words) and torch.equal(q.scales, q1.scales)


@pytest.mark.parametrize("lattice", LATTICES)
def test_torch_path_streams_do_not_depend_on_the_chunk(monkeypatch, lattice):
    """The torch code (the GPU's) finds points and Rice-codes them ``chunk_values`` at a time, cut at whole blocks,
    so its memory scales with the chunk: the blob is byte for byte that of one pass, also with a partial last
    block (100 x 384 values = 9.375 blocks of 4096; 4096-value chunks are 32 rows), and equals the CPU kernels'."""
    torch.manual_seed(22)
    w = torch.randn(100, 384) * torch.linspace(0.2, 3.0, 100).unsqueeze(1)
    ref = quantize(w, bits=4.0, lattice=lattice)                    # the CPU kernels, block by block
    monkeypatch.setenv("HYPERQUANT_CPU_KERNELS", "0")
    blobs = {cv: quantize(w, bits=4.0, lattice=lattice, chunk_values=cv).to_bytes() for cv in (1 << 22, 4096, 12000)}
    assert blobs[4096] == blobs[1 << 22] == blobs[12000] == ref.to_bytes()
