"""Lossless bit-stripping of lattice coordinates and their Rice-coded block stream.

A lattice vector's integer coordinates ``c`` (see :mod:`.lattices`) are split into

* a *parity* bit per vector for E8 (all-even / all-odd coset), stored raw in the block head;
* magnitudes ``m = |c| >> 1`` (E8: the parity already carries the low bit) or ``m = |c|`` (Z, D4),
  Rice coded;
* one sign bit per non-zero coordinate, stored raw in the block tail.

and every bit the lattice's parity rule determines is stripped: D4's even sum fixes the low bit of the last
magnitude; E8's sum ≡ 0 (mod 4) fixes the low bit of the last magnitude of an even vector and the last sign
of an odd vector. Stripped magnitudes are coded as ``m >> 1`` with Rice parameter ``max(k - 1, 0)``.

A2 is coded differently (the GPU decoder does not read A2): one Rice-coded symbol per point, its rank in the
lattice's norm order (:mod:`.a2_index`; close to geometric for a Gaussian pair), no parity or sign bits; a
point outside the rank table is coded as the escape rank followed, in the block tail, by its two coordinates
raw (ESCAPE_BITS each, two's complement).

Blocks hold ``block_values`` consecutive coordinates of the flattened tensor; each block has its own Rice
parameter ``k`` (``ks`` has one column per symbol class, one for every lattice).
"""

from __future__ import annotations

import torch

from .a2_index import a2_rank, a2_unrank
from .constants import A2_RANK_TABLE, ESCAPE_BITS, MAX_ABS_COORD, lattice_spec
from .rice import RiceStreamError, best_rice_k, decode_blocks, encode_blocks, read_fields, rice_cost, unpack_bits


def _layout(n: int, lattice: str, block_values: int, device) -> dict:
    spec = lattice_spec(lattice)
    if block_values % 8 or block_values <= 0:
        raise ValueError(f"block_values must be a positive multiple of 8, got {block_values}")
    if n % spec.dim:
        raise ValueError(f"{n} coordinates is not a multiple of the {spec.name} dimension {spec.dim}")
    nb = (n + block_values - 1) // block_values
    counts = torch.full((nb,), block_values, dtype=torch.int64, device=device)
    if nb:
        counts[-1] = n - block_values * (nb - 1)
    pos = torch.arange(n, device=device) % spec.dim
    cls = (pos % spec.classes) if spec.classes > 1 else torch.zeros_like(pos)
    has_parity = spec.name == "E8"
    head_counts = counts // spec.dim if has_parity else torch.zeros_like(counts)
    # Rice symbols per block: one per coordinate, or one per point for A2
    sym_counts = counts // 2 if spec.name == "A2" else counts
    return dict(spec=spec, nb=nb, counts=counts, pos=pos, cls=cls, has_parity=has_parity, head_counts=head_counts,
                sym_counts=sym_counts)


def _a2_escape_bits(c: torch.Tensor, esc: torch.Tensor) -> torch.Tensor:
    """Raw tail bits of the escaped A2 points: bool (n_esc * 2 * ESCAPE_BITS,), c0 then c1, LSB first."""
    g = c.reshape(-1, 2).to(torch.int64)[esc] & ((1 << ESCAPE_BITS) - 1)
    sh = torch.arange(ESCAPE_BITS, device=c.device)
    return ((g.unsqueeze(-1) >> sh) & 1).reshape(-1).bool()


