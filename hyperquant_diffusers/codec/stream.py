"""Lattice coordinates -> Rice-coded block stream: pair ranks (A2, Z, D4) or bit-stripped sign-magnitude (E8).

**A2, Z, D4: pair ranks.** The coordinates are cut into consecutive pairs, and each pair is one Rice-coded
symbol: its rank in the norm order of a 2-D lattice (:mod:`.rank_index`; close to geometric for a Gaussian pair,
so Rice is within a few hundredths of a bit of the symbols' entropy). There are no parity or sign bits.

* A2: each point ``(c0, c1)`` by its rank in A2 (``"A2"`` table).
* Z: each coordinate pair ``(c_2i, c_2i+1)`` by its rank in Z^2 (``"Z2"``); a Z stream needs an even count.
* D4 (integer 4-vectors of even sum): two symbols per vector, the first pair ``(c0, c1)`` by its rank in Z^2
  (``"Z2"``) with the block's Rice parameter ``k``, then the second pair ``(c2, c3)`` by its rank within the
  checkerboard coset ``(c2 + c3) ≡ (c0 + c1) (mod 2)`` (``"Z2coset"``, the coset the first pair fixes) with
  parameter ``max(k - 1, 0)`` (a coset has half the density of Z^2, so its ranks are half as large).

A pair outside its table is coded as the table's escape rank, followed, in the block tail, by its two
coordinates raw (ESCAPE_BITS each, two's complement, LSB first, first coordinate first; escaped pairs in
symbol order). A block is ``[low bits][unary][Rice escapes][tail]`` (:mod:`.rice`, no head).

**E8: sign-magnitude.** The integer coordinates ``c`` (see :mod:`.lattices`) are split into

* a *parity* bit per vector (all-even / all-odd coset), stored raw in the block head;
* magnitudes ``m = |c| >> 1`` (the parity already carries the low bit), Rice coded;
* one sign bit per non-zero coordinate, stored raw in the block tail,

and every bit the lattice's parity rule determines is stripped: the sum ≡ 0 (mod 4) fixes the low bit of the
last magnitude of an even vector (coded as ``m >> 1`` with Rice parameter ``max(k - 1, 0)``) and the last sign
of an odd vector.

Blocks hold ``block_values`` consecutive coordinates of the flattened tensor; each block has its own Rice
parameter ``k`` (``ks`` has one column per symbol class, one for every lattice).
"""

from __future__ import annotations

import functools

import torch

from . import cpu_kernels
from .constants import ESCAPE_BITS, MAX_ABS_COORD, lattice_spec
from .rank_index import escape_rank, rank_points, table_sizes, unrank_points
from .rice import RiceStreamError, best_rice_k, decode_blocks, encode_blocks, read_fields, rice_cost, unpack_bits

#: Lattices coded by pair ranks, and the rank table of each symbol of a vector (symbol j uses kinds[j % len]).
_RANK_KINDS = {"A2": ("A2",), "Z": ("Z2",), "D4": ("Z2", "Z2coset")}
#: Rice parameter shift of each symbol of a vector (D4: the coset rank uses k - 1).
_RANK_SHIFTS = {"A2": (0,), "Z": (0,), "D4": (0, -1)}


