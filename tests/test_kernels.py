"""Kernels (issue 4): references vs the codec / float64 on CPU; Triton kernels through the interpreter on small
inputs when there is no GPU; full-size checks on CUDA (``-m gpu``, run on the device machine)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's CPU interpreter runs the same kernels (slowly) on small inputs; set before any kernel is built.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hyperquant_diffusers.codec import LatticeTensor, quantize, random_signs, rht  # noqa: E402
from hyperquant_diffusers.codec.rice import RiceStreamError  # noqa: E402
from hyperquant_diffusers.codec.stream import decode_coords, encode_coords  # noqa: E402
from hyperquant_diffusers.kernels import fp4  # noqa: E402
from hyperquant_diffusers.kernels._triton import triton_available  # noqa: E402
from hyperquant_diffusers.kernels.act_quant import rht_quantize, rht_quantize_reference  # noqa: E402
from hyperquant_diffusers.kernels.int8_gemm import quantized_linear_reference  # noqa: E402
from hyperquant_diffusers.kernels.quantize import quantize_filled, quantize_many  # noqa: E402
from hyperquant_diffusers.kernels.rice_decode import rice_decode, rice_decode_reference  # noqa: E402

_DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton (GPU or interpreter) not available")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---- references on CPU -----------------------------------------------------------------------------------------

def test_act_quant_reference_matches_float64_rht():
    torch.manual_seed(1)
    x = torch.randn(33, 512, dtype=torch.float64) * torch.linspace(0.1, 10, 33, dtype=torch.float64)[:, None]
    s = random_signs(512, 3)
    y = rht(x, s.double(), 128)
    for fmt, bound in (("int8", 0.5 / 127 * 1.0001), ("fp8", 2.0 ** -4 * 1.0001)):
        q, sx = rht_quantize_reference(x.float(), s, 128, fmt)
        back = q.double() * sx.double()[:, None]
        amax = y.abs().amax(1, keepdim=True)
        err = (back - y).abs()
        if fmt == "int8":  # rounding error at most half a code step of amax/127 per value
            assert bool((err <= bound * amax + 1e-6 * amax).all())
        else:  # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values
            big = y.abs() > amax * 2.0 ** -6 * 448 / 448
            assert bool((err[big] <= bound * y.abs()[big] + 1e-6 * amax.expand_as(y)[big]).all())
        assert torch.allclose(sx.double(), amax.squeeze(1) / (127.0 if fmt == "int8" else 448.0), rtol=1e-6)


def test_quantized_linear_reference_brute_force():
    torch.manual_seed(2)
    xq = torch.randint(-127, 128, (5, 16), dtype=torch.int8)
    wq = torch.randint(-127, 128, (7, 16), dtype=torch.int8)
    sx, sw, b = torch.rand(5), torch.rand(7), torch.randn(7)
    y = quantized_linear_reference(xq, sx, wq, sw, b)
    i, j = 3, 4
    brute = sum(int(xq[i, t]) * int(wq[j, t]) for t in range(16)) * float(sx[i]) * float(sw[j]) + float(b[j])
    assert abs(float(y[i, j]) - brute) < 1e-9 * max(1.0, abs(brute))


def _brute_fp4(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    grid = torch.tensor(fp4.E2M1, dtype=torch.float64)
    grid = torch.cat((-grid.flip(0), grid))
    v = (x.double() / scale.double()).clamp(-6, 6)
    idx = (v.unsqueeze(-1) - grid).abs().argmin(-1)
    return grid[idx] * scale.double()


@pytest.mark.parametrize("fmt,block", [("mxfp4", 32), ("nvfp4", 16)])
def test_fp4_cast_is_nearest_e2m1_per_block(fmt, block):
    torch.manual_seed(3)
    w = torch.randn(6, 128) * torch.logspace(-2, 1, 6)[:, None]
    q = (fp4.mxfp4_quantize if fmt == "mxfp4" else fp4.nvfp4_quantize)(w)
    back = (fp4.mxfp4_dequantize if fmt == "mxfp4" else fp4.nvfp4_dequantize)(q)
    assert q["packed"].dtype == torch.uint8 and q["packed"].shape == (6, 64)
    xb = w.reshape(6, -1, block)
    if fmt == "mxfp4":
        scale = torch.exp2(q["scale_e8m0"].double() - 127).unsqueeze(-1)
        # the block maximum lands in [4, 8) of the scale (clipped at 6)
        ratio = xb.abs().amax(-1).double() / scale.squeeze(-1)
        assert bool(((ratio >= 4) & (ratio < 8)).all())
    else:
        scale = (q["scale_e4m3"].double() * q["global"].double()).unsqueeze(-1)
    ref = _brute_fp4(xb, scale).reshape(6, -1)
    assert torch.allclose(back.double(), ref, rtol=1e-6, atol=0)
    # theory: e2m1 relative error (nearest, no clipping in nvfp4) stays below ~1/6 per block max on average
    assert fp4.fp4_cast_error(w, fmt) < 0.2


def test_quantize_many_splits_exactly():
    torch.manual_seed(4)
    ws = [torch.randn(32, 256) for _ in range(3)]
    qs = quantize_many(ws, bits=4.0, lattice="E8", block_values=256, max_values=2 * 32 * 256)
    assert len(qs) == 3
    whole = quantize(torch.cat(ws[:2]), bits=4.0, lattice="E8", block_values=256, pieces=2)
    ref = whole.decode_coords()
    got = torch.cat([qs[0].decode_coords(), qs[1].decode_coords()])
    assert torch.equal(got, ref)
    for q, w in zip(qs, ws):
        assert q.shape == (32, 256)
        assert _rel(q.dequantize(torch.float32), w) < 0.2  # 4 bps E8: ~ -22 dB
        # the per-layer stream round-trips through the codec's own encoder
        words, offs, ks = encode_coords(q.decode_coords().reshape(-1), "E8", 256)
        assert torch.equal(words, q.words) and torch.equal(offs, q.offsets.to(torch.int64))


@pytest.mark.parametrize("rows, block_values", [(32, 256), (5, 512)])
def test_quantize_filled_equals_quantize_many_of_the_weights_it_writes(rows, block_values):
    """``quantize_filled`` builds each group in one buffer from ``fill(i, out)``: the same groups and streams as
    ``quantize_many`` of those weights (groups of 2, the last of 1), also where a weight is no whole number of
    blocks (5x256 in 512-value blocks: one codec call per weight). ``fill`` writes each weight once, into a
    float32 (rows, 256) view."""
    torch.manual_seed(6)
    ws = [torch.randn(rows, 256) * (1 + i) for i in range(5)]
    kw = dict(bits=4.0, lattice="E8", block_values=block_values, max_values=2 * rows * 256)
    writes = []

    def fill(i, out):
        assert out.shape == (rows, 256) and out.dtype == torch.float32
        writes.append(i)
        out.copy_(ws[i])

    got = quantize_filled((rows, 256), len(ws), fill, device="cpu", **kw)
    ref = quantize_many(ws, **kw)
    assert sorted(writes) == list(range(5))
    assert len(got) == len(ref) == 5
    for a, b in zip(got, ref):
        assert torch.equal(a.words, b.words) and torch.equal(a.scales, b.scales) and torch.equal(a.ks, b.ks)
    assert quantize_filled((rows, 256), 0, fill, device="cpu", **kw) == []
    with pytest.raises(ValueError, match="2-D shape and a count"):
        quantize_filled((rows, 256), -1, fill, device="cpu", **kw)


@pytest.mark.parametrize("shape", [(64, 64), (256, 512)])
def test_quantize_many_pieces_land_on_the_rate_of_one_layer(shape):
    """Each stacked piece is stored as its own blob (header, signs, side arrays): it must land on the requested bits
    as a layer quantized alone does, with its steps on its own blob's compact grid (one byte per row). Stacking
    64x64 weights without counting the per-piece headers gave each piece 4.8 bps at 4 asked, and a shared step
    grid stored every piece but the first with float32 steps."""
    torch.manual_seed(5)
    ws = [torch.randn(*shape) * (1 + i) + (torch.randn(shape[0], 4) @ torch.randn(4, shape[1])) * 0.2 * i
          for i in range(4)]
    qs = quantize_many(ws, bits=4.0, lattice="E8", tile_size=64)
    alone = [quantize(w, bits=4.0, lattice="E8", tile_size=64) for w in ws]
    for q, a, w in zip(qs, alone, ws):
        assert q._blob_side()[0]["scales"] == "log8"
        assert abs(q.bits_per_scalar - 4.0) < 0.02 and abs(q.bits_per_scalar - a.bits_per_scalar) < 0.03
        assert _rel(q.dequantize(torch.float32), w) < 1.05 * _rel(a.dequantize(torch.float32), w)
        assert LatticeTensor.from_bytes(q.to_bytes()).decode_coords().equal(q.decode_coords())


# ---- Triton kernels through the interpreter (or the GPU), small inputs -----------------------------------------

def _stream(lattice, bits, bv, rows=8, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g)
    w[1, 7] = 60.0  # an outlier row: large coordinates
    return quantize(w.to(_DEV), bits=bits, lattice=lattice, tile_size=128, block_values=bv, seed=seed)


#: the E8 decoders (kernels/rice_decode.py: IMPLS); every E8 decoder test runs on each
E8_IMPLS = ["units", "vectors"]


@needs_triton
@pytest.mark.parametrize("lattice,bits,impl", [("E8", 4.0, "units"), ("E8", 4.0, "vectors"), ("D4", 3.0, None),
                                               ("Z", 5.0, None)])
def test_rice_decode_kernel_bit_exact(lattice, bits, impl):
    q = _stream(lattice, bits, 256)
    out, amax, err = rice_decode(q.words, q.offsets.to(torch.int32), q.ks, q.numel, lattice, 256, sub=128,
                                 impl=impl)
    ref = decode_coords(q.words, q.offsets, q.ks, q.numel, lattice, 256)
    assert int(err.abs().sum()) == 0
    assert torch.equal(out.to(torch.int32), ref.clamp(-127, 127))
    assert int(amax.max()) == int(ref.abs().max())
    assert torch.equal(out, rice_decode_reference(q.words, q.offsets, q.ks, q.numel, lattice, 256))


def _e8_points(nvec, seed, scale=3):
    """Random E8 points, doubled (the codec's integer contract): all-even or all-odd vectors, sum = 0 mod 4."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(-scale, scale + 1, (nvec, 8), generator=g) * 2
    odd = torch.rand(nvec, generator=g) < 0.5
    c[odd] += 1
    c[c.sum(1) % 4 != 0, 0] += 2
    return c


@needs_triton
@pytest.mark.parametrize("impl,sub,chunk_words,unit_bits,lane_words", [
    ("units", None, None, None, None), ("units", 64, 8, 8, None), ("units", 128, 4, 32, None),
    ("units", 256, 2, 4, None), ("vectors", None, None, None, None), ("vectors", 64, 8, None, 1),
    ("vectors", 128, 4, None, 2), ("vectors", 256, 2, None, 1), ("vectors", 256, 6, None, 3),
    ("vectors", 64, 8, None, 4)])
def test_rice_decode_kernel_escapes_and_partial_block(impl, sub, chunk_words, unit_bits, lane_words):
    # a few huge coordinates force escape codes; 760 values leave a partial last block
    c = _e8_points(95, 5)
    c[10, :] = torch.tensor([101, 99, -3, 1, 1, 1, 1, 3])  # odd vector, sum 204 = 0 mod 4
    c[40, :] = torch.tensor([120, 2, 0, -2, 0, 4, 0, 0])  # even vector, sum 124 = 0 mod 4
    # three escapes in one vector: its unary run (3 x 25 bits and more) outgrows a 64-bit window
    c[70, :] = torch.tensor([120, -118, 116, 2, 0, 0, 0, 0])
    c = c.reshape(-1).to(torch.int32).to(_DEV)
    assert int(c.view(-1, 8).sum(1).remainder(4).abs().sum()) == 0
    words, offs, ks = encode_coords(c, "E8", 256)
    assert torch.equal(decode_coords(words, offs, ks, c.numel(), "E8", 256), c)  # valid E8 points
    # sub=64 splits each block into tiles of 64 values (carries across tiles; the vector kernel counts escapes
    # ahead); a few words per chunk scan the unary section in several steps (positions carried across steps), in
    # runs of 1-4 words per lane for the vector kernel
    kw = dict(sub=sub, chunk_words=chunk_words, unit_bits=unit_bits, impl=impl, lane_words=lane_words)
    out, amax, err = rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 256, **kw)
    assert int(err.abs().sum()) == 0
    assert torch.equal(out.to(torch.int32), c)
    assert amax.tolist() == [int(b.abs().max()) for b in c.split(256)]
    # a truncated stream is flagged, never read past
    bad_offs = offs.clone()
    bad_offs[1] = bad_offs[1] - 3
    _, _, err2 = rice_decode(words, bad_offs.to(torch.int32), ks, c.numel(), "E8", 256, **kw)
    assert int(err2[0]) != 0
    with pytest.raises(RiceStreamError):
        rice_decode(words, bad_offs.to(torch.int32), ks, c.numel(), "E8", 256, check=True, impl=impl)


