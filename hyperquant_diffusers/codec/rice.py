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


def _fold_windows(acc: torch.Tensor, total_words: int) -> torch.Tensor:
    """int64 accumulators of 64-bit windows -> int32 words.

    ``acc[w]`` holds, as disjoint bits, every field that starts in word ``w`` (bits 0..62 of the window that
    begins at bit ``32 w``): its low half is word ``w``, its high half spills into word ``w + 1``. Raises if
    anything lies past the last word (an internal sizing error)."""
    lo = acc[:total_words] & _MASK32
    if total_words > 1:
        lo[1:] += acc[: total_words - 1] >> 32
    if acc.numel() > total_words and bool((acc[total_words:] != 0).any()) or (
            total_words and int(acc[total_words - 1] >> 32) != 0):
        raise RuntimeError("pack_bits: field written past the last word (internal sizing error)")
    return torch.where(lo >= (1 << 31), lo - (1 << 32), lo).to(torch.int32)


def pack_bits(positions: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, total_words: int) -> torch.Tensor:
    """Write ``values[i]`` (``lengths[i]`` <= 32 bits, LSB first) at bit ``positions[i]``; fields must not overlap.

    All inputs int64 (n,). Returns int32 words (total_words,). Non-overlapping fields make addition equal OR:
    each field is added, shifted by its offset in its first word, to that word's 64-bit window (one
    ``index_add_``), and the windows' high halves are folded into the next words.
    """
    device = positions.device
    acc = torch.zeros(total_words + 1, dtype=torch.int64, device=device)
    if positions.numel():
        lengths = lengths.to(torch.int64)
        mask = torch.where(lengths >= 63, torch.full_like(lengths, -1), (1 << lengths) - 1)
        v = values.to(torch.int64) & mask & _MASK32
        acc.index_add_(0, positions >> 5, v << (positions & 31))
    return _fold_windows(acc, total_words)


def unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """int32 words (n,) -> bits uint8 (32 n,), LSB of word 0 first."""
    # little-endian bytes of the words, 8 bits each: no 64-bit temporaries (32 per word)
    b = words.to(torch.int32).contiguous().view(torch.uint8)
    shifts = torch.arange(8, device=words.device, dtype=torch.uint8)
    return ((b.unsqueeze(1) >> shifts) & 1).reshape(-1)


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


#: Values are bucketed by their top _TOP bits for the Rice cost tables: 2**_TOP must reach ESCAPE_Q (see _buckets).
_TOP = max(5, (ESCAPE_Q - 1).bit_length())
_HALF = 1 << (_TOP - 1)


def _buckets(m: torch.Tensor, m_max: int | None = None) -> torch.Tensor:
    """Bucket of each integer ``m >= 0`` (int64 < 2**62, or int32) such that ``rice_cost(m, k)`` is the same for
    every value of a bucket, for every ``k``: int32 if ``m`` is below 2**31, else int64; same shape.

    With ``t = max(bit_length(m) - _TOP, 0)`` the bucket is ``(m >> t) + _HALF * t``: for ``k >= t``,
    ``m >> k == (m >> t) >> (k - t)`` depends on the bucket only, and for ``k < t`` the quotient is at least
    ``2**_TOP >= ESCAPE_Q`` (an escape) whatever the low bits. The bit length comes from the float32 exponent;
    where rounding to float32 carries into the next power of two, the top ``_TOP`` bits are all ones and
    ``(m >> (t + 1)) + _HALF * (t + 1)`` is the same bucket. Buckets grow with ``m``. ``m_max``: ``m.max()``
    if known."""
    if m.dtype != torch.int32 and m.numel():
        if m_max is None:
            m_max = int(m.max())
        if m_max < (1 << 31):
            m = m.to(torch.int32)
    t = m.to(torch.float32).view(torch.int32)
    t >>= 23
    t.sub_(126 + _TOP).clamp_min_(0)
    return (m >> t).add_(t, alpha=_HALF)


def _bucket_of(v: int) -> int:
    """:func:`_buckets` of one Python integer."""
    t = max(v.bit_length() - _TOP, 0)
    return (v >> t) + _HALF * t


