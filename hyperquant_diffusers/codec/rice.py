"""Rice coding of non-negative integers into independently decodable blocks, vectorized in torch.

Bit order: LSB first inside little-endian 32-bit words. One block is laid out as

    [head: raw bits given by the caller][low: k_i bits of each m_i][unary: q_i ones then a zero, per value]
    [escapes: ESCAPE_BITS bits of m_i for each value whose quotient reached ESCAPE_Q][tail: raw caller bits]

padded to a whole 32-bit word. ``q_i = min(m_i >> k_i, ESCAPE_Q)``: a quotient of ``ESCAPE_Q`` marks an escape,
so one outlier costs ESCAPE_Q + 1 + ESCAPE_BITS bits instead of an unbounded unary run. The low bits sit at
positions known from the ks alone and a block's unary terminators can be found by one prefix count, which is
what lets a GPU decode a block with many threads (see ``hyperquant_diffusers.kernels``).

Every decoder here checks its reads against the block's end and raises ``RiceStreamError`` on a malformed
or truncated stream; it never reads past its buffer.
"""

from __future__ import annotations

import torch

from .constants import ESCAPE_BITS, ESCAPE_Q, MAX_RICE_K


class RiceStreamError(ValueError):
    """A Rice stream is malformed or truncated."""


_MASK32 = (1 << 32) - 1


def pack_bits(positions: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, total_words: int) -> torch.Tensor:
    """Write ``values[i]`` (``lengths[i]`` <= 32 bits, LSB first) at bit ``positions[i]``; fields must not overlap.

    All inputs int64 (n,). Returns int32 words (total_words,). Non-overlapping fields make addition equal OR,
    which is what lets one ``index_add_`` place them all.
    """
    device = positions.device
    acc = torch.zeros(total_words + 1, dtype=torch.int64, device=device)
    if positions.numel():
        mask = torch.where(lengths >= 63, torch.full_like(lengths, -1), (1 << lengths) - 1)
        v = values & mask & _MASK32
        word = positions >> 5
        off = positions & 31
        acc.index_add_(0, word, (v << off) & _MASK32)
        acc.index_add_(0, word + 1, v >> (32 - off))
    if int(acc[total_words]) != 0:
        raise RuntimeError("pack_bits: field written past the last word (internal sizing error)")
    acc = acc[:total_words]
    return torch.where(acc >= (1 << 31), acc - (1 << 32), acc).to(torch.int32)


def unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """int32 words (n,) -> bits uint8 (32 n,), LSB of word 0 first."""
    w = words.to(torch.int64) & _MASK32
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    return ((w.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)


def read_fields(bits: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Read fields of ``lengths[i]`` bits (LSB first) starting at ``positions[i]`` from a bit array; int64 (n,).

    Raises ``RiceStreamError`` if any field runs past the end of ``bits``.
    """
    if positions.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=bits.device)
    if int((positions + lengths).max()) > bits.numel() or int(positions.min()) < 0:
        raise RiceStreamError("field reaches past the end of the stream")
    out = torch.zeros_like(positions)
    max_len = int(lengths.max())
    for j in range(max_len):
        take = lengths > j
        idx = torch.where(take, positions + j, torch.zeros_like(positions))
        out |= (bits[idx].to(torch.int64) & take.to(torch.int64)) << j
    return out


def rice_cost(m: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Bits each value of ``m`` (int >= 0) costs in Rice(k) with this module's escape rule; same dtype as ``m``."""
    q = m >> k
    esc = q >= ESCAPE_Q
    return k + torch.clamp(q, max=ESCAPE_Q) + 1 + esc.to(q.dtype) * ESCAPE_BITS


def best_rice_k(m: torch.Tensor, k_shift: torch.Tensor | None = None, *, max_k: int = MAX_RICE_K) -> torch.Tensor:
    """Per row of ``m`` (G, n) the Rice parameter minimizing the row's total bits; int64 (G,).

    ``k_shift`` (same shape, 0 or -1) lowers the parameter of individual values (bit-stripped magnitudes use
    ``max(k - 1, 0)``). Candidates are searched around log2 of the mean, then refined to the exact minimum.
    """
    m = m.to(torch.int64)
    if k_shift is None:
        k_shift = torch.zeros_like(m)
    mean = m.to(torch.float64).mean(dim=1).clamp_min(0.0)
    k0 = torch.floor(torch.log2(mean + 1.0)).to(torch.int64)
    # The total cost is convex-ish in k; a window of 3 around the estimate contains the minimum for
    # geometric-like data, and we widen it until the minimum is interior, so the result is exact.
    lo, hi = -1, 1
    while True:
        ks = torch.stack([(k0 + d).clamp(0, max_k) for d in range(lo, hi + 1)], 0)  # (C, G)
        costs = torch.stack([
            rice_cost(m, (kk.unsqueeze(1) + k_shift).clamp_min(0)).sum(1) for kk in ks
        ], 0)
        idx = costs.argmin(0)
        best_k = ks.gather(0, idx.unsqueeze(0)).squeeze(0)
        at_edge = ((idx == 0) & (ks[0] > 0)) | ((idx == ks.shape[0] - 1) & (ks[-1] < max_k))
        if not bool(at_edge.any()) or hi - lo > 2 * max_k:
            return best_k
        lo, hi = lo - 3, hi + 3


def encode_blocks(
    mags: torch.Tensor,
    k_eff: torch.Tensor,
    block_counts: torch.Tensor,
    head_bits: torch.Tensor,
    head_counts: torch.Tensor,
    tail_bits: torch.Tensor,
    tail_counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rice-code consecutive blocks.

    ``mags`` int64 (n,) >= 0, ``k_eff`` int64 (n,) Rice parameter of each value, ``block_counts`` int64 (B,)
    values per block (summing to n); ``head_bits``/``tail_bits`` uint8/bool raw bits, ``head_counts`` and
    ``tail_counts`` int64 (B,) how many belong to each block. Returns (int32 words, int64 word offsets (B+1,)).
    """
    device = mags.device
    nb = block_counts.numel()
    blk = torch.repeat_interleave(torch.arange(nb, device=device), block_counts)
    q = mags >> k_eff
    esc = q >= ESCAPE_Q
    qc = torch.clamp(q, max=ESCAPE_Q)
    low_len = k_eff
    un_len = qc + 1
    esc_len = esc.to(torch.int64) * ESCAPE_BITS

    def per_block(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(nb, dtype=torch.int64, device=device).index_add_(0, blk, x)

    low_tot, un_tot, esc_tot = per_block(low_len), per_block(un_len), per_block(esc_len)
    block_bits = head_counts + low_tot + un_tot + esc_tot + tail_counts
    block_words = (block_bits + 31) // 32
    word_off = torch.zeros(nb + 1, dtype=torch.int64, device=device)
    word_off[1:] = torch.cumsum(block_words, 0)
    start = word_off[:-1] * 32
    low_start = start + head_counts
    un_start = low_start + low_tot
    esc_start = un_start + un_tot
    tail_start = esc_start + esc_tot

    def within_block(x: torch.Tensor, owner: torch.Tensor, n_owner_blocks: torch.Tensor) -> torch.Tensor:
        # exclusive prefix sum of x restarted at each block
        cs = torch.cumsum(x, 0) - x
        first = torch.zeros(nb, dtype=torch.int64, device=device)
        counts_cs = torch.cumsum(n_owner_blocks, 0) - n_owner_blocks
        nonempty = n_owner_blocks > 0
        first[nonempty] = cs[counts_cs[nonempty]]
        return cs - first[owner]

    pos_low = low_start[blk] + within_block(low_len, blk, block_counts)
    pos_un = un_start[blk] + within_block(un_len, blk, block_counts)
    pos_esc = esc_start[blk] + within_block(esc_len, blk, block_counts)
    hblk = torch.repeat_interleave(torch.arange(nb, device=device), head_counts)
    tblk = torch.repeat_interleave(torch.arange(nb, device=device), tail_counts)
    ones_h = torch.ones_like(hblk)
    ones_t = torch.ones_like(tblk)
    pos_head = start[hblk] + within_block(ones_h, hblk, head_counts)
    pos_tail = tail_start[tblk] + within_block(ones_t, tblk, tail_counts)

    low_val = torch.where(esc, torch.zeros_like(mags), mags & ((1 << k_eff) - 1))
    un_val = (1 << qc) - 1
    ei = esc.nonzero().squeeze(1)
    positions = torch.cat((pos_head, pos_low, pos_un, pos_esc[ei], pos_tail))
    values = torch.cat((head_bits.to(torch.int64), low_val, un_val, mags[ei], tail_bits.to(torch.int64)))
    lengths = torch.cat((ones_h, low_len, un_len, esc_len[ei], ones_t))
    keep = lengths > 0
    words = pack_bits(positions[keep], values[keep], lengths[keep], int(word_off[-1]))
    return words, word_off


def decode_blocks(
    bits: torch.Tensor,
    block_starts: torch.Tensor,
    block_ends: torch.Tensor,
    block_counts: torch.Tensor,
    k_eff: torch.Tensor,
    head_counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode the head bits and magnitudes of consecutive blocks from an unpacked bit array.

    ``bits`` uint8 (L,); ``block_starts``/``block_ends`` int64 (B,) bit range of each block in ``bits``;
    ``block_counts`` values per block; ``k_eff`` int64 (n,) Rice parameter of each value; ``head_counts``
    raw head bits per block. Returns (head bits uint8 (sum head_counts,), mags int64 (n,),
    tail start bit int64 (B,)). Raises ``RiceStreamError`` on a truncated or malformed block.
    """
    device = bits.device
    nb = block_counts.numel()
    if bool((block_ends < block_starts).any()) or (nb and int(block_ends.max()) > bits.numel()):
        raise RiceStreamError("block offsets are not increasing or point past the end of the stream")
    blk = torch.repeat_interleave(torch.arange(nb, device=device), block_counts)
    first_val = torch.cumsum(block_counts, 0) - block_counts
    idx_in_blk = torch.arange(blk.numel(), device=device) - first_val[blk]

    hblk = torch.repeat_interleave(torch.arange(nb, device=device), head_counts)
    hfirst = torch.cumsum(head_counts, 0) - head_counts
    hpos = block_starts[hblk] + torch.arange(hblk.numel(), device=device) - hfirst[hblk]
    low_tot = torch.zeros(nb, dtype=torch.int64, device=device).index_add_(0, blk, k_eff)
    low_start = block_starts + head_counts
    un_start = low_start + low_tot
    if bool((un_start > block_ends).any()):
        raise RiceStreamError("block too short for its head and low-bit sections")
    head = bits[hpos] if hpos.numel() else torch.zeros(0, dtype=torch.uint8, device=device)
    low_cs = torch.cumsum(k_eff, 0) - k_eff
    low_pos = low_start[blk] + low_cs - low_cs[first_val][blk] if blk.numel() else low_cs
    low = read_fields(bits, low_pos, k_eff)

    # Unary terminators: the zeros at or after each block's unary start, in order.
    zpos = (bits == 0).nonzero().squeeze(1)
    zfirst = torch.searchsorted(zpos, un_start)
    zlast = torch.searchsorted(zpos, block_ends)
    if bool((zlast - zfirst < block_counts).any()):
        bad = int(((zlast - zfirst) < block_counts).nonzero()[0])
        raise RiceStreamError(f"block {bad}: unary section truncated (fewer terminators than values)")
    term = zpos[zfirst[blk] + idx_in_blk]
    prev = torch.where(idx_in_blk == 0, un_start[blk] - 1, torch.roll(term, 1))
    q = term - prev - 1
    if bool((q > ESCAPE_Q).any()):
        raise RiceStreamError("unary run longer than the escape code: malformed stream")
    esc = q == ESCAPE_Q
    last_term = torch.full((nb,), -1, dtype=torch.int64, device=device)
    if blk.numel():
        last_term = torch.zeros(nb, dtype=torch.int64, device=device).scatter_reduce_(
            0, blk, term, reduce="amax", include_self=False)
    esc_start = torch.where(block_counts > 0, last_term + 1, un_start)
    esc_i = esc.to(torch.int64)
    esc_cs = torch.cumsum(esc_i, 0) - esc_i
    esc_rank = esc_cs - esc_cs[first_val][blk] if blk.numel() else esc_cs
    mags = (torch.clamp(q, max=ESCAPE_Q - 1) << k_eff) | low
    ei = esc.nonzero().squeeze(1)
    esc_count = torch.zeros(nb, dtype=torch.int64, device=device).index_add_(0, blk, esc_i)
    tail_start = esc_start + esc_count * ESCAPE_BITS
    if bool((tail_start > block_ends).any()):
        raise RiceStreamError("escape section runs past the end of its block")
    if ei.numel():
        epos = esc_start[blk[ei]] + esc_rank[ei] * ESCAPE_BITS
        mags[ei] = read_fields(bits, epos, torch.full_like(epos, ESCAPE_BITS))
        if bool(((mags[ei] >> k_eff[ei]) < ESCAPE_Q).any()):
            raise RiceStreamError("escaped value small enough to be coded directly: malformed stream")
    return head, mags, tail_start


def rice_encode(m: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Rice-code one stream of non-negative integers ``m`` (int64 (n,)) with parameter ``k``.

    Returns (int32 words, number of meaningful bits). The escape rule of this module applies.
    """
    m = m.to(torch.int64).reshape(-1)
    if m.numel() and int(m.min()) < 0:
        raise ValueError("rice_encode takes non-negative integers (map signed values first)")
    if m.numel() and int(m.max()) >= (1 << ESCAPE_BITS):
        raise ValueError(f"values must be below 2**{ESCAPE_BITS}")
    if not 0 <= int(k) <= MAX_RICE_K:
        raise ValueError(f"Rice parameter k must be in [0, {MAX_RICE_K}], got {k}")
    n = torch.tensor([m.numel()], dtype=torch.int64, device=m.device)
    z = torch.zeros(1, dtype=torch.int64, device=m.device)
    empty = torch.zeros(0, dtype=torch.uint8, device=m.device)
    words, _ = encode_blocks(m, torch.full_like(m, int(k)), n, empty, z, empty, z)
    nbits = int(rice_cost(m, int(k)).sum())
    return words, nbits


def rice_decode(words: torch.Tensor, nbits: int, count: int, k: int) -> torch.Tensor:
    """Inverse of :func:`rice_encode`: ``count`` values from the first ``nbits`` bits of ``words``; int64."""
    if nbits < 0 or nbits > 32 * words.numel():
        raise RiceStreamError(f"stream claims {nbits} bits but holds {32 * words.numel()}")
    bits = unpack_bits(words)[:nbits]
    dev = bits.device
    kk = torch.full((int(count),), int(k), dtype=torch.int64, device=dev)
    z = torch.zeros(1, dtype=torch.int64, device=dev)
    _, mags, tail = decode_blocks(bits, z, torch.tensor([nbits], device=dev), torch.tensor([int(count)], device=dev), kk, z)
    return mags