@needs_triton
@pytest.mark.parametrize("chunk_words,lane_words", [(None, None), (6, 3), (8, 4)])
def test_vector_decoder_dense_and_sparse_unary_words(chunk_words, lane_words):
    # All-zero vectors make unary words of 32 terminators (4 vector ends in one word: pass 1's fourth round),
    # next to runs of large coordinates (words with no terminator at all, ends spread over several words of a lane)
    c = torch.zeros(128, 8, dtype=torch.int64)
    c[40:56] = _e8_points(16, 12, scale=40)
    c[70] = torch.tensor([-61, 57, 3, 1, -1, 1, -3, 3])     # odd vector, sum 0 mod 4
    c[90:96] = _e8_points(6, 13, scale=1)
    c = c.reshape(-1).to(torch.int32).to(_DEV)
    assert int(c.view(-1, 8).sum(1).remainder(4).abs().sum()) == 0
    words, offs, ks = encode_coords(c, "E8", 256)
    assert torch.equal(decode_coords(words, offs, ks, c.numel(), "E8", 256), c)
    for dt in (torch.int8, torch.float8_e4m3fn):
        out, amax, err = rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 256, out_dtype=dt,
                                     impl="vectors", chunk_words=chunk_words, lane_words=lane_words)
        assert int(err.abs().sum()) == 0
        ref = rice_decode_reference(words, offs, ks, c.numel(), "E8", 256, out_dtype=dt)
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


@needs_triton
def test_decoder_file_loads_beside_the_package_and_decodes():
    # the bench's A/B of decoder versions (--decoder-files) loads a copy of the decoder module by path; that copy
    # must resolve its relative imports and decode exactly like the package's own
    from hyperquant_diffusers.bench.bench_kernels import load_decoder_file
    from hyperquant_diffusers.kernels import rice_decode_vectors
    from hyperquant_diffusers.kernels._bits import decode_buffers, stats_placeholder
    from hyperquant_diffusers.kernels.rice_decode import ESCAPE_Q

    mod = load_decoder_file(rice_decode_vectors.__file__, "test")
    assert mod is not rice_decode_vectors and mod.launch is not rice_decode_vectors.launch
    c = _e8_points(64, 21, scale=6).reshape(-1).to(torch.int32).to(_DEV)
    words, offs, ks = encode_coords(c, "E8", 256)
    out, _, _ = decode_buffers(c.numel(), offs.numel() - 1, None, torch.int8, c.device, False)
    flags = stats_placeholder(c.device)
    mod.launch(words, offs.to(torch.int32), ks, out, flags, flags, c.numel(), offs.numel() - 1, 256, ESCAPE_Q,
               stats=False)
    assert torch.equal(out.to(torch.int32), c)
    with pytest.raises(ValueError, match="not a Python file"):
        load_decoder_file(os.path.dirname(rice_decode_vectors.__file__), "dir")


def _e4m3x2_bits_of(hi, lo, hw):
    # the decoders' integer -> e4m3 helper on int32 ``hi``, ``lo`` (HW: the GPU instruction, else the integer
    # reference), in a one-line kernel: (byte of hi) << 8 | (byte of lo)
    import triton
    import triton.language as tl
    from hyperquant_diffusers.kernels._bits import bit_helpers

    global _E4M3X2_BITS
    _E4M3X2_BITS = bit_helpers().e4m3x2_bits

    @triton.jit
    def one_line(hi_ptr, lo_ptr, o_ptr, n, B: tl.constexpr, HW: tl.constexpr):
        i = tl.program_id(0) * B + tl.arange(0, B)
        m = i < n
        tl.store(o_ptr + i, _E4M3X2_BITS(tl.load(hi_ptr + i, mask=m, other=0), tl.load(lo_ptr + i, mask=m, other=0),
                                         HW), mask=m)

    out = torch.empty_like(lo)
    one_line[(triton.cdiv(lo.numel(), 1024),)](hi, lo, out, lo.numel(), B=1024, HW=hw)
    return out


def _check_e4m3x2_bits(hw):
    # every integer in [-448, 448] in each byte, paired with a different one and mixed signs, against torch's cast:
    # nearest, ties to even (17 -> 16, 19 -> 20, 68 -> 64, 440 -> 448)
    lo = torch.arange(-448, 449, dtype=torch.int32, device=_DEV)
    hi = -lo.roll(1)
    got = _e4m3x2_bits_of(hi, lo, hw)
    byte = lambda v: v.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)  # noqa: E731
    assert torch.equal(got & 0xFF, byte(lo))
    assert torch.equal(got >> 8, byte(hi))
    small = lo.abs() <= 16
    assert torch.equal((got[small] & 0xFF).to(torch.uint8).view(torch.float8_e4m3fn).float(), lo[small].float())
    # a single value pairs with 0, whose byte is 0
    assert torch.equal(_e4m3x2_bits_of(torch.zeros_like(lo), lo, hw), byte(lo))


@needs_triton
def test_e4m3x2_bits_is_torchs_cast_on_every_integer_in_range():
    # the path the decoders take here: the integer reference in the interpreter, the instruction on a GPU
    from hyperquant_diffusers.kernels._triton import interpreting

    _check_e4m3x2_bits(not interpreting())


