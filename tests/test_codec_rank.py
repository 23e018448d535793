"""Pair ranks (codec/rank_index.py) against brute-force enumeration; the rank-coded A2, Z and D4 streams with
escapes, partial blocks and malformed input; rate accounting; the rank RDO (codec/rank_rdo.py) against brute
force."""

import math

import pytest
import torch

from hyperquant_diffusers.codec import FormatError, LatticeTensor, RiceStreamError, quantize
from hyperquant_diffusers.codec.a2_index import a2_rank, a2_unrank
from hyperquant_diffusers.codec.constants import (A2_RANK_TABLE, ESCAPE_BITS, FORMAT_VERSION, MAX_ABS_COORD,
                                                  Z2_COSET_ESCAPE, Z2_COSET_RANK_TABLE, Z2_RANK_NORM2, Z2_RANK_TABLE)
from hyperquant_diffusers.codec.lattices import coords_to_points, is_lattice_point, nearest_point
from hyperquant_diffusers.codec.rank_index import escape_rank, packed_table, rank_points, unrank_points
from hyperquant_diffusers.codec.rank_rdo import rd_rank_chunk
from hyperquant_diffusers.codec.rdo import rd_lambda
from hyperquant_diffusers.codec.rice import encode_blocks
from hyperquant_diffusers.codec.stream import (choose_ks, decode_coords, encode_coords, index_entropy_bits,
                                               stream_bits, vector_bits)


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


# ---- Z^2 and checkerboard-coset tables ------------------------------------------------------------------------

def _brute_z2(coset=None, radius=12):
    """All integer pairs in a box sorted by (c0^2 + c1^2, c1, c0), Python ints; optionally one coset."""
    pts = [(a, b) for a in range(-radius, radius + 1) for b in range(-radius, radius + 1)
           if coset is None or (a + b) % 2 == coset]
    return sorted(pts, key=lambda p: (p[0] ** 2 + p[1] ** 2, p[1], p[0]))


@pytest.mark.parametrize("kind", ["Z2", "Z2coset"])
def test_z2_ranks_match_brute_force_sorting(kind):
    radius = 12
    for coset in ((None,) if kind == "Z2" else (0, 1)):
        order = _brute_z2(coset, radius)
        # only the points whose whole disk lies inside the box are ranked correctly by the enumeration
        order = [p for p in order if p[0] ** 2 + p[1] ** 2 < radius ** 2]
        c = torch.tensor(order, dtype=torch.int64)
        r = rank_points(c, kind)
        assert r.tolist() == list(range(len(order)))
        cs = None if coset is None else torch.full((len(order),), coset)
        assert torch.equal(unrank_points(r, kind, cs).to(torch.int64), c)


def test_z2_tables_are_the_disk_and_escape_outside_it():
    # sizes from first principles: lattice points of the disk c0^2 + c1^2 <= Z2_RANK_NORM2
    b = math.isqrt(Z2_RANK_NORM2)
    a = torch.arange(-b, b + 1)
    g0, g1 = torch.meshgrid(a, a, indexing="ij")
    inside = g0 * g0 + g1 * g1 <= Z2_RANK_NORM2
    assert int(inside.sum()) == Z2_RANK_TABLE == escape_rank("Z2")
    par = (g0 + g1) & 1
    assert (int((inside & (par == 0)).sum()), int((inside & (par == 1)).sum())) == Z2_COSET_RANK_TABLE
    assert Z2_COSET_ESCAPE == max(Z2_COSET_RANK_TABLE) == escape_rank("Z2coset")
    # every table is a bijection between its ranks and the disk's points
    r_all = rank_points(unrank_points(torch.arange(Z2_RANK_TABLE), "Z2"), "Z2")
    assert torch.equal(r_all, torch.arange(Z2_RANK_TABLE))
    for cs in (0, 1):
        t = Z2_COSET_RANK_TABLE[cs]
        p = unrank_points(torch.arange(t), "Z2coset", torch.full((t,), cs))
        assert bool((((p[:, 0] + p[:, 1]) & 1) == cs).all())
        assert torch.equal(rank_points(p, "Z2coset"), torch.arange(t))
    # just outside the disk, far outside, and at the coordinate limit: escapes
    out = torch.tensor([[b + 1, 0], [0, -b - 1], [363, 363], [-363, 362], [MAX_ABS_COORD, -MAX_ABS_COORD],
                        [-(1 << 31), 5]])
    assert bool((out[:, 0] ** 2 + out[:, 1] ** 2 > Z2_RANK_NORM2).all())
    assert rank_points(out, "Z2").tolist() == [Z2_RANK_TABLE] * 6
    assert rank_points(out, "Z2coset").tolist() == [Z2_COSET_ESCAPE] * 6
    # the packed table for the GPU decoder: (c1 << 16) | (c0 & 0xFFFF), sign-extended halves
    pk = packed_table("Z2coset", "cpu").to(torch.int64)
    c0 = ((pk & 0xFFFF) ^ 0x8000) - 0x8000
    assert pk.numel() == sum(Z2_COSET_RANK_TABLE)
    assert torch.equal(torch.stack((c0, pk >> 16), 1)[Z2_COSET_RANK_TABLE[0]:],
                       unrank_points(torch.arange(Z2_COSET_RANK_TABLE[1]), "Z2coset",
                                     torch.ones(Z2_COSET_RANK_TABLE[1], dtype=torch.int64)).to(torch.int64))