def _per_block_k(m: torch.Tensor, k_shift: torch.Tensor, per: int, nb: int) -> torch.Tensor:
    """Best Rice parameter of each block of ``per`` consecutive symbols (the last may be shorter): int64 (nb,)."""
    ks = torch.zeros(nb, dtype=torch.int64, device=m.device)
    nfull = min(nb, m.numel() // per)
    if nfull:
        ks[:nfull] = best_rice_k(m[: nfull * per].reshape(nfull, per), k_shift[: nfull * per].reshape(nfull, per))
    if nfull < nb:
        ks[nfull:] = best_rice_k(m[nfull * per:].reshape(1, -1), k_shift[nfull * per:].reshape(1, -1))
    return ks


def _symbols(c: torch.Tensor, lattice: str):
    """Integer coordinates (n,) -> parity (n/d,) uint8, coded magnitudes int64, k shift, sign-present, sign."""
    spec = lattice_spec(lattice)
    d = spec.dim
    c = c.to(torch.int64)
    a = c.abs()
    g = c.reshape(-1, d)
    if spec.name == "A2":
        raise AssertionError("A2 is coded by rank, not by _symbols")  # internal misuse
    if spec.name == "E8":
        parity = (g[:, 0] & 1).to(torch.uint8)
        m = (a >> 1).reshape(-1, d)
    else:
        parity = torch.zeros(0, dtype=torch.uint8, device=c.device)
        m = a.reshape(-1, d)
    k_shift = torch.zeros_like(m)
    present = (g != 0)
    if spec.name == "D4":
        m = m.clone()
        m[:, 3] >>= 1
        k_shift[:, 3] = -1
    elif spec.name == "E8":
        m = m.clone()
        even = parity == 0
        m[:, 7] = torch.where(even, m[:, 7] >> 1, m[:, 7])
        k_shift[:, 7] = torch.where(even, -1, 0)
        present[:, 7] &= even
    sign = (c < 0).reshape(-1, d)
    return parity, m.reshape(-1), k_shift.reshape(-1), present.reshape(-1), sign.reshape(-1)


def choose_ks(c: torch.Tensor, lattice: str, block_values: int) -> torch.Tensor:
    """Rice parameter per (block, class), uint8 (n_blocks, classes), minimizing each block's bits."""
    lay = _layout(c.numel(), lattice, block_values, c.device)
    spec, nb = lay["spec"], lay["nb"]
    if spec.name == "A2":
        r = a2_rank(c)
        return _per_block_k(r, torch.zeros_like(r), block_values // 2, nb).to(torch.uint8).unsqueeze(1)
    _, m, k_shift, _, _ = _symbols(c, lattice)
    return _per_block_k(m, k_shift, block_values, nb).to(torch.uint8).unsqueeze(1)


def _k_eff(ks: torch.Tensor, lay: dict, k_shift: torch.Tensor, block_values: int) -> torch.Tensor:
    """Rice parameter of each symbol (int64, like ``k_shift``): its block's ``k`` plus its shift, >= 0."""
    n = k_shift.numel()
    per = block_values // 2 if lay["spec"].name == "A2" else block_values
    blk = torch.arange(n, device=k_shift.device) // per
    return (ks.to(torch.int64)[blk, 0] + k_shift).clamp_min(0)


def _a2_symbol_bits(c: torch.Tensor, ks: torch.Tensor, lay: dict, block_values: int):
    """A2: (rank int64 (n/2,), escape mask, bits of each point: Rice-coded rank + raw coordinates if escaped)."""
    r = a2_rank(c)
    esc = r == A2_RANK_TABLE
    bits = rice_cost(r, _k_eff(ks, lay, torch.zeros_like(r), block_values)) + esc.to(torch.int64) * (2 * ESCAPE_BITS)
    return r, esc, bits


def stream_bits(c: torch.Tensor, lattice: str, block_values: int, ks: torch.Tensor | None = None) -> int:
    """Bits the block stream of ``c`` takes, word padding included, without building it."""
    c = c.reshape(-1)
    lay = _layout(c.numel(), lattice, block_values, c.device)
    if ks is None:
        ks = choose_ks(c, lattice, block_values)
    if lay["spec"].name == "A2":
        _, _, cost = _a2_symbol_bits(c, ks, lay, block_values)
        blk = torch.arange(cost.numel(), device=c.device) // (block_values // 2)
    else:
        parity, m, k_shift, present, _ = _symbols(c, lattice)
        cost = rice_cost(m, _k_eff(ks, lay, k_shift, block_values)) + present.to(torch.int64)
        blk = torch.arange(c.numel(), device=c.device) // block_values
    per_block = torch.zeros(lay["nb"], dtype=torch.int64, device=c.device).index_add_(0, blk, cost)
    per_block += lay["head_counts"]
    return int(((per_block + 31) // 32).sum()) * 32


def encode_coords(c: torch.Tensor, lattice: str, block_values: int, chunk_values: int = 1 << 21):
    """Integer lattice coordinates (n,) -> (int32 words, int64 word offsets (n_blocks+1,), uint8 ks).

    Processes ``chunk_values`` coordinates at a time to bound memory.
    """
    c = c.reshape(-1)
    if c.numel() and int(c.abs().max()) > MAX_ABS_COORD:
        raise ValueError(f"lattice coordinate magnitude exceeds {MAX_ABS_COORD}: step size far too small")
    _layout(c.numel(), lattice, block_values, c.device)  # validates the geometry before any work
    ks = choose_ks(c, lattice, block_values)
    per_chunk = max(1, chunk_values // block_values) * block_values
    all_words, all_offsets, base = [], [torch.zeros(1, dtype=torch.int64, device=c.device)], 0
    for s in range(0, c.numel(), per_chunk):
        cc = c[s: s + per_chunk]
        b0 = s // block_values
        sub = _layout(cc.numel(), lattice, block_values, c.device)
        if sub["spec"].name == "A2":
            r = a2_rank(cc)
            esc = r == A2_RANK_TABLE
            k_eff = _k_eff(ks[b0: b0 + sub["nb"]], sub, torch.zeros_like(r), block_values)
            blk = torch.arange(r.numel(), device=c.device) // (block_values // 2)
            tail_counts = torch.zeros(sub["nb"], dtype=torch.int64, device=c.device).index_add_(
                0, blk, esc.to(torch.int64) * (2 * ESCAPE_BITS))
            words, off = encode_blocks(r, k_eff, sub["sym_counts"], torch.zeros(0, dtype=torch.uint8, device=c.device),
                                       sub["head_counts"], _a2_escape_bits(cc, esc), tail_counts)
            all_words.append(words)
            all_offsets.append(off[1:] + base)
            base += words.numel()
            continue
        parity, m, k_shift, present, sign = _symbols(cc, lattice)
        k_eff = _k_eff(ks[b0: b0 + sub["nb"]], sub, k_shift, block_values)
        blk = torch.arange(cc.numel(), device=c.device) // block_values
        tail_counts = torch.zeros(sub["nb"], dtype=torch.int64, device=c.device).index_add_(
            0, blk, present.to(torch.int64))
        words, off = encode_blocks(m, k_eff, sub["counts"], parity, sub["head_counts"], sign[present], tail_counts)
        all_words.append(words)
        all_offsets.append(off[1:] + base)
        base += words.numel()
    words = torch.cat(all_words) if all_words else torch.zeros(0, dtype=torch.int32, device=c.device)
    return words, torch.cat(all_offsets), ks


def decode_coords(words: torch.Tensor, word_offsets: torch.Tensor, ks: torch.Tensor, n: int, lattice: str,
                  block_values: int, chunk_values: int = 1 << 21) -> torch.Tensor:
    """Inverse of :func:`encode_coords`: int32 coordinates (n,). Raises ``RiceStreamError`` on bad streams."""
    lay = _layout(n, lattice, block_values, words.device)
    spec, nb = lay["spec"], lay["nb"]
    word_offsets = word_offsets.to(torch.int64)
    if word_offsets.numel() != nb + 1 or ks.shape != (nb, spec.classes):
        raise RiceStreamError(f"stream index describes {word_offsets.numel() - 1} blocks, expected {nb}")
    if nb and (int(word_offsets[0]) != 0 or bool((word_offsets[1:] < word_offsets[:-1]).any())
               or int(word_offsets[-1]) > words.numel()):
        raise RiceStreamError("block offsets are not increasing or point past the end of the stream")
    per_chunk_blocks = max(1, chunk_values // block_values)
    out = []
    for b0 in range(0, nb, per_chunk_blocks):
        b1 = min(nb, b0 + per_chunk_blocks)
        w0, w1 = int(word_offsets[b0]), int(word_offsets[b1])
        bits = unpack_bits(words[w0:w1])
        starts = (word_offsets[b0:b1] - w0) * 32
        ends = (word_offsets[b0 + 1: b1 + 1] - w0) * 32
        nvals = min(n, b1 * block_values) - b0 * block_values
        sub = _layout(nvals, lattice, block_values, words.device)
        d = spec.dim
        if spec.name == "A2":
            out.append(_a2_decode(bits, starts, ends, ks[b0:b1], sub, block_values))
            continue
        # k shifts depend on parity (E8) which lives in the head: decode heads first with a provisional
        # k_eff, which is exact for every value except E8's last coordinate; fix it once parity is known.
        pos = sub["pos"]
        k_shift = torch.zeros(nvals, dtype=torch.int64, device=words.device)
        if spec.name == "D4":
            k_shift[pos == 3] = -1
        if spec.name == "E8":
            hc = sub["head_counts"]
            hidx = torch.repeat_interleave(torch.arange(b1 - b0, device=words.device), hc)
            hrank = torch.arange(hidx.numel(), device=words.device) - (torch.cumsum(hc, 0) - hc)[hidx]
            if bool((starts + hc > ends).any()):
                raise RiceStreamError("block too short for its parity bits")
            parity_pre = bits[starts[hidx] + hrank]
            even = (parity_pre == 0)
            k_shift.view(-1, 8)[:, 7] = torch.where(even, -1, 0)
        k_eff = _k_eff(ks[b0:b1], sub, k_shift, block_values)
        head, m, tail_start = decode_blocks(bits, starts, ends, sub["counts"], k_eff, sub["head_counts"])
        g = m.view(-1, d)
        mag = g.clone()
        if spec.name == "E8":
            par = head.to(torch.int64)
        if spec.name == "D4":
            mag[:, 3] = 2 * g[:, 3] + (g[:, :3].sum(1) & 1)
        present = mag != 0
        if spec.name == "E8":
            even = par == 0
            mag[:, 7] = torch.where(even, 2 * g[:, 7] + (g[:, :7].sum(1) & 1), g[:, 7])
            present = (mag != 0) | (~even).unsqueeze(1)
            present[:, 7] &= even
        present = present.reshape(-1)
        blk = torch.arange(nvals, device=words.device) // block_values
        pi = present.to(torch.int64)
        cs = torch.cumsum(pi, 0) - pi
        first = cs[(torch.arange(b1 - b0, device=words.device) * block_values)]
        spos = tail_start[blk] + cs - first[blk]
        sel = present.nonzero().squeeze(1)
        if sel.numel():
            sp = spos[sel]
            if bool((sp >= ends[blk[sel]]).any()):
                raise RiceStreamError("sign section runs past the end of its block")
        neg = torch.zeros(nvals, dtype=torch.bool, device=words.device)
        neg[sel] = bits[spos[sel]].bool() if sel.numel() else neg[sel]
        neg = neg.view(-1, d)
        if spec.name == "E8":
            val = 2 * mag + par.unsqueeze(1)
        else:
            val = mag
        if spec.name == "E8":
            odd = par == 1
            n_neg = neg[:, :7].sum(1)
            neg7 = ((mag.sum(1) - n_neg) & 1).bool()
            neg[:, 7] = torch.where(odd, neg7, neg[:, 7])
        c = torch.where(neg, -val, val)
        out.append(c.reshape(-1).to(torch.int32))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int32, device=words.device)


def _a2_decode(bits: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, ks: torch.Tensor, sub: dict,
               block_values: int) -> torch.Tensor:
    """Decode A2 blocks (ranks, then the raw coordinates of escaped points) -> int32 coordinates (n,)."""
    dev = bits.device
    nb = sub["nb"]
    n_sym = int(sub["sym_counts"].sum())
    k_eff = _k_eff(ks, sub, torch.zeros(n_sym, dtype=torch.int64, device=dev), block_values)
    _, r, tail_start = decode_blocks(bits, starts, ends, sub["sym_counts"], k_eff, sub["head_counts"])
    if bool((r > A2_RANK_TABLE).any()):
        raise RiceStreamError("A2 rank beyond the escape rank: malformed stream")
    esc = r == A2_RANK_TABLE
    blk = torch.arange(n_sym, device=dev) // (block_values // 2)
    ei = esc.to(torch.int64)
    cs = torch.cumsum(ei, 0) - ei
    first = cs[torch.arange(nb, device=dev) * (block_values // 2)]
    n_esc = torch.zeros(nb, dtype=torch.int64, device=dev).index_add_(0, blk, ei)
    if bool((tail_start + n_esc * 2 * ESCAPE_BITS > ends).any()):
        raise RiceStreamError("A2 escaped coordinates run past the end of their block")
    c = torch.zeros(n_sym, 2, dtype=torch.int64, device=dev)
    c[~esc] = a2_unrank(r[~esc]).to(torch.int64)
    sel = esc.nonzero().squeeze(1)
    if sel.numel():
        pos = tail_start[blk[sel]] + (cs[sel] - first[blk[sel]]) * (2 * ESCAPE_BITS)
        raw = read_fields(bits, torch.stack((pos, pos + ESCAPE_BITS), 1).reshape(-1),
                          torch.full((2 * sel.numel(),), ESCAPE_BITS, dtype=torch.int64, device=dev))
        raw = torch.where(raw >= (1 << (ESCAPE_BITS - 1)), raw - (1 << ESCAPE_BITS), raw).view(-1, 2)
        if bool(((raw[:, 0] - raw[:, 1]) & 1).any()) or bool((a2_rank(raw) != A2_RANK_TABLE).any()):
            raise RiceStreamError("escaped A2 point is not an A2 point outside the rank table: malformed stream")
        c[sel] = raw
    return c.reshape(-1).to(torch.int32)


def index_entropy_bits(c: torch.Tensor, lattice: str) -> float:
    """Empirical zeroth-order entropy of the bit-stripped symbols of ``c``, in bits (total, not per value).

    Parity bits and each coordinate class's magnitudes (stripped magnitudes separately) are counted by their
    empirical entropy, sign bits at one bit each (they are equiprobable). The Rice stream's length minus this
    is the Rice code's overhead over an ideal memoryless entropy coder of the same symbols. A2: the entropy of
    the point ranks, plus the raw bits of escaped points.
    """
    spec = lattice_spec(lattice)
    c = c.reshape(-1)

    def h(x: torch.Tensor) -> float:
        if x.numel() == 0:
            return 0.0
        _, cnt = torch.unique(x, return_counts=True)
        p = cnt.double() / cnt.sum()
        return float(-(p * p.log2()).sum()) * x.numel()

    if spec.name == "A2":
        r = a2_rank(c)
        return h(r) + float((r == A2_RANK_TABLE).sum()) * 2 * ESCAPE_BITS
    parity, m, k_shift, present, _ = _symbols(c, lattice)
    total = h(parity) + float(present.sum())
    for sh in (0, -1):
        total += h(m[k_shift == sh])
    return total


def vector_bits(c: torch.Tensor, lattice: str, ks: torch.Tensor, block_values: int) -> torch.Tensor:
    """Bits each lattice vector of ``c`` (n,) costs in the block stream with Rice parameters ``ks``.

    Returns int64 (n // dim,): Rice-coded magnitudes + sign bits + the parity bit (A2: the Rice-coded rank, plus
    the raw coordinates of an escaped point); block word padding is not attributed to vectors.
    """
    spec = lattice_spec(lattice)
    c = c.reshape(-1)
    lay = _layout(c.numel(), lattice, block_values, c.device)
    if spec.name == "A2":
        return _a2_symbol_bits(c, ks, lay, block_values)[2]
    _, m, k_shift, present, _ = _symbols(c, lattice)
    cost = rice_cost(m, _k_eff(ks, lay, k_shift, block_values)) + present.to(torch.int64)
    return cost.view(-1, spec.dim).sum(1) + (1 if lay["has_parity"] else 0)