def _bucket_values(nbk: int, device) -> torch.Tensor:
    """A representative integer of each of the first ``nbk`` buckets (see :func:`_buckets`): int64 (nbk,)."""
    b = torch.arange(nbk, dtype=torch.int64, device=device)
    t = (b // _HALF - 1).clamp_min(0)
    return (b - _HALF * t) << t


def rice_cost_table(m: torch.Tensor, k_shift: torch.Tensor | None = None, *, max_k: int = MAX_RICE_K) -> torch.Tensor:
    """Total Rice bits of each row of ``m`` (G, n) for every parameter ``k`` in [0, max_k]: float64 (G, max_k+1),
    exact integers; value ``i`` is coded with ``max(k + k_shift[i], 0)``, ``k_shift`` 0 or -1 (or None: 0).

    One pass over the values builds a histogram of buckets (:func:`_buckets`) per row and shift; the table is
    that histogram times the cost of each bucket at each k."""
    g, n = m.shape
    device = m.device
    shifted = k_shift is not None and k_shift.numel() > 0
    if shifted:
        lo_hi = torch.aminmax(k_shift)
        if int(lo_hi.min) < -1 or int(lo_hi.max) > 0:
            raise ValueError("k_shift must be 0 or -1")
    if m.numel() == 0:
        return torch.zeros(g, max_k + 1, dtype=torch.float64, device=device)
    m_max = int(m.max())
    b = _buckets(m, m_max)
    nbk = _bucket_of(m_max) + 1
    ns = 2 if shifted else 1
    if g * ns * nbk >= (1 << 31):
        b = b.to(torch.int64)
    if shifted:  # shift -1 -> second half (same dtypes: a mixed-dtype in-place op is several times slower)
        b.sub_(k_shift.view(b.shape).to(b.dtype), alpha=nbk)
    b += (torch.arange(g, dtype=b.dtype, device=device) * (ns * nbk)).unsqueeze(1)
    hist = torch.bincount(b.reshape(-1), minlength=g * ns * nbk).view(g, ns * nbk)
    rep = _bucket_values(nbk, device).unsqueeze(1)
    kk = torch.arange(max_k + 1, dtype=torch.int64, device=device).unsqueeze(0)
    costs = [rice_cost(rep, kk)]
    if shifted:
        costs.append(rice_cost(rep, (kk - 1).clamp_min(0)))
    return hist.to(torch.float64) @ torch.cat(costs, 0).to(torch.float64)


def best_rice_k(m: torch.Tensor, k_shift: torch.Tensor | None = None, *, max_k: int = MAX_RICE_K) -> torch.Tensor:
    """Per row of ``m`` (G, n) the Rice parameter minimizing the row's total bits; int64 (G,).

    ``k_shift`` (same shape, 0 or -1) lowers the parameter of individual values (bit-stripped magnitudes use
    ``max(k - 1, 0)``). Candidates are searched around log2 of the mean, then refined to the exact minimum:
    a window of 3 around the estimate, widened until the minimum is interior (the total cost is convex in k
    but for escapes). The costs of every k come from one table (:func:`rice_cost_table`).
    """
    return best_rice_k_and_bits(m, k_shift, max_k=max_k)[0]


def best_rice_k_and_bits(m: torch.Tensor, k_shift: torch.Tensor | None = None, *,
                         max_k: int = MAX_RICE_K) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`best_rice_k` and the Rice bits of each row at that parameter: (int64 (G,), int64 (G,)) — what a
    caller that needs the stream's size gets without a second pass over the values."""
    if m.dim() != 2:
        raise ValueError("best_rice_k takes a (G, n) tensor")
    table = rice_cost_table(m, k_shift, max_k=max_k)
    n = m.shape[1]
    mean = (m.sum(dim=1, dtype=torch.int64).to(torch.float64) / n).clamp_min(0.0)
    k0 = torch.floor(torch.log2(mean + 1.0)).to(torch.int64)
    lo, hi = -1, 1
    while True:
        ks = torch.stack([(k0 + d).clamp(0, max_k) for d in range(lo, hi + 1)], 0)  # (C, G)
        costs = table.gather(1, ks.t()).t()
        idx = costs.argmin(0)
        best_k = ks.gather(0, idx.unsqueeze(0)).squeeze(0)
        at_edge = ((idx == 0) & (ks[0] > 0)) | ((idx == ks.shape[0] - 1) & (ks[-1] < max_k))
        if not bool(at_edge.any()) or hi - lo > 2 * max_k:
            return best_k, table.gather(1, best_k.unsqueeze(1)).squeeze(1).to(torch.int64)
        lo, hi = lo - 3, hi + 3


def _add_per_block_(x: torch.Tensor, per_block: torch.Tensor, counts: torch.Tensor, regular: int) -> torch.Tensor:
    """In place: ``x[i] += per_block[block of i]``."""
    n = x.numel()
    if regular:
        nfull = n // regular
        x[: nfull * regular].view(nfull, regular).add_(per_block[:nfull].unsqueeze(1))
        if nfull * regular < n:
            x[nfull * regular:].add_(per_block[nfull])
        return x
    return x.add_(torch.repeat_interleave(per_block, counts, output_size=n))


def _segment_totals(cum: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per block sum from an inclusive cumsum ``cum`` and the blocks' exclusive ends: int64 (B,)."""
    if cum.numel() == 0:
        return torch.zeros_like(ends)
    at = torch.where(ends > 0, cum.index_select(0, (ends - 1).clamp_min(0)).to(torch.int64), torch.zeros_like(ends))
    out = at.clone()
    out[1:] -= at[:-1]
    return out


def _pack_runs(acc: torch.Tensor, bits: torch.Tensor, counts: torch.Tensor, dest: torch.Tensor) -> None:
    """Add to ``acc`` (64-bit windows, see :func:`_fold_windows`) raw bits laid out as consecutive runs: run ``b``
    is the next ``counts[b]`` of ``bits`` (0/1, uint8 or bool), written from global bit ``dest[b]`` on.

    The bits are packed 32 to a word, the runs are cut at run and word boundaries, and each piece (<= 32 bits)
    is one field: ~len/32 + 2 B fields instead of one per bit."""
    total = bits.numel()
    if total == 0:
        return
    device = bits.device
    nwords = (total + 31) // 32
    padded = torch.zeros(nwords * 32, dtype=torch.uint8, device=device)
    padded[:total] = bits.reshape(-1).to(torch.uint8) & 1
    byte = (padded.view(-1, 8) << torch.arange(8, dtype=torch.uint8, device=device)).sum(1, dtype=torch.uint8)
    packed = byte.view(torch.int32).to(torch.int64) & _MASK32
    counts = counts.to(torch.int64)
    first = torch.cumsum(counts, 0) - counts
    cuts = torch.cat((first, first + counts, torch.arange(0, total, 32, device=device),
                      torch.tensor([total], device=device)))
    cuts = torch.unique(cuts.clamp_(0, total))  # sorted
    a, e = cuts[:-1], cuts[1:]
    run = torch.searchsorted(first, a, right=True) - 1
    length = e - a
    val = (packed[a >> 5] >> (a & 31)) & ((1 << length) - 1)
    pos = dest[run] + (a - first[run])
    acc.index_add_(0, pos >> 5, val << (pos & 31))


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

    Every field is added to the 64-bit window of the word it starts in (:func:`_fold_windows`): a low-bit field
    per value, the unary sections as runs of ones with their terminators subtracted, the escapes, and the head
    and tail bits 32 at a time (:func:`_pack_runs`). Per-value work runs in int32 where the values fit.
    """
    device = mags.device
    nb = block_counts.numel()
    m = mags.reshape(-1)
    n = m.numel()
    counts = block_counts.to(torch.int64)
    head_counts = head_counts.to(torch.int64)
    tail_counts = tail_counts.to(torch.int64)
    ends = torch.cumsum(counts, 0)
    # blocks of one size but for a shorter last one: per-block values spread over a view, no index tensor
    cl = counts.tolist() if nb else []
    regular = cl[0] if nb and cl[0] > 0 and all(c == cl[0] for c in cl[:-1]) and 0 < cl[-1] <= cl[0] else 0
    vdt = torch.int32 if n == 0 or int(m.max()) < (1 << 31) else torch.int64
    m = m.to(vdt)
    k = k_eff.reshape(-1).to(vdt)
    q = m >> k
    low = m - (q << k)  # m & ((1 << k) - 1)
    qc = q.clamp_max_(ESCAPE_Q)
    esc = qc == ESCAPE_Q
    n_esc = int(esc.sum())
    if n_esc:
        low.masked_fill_(esc, 0)
    # positions: inclusive cumsums of the field lengths, int32 while they fit (< 2**31)
    kmax = int(k.max()) if n else 0
    cdt = torch.int32 if n * max(kmax, ESCAPE_Q + 1) < (1 << 31) else torch.int64
    ck = torch.cumsum(k, 0, dtype=cdt)
    cu = torch.cumsum(qc.add_(1), 0, dtype=cdt)  # qc is now the unary length q + 1
    low_tot = _segment_totals(ck, ends)
    un_tot = _segment_totals(cu, ends)
    if n_esc:
        ei = esc.nonzero().squeeze(1)
        eblk = torch.searchsorted(ends, ei, right=True)
        esc_cnt = torch.bincount(eblk, minlength=nb)
    else:
        esc_cnt = torch.zeros(nb, dtype=torch.int64, device=device)
    block_bits = head_counts + low_tot + un_tot + esc_cnt * ESCAPE_BITS + tail_counts
    block_words = (block_bits + 31) // 32
    word_off = torch.zeros(nb + 1, dtype=torch.int64, device=device)
    word_off[1:] = torch.cumsum(block_words, 0)
    total_words = int(word_off[-1])
    start = word_off[:-1] * 32
    low_start = start + head_counts
    un_start = low_start + low_tot
    esc_start = un_start + un_tot
    tail_start = esc_start + esc_cnt * ESCAPE_BITS
    acc = torch.zeros(total_words + 1, dtype=torch.int64, device=device)
    if total_words * 32 >= (1 << 31) and cdt == torch.int32:
        ck, cu = ck.to(torch.int64), cu.to(torch.int64)
    pdt = ck.dtype
    # unary sections: ones over [un_start, esc_start) of each block, word by word ...
    wblk = torch.repeat_interleave(torch.arange(nb, device=device), block_words, output_size=total_words)
    wbit = torch.arange(total_words, dtype=torch.int64, device=device) * 32
    lo = (un_start[wblk] - wbit).clamp_(0, 32)
    hi = (esc_start[wblk] - wbit).clamp_(0, 32)
    acc[:total_words] += torch.where(hi > lo, (1 << hi) - (1 << lo), torch.zeros_like(hi))
    # ... less one terminator per value, at un_start + (inclusive unary cumsum within the block) - 1
    cum_before = torch.zeros(nb, dtype=torch.int64, device=device)
    cum_before[1:] = torch.cumsum(un_tot, 0)[:-1]
    tpos = _add_per_block_(cu, (un_start - cum_before - 1).to(pdt), counts, regular)
    acc.index_add_(0, tpos >> 5, torch.ones(1, dtype=torch.int64, device=device).expand(n) << (tpos & 31),
                   alpha=-1)
    del tpos, cu
    # low bits: k bits of each value at low_start + (exclusive k cumsum within the block)
    cum_before[1:] = torch.cumsum(low_tot, 0)[:-1]
    lpos = _add_per_block_(ck.sub_(k), (low_start - cum_before).to(pdt), counts, regular)
    acc.index_add_(0, lpos >> 5, low.to(torch.int64) << (lpos & 31))
    del lpos, ck, low
    if n_esc:
        first_esc = torch.searchsorted(eblk, torch.arange(nb, device=device))
        rank = torch.arange(n_esc, device=device) - first_esc[eblk]
        epos = esc_start[eblk] + rank * ESCAPE_BITS
        acc.index_add_(0, epos >> 5, (mags.reshape(-1)[ei].to(torch.int64) & _MASK32) << (epos & 31))
    _pack_runs(acc, head_bits, head_counts, start)
    _pack_runs(acc, tail_bits, tail_counts, tail_start)
    return _fold_windows(acc, total_words), word_off


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
