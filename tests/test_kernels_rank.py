"""The rank-coded stream decoder (kernels/rank_decode.py): bit-exact against the codec's torch decoder for Z, D4
and A2 (escapes, a partial last block, fp8 output), error flags on malformed streams. Through Triton's CPU
interpreter on small inputs when there is no GPU; skipped without Triton."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hyperquant_diffusers.codec import RiceStreamError, quantize  # noqa: E402
from hyperquant_diffusers.codec.constants import (MAX_ABS_COORD, Z2_COSET_ESCAPE, Z2_COSET_RANK_TABLE,  # noqa: E402
                                                  Z2_RANK_TABLE)
from hyperquant_diffusers.codec.lattices import nearest_point  # noqa: E402
from hyperquant_diffusers.codec.stream import decode_coords, encode_coords  # noqa: E402
from hyperquant_diffusers.kernels._triton import triton_available  # noqa: E402
from hyperquant_diffusers.kernels.rank_decode import rank_decode, rank_decode_reference  # noqa: E402
from test_codec_rank import _block  # noqa: E402  (the hand-built one-block streams of the codec tests)

_DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton (GPU or interpreter) not available")
BV = 256


def _run(words, offs, ks, n, lattice, **kw):
    return rank_decode(words.to(_DEV), offs.to(torch.int32).to(_DEV), ks.to(_DEV), n, lattice, BV, sub=128, **kw)


def _block_amax(c, n_blocks):
    a = c.to(torch.int64).abs()
    return torch.stack([a[b * BV:(b + 1) * BV].max() for b in range(n_blocks)]).to(torch.int32)


@pytest.mark.parametrize("lattice,bits", [("Z", 2.0), ("Z", 5.0), ("D4", 3.0), ("D4", 6.0), ("A2", 4.0)])
def test_rank_decode_bit_exact(lattice, bits):
    # 24 rows: a 6x256 weight is too small for 2 bps (its side information alone takes 1.9 of them)
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(int(bits)))
    q = quantize(w, bits=bits, lattice=lattice, tile_size=128, block_values=BV)
    assert abs(q.bits_per_scalar - bits) < 0.05
    out, amax, err = _run(q.words, q.offsets, q.ks, q.numel, lattice)
    c = decode_coords(q.words, q.offsets, q.ks, q.numel, lattice, BV)
    assert torch.equal(err.cpu(), torch.zeros_like(err.cpu()))
    assert torch.equal(out.cpu(), rank_decode_reference(q.words, q.offsets, q.ks, q.numel, lattice, BV))
    assert torch.equal(amax.cpu(), _block_amax(c, q.ks.shape[0]))
    if int(c.abs().max()) <= 127:
        assert torch.equal(out.cpu().to(torch.int32), c)


@pytest.mark.parametrize("lattice", ["Z", "D4"])
def test_rank_decode_escapes_partial_block_fp8(lattice):
    g = torch.Generator().manual_seed(3)
    n = 2 * BV + 40                                     # a partial last block
    c = nearest_point(lattice, torch.randn(n, generator=g) * 2.5)
    if lattice == "Z":
        c[:6] = torch.tensor([MAX_ABS_COORD, -MAX_ABS_COORD, 513, 0, -363, 363])   # escapes
        c[BV + 10: BV + 12] = torch.tensor([-(1 << 20), 7])
        c[n - 2:] = torch.tensor([0, 600])                                          # escape in the partial block
    else:
        c[:8] = torch.tensor([MAX_ABS_COORD, -MAX_ABS_COORD, 513, 1, -363, 363, 0, 0])
        c[8:12] = torch.tensor([1, 0, 1000, -1001])
        c[12:16] = torch.tensor([600, 1, -2, 401])
        c[n - 4:] = torch.tensor([3, 1, 0, -700])
    c[BV + 40: BV + 48] = 0
    words, offs, ks = encode_coords(c, lattice, BV)
    assert torch.equal(decode_coords(words, offs, ks, n, lattice, BV), c)
    out, amax, err = _run(words, offs, ks, n, lattice)
    assert torch.equal(err.cpu(), torch.zeros(3, dtype=torch.int32))
    assert torch.equal(out.cpu(), c.clamp(-127, 127).to(torch.int8))
    assert torch.equal(amax.cpu(), _block_amax(c, 3))
    with pytest.raises(ValueError, match="beyond"):   # clamped coordinates are reported by check=True
        _run(words, offs, ks, n, lattice, check=True)
    f8, _, _ = _run(words, offs, ks, n, lattice, out_dtype=torch.float8_e4m3fn)
    assert torch.equal(f8.cpu().float(), rank_decode_reference(words, offs, ks, n, lattice, BV,
                                                               out_dtype=torch.float8_e4m3fn).float())
    # all zeros: one block of zero ranks with k = 0
    z = torch.zeros(BV, dtype=torch.int32)
    wz, oz, kz = encode_coords(z, lattice, BV)
    outz, amz, errz = _run(wz, oz, kz, BV, lattice, check=True)
    assert int(outz.abs().max()) == 0 and int(amz[0]) == 0 and int(errz[0]) == 0


def _flags(lattice, w, off, ks, n):
    with pytest.raises(RiceStreamError):
        decode_coords(w, off, ks, n, lattice, BV)       # the torch decoder refuses the same stream
    _, _, err = _run(w, off, ks, n, lattice)
    with pytest.raises(RiceStreamError, match="malformed"):
        _run(w, off, ks, n, lattice, check=True)
    return int(err[0])


def test_rank_decode_flags_malformed_streams():
    n = 8
    assert _flags("Z", *_block([0, Z2_RANK_TABLE + 1, 0, 0], [0] * 4), n) & 8            # rank beyond escape
    assert _flags("Z", *_block([0, Z2_RANK_TABLE, 0, 0], [0] * 4, [(3, -4)]), n) & 8      # escape inside table
    w, off, ks = _block([0, Z2_RANK_TABLE, 2, 0], [0] * 4, [(3, -600)])
    assert _flags("Z", w[:1], torch.tensor([0, 1]), ks, n) & 2                           # raw pair cut off
    ones = torch.full((4,), -1, dtype=torch.int32)                                       # no unary terminator
    assert _flags("Z", ones, torch.tensor([0, 4]), torch.zeros(1, 1, dtype=torch.uint8), n) & (1 | 4)
    assert _flags("D4", *_block([1, Z2_COSET_RANK_TABLE[1], 0, 0], [1, 0, 1, 0], k=1), n) & 8   # beyond odd coset
    assert _flags("D4", *_block([0, Z2_COSET_ESCAPE, 0, 0], [1, 0, 1, 0], [(1000, 1)], k=1), n) & 8  # wrong coset
    assert _flags("D4", *_block([Z2_RANK_TABLE, 0, 0, 0], [1, 0, 1, 0], [(1, 1)], k=1), n) & 8   # inside table
    # a long block whose low-bit section runs past its end (k = 20, one word)
    assert _flags("D4", torch.zeros(1, dtype=torch.int32), torch.tensor([0, 1]),
                  torch.full((1, 1), 20, dtype=torch.uint8), n) & 2
    # honest versions of the D4 blocks decode without flags
    for blk in (_block([0, Z2_COSET_RANK_TABLE[1], 0, 0], [1, 0, 1, 0], k=1),
                _block([0, Z2_COSET_ESCAPE, 0, 0], [1, 0, 1, 0], [(1000, 2)], k=1)):
        out, _, err = _run(*blk, n, "D4")
        ref = decode_coords(*blk, n, "D4", BV)
        assert int(err[0]) == 0 and torch.equal(out.cpu(), ref.clamp(-127, 127).to(torch.int8))
