"""Rice coding: bit-exact round trips on random and adversarial streams, costs, and malformed input."""

import pytest
import torch

from hyperquant_diffusers.codec import RiceStreamError, rice_decode, rice_encode
from hyperquant_diffusers.codec.constants import ESCAPE_Q, ESCAPE_BITS
from hyperquant_diffusers.codec.rice import best_rice_k, pack_bits, rice_cost, unpack_bits


def _reference_rice_bits(values, k):
    """Bit string of the stream, built one value at a time in pure Python (the independent reference)."""
    low, unary, esc = [], [], []
    for m in values:
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
