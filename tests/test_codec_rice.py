"""Rice coding: bit-exact round trips on random and adversarial streams, costs, and malformed input."""

import pytest
import torch

from hyperquant_diffusers.codec import RiceStreamError, rice_decode, rice_encode
from hyperquant_diffusers.codec.constants import ESCAPE_Q, ESCAPE_BITS
from hyperquant_diffusers.codec.rice import best_rice_k, pack_bits, rice_cost, unpack_bits


def _reference_rice_bits(values, k):
    """Bit string of the stream, built one value at a time in pure Python (the independent reference); ``k`` is
    one Rice parameter or one per value."""
    ks = k if isinstance(k, (list, tuple)) else [k] * len(values)
    low, unary, esc = [], [], []
    for m, k in zip(values, ks):
        q = m >> k
        if q >= ESCAPE_Q:
            low += [0] * k
            unary += [1] * ESCAPE_Q + [0]
            esc += [(m >> j) & 1 for j in range(ESCAPE_BITS)]
        else:
            low += [(m >> j) & 1 for j in range(k)]
            unary += [1] * q + [0]
    return low + unary + esc


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_rice_matches_python_reference_bit_for_bit(k):
    torch.manual_seed(k)  # Distribution.sample draws from the global generator
    m = torch.distributions.Geometric(probs=torch.tensor(0.5 ** (k + 0.5))).sample((500,)).to(torch.int64)
    m[::97] = (1 << 31) + 12345  # escapes
    words, nbits = rice_encode(m, k)
    ref = _reference_rice_bits(m.tolist(), k)
    assert nbits == len(ref)
    assert unpack_bits(words)[:nbits].tolist() == ref
    assert torch.equal(rice_decode(words, nbits, m.numel(), k), m)
    assert nbits == int(rice_cost(m, k).sum())


@pytest.mark.parametrize("values", [
    [], [0], [0] * 1000, [(1 << 32) - 1] * 5, [ESCAPE_Q - 1, ESCAPE_Q, ESCAPE_Q + 1] * 10,
    list(range(300)), [1 << j for j in range(32)],
])
@pytest.mark.parametrize("k", [0, 2, 24])
def test_rice_round_trip_adversarial(values, k):
    m = torch.tensor(values, dtype=torch.int64)
    words, nbits = rice_encode(m, k)
    assert torch.equal(rice_decode(words, nbits, m.numel(), k), m)