def _byte_prmt_of(a, b, sel, hw):
    # the vector decoder's byte permute on uint32 lanes (as int32 tensors), in a one-line kernel
    import triton
    import triton.language as tl
    from hyperquant_diffusers.kernels import rice_decode_vectors

    global _BYTE_PRMT
    rice_decode_vectors._kernel()                 # binds the module's jitted helpers
    _BYTE_PRMT = rice_decode_vectors._byte_prmt

    @triton.jit
    def one_line(a_ptr, b_ptr, s_ptr, o_ptr, n, B: tl.constexpr, HW: tl.constexpr):
        i = tl.program_id(0) * B + tl.arange(0, B)
        m = i < n
        a = tl.load(a_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
        b = tl.load(b_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
        sel = tl.load(s_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
        tl.store(o_ptr + i, _BYTE_PRMT(a, b, sel, HW).to(tl.int32, bitcast=True), mask=m)

    out = torch.empty_like(a)
    one_line[(triton.cdiv(a.numel(), 256),)](a, b, sel, out, a.numel(), B=256, HW=hw)
    return out


def _window32_of(words, pos, hw):
    # the vector decoder's 32-bit window reader over the whole of ``words`` (one block), in a one-line kernel
    import triton
    import triton.language as tl
    from hyperquant_diffusers.kernels import rice_decode_vectors

    global _WINDOW32
    rice_decode_vectors._kernel()                 # binds the module's jitted helpers
    _WINDOW32 = rice_decode_vectors._window32

    @triton.jit
    def one_line(w_ptr, p_ptr, o_ptr, n, nwords, B: tl.constexpr, HW: tl.constexpr):
        i = tl.program_id(0) * B + tl.arange(0, B)
        m = i < n
        v = _WINDOW32(w_ptr, tl.load(p_ptr + i, mask=m, other=0), nwords, m, HW)
        tl.store(o_ptr + i, v.to(tl.int32, bitcast=True), mask=m)

    out = torch.empty_like(pos)
    one_line[(triton.cdiv(pos.numel(), 256),)](words, pos, out, pos.numel(), words.numel(), B=256, HW=hw)
    return out


@needs_triton
def test_window32_reads_32_bits_and_nothing_outside_the_block():
    # bit positions at word starts, inside words, in the last word and around the block (every bit outside it reads
    # as 0; a window wholly outside is 0), against the bits picked one by one
    from hyperquant_diffusers.kernels._triton import interpreting

    g = torch.Generator().manual_seed(4)
    words = torch.randint(-2**31, 2**31, (9,), generator=g, dtype=torch.int64).to(torch.int32)
    pos = torch.cat([torch.arange(0, 9 * 32, 7), torch.tensor([0, 32, 256, 287, 288, 300, -1, -32, -40])])
    pos = pos.to(torch.int32)
    got = _window32_of(words.to(_DEV), pos.to(_DEV), not interpreting()).cpu()
    bits = ((words.to(torch.int64)[:, None] >> torch.arange(32)) & 1).reshape(-1)        # LSB first
    for p, v in zip(pos.tolist(), got.tolist()):
        want = sum(int(bits[p + i]) << i for i in range(32) if 0 <= p + i < bits.numel())
        assert v & 0xFFFFFFFF == want, (p, hex(v & 0xFFFFFFFF), hex(want))


@needs_triton
def test_byte_prmt_picks_the_selected_bytes():
    # byte i of the result = byte (nibble i of sel) of b:a, checked against bytes picked by indexing
    from hyperquant_diffusers.kernels._triton import interpreting

    g = torch.Generator().manual_seed(3)
    n = 1000
    a, b = (torch.randint(-2**31, 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32) for _ in range(2))
    idx = torch.randint(0, 8, (n, 4), generator=g)
    sel = (idx << torch.tensor([0, 4, 8, 12])).sum(1).to(torch.int32)
    got = _byte_prmt_of(a.to(_DEV), b.to(_DEV), sel.to(_DEV), not interpreting()).cpu()
    ab = torch.stack([a, b], 1).contiguous().view(torch.uint8).reshape(n, 8)      # little-endian bytes of b:a
    want = ab.gather(1, idx).contiguous().view(torch.int32).reshape(n)
    assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("impl", E8_IMPLS)
def test_rice_decode_kernel_e4m3_output(impl):
    # coordinates up to 23: the rounded e4m3 values (ties to even) as torch's cast gives them, on the CPU too
    c = _e8_points(300, 9, scale=10).reshape(-1).to(torch.int32).to(_DEV)
    assert int(c.abs().max()) > 16
    words, offs, ks = encode_coords(c, "E8", 1024)
    out, amax, err = rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 1024,
                                 out_dtype=torch.float8_e4m3fn, impl=impl)
    assert int(err.abs().sum()) == 0
    assert torch.equal(out.view(torch.uint8), c.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8))
    assert amax.tolist() == [int(b.abs().max()) for b in c.split(1024)]


@needs_triton
@pytest.mark.parametrize("impl", E8_IMPLS)
@pytest.mark.parametrize("out_dtype", [torch.int8, torch.float8_e4m3fn])
def test_rice_decode_kernel_large_k_and_unaligned_output(out_dtype, impl):
    # coordinates in the thousands: Rice parameters k > 8 (the low bits of a vector no longer fit one 64-bit
    # window, each field is read on its own); blocks of 512 values, one with small coordinates (k <= 8)
    c = torch.cat([_e8_points(64, 7, scale=4000), _e8_points(64, 8, scale=2)]).reshape(-1).to(torch.int32).to(_DEV)
    words, offs, ks = encode_coords(c, "E8", 512)
    assert torch.equal(decode_coords(words, offs, ks, c.numel(), "E8", 512), c)
    assert int(ks[0]) > 8 >= int(ks[1])
    ref = rice_decode_reference(words, offs, ks, c.numel(), "E8", 512, out_dtype=out_dtype)
    out, amax, err = rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 512, out_dtype=out_dtype,
                                 impl=impl)
    assert int(err.abs().sum()) == 0
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    assert amax.tolist() == [int(c[:512].abs().max()), int(c[512:].abs().max())]
    # an output view off an 8-byte boundary (the kernel stores 8 bytes per vector) decodes through a copy
    buf = torch.zeros(c.numel() + 3, dtype=out_dtype, device=_DEV)
    view = buf[3:]
    assert view.data_ptr() % 8 != 0
    rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 512, out=view, out_dtype=out_dtype, impl=impl)
    assert torch.equal(view.view(torch.uint8), ref.view(torch.uint8))
    assert int(buf[:3].view(torch.uint8).sum()) == 0


@needs_triton
def test_rice_decode_block_sizes_and_bad_arguments():
    # 264-value blocks (33 vectors: tiles padded to 64 lanes, two parity-head words): the vector decoder takes any
    # multiple of 8; the units decoder takes the powers of two that quantize writes and names the problem otherwise
    c = _e8_points(66, 3).reshape(-1).to(torch.int32).to(_DEV)
    words, offs, ks = encode_coords(c, "E8", 264)
    out, amax, err = rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 264, impl="vectors")
    assert int(err.abs().sum()) == 0 and torch.equal(out.to(torch.int32), c)
    with pytest.raises(ValueError, match="power-of-two block_values"):
        rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 264, impl="units")
    with pytest.raises(ValueError, match="unknown E8 decoder impl 'bogus'"):
        rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 264, impl="bogus")
    with pytest.raises(ValueError, match="multiple of the E8 dimension"):
        rice_decode(words, offs.to(torch.int32), ks, c.numel() - 4, "E8", 264)
    with pytest.raises(ValueError, match="a D4 stream has one decoder"):
        rice_decode(words, offs.to(torch.int32), ks, c.numel(), "D4", 264, impl="vectors")
    # the vector decoder's launch shape (its constants are cached per shape: a bad one still raises every time)
    for _ in range(2):
        with pytest.raises(ValueError, match="sub must be a power of two"):
            rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 264, impl="vectors", sub=96)
        with pytest.raises(ValueError, match="chunk_words must be lane_words \\(1\\) times a power of two"):
            rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 264, impl="vectors", chunk_words=12,
                        lane_words=1)
        with pytest.raises(ValueError, match="chunk_words must be lane_words \\(3\\) times a power of two"):
            rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 264, impl="vectors", chunk_words=128)
        with pytest.raises(ValueError, match="lane_words must be 1 to 4, got 5"):
            rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 264, impl="vectors", chunk_words=20,
                        lane_words=5)
    with pytest.raises(ValueError, match="lane_words is a launch parameter of the 'vectors' E8 decoder only"):
        rice_decode(words, offs.to(torch.int32), ks, c.numel(), "E8", 264, impl="units", lane_words=2)


