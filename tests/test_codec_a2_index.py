"""A2 point ranks (codec/a2_index.py) against brute-force enumeration, and the A2 stream with escapes."""

import pytest
import torch

from hyperquant_diffusers.codec import RiceStreamError, quantize
from hyperquant_diffusers.codec.a2_index import a2_rank, a2_unrank
from hyperquant_diffusers.codec.constants import A2_RANK_TABLE
from hyperquant_diffusers.codec.stream import decode_coords, encode_coords, index_entropy_bits


def _brute_rank(p, radius=40):
    """Rank of A2 point p (c0, c1) = number of A2 points with a smaller (c0^2 + 3 c1^2, c1, c0) key."""
    c0 = torch.arange(-2 * radius, 2 * radius + 1)
    c1 = torch.arange(-radius, radius + 1)
    g0, g1 = torch.meshgrid(c0, c1, indexing="ij")
    g0, g1 = g0[(g0 - g1) % 2 == 0], g1[(g0 - g1) % 2 == 0]
    n, np_ = g0 * g0 + 3 * g1 * g1, p[0] ** 2 + 3 * p[1] ** 2
    assert np_ < radius ** 2  # every point of smaller norm lies inside the enumerated box
    smaller = (n < np_) | ((n == np_) & ((g1 < p[1]) | ((g1 == p[1]) & (g0 < p[0]))))
    return int(smaller.sum())


def test_ranks_match_brute_force_and_invert():
    g = torch.Generator().manual_seed(0)
    c1 = torch.randint(-12, 13, (300,), generator=g)
    c0 = 2 * torch.randint(-12, 13, (300,), generator=g) + (c1 & 1)
    c = torch.stack((c0, c1), 1)
    r = a2_rank(c)
    assert [int(x) for x in r[:60]] == [_brute_rank(p) for p in c[:60]]
    assert int(a2_rank(torch.tensor([0, 0]))) == 0 and set(a2_rank(torch.tensor(
        [[2, 0], [-2, 0], [1, 1], [1, -1], [-1, 1], [-1, -1]])).tolist()) == set(range(1, 7))  # first shell
    assert torch.equal(a2_unrank(r).to(torch.int64), c)
    # the table is a prefix of the order: ranks 0..T-1 all present once, and decode(encode) is the identity
    r_all = a2_rank(a2_unrank(torch.arange(A2_RANK_TABLE)))
    assert torch.equal(r_all, torch.arange(A2_RANK_TABLE))


def test_escaped_points_round_trip_and_malformed_escape_raises():
    g = torch.Generator().manual_seed(1)
    c1 = torch.randint(-6, 7, (512,), generator=g)
    c0 = 2 * torch.randint(-6, 7, (512,), generator=g) + (c1 & 1)
    c = torch.stack((c0, c1), 1)
    c[5] = torch.tensor([40001, 3])          # outside the rank table: escape + raw coordinates
    c[300] = torch.tensor([-4, -100000])
    c = c.reshape(-1).to(torch.int32)
    assert int((a2_rank(c) == A2_RANK_TABLE).sum()) == 2
    words, off, ks = encode_coords(c, "A2", 256)
    assert torch.equal(decode_coords(words, off, ks, c.numel(), "A2", 256), c)
    # a hand-built block whose escape carries a point that has a rank (0, 2): the decoder refuses it
    from hyperquant_diffusers.codec.rice import encode_blocks

    r = torch.tensor([0, A2_RANK_TABLE, 3, 1])
    raw = torch.tensor([0, 2])
    tail = ((raw.unsqueeze(1) >> torch.arange(32)) & 1).reshape(-1).bool()
    z = torch.zeros(1, dtype=torch.int64)
    w_bad, off_bad = encode_blocks(r, torch.zeros(4, dtype=torch.int64), torch.tensor([4]),
                                   torch.zeros(0, dtype=torch.uint8), z, tail, torch.tensor([64]))
    ks0 = torch.zeros(1, 1, dtype=torch.uint8)
    with pytest.raises(RiceStreamError, match="escaped A2 point"):
        decode_coords(w_bad, off_bad, ks0, 8, "A2", 256)
    # the same block with an honest escape decodes
    raw = torch.tensor([40001, 3])
    tail = ((raw.unsqueeze(1) >> torch.arange(32)) & 1).reshape(-1).bool()
    w_ok, off_ok = encode_blocks(r, torch.zeros(4, dtype=torch.int64), torch.tensor([4]),
                                 torch.zeros(0, dtype=torch.uint8), z, tail, torch.tensor([64]))
    assert decode_coords(w_ok, off_ok, ks0, 8, "A2", 256)[2:4].tolist() == [40001, 3]
    with pytest.raises(RiceStreamError):  # truncated: the raw coordinates are cut off
        decode_coords(w_ok[:1], torch.tensor([0, 1]), ks0, 8, "A2", 256)


def test_a2_rank_code_is_near_its_entropy():
    """Rice on ranks of Gaussian pairs: close to the rank entropy (sign-magnitude Rice of the axes cost 0.1-0.19)."""
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    for bits in (3.0, 4.0, 5.0):
        q = quantize(w, bits=bits, lattice="A2", rdo=False)
        over = (q.words.numel() * 32 - index_entropy_bits(q.decode_coords(), "A2")) / w.numel()
        assert 0.0 < over < 0.06, (bits, over)