def test_truncated_stream_raises():
    m = torch.arange(200, dtype=torch.int64)
    words, nbits = rice_encode(m, 2)
    with pytest.raises(RiceStreamError):
        rice_decode(words[: words.numel() // 2], nbits, m.numel(), 2)
    with pytest.raises(RiceStreamError):
        rice_decode(words, nbits - 40, m.numel(), 2)


def test_all_ones_stream_raises_not_overreads():
    words = torch.full((8,), -1, dtype=torch.int32)  # every bit 1: no terminator anywhere
    with pytest.raises(RiceStreamError):
        rice_decode(words, 256, 10, 0)


def test_rice_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        rice_encode(torch.tensor([-1]), 1)
    with pytest.raises(ValueError, match="Rice parameter"):
        rice_encode(torch.tensor([1]), 99)


def test_best_k_is_the_exhaustive_minimum():
    torch.manual_seed(0)
    rows = [torch.distributions.Geometric(probs=torch.tensor(p)).sample((256,)).to(torch.int64)
            for p in (0.9, 0.3, 0.05, 0.002)]
    m = torch.stack(rows)
    m[3, 5] = 10**9
    k = best_rice_k(m)
    for i in range(m.shape[0]):
        costs = [int(rice_cost(m[i], kk).sum()) for kk in range(25)]
        assert int(rice_cost(m[i], int(k[i])).sum()) == min(costs)


def test_pack_bits_against_python():
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 33, (300,), generator=gen)
    values = torch.randint(0, 1 << 32, (300,), generator=gen, dtype=torch.int64) & ((1 << lengths) - 1)
    pos = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    words = pack_bits(pos, values, lengths, (total + 31) // 32)
    ref = []
    for v, l in zip(values.tolist(), lengths.tolist()):
        ref += [(v >> j) & 1 for j in range(l)]
    assert unpack_bits(words)[:total].tolist() == ref


# ---- block coder against a per-block pure-Python reference ------------------------------------------------

def _reference_blocks(mags, ks, counts, head, head_counts, tail, tail_counts):
    """Words and word offsets of encode_blocks' layout, built one block and one bit at a time in Python:
    [head][k low bits of each value][unary q ones + 0 each][escapes][tail], padded to 32-bit words."""
    words, offsets = [], [0]
    iv = ih = it = 0
    for c, hc, tc in zip(counts, head_counts, tail_counts):
        bits = list(head[ih: ih + hc])
        ih += hc
        ms, kk = mags[iv: iv + c], ks[iv: iv + c]
        iv += c
        bits += _reference_rice_bits(list(ms), list(kk)) + list(tail[it: it + tc])
        it += tc
        bits += [0] * (-len(bits) % 32)
        for w in range(0, len(bits), 32):
            v = sum(b << j for j, b in enumerate(bits[w: w + 32]))
            words.append(v - (1 << 32) if v >= 1 << 31 else v)
        offsets.append(len(words))
    return words, offsets


@pytest.mark.parametrize("seed", range(12))
def test_encode_blocks_matches_python_reference(seed):
    """Bit-exact against the reference: equal and unequal block sizes, empty blocks, k from 0 to 24 varying
    inside a block, escapes (up to 2**32 - 1), head and tail bits."""
    from hyperquant_diffusers.codec.rice import encode_blocks

    g = torch.Generator().manual_seed(seed)
    nb = int(torch.randint(1, 7, (1,), generator=g))
    if seed % 3 == 0:
        counts = torch.randint(0, 50, (nb,), generator=g)
    else:
        per = int(torch.randint(1, 80, (1,), generator=g))
        counts = torch.full((nb,), per)
        counts[-1] = int(torch.randint(1, per + 1, (1,), generator=g))
    n = int(counts.sum())
    kb = torch.randint(0, 25 if seed % 4 == 0 else 6, (nb,), generator=g)
    k = (torch.repeat_interleave(kb, counts) - (torch.rand(n, generator=g) < 0.3).to(torch.int64)).clamp_min(0)
    m = (torch.rand(n, generator=g) * 2 ** (k.double() + torch.rand(n, generator=g, dtype=torch.float64) * 5)).floor().to(torch.int64)
    if n and seed % 2:
        m[::9] = torch.randint(0, 1 << 32, m[::9].shape, generator=g)
    hc = torch.randint(0, 9, (nb,), generator=g) * (seed % 2)
    tc = torch.randint(0, 70, (nb,), generator=g)
    hb = torch.randint(0, 2, (int(hc.sum()),), generator=g).to(torch.uint8)
    tb = torch.randint(0, 2, (int(tc.sum()),), generator=g).bool()
    words, off = encode_blocks(m, k, counts, hb, hc, tb, tc)
    ref_w, ref_off = _reference_blocks(m.tolist(), k.tolist(), counts.tolist(), hb.tolist(), hc.tolist(),
                                       tb.int().tolist(), tc.tolist())
    assert off.tolist() == ref_off
    assert words.tolist() == ref_w


def test_rice_cost_table_is_brute_force_exact():
    """Every k's row total, from the bucket histogram, equals summing rice_cost value by value; values around
    every power of two up to 2**40 (where the float32 bit length rounds up) and shifted parameters included."""
    from hyperquant_diffusers.codec.rice import rice_cost_table

    g = torch.Generator().manual_seed(5)
    edge = torch.tensor([(1 << j) + d for j in range(41) for d in (-2, -1, 0, 1)]).clamp_min(0)
    edge = torch.cat((edge, torch.tensor([(1 << 40) - (1 << 14), (1 << 25) - 1, (1 << 24) + 1, 0])))
    rows = [edge[:80], edge[80:]]
    rows = [torch.cat((r, torch.randint(0, 1000, (200 - r.numel(),), generator=g))) for r in rows]
    rows.append(torch.randint(0, 8, (200,), generator=g))
    rows.append((torch.rand(200, generator=g) * 2.0 ** (torch.rand(200, generator=g) * 34)).to(torch.int64))
    m = torch.stack(rows)
    for shift in (None, -(torch.rand(m.shape, generator=g) < 0.4).to(torch.int64)):
        table = rice_cost_table(m, shift)
        s = torch.zeros_like(m) if shift is None else shift
        for k in range(25):
            ref = rice_cost(m, (k + s).clamp_min(0)).sum(1)
            assert torch.equal(table[:, k].to(torch.int64), ref), k


def test_best_k_matches_the_window_rule_on_brute_force_costs():
    """best_rice_k is the windowed search (start at log2 of the mean + 1, widen by 3 while any row's minimum
    is at the window's edge), evaluated here value by value with rice_cost, including rows with escapes
    (where the cost is not convex in k) and shifted parameters."""
    g = torch.Generator().manual_seed(9)
    m = (torch.rand(64, 300, generator=g) * 2.0 ** (torch.rand(64, 1, generator=g) * 12)).to(torch.int64)
    m[::3, ::17] = 10 ** 9
    m[1::5, :150] = 0
    shift = -(torch.rand(m.shape, generator=g) < 0.25).to(torch.int64)
    for sh in (None, shift):
        s = torch.zeros_like(m) if sh is None else sh
        k0 = torch.floor(torch.log2(m.double().mean(1) + 1.0)).to(torch.int64)
        lo, hi = -1, 1
        while True:
            ks = torch.stack([(k0 + d).clamp(0, 24) for d in range(lo, hi + 1)], 0)
            costs = torch.stack([rice_cost(m, (kk.unsqueeze(1) + s).clamp_min(0)).sum(1) for kk in ks], 0)
            idx = costs.argmin(0)
            ref = ks.gather(0, idx.unsqueeze(0)).squeeze(0)
            edge = ((idx == 0) & (ks[0] > 0)) | ((idx == ks.shape[0] - 1) & (ks[-1] < 24))
            if not bool(edge.any()) or hi - lo > 48:
                break
            lo, hi = lo - 3, hi + 3
        assert torch.equal(best_rice_k(m, sh), ref)


def test_best_k_and_bits_gives_the_rows_bits_at_that_k():
    from hyperquant_diffusers.codec.rice import best_rice_k_and_bits

    g = torch.Generator().manual_seed(2)
    m = (torch.rand(16, 500, generator=g) * 2.0 ** (torch.rand(16, 1, generator=g) * 10)).to(torch.int64)
    m[3, 7] = 1 << 31
    sh = -(torch.rand(m.shape, generator=g) < 0.2).to(torch.int64)
    k, bits = best_rice_k_and_bits(m, sh)
    assert torch.equal(k, best_rice_k(m, sh))
    assert torch.equal(bits, rice_cost(m, (k.unsqueeze(1) + sh).clamp_min(0)).sum(1))