@needs_triton
@pytest.mark.parametrize("lattice,impl", [("E8", "units"), ("E8", "vectors"), ("D4", None), ("Z", None)])
def test_decoders_agree_with_the_codec_on_corrupted_streams(lattice, impl):
    # Bit flips in a valid stream and random words: the GPU decoder (rank decoder for D4/Z) must flag a block
    # exactly when the codec's torch decoder rejects it, and otherwise return the same coordinates (a Rice stream
    # has no redundancy, so most corruptions decode to other valid values; neither decoder may disagree).
    from hyperquant_diffusers.codec.lattices import nearest_point

    g = torch.Generator().manual_seed(11)
    d = {"E8": 8, "D4": 4, "Z": 1}[lattice]
    n_bad = 0
    for t in range(7):
        if t == 6:  # a valid stream cut to half its words: both must reject it
            c = nearest_point(lattice, (torch.randn(256, generator=g) * 3).reshape(-1, d)).reshape(-1)
            words, offs, ks = encode_coords(c.to(_DEV), lattice, 256)
            w, offs = words[: words.numel() // 2], torch.tensor([0, words.numel() // 2], device=_DEV)
        elif t < 3:
            c = nearest_point(lattice, (torch.randn(256, generator=g) * 3).reshape(-1, d)).reshape(-1)
            words, offs, ks = encode_coords(c.to(_DEV), lattice, 256)
            w = words.clone()
            for _ in range(1 + t):
                i, b = int(torch.randint(0, w.numel(), (1,), generator=g)), int(torch.randint(0, 31, (1,), generator=g))
                w[i] = int(w[i]) ^ (1 << b)
        else:
            nw = 12 + 10 * t
            w = torch.randint(-2**31, 2**31 - 1, (nw,), generator=g, dtype=torch.int64).to(torch.int32).to(_DEV)
            if t == 4:  # fewer one-bits: shorter unary runs, more plausible streams
                w = w & torch.randint(-2**31, 2**31 - 1, (nw,), generator=g, dtype=torch.int64).to(torch.int32).to(_DEV)
            offs = torch.tensor([0, nw], dtype=torch.int64, device=_DEV)
            ks = torch.tensor([[t % 4]], dtype=torch.uint8, device=_DEV)
        try:
            ref = decode_coords(w, offs, ks, 256, lattice, 256)
        except RiceStreamError:
            ref = None
        out, _, err = rice_decode(w, offs.to(torch.int32), ks, 256, lattice, 256, impl=impl)
        flagged = bool((err != 0).any())
        assert flagged == (ref is None), (t, err.tolist())
        if ref is None:
            n_bad += 1
        else:
            assert torch.equal(out.to(torch.int32), ref.clamp(-127, 127))
    assert n_bad >= 1  # the truncated stream at least


@needs_triton
@pytest.mark.parametrize("dtype,impl,k", [(torch.float32, "auto", 256), (torch.float16, "auto", 256),
                                          (torch.float32, "onepass", 384), (torch.float32, "fused", 384),
                                          (torch.float32, "split", 256)])
def test_act_quant_kernel_matches_reference(dtype, impl, k):
    torch.manual_seed(6)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(40, k) * 3).to(dev, dtype)
    x[3] = 0.0  # an all-zero token: scale 1/127-ish, codes 0
    s = random_signs(k, 1)
    q, sx = rht_quantize(x, s, 128, "int8", impl=impl)
    qr, sxr = rht_quantize_reference(x, s, 128, "int8")
    nz = torch.arange(40) != 3
    assert torch.allclose(sx.cpu()[nz], sxr.cpu()[nz], rtol=1e-5)
    assert int(q[3].abs().max()) == 0 and 0 < float(sx[3]) < float("inf")
    diff = (q.cpu().int() - qr.cpu().int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 2  # summation order only moves exact .5 ties


@needs_triton
@pytest.mark.parametrize("impl,k", [("onepass", 384), ("fused", 384), ("split", 256)])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_act_quant_folded_signs_give_the_same_codes(impl, k, fmt):
    # signs that repeat one flip d every tile: the kernels take diag(d) H as their product operand and skip the
    # flip; every term x_k d_k H_kj is the same number, so the codes and scales are the same bits, and they match
    # the float32 reference
    from hyperquant_diffusers.codec import tile_signs
    from hyperquant_diffusers.kernels.act_quant import signed_hadamard

    torch.manual_seed(9)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(40, k) * 3).to(dev, torch.float16)
    s = random_signs(k, 5, period=128)
    hs = signed_hadamard(tile_signs(s, 128), x.dtype, x.device)
    q, sx = rht_quantize(x, s, 128, fmt, impl=impl)
    qf, sxf = rht_quantize(x, s, 128, fmt, impl=impl, hadamard=hs)
    assert torch.equal(qf.view(torch.int8), q.view(torch.int8)) and torch.equal(sxf, sx)
    qr, sxr = rht_quantize_reference(x, s, 128, fmt)
    assert torch.allclose(sxf.cpu(), sxr.cpu(), rtol=1e-5)
    d = (qf.cpu().float() - qr.cpu().float()).abs()
    if fmt == "int8":
        assert float(d.gt(0).float().mean()) < 0.01            # summation order only moves exact .5 ties
    elif dev == "cuda":
        # (Triton 3.8's interpreter loses the carry when a float32 rounds up to the next power of two in e4m3:
        # 127.9 -> 64, not 128; so fp8 codes are compared with the reference on the GPU only, as
        # test_gpu_act_quant_bf16 does at full size)
        assert float(d.gt(0).float().mean()) < 0.01
    with pytest.raises(ValueError, match="hadamard must be"):
        rht_quantize(x, s, 128, fmt, impl=impl, hadamard=hs.float())


@needs_triton
@pytest.mark.parametrize("k", [256, 512])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_act_quant_tma_kernel_equals_onepass(k, fmt):
    # the TMA variant computes the same products in the same order: the same bits as the one-pass kernel (40 rows:
    # the last box runs past the end, which the bulk copy fills with zeros and the bulk store clips), and the same
    # codes as the float32 reference up to the one-pass kernel's own tolerance
    from hyperquant_diffusers.codec import tile_signs
    from hyperquant_diffusers.kernels.act_quant import signed_hadamard

    torch.manual_seed(16)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(40, k) * 3).to(dev, torch.float16)   # (the interpreter's bf16 products are wrong: fp16)
    s = random_signs(k, 7, period=128)
    hs = signed_hadamard(tile_signs(s, 128), x.dtype, x.device)
    q, sx = rht_quantize(x, s, 128, fmt, impl="tma", hadamard=hs)
    qo, sxo = rht_quantize(x, s, 128, fmt, impl="onepass", hadamard=hs)
    assert torch.equal(q.view(torch.int8), qo.view(torch.int8)) and torch.equal(sx, sxo)
    qr, sxr = rht_quantize_reference(x, s, 128, fmt)
    assert torch.allclose(sx.cpu(), sxr.cpu(), rtol=1e-5)
    if fmt == "int8":
        assert float((q.cpu().float() - qr.cpu().float()).abs().gt(0).float().mean()) < 0.01


@needs_triton
def test_act_quant_tma_kernel_rejects_what_it_cannot_view():
    from hyperquant_diffusers.codec import tile_signs
    from hyperquant_diffusers.kernels.act_quant import signed_hadamard

    x = torch.randn(8, 384).to(torch.bfloat16)
    s = random_signs(384, 7, period=128)
    hs = signed_hadamard(tile_signs(s, 128), x.dtype, x.device)
    with pytest.raises(ValueError, match="TMA activation kernel needs .* got K=384"):
        rht_quantize(x, s, 128, "int8", impl="tma", hadamard=hs)            # 3 tiles: not a power of two
    x2 = torch.randn(8, 512).to(torch.bfloat16)
    s2 = random_signs(512, 7, period=128)
    with pytest.raises(ValueError, match="folded=False"):
        rht_quantize(x2, s2, 128, "int8", impl="tma")                       # the flip not folded
    h2 = signed_hadamard(tile_signs(s2, 128), torch.bfloat16, "cpu")
    wide = torch.randn(8, 640).to(torch.bfloat16)[:, :512]
    with pytest.raises(ValueError, match="row stride 640"):
        rht_quantize(wide, s2, 128, "int8", impl="tma", hadamard=h2)
    shifted = torch.randn(8 * 512 + 1).to(torch.bfloat16)[1:].view(8, 512)   # 2 bytes past an aligned address
    with pytest.raises(ValueError, match=r"\(2 mod 16\)"):
        rht_quantize(shifted, s2, 128, "int8", impl="tma", hadamard=h2)


def test_act_quant_auto_takes_the_tma_kernel_only_where_it_can_and_pays():
    # the launch decision alone (launches recorded, not run): an activation of at least large_min_values values
    # (M x K) that the kernel can view -> TMA; a 2-byte-offset view of the same rows (TMA needs a 16-byte aligned
    # base), rows not folded, or one row fewer -> one-pass. The threshold counts values, not rows: LTX-2's
    # 16384-wide pass takes TMA from 2048 tokens, a 2048-wide one not even at 12288 (eager, the host's extra
    # 12-25 µs per call outweighs the kernel's gain there; bench/RESULTS.md)
    from hyperquant_diffusers.codec import tile_signs
    from hyperquant_diffusers.kernels import act_quant
    from hyperquant_diffusers.testing.triton_compile import recording

    def launched(x, k, folded=True):
        s = random_signs(k, 7, period=128)
        h = act_quant.signed_hadamard(tile_signs(s, 128), torch.bfloat16, "cpu") if folded else None
        with recording(act_quant) as recs:
            act_quant.rht_quantize(x, s, 128, "int8", hadamard=h)
        return [name for name, rec in recs.items() if rec.calls]

    m = act_quant._TUNE["large_min_values"] // 512
    base = torch.zeros(m * 512 + 8, dtype=torch.bfloat16)
    assert launched(base[:m * 512].view(m, 512), 512) == ["rht_quant_tma_kernel"]
    assert launched(base[1:1 + m * 512].view(m, 512), 512) == ["rht_quant_onepass_kernel"]
    assert launched(base[:m * 512].view(m, 512), 512, folded=False) == ["rht_quant_onepass_kernel"]
    assert launched(base[:(m - 1) * 512].view(m - 1, 512), 512) == ["rht_quant_onepass_kernel"]
    assert launched(base[:2048 * 16384].view(2048, 16384), 16384) == ["rht_quant_tma_kernel"]
    assert launched(base[:1024 * 16384].view(1024, 16384), 16384) == ["rht_quant_onepass_kernel"]
    assert launched(base[:12288 * 2048].view(12288, 2048), 2048) == ["rht_quant_onepass_kernel"]
    assert launched(base[:8192 * 4096].view(8192, 4096), 4096) == ["rht_quant_tma_kernel"]


