"""Fast GPU quantization of many weights: same-shape layers are stacked and quantized in one codec call.

``codec.quantize`` on one layer spends most of its time in fixed per-call work (a step-size search on a sample
of rows, dozens of small kernel launches and host syncs per iteration), not in proportion to the layer's size.
A transformer has hundreds of layers of a few shapes (LTX-2: 389 of 4096x4096, 581 of 2048x2048), so this module
concatenates the rows of up to ``max_values`` weights of one shape, quantizes them with the codec once, and splits
the result back into one ``LatticeTensor`` per layer. The split is exact because a Rice block never straddles
two layers when ``out * in`` is a multiple of ``block_values``: each layer gets its blocks' words, their offsets
rebased to 0, their ks, and its rows' step sizes; its stream decodes with the codec's own decoder.

Difference from per-layer ``quantize``: the rate search's single multiplier ``alpha`` (on top of the per-row
RMS step) is shared by the stacked layers, so the bit rate is on target for the group as a whole and each
layer's own rate lands near it (RHT'd weights of one shape have nearly the same normalized distribution);
``bench/bench_ltx2_full.py`` reports the realized bits per scalar.
"""

from __future__ import annotations

import torch

from hyperquant_diffusers.codec import LatticeTensor, quantize
from hyperquant_diffusers.codec.constants import DEFAULT_BLOCK_VALUES, DEFAULT_GROUP_VALUES, DEFAULT_TILE, GPU_ENCODE_CHUNK

#: coordinates per encode_coords chunk for stacked groups (see codec.constants.GPU_ENCODE_CHUNK)
ENCODE_CHUNK = GPU_ENCODE_CHUNK


def split_stacked(q: LatticeTensor, n_layers: int) -> list[LatticeTensor]:
    """Split a LatticeTensor of ``n_layers`` stacked (N, K) weights (shape (n_layers * N, K)) into per-layer ones."""
    rows, k = q.rows, q.in_features
    if rows % n_layers:
        raise ValueError(f"{rows} rows do not split into {n_layers} layers")
    n = rows // n_layers
    per = n * k
    if per % q.block_values:
        raise ValueError(f"a layer of {n}x{k} values is not a whole number of {q.block_values}-value blocks")
    nbl = per // q.block_values
    offs = q.offsets.to(torch.int64)
    out = []
    for i in range(n_layers):
        b0, b1 = i * nbl, (i + 1) * nbl
        w0, w1 = int(offs[b0]), int(offs[b1])
        out.append(LatticeTensor((n, k), q.dtype, q.lattice, q.tile_size, q.block_values, q.seed, q.step_mode,
                                 q.signs, q.scales[i * n:(i + 1) * n].contiguous(), q.words[w0:w1].clone(),
                                 (offs[b0:b1 + 1] - w0).contiguous(), q.ks[b0:b1].contiguous()))
    return out


def quantize_many(weights: list[torch.Tensor], *, bits: float, lattice: str = "E8", tile_size: int = DEFAULT_TILE,
                  seed: int = 0, rht_signs: str = "tiled", block_values: int = DEFAULT_BLOCK_VALUES,
                  max_values: int = DEFAULT_GROUP_VALUES, encode_chunk: int = ENCODE_CHUNK) -> list[LatticeTensor]:
    """Quantize same-shape 2-D weights in stacked groups of at most ``max_values`` values; one LatticeTensor
    per weight, in order. Weights whose size is not a whole number of blocks are quantized one by one."""
    if not weights:
        return []
    shape = tuple(weights[0].shape)
    if any(tuple(w.shape) != shape for w in weights) or len(shape) != 2:
        raise ValueError("quantize_many takes 2-D weights of one shape")
    kw = dict(bits=bits, lattice=lattice, tile_size=tile_size, seed=seed, rht_signs=rht_signs,
              block_values=block_values)

    def stack(g0: int, g1: int) -> torch.Tensor:
        chunk = weights[g0:g1]
        return torch.cat([w.detach() for w in chunk], 0) if len(chunk) > 1 else chunk[0].detach()

    return _quantize_groups(shape, len(weights), stack, max_values, encode_chunk, kw)


def quantize_filled(shape: tuple[int, int], count: int, fill, *, device: torch.device | str,
                    dtype: torch.dtype = torch.float32, bits: float, lattice: str = "E8",
                    tile_size: int = DEFAULT_TILE, seed: int = 0, rht_signs: str = "tiled",
                    block_values: int = DEFAULT_BLOCK_VALUES, max_values: int = DEFAULT_GROUP_VALUES,
                    encode_chunk: int = ENCODE_CHUNK) -> list[LatticeTensor]:
    """:func:`quantize_many` of ``count`` weights of ``shape`` (N, K) that exist only when asked for: ``fill(i,
    out)`` writes weight ``i`` into ``out``, an (N, K) ``dtype`` view of its group's stacked buffer on ``device``.
    A group then costs its one buffer: no weight waits beside it as a tensor of its own, and no concatenation
    copies them (a LoRA merge computes its ``W_hat + dW`` this way: ``nn.lora``). Same groups, same codes as
    :func:`quantize_many` of the weights ``fill`` writes."""
    if len(shape) != 2 or isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"quantize_filled takes a 2-D shape and a count >= 0, got {shape!r} and {count!r}")
    kw = dict(bits=bits, lattice=lattice, tile_size=tile_size, seed=seed, rht_signs=rht_signs,
              block_values=block_values)
    n = shape[0]

    def stack(g0: int, g1: int) -> torch.Tensor:
        buf = torch.empty((g1 - g0) * n, shape[1], dtype=dtype, device=device)
        for i in range(g0, g1):
            fill(i, buf[(i - g0) * n:(i - g0 + 1) * n])
        return buf

    return _quantize_groups(tuple(shape), count, stack, max_values, encode_chunk, kw)


def _quantize_groups(shape: tuple[int, int], count: int, stack, max_values: int, encode_chunk: int,
                     kw: dict) -> list[LatticeTensor]:
    # stack(g0, g1): the (g1 - g0) weights g0..g1-1 as one (rows, K) tensor; its memory is released per group
    per = shape[0] * shape[1]
    if per % kw["block_values"]:      # blocks would straddle weights: one codec call each
        return [quantize(stack(i, i + 1), **kw) for i in range(count)]
    group = max(1, max_values // per)
    out: list[LatticeTensor] = []
    hint = None  # the previous group's step multiplier: same shape, same distribution, so the search starts there
    for g0 in range(0, count, group):
        g1 = min(count, g0 + group)
        stacked = stack(g0, g1)
        q = quantize(stacked, chunk_values=encode_chunk, alpha_hint=hint, pieces=g1 - g0, **kw)
        hint = q.search_alpha
        del stacked
        out.extend(split_stacked(q, g1 - g0))
    return out