def _layout(n: int, lattice: str, block_values: int, device) -> dict:
    spec = lattice_spec(lattice)
    if block_values % 8 or block_values <= 0:
        raise ValueError(f"block_values must be a positive multiple of 8, got {block_values}")
    if n % spec.dim:
        raise ValueError(f"{n} coordinates is not a multiple of the {spec.name} dimension {spec.dim}")
    ranked = spec.name in _RANK_KINDS
    if ranked and n % 2:
        raise ValueError(f"a {spec.name} stream codes coordinate pairs: {n} coordinates is odd")
    nb = (n + block_values - 1) // block_values
    counts = torch.full((nb,), block_values, dtype=torch.int64, device=device)
    if nb:
        counts[-1] = n - block_values * (nb - 1)
    has_parity = spec.name == "E8"
    head_counts = counts // spec.dim if has_parity else torch.zeros_like(counts)
    # Rice symbols per block: one per coordinate (E8) or one per coordinate pair (rank-coded lattices)
    sym_counts = counts // 2 if ranked else counts
    return dict(spec=spec, nb=nb, counts=counts, ranked=ranked, has_parity=has_parity, head_counts=head_counts,
                sym_counts=sym_counts, per=block_values // 2 if ranked else block_values)


def _pair_bits(c: torch.Tensor, esc: torch.Tensor) -> torch.Tensor:
    """Raw tail bits of the escaped pairs: bool (n_esc * 2 * ESCAPE_BITS,), c0 then c1, LSB first."""
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


def _pattern(values: tuple, n_sym: int, device) -> torch.Tensor:
    """The per-vector pattern ``values`` repeated over ``n_sym`` symbols: int64 (n_sym,)."""
    return torch.tensor(values, dtype=torch.int64, device=device).repeat(n_sym // len(values))


def _rank_symbols(c: torch.Tensor, lattice: str):
    """Rank-coded lattices: coordinates (n,) -> (ranks int64 (n/2,), Rice k shift int64 (n/2,), escape mask)."""
    name = lattice_spec(lattice).name
    kinds = _RANK_KINDS[name]
    g = c.reshape(-1, 2 * len(kinds))
    r = torch.stack([rank_points(g[:, 2 * j: 2 * j + 2], kind) for j, kind in enumerate(kinds)], 1).reshape(-1)
    esc = r == _pattern(tuple(escape_rank(k) for k in kinds), r.numel(), c.device)
    return r, _pattern(_RANK_SHIFTS[name], r.numel(), c.device), esc


def _symbols(c: torch.Tensor, lattice: str):
    """E8 coordinates (n,) -> parity (n/8,) uint8, coded magnitudes int64, k shift, sign-present, sign."""
    spec = lattice_spec(lattice)
    if spec.name != "E8":
        raise AssertionError(f"{spec.name} is coded by pair ranks, not by _symbols")  # internal misuse
    d = spec.dim
    c = c.to(torch.int64)
    a = c.abs()
    g = c.reshape(-1, d)
    parity = (g[:, 0] & 1).to(torch.uint8)
    m = (a >> 1).reshape(-1, d).clone()
    k_shift = torch.zeros_like(m)
    present = (g != 0)
    even = parity == 0
    m[:, 7] = torch.where(even, m[:, 7] >> 1, m[:, 7])
    k_shift[:, 7] = torch.where(even, -1, 0)
    present[:, 7] &= even
    sign = (c < 0).reshape(-1, d)
    return parity, m.reshape(-1), k_shift.reshape(-1), present.reshape(-1), sign.reshape(-1)


def choose_ks(c: torch.Tensor, lattice: str, block_values: int) -> torch.Tensor:
    """Rice parameter per (block, class), uint8 (n_blocks, classes), minimizing each block's bits."""
    if cpu_kernels.usable(c):
        ks = cpu_kernels.choose_ks(c, lattice, block_values)
        if ks is not None:
            return ks
    lay = _layout(c.numel(), lattice, block_values, c.device)
    if lay["ranked"]:
        r, k_shift, _ = _rank_symbols(c, lattice)
        return _per_block_k(r, k_shift, lay["per"], lay["nb"]).to(torch.uint8).unsqueeze(1)
    _, m, k_shift, _, _ = _symbols(c, lattice)
    return _per_block_k(m, k_shift, lay["per"], lay["nb"]).to(torch.uint8).unsqueeze(1)


def _k_eff(ks: torch.Tensor, lay: dict, k_shift: torch.Tensor, block_values: int) -> torch.Tensor:
    """Rice parameter of each symbol (int64, like ``k_shift``): its block's ``k`` plus its shift, >= 0."""
    blk = torch.arange(k_shift.numel(), device=k_shift.device) // lay["per"]
    return (ks.to(torch.int64)[blk, 0] + k_shift).clamp_min(0)


def _rank_symbol_bits(c: torch.Tensor, ks: torch.Tensor, lay: dict, block_values: int):
    """Rank-coded lattices: (ranks int64 (n/2,), escape mask, bits of each symbol: the Rice-coded rank, plus the
    pair's raw coordinates if escaped)."""
    r, k_shift, esc = _rank_symbols(c, lay["spec"].name)
    bits = rice_cost(r, _k_eff(ks, lay, k_shift, block_values)) + esc.to(torch.int64) * (2 * ESCAPE_BITS)
    return r, esc, bits


def stream_bits(c: torch.Tensor, lattice: str, block_values: int, ks: torch.Tensor | None = None) -> int:
    """Bits the block stream of ``c`` takes, word padding included, without building it."""
    if cpu_kernels.usable(c):
        bits = cpu_kernels.stream_bits(c, lattice, block_values, ks)
        if bits is not None:
            return bits
    c = c.reshape(-1)
    lay = _layout(c.numel(), lattice, block_values, c.device)
    if ks is None:
        ks = choose_ks(c, lattice, block_values)
    if lay["ranked"]:
        cost = _rank_symbol_bits(c, ks, lay, block_values)[2]
    else:
        parity, m, k_shift, present, _ = _symbols(c, lattice)
        cost = rice_cost(m, _k_eff(ks, lay, k_shift, block_values)) + present.to(torch.int64)
    blk = torch.arange(cost.numel(), device=c.device) // lay["per"]
    per_block = torch.zeros(lay["nb"], dtype=torch.int64, device=c.device).index_add_(0, blk, cost)
    per_block += lay["head_counts"]
    return int(((per_block + 31) // 32).sum()) * 32


@functools.lru_cache(maxsize=None)
def code_floor_bits(lattice: str, block_values: int) -> float:
    """The least the Rice-coded coordinates of ``lattice`` cost, bits per scalar: the stream of a block of all-zero
    coordinates (word padding included). No step size brings a stream below it: E8 1.125 (a parity bit per vector
    and a unary bit per magnitude), the pair-coded A2, Z and D4 0.5 (one unary bit per pair). A requested rate
    must leave more than this after a tensor's side information."""
    spec = lattice_spec(lattice)
    return stream_bits(torch.zeros(block_values, dtype=torch.int32), spec.name, block_values) / block_values


def encode_coords(c: torch.Tensor, lattice: str, block_values: int, chunk_values: int = 1 << 21):
    """Integer lattice coordinates (n,) -> (int32 words, int64 word offsets (n_blocks+1,), uint8 ks).

    Processes ``chunk_values`` coordinates at a time to bound memory (the torch code; the CPU kernels of
    :mod:`.cpu_kernels` work block by block). The result does not depend on it.
    """
    if cpu_kernels.usable(c):
        out = cpu_kernels.encode_coords(c, lattice, block_values)
        if out is not None:
            return out
    c = c.reshape(-1)
    if c.numel() and int(c.abs().max()) > MAX_ABS_COORD:
        raise ValueError(f"lattice coordinate magnitude exceeds {MAX_ABS_COORD}: step size far too small")
    lay = _layout(c.numel(), lattice, block_values, c.device)  # validates the geometry before any work
    if lay["spec"].name == "D4" and c.numel() and bool((c.reshape(-1, 4).to(torch.int64).sum(1) & 1).any()):
        raise ValueError("not D4 points: a vector of four coordinates has an odd sum")
    ks = choose_ks(c, lattice, block_values)
    per_chunk = max(1, chunk_values // block_values) * block_values
    all_words, all_offsets, base = [], [torch.zeros(1, dtype=torch.int64, device=c.device)], 0
    empty = torch.zeros(0, dtype=torch.uint8, device=c.device)
    for s in range(0, c.numel(), per_chunk):
        cc = c[s: s + per_chunk]
        b0 = s // block_values
        sub = _layout(cc.numel(), lattice, block_values, c.device)
        nbs = sub["nb"]
        if sub["ranked"]:
            r, k_shift, esc = _rank_symbols(cc, lattice)
            k_eff = _k_eff(ks[b0: b0 + nbs], sub, k_shift, block_values)
            blk = torch.arange(r.numel(), device=c.device) // sub["per"]
            tail_counts = torch.zeros(nbs, dtype=torch.int64, device=c.device).index_add_(
                0, blk, esc.to(torch.int64) * (2 * ESCAPE_BITS))
            words, off = encode_blocks(r, k_eff, sub["sym_counts"], empty, sub["head_counts"], _pair_bits(cc, esc),
                                       tail_counts)
        else:
            parity, m, k_shift, present, sign = _symbols(cc, lattice)
            k_eff = _k_eff(ks[b0: b0 + nbs], sub, k_shift, block_values)
            blk = torch.arange(cc.numel(), device=c.device) // block_values
            tail_counts = torch.zeros(nbs, dtype=torch.int64, device=c.device).index_add_(
                0, blk, present.to(torch.int64))
            words, off = encode_blocks(m, k_eff, sub["counts"], parity, sub["head_counts"], sign[present],
                                       tail_counts)
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
        if sub["ranked"]:
            out.append(_rank_decode(bits, starts, ends, ks[b0:b1], sub, block_values))
        else:
            out.append(_e8_decode(bits, starts, ends, ks[b0:b1], sub, block_values))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int32, device=words.device)


def _e8_decode(bits: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, ks: torch.Tensor, sub: dict,
               block_values: int) -> torch.Tensor:
    """Decode E8 blocks (parity head, magnitudes, signs) -> int32 coordinates (n,)."""
    dev = bits.device
    nb, nvals, d = sub["nb"], int(sub["counts"].sum()), 8
    # k shifts depend on parity, which lives in the head: read the heads first
    k_shift = torch.zeros(nvals, dtype=torch.int64, device=dev)
    hc = sub["head_counts"]
    hidx = torch.repeat_interleave(torch.arange(nb, device=dev), hc)
    hrank = torch.arange(hidx.numel(), device=dev) - (torch.cumsum(hc, 0) - hc)[hidx]
    if bool((starts + hc > ends).any()):
        raise RiceStreamError("block too short for its parity bits")
    parity_pre = bits[starts[hidx] + hrank]
    k_shift.view(-1, 8)[:, 7] = torch.where(parity_pre == 0, -1, 0)
    k_eff = _k_eff(ks, sub, k_shift, block_values)
    head, m, tail_start = decode_blocks(bits, starts, ends, sub["counts"], k_eff, hc)
    g = m.view(-1, d)
    mag = g.clone()
    par = head.to(torch.int64)
    even = par == 0
    mag[:, 7] = torch.where(even, 2 * g[:, 7] + (g[:, :7].sum(1) & 1), g[:, 7])
    present = (mag != 0) | (~even).unsqueeze(1)
    present[:, 7] &= even
    present = present.reshape(-1)
    blk = torch.arange(nvals, device=dev) // block_values
    pi = present.to(torch.int64)
    cs = torch.cumsum(pi, 0) - pi
    first = cs[(torch.arange(nb, device=dev) * block_values)]
    spos = tail_start[blk] + cs - first[blk]
    sel = present.nonzero().squeeze(1)
    if sel.numel():
        sp = spos[sel]
        if bool((sp >= ends[blk[sel]]).any()):
            raise RiceStreamError("sign section runs past the end of its block")
    neg = torch.zeros(nvals, dtype=torch.bool, device=dev)
    neg[sel] = bits[spos[sel]].bool() if sel.numel() else neg[sel]
    neg = neg.view(-1, d)
    val = 2 * mag + par.unsqueeze(1)
    odd = par == 1
    n_neg = neg[:, :7].sum(1)
    neg7 = ((mag.sum(1) - n_neg) & 1).bool()
    neg[:, 7] = torch.where(odd, neg7, neg[:, 7])
    c = torch.where(neg, -val, val)
    return c.reshape(-1).to(torch.int32)


def _rank_decode(bits: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, ks: torch.Tensor, sub: dict,
                 block_values: int) -> torch.Tensor:
    """Decode rank-coded blocks (ranks, then the raw coordinates of escaped pairs) -> int32 coordinates (n,)."""
    dev = bits.device
    name = sub["spec"].name
    kinds = _RANK_KINDS[name]
    nb, per = sub["nb"], sub["per"]
    n_sym = int(sub["sym_counts"].sum())
    k_eff = _k_eff(ks, sub, _pattern(_RANK_SHIFTS[name], n_sym, dev), block_values)
    _, r, tail_start = decode_blocks(bits, starts, ends, sub["sym_counts"], k_eff, sub["head_counts"])
    esc_r = _pattern(tuple(escape_rank(k) for k in kinds), n_sym, dev)
    if bool((r > esc_r).any()):
        raise RiceStreamError(f"{name} rank beyond the escape rank: malformed stream")
    esc = r == esc_r
    blk = torch.arange(n_sym, device=dev) // per
    ei = esc.to(torch.int64)
    cs = torch.cumsum(ei, 0) - ei
    first = cs[torch.arange(nb, device=dev) * per]
    n_esc = torch.zeros(nb, dtype=torch.int64, device=dev).index_add_(0, blk, ei)
    if bool((tail_start + n_esc * 2 * ESCAPE_BITS > ends).any()):
        raise RiceStreamError(f"{name} escaped coordinates run past the end of their block")
    raw = torch.zeros(n_sym, 2, dtype=torch.int64, device=dev)
    sel = esc.nonzero().squeeze(1)
    if sel.numel():
        pos = tail_start[blk[sel]] + (cs[sel] - first[blk[sel]]) * (2 * ESCAPE_BITS)
        v = read_fields(bits, torch.stack((pos, pos + ESCAPE_BITS), 1).reshape(-1),
                        torch.full((2 * sel.numel(),), ESCAPE_BITS, dtype=torch.int64, device=dev))
        raw[sel] = torch.where(v >= (1 << (ESCAPE_BITS - 1)), v - (1 << ESCAPE_BITS), v).view(-1, 2)
    nk = len(kinds)
    rv, ev, rawv = r.view(-1, nk), esc.view(-1, nk), raw.view(-1, nk, 2)
    cols, coset = [], None
    for j, kind in enumerate(kinds):
        rj, ej = rv[:, j], ev[:, j]
        if kind == "Z2coset":
            size = torch.tensor(table_sizes(kind), dtype=torch.int64, device=dev)[coset]
            if bool((~ej & (rj >= size)).any()):
                raise RiceStreamError(f"{name} rank beyond its coset's table: malformed stream")
        # escaped symbols decode to table entry 0 here and are overwritten with their raw pair below
        cj = unrank_points(torch.where(ej, 0, rj), kind, coset).to(torch.int64)
        if sel.numel():
            ei_j = ej.nonzero().squeeze(1)
            if ei_j.numel():
                pj = rawv[ei_j, j]
                bad = rank_points(pj, kind) != escape_rank(kind)
                if kind == "A2":
                    bad |= ((pj[:, 0] - pj[:, 1]) & 1) != 0
                if kind == "Z2coset":
                    bad |= ((pj[:, 0] + pj[:, 1]) & 1) != coset[ei_j]
                if bool(bad.any()):
                    what = "an A2 point" if kind == "A2" else "a pair"
                    raise RiceStreamError(f"escaped {name} point is not {what} outside the rank table: "
                                          f"malformed stream")
                cj[ei_j] = pj
        cols.append(cj)
        coset = (cj[:, 0] + cj[:, 1]) & 1
    return torch.stack(cols, 1).reshape(-1).to(torch.int32)


def index_entropy_bits(c: torch.Tensor, lattice: str) -> float:
    """Empirical zeroth-order entropy of the coded symbols of ``c``, in bits (total, not per value).

    The Rice stream's length minus this is the Rice code's overhead over an ideal memoryless entropy coder of the
    same symbols. A2, Z: the entropy of the pair ranks (= of the pairs), plus the raw bits of escaped pairs.
    D4: the entropy of the first pairs' ranks plus the conditional entropy of the second pairs' coset ranks given
    the coset (which the decoder knows from the first pair), i.e. H(pair 1) + H(pair 2 | parity of pair 1), plus
    raw escape bits. E8: parity bits and each coordinate class's magnitudes (stripped magnitudes separately) by
    their empirical entropy, sign bits at one bit each (they are equiprobable).
    """
    spec = lattice_spec(lattice)
    c = c.reshape(-1)

    def h(x: torch.Tensor) -> float:
        if x.numel() == 0:
            return 0.0
        _, cnt = torch.unique(x, return_counts=True)
        p = cnt.double() / cnt.sum()
        return float(-(p * p.log2()).sum()) * x.numel()

    if spec.name in _RANK_KINDS:
        r, _, esc = _rank_symbols(c, lattice)
        raw = float(esc.sum()) * 2 * ESCAPE_BITS
        if spec.name != "D4":
            return h(r) + raw
        g = c.reshape(-1, 4).to(torch.int64)
        par = (g[:, 0] + g[:, 1]) & 1
        rv = r.view(-1, 2)
        return h(rv[:, 0]) + h(2 * rv[:, 1] + par) - h(par) + raw
    parity, m, k_shift, present, _ = _symbols(c, lattice)
    total = h(parity) + float(present.sum())
    for sh in (0, -1):
        total += h(m[k_shift == sh])
    return total


def vector_bits(c: torch.Tensor, lattice: str, ks: torch.Tensor, block_values: int) -> torch.Tensor:
    """Bits each coding unit of ``c`` (n,) costs in the block stream with Rice parameters ``ks``.

    The unit is the lattice vector (A2 point, D4 or E8 vector), except for Z, whose unit is a coordinate *pair*
    (Z pairs are coded jointly). Returns int64 (n // 2) for Z, (n // dim) otherwise: A2, Z, D4: the Rice-coded
    ranks plus the raw coordinates of escaped pairs; E8: Rice-coded magnitudes + sign bits + the parity bit.
    Block word padding is not attributed to units.
    """
    spec = lattice_spec(lattice)
    c = c.reshape(-1)
    lay = _layout(c.numel(), lattice, block_values, c.device)
    if lay["ranked"]:
        bits = _rank_symbol_bits(c, ks, lay, block_values)[2]
        return bits.view(-1, len(_RANK_KINDS[spec.name])).sum(1)
    _, m, k_shift, present, _ = _symbols(c, lattice)
    cost = rice_cost(m, _k_eff(ks, lay, k_shift, block_values)) + present.to(torch.int64)
    return cost.view(-1, spec.dim).sum(1) + 1