@needs_triton
def test_int8_gemm_kernel_vs_float64():
    from hyperquant_diffusers.kernels.int8_gemm import int8_gemm_triton

    torch.manual_seed(7)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    xq = torch.randint(-127, 128, (40, 256), dtype=torch.int8)
    wq = torch.randint(-127, 128, (200, 256), dtype=torch.int8)
    sx, sw, b = torch.rand(40) + 0.1, torch.rand(200) + 0.1, torch.randn(200)
    y = int8_gemm_triton(xq.to(dev), sx.to(dev), wq.to(dev), sw.to(dev), b.to(dev), out_dtype=torch.float32,
                         config=(32, 64, 128, 4, 4, 2))
    assert _rel(y.cpu(), quantized_linear_reference(xq, sx, wq, sw, b)) < 1e-6


@needs_triton
def test_persistent_gemm_launches_programs_per_sm():
    # the persistent GEMM's grid: SMs x the launch's programs per SM (the int8 default: two, the fp8 default and any
    # eight-element config: one), never more programs than output tiles; a config of another length is refused
    from hyperquant_diffusers.kernels import int8_gemm
    from hyperquant_diffusers.kernels._triton import num_sms
    from hyperquant_diffusers.testing.triton_compile import recording

    sms = num_sms(0)
    m, n, k = 12288, 1024, 512
    a, w = torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
    a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    sx, sw = torch.ones(m), torch.ones(n)
    cfg8, cfg_int8 = int8_gemm.PERSISTENT["fp8"], int8_gemm.PERSISTENT["int8"]
    with recording(int8_gemm) as recs:
        int8_gemm.int8_gemm_persistent(a, sx, w, sw, None)
        int8_gemm.fp8_gemm_persistent(a8, sx, w8, sw, None)
        int8_gemm.int8_gemm_persistent(a, sx, w, sw, None, config=cfg_int8[:8])
        int8_gemm.int8_gemm_persistent(a[:128], sx[:128], w[:128], sw[:128], None)   # a single 128x128 tile
        with pytest.raises(ValueError, match="programs per SM"):
            int8_gemm.int8_gemm_persistent(a, sx, w, sw, None, config=cfg_int8 + (1,))
        with pytest.raises(ValueError, match="positive integer"):
            int8_gemm.int8_gemm_persistent(a, sx, w, sw, None, config=cfg_int8[:8] + (0,))
    progs = [kw["PROGRAMS"] for _, kw in recs["gemm_persistent_kernel"].calls]
    fp8_per_sm = cfg8[8] if len(cfg8) == 9 else 1
    assert cfg_int8[8] == 2 and (m // cfg_int8[0]) * (n // cfg_int8[1]) > 2 * sms
    assert progs == [2 * sms, fp8_per_sm * sms, sms, 1]


@needs_triton
@pytest.mark.parametrize("fp8", [False, True])
def test_tma_and_persistent_gemm_kernels_vs_float64(fp8):
    # the Hopper GEMMs through the interpreter: the one-tile-per-program TMA kernel, and the persistent kernel
    # walking several tiles per program (its tile loop and the epilogue's own tile counter), with a split or whole
    # epilogue; the TMA store is clipped at M = 150 (inside the second row tile). float32 output, so the only
    # rounding is the float32 epilogue
    from hyperquant_diffusers.kernels.int8_gemm import (fp8_gemm_persistent, fp8_gemm_tma, int8_gemm_persistent,
                                                        int8_gemm_tma)

    torch.manual_seed(8 + fp8)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m, n, k = 150, 256, 256
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-12, 13, (n, k), dtype=torch.int8)
    if fp8:
        xq, wq = (torch.randn(m, k) * 64).to(torch.float8_e4m3fn), wq.to(torch.float8_e4m3fn)
    sx, sw, b = torch.rand(m) + 0.1, torch.rand(n) + 0.1, torch.randn(n)
    ops = [t.to(dev) for t in (xq, sx, wq, sw)]
    ref = {bias is None: quantized_linear_reference(xq.float() if fp8 else xq, sx, wq.float() if fp8 else wq, sw,
                                                   bias) for bias in (b, None)}
    outs = []
    for bias in (b, None):
        y = (fp8_gemm_tma if fp8 else int8_gemm_tma)(*ops, None if bias is None else bias.to(dev),
                                                     out_dtype=torch.float32, config=(64, 128, 64, 8, 4, 2))
        assert y.shape == (m, n) and _rel(y.cpu(), ref[bias is None]) < 1e-6, ("tma", bias is None)
        if bias is not None:
            outs.append(y.cpu())
    per = fp8_gemm_persistent if fp8 else int8_gemm_persistent
    for cfg in ((64, 128, 64, 8, 4, 2, True, True), (64, 128, 64, 8, 4, 2, False, False),
                (64, 128, 64, 8, 4, 2, True, True, 2)):   # two programs per SM
        for programs, bias in ((None, b), (3, b), (3, None)):
            y = per(*ops, None if bias is None else bias.to(dev), out_dtype=torch.float32, config=cfg,
                    programs=programs)
            assert y.shape == (m, n) and _rel(y.cpu(), ref[bias is None]) < 1e-6, (cfg, programs, bias is None)
            if bias is not None:
                outs.append(y.cpu())
    if not fp8:   # exact int32 sums and the same float32 epilogue: both kernels, every launch, the same bits
        assert all(torch.equal(o, outs[0]) for o in outs)
    with pytest.raises(ValueError, match="SUBTILE, FLATTEN"):
        per(*ops, None, config=(64, 128, 64, 8, 4, 2))      # a TMA-kernel config given to the persistent one
    with pytest.raises(ValueError, match="multiple of 128"):
        per(*[t[:, :200] if t.dim() == 2 else t for t in ops], None)   # K = 200


def test_cuda_forward_falls_back_on_cpu():
    from hyperquant_diffusers.kernels.dispatch import cuda_forward
    from hyperquant_diffusers.nn import LatticeLinear

    lin = torch.nn.Linear(256, 64)
    m = LatticeLinear.from_linear(lin, bits=4.0, residency="compressed")
    x = torch.randn(3, 256)
    assert torch.equal(cuda_forward(m, x), m.reference_forward(x))


def test_dequantize_decoder_argument_is_checked():
    from hyperquant_diffusers.nn import LatticeLinear

    m = LatticeLinear.from_linear(torch.nn.Linear(256, 64), bits=4.0, residency="compressed")
    with pytest.raises(ValueError, match="decoder must be 'auto' or 'torch'"):
        m.dequantize(decoder="triton")


def test_prefetch_when_rejects_an_unknown_place():
    from hyperquant_diffusers.kernels import dispatch

    with pytest.raises(ValueError, match="prefetch 'when' must be one of .*'after_gemm'.*got 'later'"):
        dispatch.set_prefetch_when("later")
    assert dispatch._PREFETCH["when"] in dispatch.PREFETCH_WHEN


# ---- GPU (device machine) ----------------------------------------------------------------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("lattice,bits,impl", [("E8", b, i) for b in (4.0, 3.0, 5.0) for i in E8_IMPLS]
                         + [("D4", 4.0, None), ("Z", 4.0, None)])
def test_gpu_rice_decode_bit_exact_full_layer(lattice, bits, impl):
    torch.manual_seed(10)
    w = torch.randn(2048, 2048, device="cuda") * 0.02
    q = quantize(w, bits=bits, lattice=lattice)
    out, amax, err = rice_decode(q.words, q.offsets.to(torch.int32), q.ks, q.numel, lattice, q.block_values,
                                 impl=impl)
    ref = q.decode_coords().reshape(-1)
    assert int(err.abs().sum()) == 0
    assert torch.equal(out.to(torch.int32), ref.clamp(-127, 127))
    f8, _, _ = rice_decode(q.words, q.offsets.to(torch.int32), q.ks, q.numel, lattice, q.block_values,
                           out_dtype=torch.float8_e4m3fn, impl=impl)
    assert torch.equal(f8, rice_decode_reference(q.words, q.offsets, q.ks, q.numel, lattice, q.block_values,
                                                 out_dtype=torch.float8_e4m3fn))


@gpu
@needs_cuda
@pytest.mark.parametrize("lattice,bits", [("E8", 4.0), ("E8", 8.0), ("D4", 4.0), ("Z", 3.0), ("A2", 4.0)])
def test_gpu_dequantize_of_a_compressed_layer_equals_the_codec_decoder(lattice, bits):
    """A compressed-resident layer on CUDA dequantizes through the GPU Rice decoder (LoRA merging does it twice per
    layer): the same float32 weight as the codec's torch decoder, bit for bit. E8 at 8 bps has coordinates beyond
    ±127 and A2 has no int8 coordinates: both fall back to the codec's decoder, and still agree."""
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(12)
    lin = torch.nn.Linear(2048, 1024, device="cuda", dtype=torch.bfloat16)
    lin.weight.data[:4, :8] *= 300.0   # outliers: at 8 bps their rows' coordinates exceed the int8 range
    m = LatticeLinear.from_linear(lin, bits=bits, lattice=lattice, residency="compressed")
    assert m.codes is None and m.hq_words.is_cuda
    fast = m.dequantize(torch.float32)
    ref = m.dequantize(torch.float32, decoder="torch")
    assert fast.is_cuda and torch.equal(fast, ref)
    served = m._gpu_decoded_codes() is not None
    assert served == (lattice in ("E8", "D4", "Z") and bits <= 4.0)
    assert _rel(ref, lin.weight.float()) < 0.35