# ---- Z and D4 streams ---------------------------------------------------------------------------------------------

def _cases(lattice):
    """Adversarial coordinate vectors: Gaussian at several scales, all zeros, huge values (escapes)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for scale, n in ((0.2, 2048), (3.0, 1024 + 48), (40.0, 3 * 256 + 8), (700.0, 512 + 16)):
        out.append(nearest_point(lattice, torch.randn(n, generator=g) * scale))
    out.append(torch.zeros(256 + 8, dtype=torch.int32))
    c = nearest_point(lattice, torch.randn(2 * 256 + 24, generator=g) * 2.0)
    if lattice == "Z":
        c[:6] = torch.tensor([MAX_ABS_COORD, -MAX_ABS_COORD, 513, 0, -363, 363])
        c[300:302] = torch.tensor([0, -600])
    else:
        c[:8] = torch.tensor([MAX_ABS_COORD, -MAX_ABS_COORD, 513, 1, -363, 363, 0, 0])  # pair 2 even, pair 1 escapes
        c[8:12] = torch.tensor([1, 0, 1000, -1001])        # odd coset, second pair escapes
        c[12:16] = torch.tensor([600, 1, -2, 401])          # both escape
        c[300:304] = torch.tensor([5, 0, -3, 2])           # odd first pair, no escape
    out.append(c)
    return out


@pytest.mark.parametrize("lattice", ["Z", "D4"])
def test_rank_streams_round_trip_exactly(lattice):
    for c in _cases(lattice):
        assert bool(is_lattice_point(lattice, c).all())
        for bv in (256, 1024):
            words, off, ks = encode_coords(c, lattice, bv)
            assert ks.shape == ((c.numel() + bv - 1) // bv, 1) and ks.dtype == torch.uint8
            assert torch.equal(decode_coords(words, off, ks, c.numel(), lattice, bv), c)
            assert stream_bits(c, lattice, bv) == 32 * words.numel()
            # chunked encoding (several chunks, a partial last block) gives the same stream
            w2, o2, k2 = encode_coords(c, lattice, bv, chunk_values=bv)
            assert torch.equal(w2, words) and torch.equal(o2, off) and torch.equal(k2, ks)
            # per-unit bits add up to the stream minus word padding
            vb = vector_bits(c, lattice, ks, bv)
            assert vb.numel() == c.numel() // (2 if lattice == "Z" else 4)
            assert 0 <= 32 * words.numel() - int(vb.sum()) < 32 * ks.shape[0]


def _bits_of(c, lattice, ks, bv):
    """Independent bit count of a rank-coded stream: Rice cost of each rank with the block's k (D4: k-1 for the
    second pair), 2*ESCAPE_BITS per escaped pair, each block padded to words."""
    g = c.reshape(-1, 2).to(torch.int64)
    total = 0
    per = bv // 2
    for j in range(g.shape[0]):
        second = lattice == "D4" and j % 2 == 1
        kind = "Z2coset" if second else "Z2"
        if j % per == 0:
            if j:
                total += -(-blk // 32) * 32
            blk = 0
            k = int(ks[j // per, 0])
        r = int(rank_points(g[j], kind))
        kk = max(k - 1, 0) if second else k
        q = r >> kk
        blk += kk + min(q, 24) + 1 + (32 if q >= 24 else 0) + (2 * ESCAPE_BITS if r == escape_rank(kind) else 0)
    return total + -(-blk // 32) * 32


@pytest.mark.parametrize("lattice", ["Z", "D4"])
def test_rank_stream_length_from_first_principles(lattice):
    c = _cases(lattice)[-1]
    words, off, ks = encode_coords(c, lattice, 256)
    assert 32 * words.numel() == _bits_of(c, lattice, ks, 256)
    # D4's second pair is coded with k - 1: the chosen k is the exact minimizer of each block's bits
    for kk in range(0, 12):
        other = torch.full_like(ks, kk)
        assert stream_bits(c, lattice, 256, other) >= stream_bits(c, lattice, 256, ks)


def test_rank_stream_rejects_bad_input():
    with pytest.raises(ValueError, match="odd"):
        encode_coords(torch.zeros(255, dtype=torch.int32), "Z", 256)
    with pytest.raises(ValueError, match="odd sum"):
        encode_coords(torch.tensor([1, 0, 0, 0] * 64, dtype=torch.int32), "D4", 256)


def _block(ranks, ks_col, tail_pairs=(), k=0):
    """A hand-built one-block stream of the given ranks (Rice parameter k per symbol) and raw escape pairs."""
    r = torch.tensor(ranks, dtype=torch.int64)
    raw = torch.tensor(tail_pairs, dtype=torch.int64).reshape(-1)
    tail = ((raw.unsqueeze(1) >> torch.arange(32)) & 1).reshape(-1).bool()
    z = torch.zeros(1, dtype=torch.int64)
    w, off = encode_blocks(r, torch.tensor(ks_col, dtype=torch.int64), torch.tensor([len(ranks)]),
                           torch.zeros(0, dtype=torch.uint8), z, tail, torch.tensor([tail.numel()]))
    return w, off, torch.full((1, 1), k, dtype=torch.uint8)


def test_malformed_rank_streams_raise():
    n = 8
    # Z: a rank beyond the escape rank
    w, off, ks = _block([0, Z2_RANK_TABLE + 1, 0, 0], [0] * 4)
    with pytest.raises(RiceStreamError, match="beyond the escape"):
        decode_coords(w, off, ks, n, "Z", 256)
    # Z: an escape whose raw pair lies inside the table
    w, off, ks = _block([0, Z2_RANK_TABLE, 0, 0], [0] * 4, [(3, -4)])
    with pytest.raises(RiceStreamError, match="escaped Z point"):
        decode_coords(w, off, ks, n, "Z", 256)
    # ... and the same block with an honest escape decodes
    w, off, ks = _block([0, Z2_RANK_TABLE, 2, 0], [0] * 4, [(3, -600)])
    assert decode_coords(w, off, ks, n, "Z", 256).tolist() == [0, 0, 3, -600, -1, 0, 0, 0]
    with pytest.raises(RiceStreamError):  # truncated: the raw coordinates are cut off
        decode_coords(w[:1], torch.tensor([0, 1]), ks, n, "Z", 256)
    # D4 (k = 1: the second pair of each vector is coded with k - 1 = 0): odd first pair (rank 1 = (0, -1)),
    # second pair rank in the odd coset
    w, off, ks = _block([1, 3, 0, 0], [1, 0, 1, 0], k=1)
    c = decode_coords(w, off, ks, n, "D4", 256)
    assert c.tolist()[:4] == [0, -1] + unrank_points(torch.tensor([3]), "Z2coset", torch.tensor([1]))[0].tolist()
    assert bool(is_lattice_point("D4", c).all())
    # D4: an odd second pair's rank between the odd table's size and the common escape rank
    assert Z2_COSET_RANK_TABLE[1] < Z2_COSET_ESCAPE
    w, off, ks = _block([1, Z2_COSET_RANK_TABLE[1], 0, 0], [1, 0, 1, 0], k=1)
    with pytest.raises(RiceStreamError, match="coset"):
        decode_coords(w, off, ks, n, "D4", 256)
    # the same rank is valid after an even first pair
    w, off, ks = _block([0, Z2_COSET_RANK_TABLE[1], 0, 0], [1, 0, 1, 0], k=1)
    assert bool(is_lattice_point("D4", decode_coords(w, off, ks, n, "D4", 256)).all())
    # D4: an escaped second pair in the wrong coset (first pair (0, 0) is even, raw pair odd)
    w, off, ks = _block([0, Z2_COSET_ESCAPE, 0, 0], [1, 0, 1, 0], [(1000, 1)], k=1)
    with pytest.raises(RiceStreamError, match="escaped D4 point"):
        decode_coords(w, off, ks, n, "D4", 256)
    w, off, ks = _block([0, Z2_COSET_ESCAPE, 0, 0], [1, 0, 1, 0], [(1000, 2)], k=1)
    assert decode_coords(w, off, ks, n, "D4", 256).tolist()[:4] == [0, 0, 1000, 2]
    # D4: an escaped first pair whose raw coordinates are inside the table
    w, off, ks = _block([Z2_RANK_TABLE, 0, 0, 0], [1, 0, 1, 0], [(1, 1)], k=1)
    with pytest.raises(RiceStreamError, match="escaped D4 point"):
        decode_coords(w, off, ks, n, "D4", 256)


# ---- rate, entropy, format ------------------------------------------------------------------------------------

@pytest.mark.parametrize("lattice", ["Z", "D4"])
def test_rank_code_is_near_its_entropy_and_rate_is_exact(lattice):
    """Rice on pair ranks of Gaussian data: 0 < rate - index entropy < 0.12 bits per value (sign-magnitude Rice
    cost 0.11-0.24); quantize's reported rate is the blob's length."""
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    for bits in (3.0, 4.0, 5.0):
        q = quantize(w, bits=bits, lattice=lattice, rdo=False)
        blob = q.to_bytes()
        assert q.bits_per_scalar == len(blob) * 8 / w.numel()
        assert abs(q.bits_per_scalar - bits) < 0.02
        over = (q.words.numel() * 32 - index_entropy_bits(q.decode_coords(), lattice)) / w.numel()
        assert 0.0 < over < 0.12, (bits, over)
        back = LatticeTensor.from_bytes(blob)
        assert torch.equal(back.decode_coords(), q.decode_coords())


def test_format_version_3_and_old_blobs_are_refused():
    assert FORMAT_VERSION == 3
    q = quantize(torch.randn(4, 256, generator=torch.Generator().manual_seed(2)), bits=4.0, lattice="Z")
    blob = bytearray(q.to_bytes())
    assert blob[4:6] == (3).to_bytes(2, "little")
    blob[4:6] = (2).to_bytes(2, "little")
    with pytest.raises(FormatError, match="version 2"):
        LatticeTensor.from_bytes(bytes(blob))


# ---- the rank RDO ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lattice,radius,n_vec", [("Z", 4, 64), ("D4", 3, 24)])
@pytest.mark.parametrize("lam_scale", [1.0, 6.0])
def test_rank_rdo_is_the_exact_minimizer(lattice, radius, n_vec, lam_scale):
    d = 2 if lattice == "Z" else 4  # the coding unit: a Z pair, a D4 vector
    bv = 256
    g = torch.Generator().manual_seed(d)
    y = torch.randn(bv, generator=g) * 3.0
    c0 = nearest_point(lattice, y)
    ks = choose_ks(c0, lattice, bv)
    lam = rd_lambda(lattice) * lam_scale
    k = ks.to(torch.int32)[torch.arange(bv) // bv, 0].view(-1, 1 if lattice == "Z" else 4)
    c = rd_rank_chunk(lattice, y.view(k.shape), k, lam).reshape(-1)
    assert bool(is_lattice_point(lattice, c).all())

    def lagr(cc, yy):
        dist = (coords_to_points(lattice, cc, torch.float64) - yy.double()).reshape(-1, d).square().sum(1)
        nb = (cc.numel() + bv - 1) // bv
        return dist + lam * vector_bits(cc.reshape(-1), lattice, ks[:1].expand(nb, -1), bv).double()

    j = lagr(c, y)
    assert bool((j <= lagr(c0, y) + 1e-9).all())
    cv, yv = c0.view(-1, d), y.view(-1, d)
    for v in range(n_vec):
        rng = [cv[v, i] + torch.arange(-radius, radius + 1) for i in range(d)]
        pts = torch.cartesian_prod(*rng).reshape(-1, d)
        pts = pts[is_lattice_point(lattice, pts.reshape(-1))] if lattice == "D4" else pts
        best = float(lagr(pts.to(torch.int32).reshape(-1), yv[v].repeat(pts.shape[0])).min())
        assert float(j[v]) <= best + 1e-9, (lattice, v, float(j[v]), best)
    if lam_scale > 1:
        assert bool((c != c0).any())