@gpu
@needs_cuda
def test_gpu_layer_quantization_streams_do_not_depend_on_the_encode_chunk():
    """A layer quantized on CUDA (``from_linear``, and ``requantize`` as LoRA merging does) encodes in
    GPU_ENCODE_CHUNK passes instead of the codec's default 2M: the same stream, word for word."""
    from hyperquant_diffusers.codec.constants import GPU_ENCODE_CHUNK
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(13)
    lin = torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)   # 16.8M values: 8 default chunks
    assert lin.weight.numel() > 2 * (1 << 21) and GPU_ENCODE_CHUNK > lin.weight.numel()
    m = LatticeLinear.from_linear(lin, bits=4.0, residency="compressed")
    q = quantize(lin.weight.detach(), bits=4.0)                              # the codec's default chunk
    assert torch.equal(m.hq_words, q.words) and torch.equal(m.hq_ks.reshape(-1), q.ks.reshape(-1).to(m.hq_ks.dtype))
    w2 = lin.weight.detach().float() * 1.25
    m.requantize(w2)
    q2 = quantize(w2, bits=4.0)
    assert torch.equal(m.hq_words, q2.words) and torch.equal(m.hq_offsets.long(), q2.offsets.long())


@gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k", [(4096, 4096), (3000, 16384), (200, 16384)])
def test_gpu_act_quant_bf16(fmt, m, k):
    # (3000, 16384): rows longer than one program's share, one program per row (auto); (200, 16384): split-K
    torch.manual_seed(11)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    s = random_signs(k, 2)
    q, sx = rht_quantize(x, s, 128, fmt)
    qr, sxr = rht_quantize_reference(x, s, 128, fmt)
    assert torch.allclose(sx, sxr, rtol=1e-5)
    d = (q.float() - qr.float()).abs()
    assert float((d > 0).float().mean()) < 1e-4
    y = rht(x.double(), s.double().cuda(), 128)
    assert _rel(q.double() * sx.double()[:, None], y) < (0.01 if fmt == "int8" else 0.03)


@gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k", [(12288, 2048), (3001, 4096), (700, 16384)])
def test_gpu_act_quant_tma_kernel_equals_onepass(fmt, m, k):
    # on the device, at LTX-2 widths: the TMA variant gives the one-pass kernel's bits, and through the layers'
    # automatic choice when it is selected for large M
    from hyperquant_diffusers.codec import tile_signs
    from hyperquant_diffusers.kernels import act_quant

    torch.manual_seed(17)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    s = random_signs(k, 3, period=128)
    hs = act_quant.signed_hadamard(tile_signs(s, 128), x.dtype, x.device)
    qo, sxo = rht_quantize(x, s, 128, fmt, impl="onepass", hadamard=hs)
    q, sx = rht_quantize(x, s, 128, fmt, impl="tma", hadamard=hs)
    assert torch.equal(q.view(torch.int8), qo.view(torch.int8)) and torch.equal(sx, sxo)
    saved = dict(act_quant._TUNE)
    act_quant._TUNE.update(large_m_impl="tma", large_min_values=0)
    try:
        qa, sxa = rht_quantize(x, s, 128, fmt, hadamard=hs)
    finally:
        act_quant._TUNE.update(saved)
    assert torch.equal(qa.view(torch.int8), qo.view(torch.int8)) and torch.equal(sxa, sxo)
    qr, sxr = rht_quantize_reference(x, s, 128, fmt)
    assert torch.allclose(sx, sxr, rtol=1e-5)


@gpu
@needs_cuda
@pytest.mark.parametrize("hw", [True, False])
def test_gpu_e4m3x2_bits_both_paths_are_torchs_cast(hw):
    # the PTX cvt.rn.satfinite.e4m3x2.f32 path and the integer reference it replaces, both compiled for the GPU
    _check_e4m3x2_bits(hw)


@gpu
@needs_cuda
def test_gpu_codes_to_e4m3_bit_exact():
    from hyperquant_diffusers.kernels.cast import codes_to_e4m3, codes_to_e4m3_reference

    every = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).cuda()
    assert torch.equal(codes_to_e4m3(every).view(torch.uint8), codes_to_e4m3_reference(every).view(torch.uint8))
    # exact below 17, rounded to nearest even above (e4m3: 3 mantissa bits)
    back = codes_to_e4m3(every).float()
    small = every.abs() <= 16
    assert torch.equal(back[small], every[small].float())
    assert float(back[every == 17]) == 16.0 and float(back[every == 19]) == 20.0
    torch.manual_seed(15)
    c = torch.randint(-127, 128, (4099, 1031), dtype=torch.int8, device="cuda")  # not a multiple of the block
    out = torch.empty(c.shape, dtype=torch.float8_e4m3fn, device="cuda")
    r = codes_to_e4m3(c, out=out)
    assert r.data_ptr() == out.data_ptr()
    assert torch.equal(r.view(torch.uint8), codes_to_e4m3_reference(c).view(torch.uint8))
    with pytest.raises(TypeError, match="int8"):
        codes_to_e4m3(c.float())


@gpu
@needs_cuda
@pytest.mark.parametrize("path", ["triton", "tma", "persistent", "int_mm", "fp8_scaled_mm", "fp8_tma",
                                  "fp8_persistent"])
@pytest.mark.parametrize("m", [256, 1000])
def test_gpu_quantized_gemm_paths_vs_float64(path, m):
    from hyperquant_diffusers.kernels.int8_gemm import (fp8_linear, int8_gemm_int_mm, int8_gemm_persistent,
                                                        int8_gemm_tma, int8_gemm_triton, set_fp8_path)

    torch.manual_seed(12)
    n, k = 768, 1024
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    wq = torch.randint(-20, 21, (n, k), dtype=torch.int8, device="cuda")
    sx = torch.rand(m, device="cuda") + 0.1
    sw = torch.rand(n, device="cuda") + 0.1
    b = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), device="cuda")
    if path.startswith("fp8"):
        # |codes| <= 20 are not all exact in e4m3 (exact to 16): compare with the product of the cast operands
        x8 = (xq.float() / 127 * 448).to(torch.float8_e4m3fn)
        w8 = wq.to(torch.float8_e4m3fn)
        set_fp8_path(path[4:])
        try:
            y = fp8_linear(x8, sx * 127 / 448, w8, sw, b)
            y_int8_codes = fp8_linear(x8, sx * 127 / 448, wq, sw, b)   # int8 codes are cast on the way
        finally:
            set_fp8_path("auto")
        ref = quantized_linear_reference(x8.float(), sx * 127 / 448, w8.float(), sw, b.float())
        assert _rel(y, ref) < 1e-2
        assert torch.equal(y, y_int8_codes)
        return
    fn = {"triton": int8_gemm_triton, "tma": int8_gemm_tma, "persistent": int8_gemm_persistent,
          "int_mm": int8_gemm_int_mm}[path]
    out = fn(xq, sx, wq, sw, b, out_dtype=torch.bfloat16)
    assert not bool(out.isnan().any())
    assert _rel(out, quantized_linear_reference(xq, sx, wq, sw, b)) < 1e-2  # bf16 output rounding


@gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_persistent_gemm_launches_match_the_tma_kernel(fp8):
    # every launch the bench sweeps (tile shapes, split / whole epilogue, flattened or nested loops, fewer programs
    # than SMs) computes the same product: int8 bit for bit as the one-tile-per-program kernel (exact int32 sums,
    # the same float32 epilogue), fp8 within float32 summation-order rounding; M = 1000 ends inside a tile
    from hyperquant_diffusers.bench.bench_kernels import PERSISTENT_SWEEP
    from hyperquant_diffusers.kernels.int8_gemm import (fp8_gemm_persistent, fp8_gemm_tma, int8_gemm_persistent,
                                                        int8_gemm_tma)

    torch.manual_seed(21 + fp8)
    m, n, k = 1000, 768, 1024
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    wq = torch.randint(-12, 13, (n, k), dtype=torch.int8, device="cuda")
    if fp8:
        xq, wq = (torch.randn(m, k, device="cuda") * 64).to(torch.float8_e4m3fn), wq.to(torch.float8_e4m3fn)
    sx, sw = torch.rand(m, device="cuda") + 0.1, torch.rand(n, device="cuda") + 0.1
    b = torch.randn(n, device="cuda").to(torch.bfloat16)
    ref = (fp8_gemm_tma if fp8 else int8_gemm_tma)(xq, sx, wq, sw, b)
    ref64 = quantized_linear_reference(xq.float() if fp8 else xq, sx, wq.float() if fp8 else wq, sw, b)
    per = fp8_gemm_persistent if fp8 else int8_gemm_persistent
    for cfg in PERSISTENT_SWEEP:
        for programs in (None, 7):
            y = per(xq, sx, wq, sw, b, config=cfg, programs=programs)
            assert y.shape == (m, n) and _rel(y, ref64) < 1e-2, (cfg, programs)
            if not fp8:
                assert torch.equal(y, ref), (cfg, programs)
    y = per(xq, sx, wq, sw, None)   # no bias
    assert _rel(y, quantized_linear_reference(xq.float() if fp8 else xq, sx, wq.float() if fp8 else wq, sw,
                                              None)) < 1e-2


@gpu
@needs_cuda
def test_gpu_fp8_residency_equals_the_per_call_cast():
    # mma="fp8" + int8 residency holds e4m3 codes (finalized on the GPU decoder path): the same output, bit for bit,
    # as int8 codes cast to e4m3 on every call, and the exact int8 codes survive
    from hyperquant_diffusers.kernels.dispatch import _interned_signs
    from hyperquant_diffusers.kernels.int8_gemm import fp8_linear
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(16)
    lin = torch.nn.Linear(1024, 768, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    a = LatticeLinear.from_linear(lin, bits=4.0, mma="int8", residency="int8")
    b = LatticeLinear.from_linear(lin, bits=4.0, mma="fp8", residency="int8")
    assert a.codes.is_cuda and b.codes.dtype == torch.float8_e4m3fn and b.code_fix_idx.numel() > 0
    assert torch.equal(b.exact_codes(), a.codes)
    for m in (1000, 200):
        x = torch.randn(m, 1024, device="cuda").to(torch.bfloat16)
        s = _interned_signs(a.signs, x.dtype, x.device)
        xq, sx = rht_quantize(x, a.signs, 128, "fp8", signs_cast=s)
        y_cast = fp8_linear(xq, sx, a.codes, a.code_scale, a.bias)  # int8 codes, cast per call
        assert torch.equal(b(x), y_cast)


@gpu
@needs_cuda
@pytest.mark.parametrize("mma", ["int8", "fp8"])
def test_gpu_dtype_casts_keep_the_kernel_path_exact(mma):
    # .float() then .to(bf16) on a CUDA model: codes, scales and signs keep their dtypes, the bias round-trips, and
    # the kernel output is unchanged bit for bit
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(17)
    lin = torch.nn.Linear(1024, 768, device="cuda", dtype=torch.bfloat16)
    m = LatticeLinear.from_linear(lin, bits=4.0, mma=mma, residency="int8")
    x = torch.randn(1000, 1024, device="cuda").to(torch.bfloat16)
    y0 = m(x)
    m.float()
    assert m.code_scale.dtype == torch.float32 and m.bias.dtype == torch.float32
    m.to(torch.bfloat16)
    assert m.codes.dtype == (torch.float8_e4m3fn if mma == "fp8" else torch.int8)
    assert m.code_scale.dtype == torch.float32 and m.signs_f32.dtype == torch.float32
    assert torch.equal(m(x), y0)


@gpu
@needs_cuda
@pytest.mark.parametrize("residency", ["int8", "compressed"])
@pytest.mark.parametrize("mma", ["int8", "fp8"])
def test_gpu_lattice_linear_cuda_forward(residency, mma):
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(13)
    lin = torch.nn.Linear(2048, 1024, device="cuda", dtype=torch.bfloat16)
    m = LatticeLinear.from_linear(lin, bits=4.0, residency=residency, mma=mma)
    assert m.residency == residency
    x = torch.randn(2, 300, 2048, device="cuda").to(torch.bfloat16)
    y = m(x)
    ref = m.reference_forward(x.float()).double()
    assert y.shape == (2, 300, 1024) and y.dtype == torch.bfloat16
    # activation quantization (int8 per token after RHT: ~0.3%; fp8: ~2-3%) + bf16 output
    assert _rel(y, ref) < (0.01 if mma == "int8" else 0.05)


@pytest.mark.parametrize("lattice", ["E8", "D4"])
def test_gpu_int8_residency_decode_equals_torch_finalize(lattice):
    """LatticeLinear.finalize on CUDA decodes with the Triton Rice decoder; here (interpreter on CPU, or the GPU)
    it must give exactly the codes and scales of the torch decoder."""
    from hyperquant_diffusers.kernels._triton import triton_available
    from hyperquant_diffusers.kernels.dispatch import make_int8_resident
    from hyperquant_diffusers.nn.lattice_linear import LatticeLinear

    if not triton_available():
        pytest.skip("Triton can run neither on a GPU nor in its interpreter here")
    from hyperquant_diffusers.codec import quantize

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    q = quantize(lin.weight.detach(), bits=4.0, lattice=lattice, tile_size=64)
    ref = LatticeLinear.from_lattice_tensor(q, lin.bias, bits=4.0, residency="int8")  # torch decoder, CPU
    where = "cuda" if torch.cuda.is_available() else "cpu"
    qd, bias = q.to(where), lin.bias.to(where)
    auto = LatticeLinear.from_lattice_tensor(qd, bias, bits=4.0, residency="int8")  # GPU decoder on CUDA
    assert torch.equal(ref.codes, auto.codes.cpu()) and torch.equal(ref.code_scale, auto.code_scale.cpu())
    dev = LatticeLinear.from_lattice_tensor(qd, bias, bits=4.0, residency="compressed")
    assert make_int8_resident(dev) and dev.residency == "int8" and dev.hq_words is None
    assert torch.equal(ref.codes, dev.codes.cpu()) and torch.equal(ref.code_scale, dev.code_scale.cpu())


@gpu
@needs_cuda
def test_gpu_activation_sharing_is_exact_and_safe():
    """Layers fed the same tensor share one activation quantization; an in-place change of the input, a new
    tensor, or different signs must recompute (results identical to sharing off)."""
    from hyperquant_diffusers.kernels import dispatch
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(11)
    a = LatticeLinear.from_linear(torch.nn.Linear(512, 256), bits=4.0, seed=0).cuda()
    b = LatticeLinear.from_linear(torch.nn.Linear(512, 384), bits=4.0, seed=0).cuda()
    c = LatticeLinear.from_linear(torch.nn.Linear(512, 256), bits=4.0, seed=5).cuda()   # other signs
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)

    def run():
        ys = [a(x), b(x), c(x)]
        x.mul_(1.5)                       # in place: the next call must see the new values
        ys.append(a(x))
        ys.append(b(x.clone()))           # a different tensor with equal values
        return ys

    dispatch.set_activation_sharing(False)
    x0 = x.clone()
    ref = run()
    x.copy_(x0)
    dispatch.set_activation_sharing(True)
    got = run()
    for r, g in zip(ref, got):
        assert torch.equal(r, g)
    assert not torch.equal(got[0], got[3])   # the in-place change was seen


@gpu
@needs_cuda
@pytest.mark.parametrize("mma", ["int8", "fp8"])
@pytest.mark.parametrize("when", ["acquire", "after_launch", "after_gemm"])
def test_gpu_prefetch_compressed_matches_just_in_time(mma, when):
    """Compressed residency with the side-stream prefetch gives bit-identical outputs to decoding just in time,
    in the learned order and when the order changes (a wrong guess), wherever the prefetch is launched."""
    from hyperquant_diffusers.kernels import dispatch
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(12)
    shapes = [(512, 1024), (1024, 512), (512, 512), (512, 2048), (2048, 512)]
    layers = [LatticeLinear.from_linear(torch.nn.Linear(i, o), bits=4.0, residency="compressed", mma=mma).cuda()
              for i, o in shapes]
    xs = {i: torch.randn(700, i, device="cuda", dtype=torch.bfloat16) for i in {512, 1024, 2048}}

    def chain(order):
        return [layers[j](xs[shapes[j][0]]) for j in order]

    dispatch.set_prefetch(False)
    fwd, rev = list(range(5)), [4, 2, 0, 3, 1]
    ref_f, ref_r = chain(fwd), chain(rev)
    dispatch.set_prefetch(True)
    dispatch.set_activation_sharing(False)
    saved_when = dispatch._PREFETCH["when"]
    dispatch.set_prefetch_when(when)
    try:
        for _ in range(3):                                  # learn, then use the prefetch
            for r, g in zip(ref_f, chain(fwd)):
                assert torch.equal(r, g)
        for r, g in zip(ref_r, chain(rev)):                 # mispredicted successors
            assert torch.equal(r, g)
        for r, g in zip(ref_f, chain(fwd)):
            assert torch.equal(r, g)
        pf = dispatch._PREFETCHERS[("cuda:0", torch.float8_e4m3fn if mma == "fp8" else torch.int8)]
        assert pf.nbytes() >= 2 * 2048 * 512
    finally:
        dispatch.set_prefetch_when(saved_when)
        dispatch.set_activation_sharing(True)


@gpu
@needs_cuda
@pytest.mark.parametrize("mma", ["int8", "fp8"])
def test_gpu_fast_launch_matches_ordinary_launch(mma):
    """Cached launches (kernels/_launch.py) give bit-identical results to Triton's ordinary launch, also when the
    arguments change what Triton specializes on (token counts, a 2-byte-aligned activation view) between calls
    that reuse a cached kernel, and for a decode launched on a side stream."""
    from hyperquant_diffusers.kernels import _launch, dispatch
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(14)
    layers = [LatticeLinear.from_linear(torch.nn.Linear(512, 384), bits=4.0, residency=r, mma=mma, lattice=lat).cuda()
              for r, lat in (("int8", "E8"), ("compressed", "E8"), ("compressed", "D4"), ("compressed", "Z"))]
    base = torch.randn(1000 * 512 + 8, device="cuda", dtype=torch.bfloat16)
    inputs = []
    for m in (1, 17, 256, 300, 1000):
        inputs.append(base[: m * 512].view(m, 512))            # 16-byte aligned
        inputs.append(base[1: 1 + m * 512].view(m, 512))       # 2-byte aligned: another specialization

    def run():
        out = [layer(x) for x in inputs for layer in layers]
        q = layers[1]
        side = torch.cuda.Stream()
        buf = torch.empty(q.out_features * q.in_features, dtype=torch.int8, device="cuda")
        side.wait_stream(torch.cuda.current_stream())
        rice_decode(q.hq_words, q.hq_offsets, q.hq_ks, buf.numel(), "E8", q.block_values, out=buf, stats=False,
                    stream=side)
        torch.cuda.current_stream().wait_stream(side)
        out.append(buf.clone())
        return out

    dispatch.set_activation_sharing(False)
    try:
        _launch.set_fast_launch(False)
        ref = run()
        _launch.set_fast_launch(True)
        for _ in range(2):                      # the first round fills the cache, the second launches from it
            got = run()
            for r, g in zip(ref, got):
                assert torch.equal(r, g)
        assert any(lz.entries for lz in _cached_launchers())
    finally:
        _launch.set_fast_launch(True)
        dispatch.set_activation_sharing(True)


def _cached_launchers():
    from hyperquant_diffusers.kernels import act_quant, int8_gemm, rank_decode, rice_decode as rd

    return [*act_quant._kernel(), *int8_gemm._kernels(), rd._kernel(), rank_decode._kernel()]


def test_cached_launch_key_separates_what_triton_specializes_on():
    """Two launches may share a compiled kernel only if every property Triton specializes on is equal: pointer
    dtype and 16-byte alignment, integer values (1, multiples of 16, 64-bit range), bools apart from ints,
    constexprs and launch options; anything else is refused (ordinary launch)."""
    from hyperquant_diffusers.kernels._launch import _Unkeyable, launch_key

    base = torch.zeros(64, dtype=torch.bfloat16)
    aligned, shifted = base[:16], base[1:17]
    assert launch_key((aligned, 16), {}, 0) == launch_key((base[8:24], 16), {}, 0)   # both 16-byte aligned
    assert launch_key((aligned, 16), {}, 0) != launch_key((shifted, 16), {}, 0)
    assert launch_key((aligned, 16), {}, 0) != launch_key((aligned.float(), 16), {}, 0)
    assert len({launch_key((aligned, v), {}, 0) for v in (1, 16, 17, 2**31, 2**33)}) == 5
    assert launch_key((aligned, True), {}, 0) != launch_key((aligned, 1), {}, 0)
    assert launch_key((aligned, 0.5), {}, 0) == launch_key((aligned, 0.25), {}, 0)    # floats are not specialized
    w4, w8 = {"BM": 64, "num_warps": 4}, {"BM": 64, "num_warps": 8}
    assert launch_key((aligned,), w4, 0) != launch_key((aligned,), w8, 0)
    assert launch_key((aligned,), {}, 0) != launch_key((aligned,), {}, 1)
    with pytest.raises(_Unkeyable):
        launch_key((aligned, "text"), {}, 0)


@gpu
@needs_cuda
def test_gpu_lattice_linear_backward_takes_the_reference():
    """An input that needs a gradient takes the differentiable float32 reference on CUDA (the kernels build no graph):
    dL/dx = g @ W_hat for the dequantized weight."""
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(15)
    m = LatticeLinear.from_linear(torch.nn.Linear(512, 256), bits=4.0, residency="compressed").cuda()
    x = torch.randn(40, 512, device="cuda", requires_grad=True)
    g = torch.randn(40, 256, device="cuda")
    (m(x) * g).sum().backward()
    want = g.double() @ m.dequantize(torch.float64)
    assert torch.allclose(x.grad.double(), want, atol=1e-4 * float(want.abs().max()))
    with torch.no_grad():
        assert m(x).grad_fn is None            # inference keeps the kernels


@needs_triton
def test_gemm_auto_paths_fall_back_to_cublas_when_triton_runs_out_of_shared_memory(monkeypatch):
    # A GPU that passes the capability test with less shared memory per SM than the Triton GEMMs need (consumer
    # Blackwell, sm_120, ~100 KB) gets Triton's out-of-resources error at the launch: "auto" then takes cuBLAS
    # (torch._int_mm / torch._scaled_mm) for that device from then on, with one warning; other errors and explicit
    # paths are not caught
    from triton.runtime.errors import OutOfResources

    from hyperquant_diffusers.kernels import int8_gemm

    torch.manual_seed(13)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    xq = torch.randint(-127, 128, (300, 256), dtype=torch.int8).to(dev)
    wq = torch.randint(-127, 128, (128, 256), dtype=torch.int8).to(dev)
    sx, sw, b = (torch.rand(300) + 0.1).to(dev), (torch.rand(128) + 0.1).to(dev), torch.randn(128).to(dev)
    ref = quantized_linear_reference(xq.cpu(), sx.cpu(), wq.cpu(), sw.cpu(), b.cpu())
    launches = []

    def too_big(*a, **k):
        launches.append("triton")
        raise OutOfResources(117000, 101376, "shared memory")

    monkeypatch.setattr(int8_gemm, "device_capability", lambda i=0: (12, 0))
    monkeypatch.setattr(int8_gemm, "_TRITON_GEMMS_TOO_BIG", set())
    for name in ("int8_gemm_tma", "int8_gemm_persistent", "int8_gemm_triton", "fp8_gemm_tma", "fp8_gemm_persistent"):
        monkeypatch.setattr(int8_gemm, name, too_big)
    with pytest.warns(RuntimeWarning, match=r"does not fit this GPU \(out of resource: shared memory.*cuBLAS"):
        y = int8_gemm.int8_linear(xq, sx, wq, sw, b, out_dtype=torch.float32)
    assert _rel(y.cpu(), ref) < 1e-6 and launches == ["triton"]
    # from now on straight to cuBLAS: no second attempt, no second warning
    import warnings as _w
    with _w.catch_warnings():
        _w.simplefilter("error")
        y = int8_gemm.int8_linear(xq, sx, wq, sw, b, out_dtype=torch.float32)
    assert _rel(y.cpu(), ref) < 1e-6 and launches == ["triton"]
    # fp8 "auto" on the same device takes torch._scaled_mm without trying the Triton GEMM
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(k) or torch.zeros(300, 128))
    x8 = torch.zeros(300, 256, device=dev).to(torch.float8_e4m3fn)
    int8_gemm.fp8_linear(x8, sx, wq.float().to(torch.float8_e4m3fn), sw, None, out_dtype=torch.float32)
    assert len(calls) == 1 and launches == ["triton"]
    # an explicit path is not caught, and neither is any other error of an "auto" path
    monkeypatch.setattr(int8_gemm, "_TRITON_GEMMS_TOO_BIG", set())
    int8_gemm.set_int8_path("persistent")
    try:
        with pytest.raises(OutOfResources):
            int8_gemm.int8_linear(xq, sx, wq, sw, b)
    finally:
        int8_gemm.set_int8_path("auto")

    def broken(*a, **k):
        raise RuntimeError("a bug, not a resource limit")

    monkeypatch.setattr(int8_gemm, "int8_gemm_persistent", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        int8_gemm.int8_linear(xq, sx, wq, sw, b)
    assert not int8_gemm._TRITON_GEMMS_TOO_BIG


@needs_triton
def test_gemm_routing_follows_the_compute_capability(monkeypatch):
    # The TMA GEMMs need Hopper (9.0) and fp8 tensor cores Ada (8.9): before Hopper int8 takes the pointer GEMM
    # (checked against float64 here), fp8 takes torch._scaled_mm on Ada and is refused by name before it
    from hyperquant_diffusers.kernels import dispatch, int8_gemm

    torch.manual_seed(12)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    xq = torch.randint(-127, 128, (300, 256), dtype=torch.int8).to(dev)   # M > 256: the TMA GEMM on Hopper
    wq = torch.randint(-127, 128, (128, 256), dtype=torch.int8).to(dev)
    sx, sw, b = (torch.rand(300) + 0.1).to(dev), (torch.rand(128) + 0.1).to(dev), torch.randn(128).to(dev)

    def refuse(*a, **k):
        raise AssertionError("a Hopper-only GEMM was launched")

    cap = {"v": (8, 6)}
    monkeypatch.setattr(int8_gemm, "device_capability", lambda i=0: cap["v"])
    for name in ("int8_gemm_tma", "int8_gemm_persistent", "fp8_gemm_tma", "fp8_gemm_persistent"):
        monkeypatch.setattr(int8_gemm, name, refuse)
    y = int8_gemm.int8_linear(xq, sx, wq, sw, b, out_dtype=torch.float32)
    assert _rel(y.cpu(), quantized_linear_reference(xq.cpu(), sx.cpu(), wq.cpu(), sw.cpu(), b.cpu())) < 1e-6
    x8 = torch.zeros(300, 256, device=dev).to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match=r"compute capability 8.9 or newer.*sm_86.*mma='int8'"):
        int8_gemm.fp8_linear(x8, sx, wq, sw, b)
    with pytest.raises(RuntimeError, match="sm_86"):      # what the CUDA forward asks before the activation pass
        dispatch.require_fp8_mma(torch.device(dev))
    cap["v"] = (8, 9)
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(k) or torch.zeros(300, 128))
    int8_gemm.fp8_linear(x8, sx, wq.float().to(torch.float8_e4m3fn), sw, None, out_dtype=torch.float32)
    assert len(calls) == 1 and calls[0]["out_dtype"] == torch.float32


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,r", [(5, 7, 1), (130, 200, 16), (64, 257, 33), (300, 384, 128)])
def test_lora_add_kernel_matches_float64(dtype, m, n, r):
    """kernels/lora_add.py: ``out += s * xa @ b.T`` in place, partial tiles and ranks below tl.dot's 16 included,
    = the float64 sum up to one unit in the last place of the output dtype, relative to the largest value (bf16
    2^-7, fp16 2^-10: Triton's CPU interpreter truncates its bf16 stores instead of rounding them)."""
    from hyperquant_diffusers.kernels.lora_add import lora_add_, lora_add_reference

    g = torch.Generator().manual_seed(m + r)
    out, xa, b = (torch.randn(*s, generator=g).to(dtype).to(_DEV) for s in ((m, n), (m, r), (n, r)))
    ref = lora_add_reference(out, xa, b, 0.7)
    got = lora_add_(out, xa, b, 0.7)
    assert got.data_ptr() == out.data_ptr()
    err = float((got.double() - ref).abs().max() / ref.abs().max())
    assert err <= (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10), err
