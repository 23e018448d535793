"""``quantize`` and ``LatticeTensor``: a tensor stored as RHT -> lattice -> Rice-coded blocks."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import torch

from . import cpu_kernels
from .constants import (BLOB_MAGIC, DEFAULT_BLOCK_VALUES, DEFAULT_TILE, FORMAT_VERSION, LATTICES, MAX_BLOCK_VALUES,
                        MIN_BLOCK_VALUES, RHT_SIGN_MODES, check_bits, check_tile_size, lattice_spec)
from .hadamard import inverse_rht, random_signs, rht
from .lattices import coords_to_points
from .rdo import rd_lambda, rd_nearest_point
from .side import decode_side, encode_side, log8_steps, side_nbytes
from .stream import code_floor_bits, decode_coords, encode_coords, stream_bits


class FormatError(ValueError):
    """A serialized LatticeTensor is truncated, inconsistent, or of another format version."""


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_STEP_MODES = ("row", "tensor")
#: Rows sampled (at most) while searching the step size; the search needs ~1e5 values to measure rate to
#: ~0.005 bits per scalar.
_SEARCH_VALUES = 1 << 18


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"cannot quantize a tensor of dtype {dtype}; use a floating-point tensor")


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """±1 / bool (K,) with K % 8 == 0 -> packed uint8 (K/8,), bit j of byte i = signs[8i+j] < 0."""
    neg = (signs < 0) if signs.dtype != torch.bool else signs
    w = (1 << torch.arange(8, device=neg.device, dtype=torch.int32))
    return (neg.reshape(-1, 8).to(torch.int32) * w).sum(1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: float32 ±1 (8 * len,)."""
    bits = (packed.to(torch.int32).unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1
    return 1.0 - 2.0 * bits.reshape(-1).to(torch.float32)


def _metadata(shape, dtype, lattice, tile_size, block_values, seed, step_mode, n_words) -> dict:
    return {
        "format": "hyperquant-lattice-tensor",
        "format_version": FORMAT_VERSION,
        "shape": list(shape),
        "dtype": _dtype_name(dtype),
        "lattice": lattice,
        "tile_size": tile_size,
        "block_values": block_values,
        "seed": seed,
        "step_mode": step_mode,
        "n_words": int(n_words),
    }


@dataclass
class LatticeTensor:
    """A floating-point tensor compressed with HyperQuant.

    The tensor, viewed as ``rows = numel // K`` rows of ``K`` (its last dimension) values, is rotated by the
    per-tile RHT along K, divided by a per-row step size ``scales`` (float32, weight units), mapped to the
    nearest lattice point, and the point's integer coordinates are stored as Rice-coded blocks.

    Fields: ``shape``/``dtype`` of the original; ``lattice`` name; ``tile_size`` (RHT tile, values);
    ``block_values`` (coordinates per Rice block); ``seed`` (of the RHT signs); ``signs`` float32 ±1 (K,);
    ``scales`` float32 (rows,); ``words`` int32 Rice stream; ``offsets`` int64 (n_blocks+1,) word offset of each
    block; ``ks`` uint8 (n_blocks, classes) Rice parameters.
    """

    shape: tuple
    dtype: torch.dtype
    lattice: str
    tile_size: int
    block_values: int
    seed: int
    step_mode: str
    signs: torch.Tensor
    scales: torch.Tensor
    words: torch.Tensor
    offsets: torch.Tensor
    ks: torch.Tensor
    _coords_cache: torch.Tensor | None = field(default=None, repr=False, compare=False)

    # ---- geometry -------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def in_features(self) -> int:
        return int(self.shape[-1])

    @property
    def rows(self) -> int:
        return self.numel // self.in_features

    @property
    def device(self) -> torch.device:
        return self.words.device

    # ---- sizes ----------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        """JSON-serializable description (everything but the arrays)."""
        return _metadata(self.shape, self.dtype, self.lattice, self.tile_size, self.block_values, self.seed,
                         self.step_mode, int(self.words.numel()))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The arrays in their in-memory form, as checkpoints of ``LatticeLinear`` hold them: packed signs uint8,
        scales float32, ks uint8, offsets int32, words int32 (all contiguous, on this tensor's device).
        :meth:`to_bytes` stores scales, ks and offsets in smaller exact forms (:mod:`.side`)."""
        if int(self.offsets[-1]) >= 2**31:
            raise ValueError("stream too large for int32 offsets; quantize the tensor in pieces")
        return {
            "signs": pack_signs(self.signs),
            "scales": self.scales.contiguous(),
            "ks": self.ks.contiguous(),
            "offsets": self.offsets.to(torch.int32),
            "words": self.words.contiguous(),
        }

    def _blob_side(self) -> tuple[dict, list[bytes]]:
        """(layout, payloads) of the side arrays as :meth:`to_bytes` stores them (see :mod:`.side`)."""
        return encode_side(self.scales, self.ks, self.offsets)

    def _blob_header(self, layout: dict | None = None) -> bytes:
        layout = self._blob_side()[0] if layout is None else layout
        return json.dumps({**self.metadata(), "layout": layout}, sort_keys=True).encode()

    @property
    def nbytes(self) -> int:
        """Exact size of :meth:`to_bytes`' output, in bytes (header, every side field, stream)."""
        layout = self._blob_side()[0]
        nb = int(self.offsets.numel()) - 1
        return (len(BLOB_MAGIC) + 6 + len(self._blob_header(layout)) + self.in_features // 8
                + side_nbytes(layout, self.scales.numel(), nb, self.ks.shape[1]) + 4 * self.words.numel())

    @property
    def bits_per_scalar(self) -> float:
        """Total stored bits (Rice stream + every side field + header) per original value."""
        return self.nbytes * 8.0 / self.numel

    @property
    def stream_bits_per_scalar(self) -> float:
        """Bits of the Rice block stream alone (with word padding) per value."""
        return self.words.numel() * 32.0 / self.numel

    # ---- decoding -------------------------------------------------------------------------------------
    def decode_coords(self) -> torch.Tensor:
        """Lattice coordinates of the rotated, step-normalized tensor: int32 (rows, K) (see ``lattices``)."""
        c = decode_coords(self.words, self.offsets, self.ks, self.numel, self.lattice, self.block_values)
        return c.reshape(self.rows, self.in_features)

    def rotated(self, dtype=torch.float32) -> torch.Tensor:
        """RHT(original) as reconstructed: (rows, K) in ``dtype``, before the inverse transform."""
        pts = coords_to_points(self.lattice, self.decode_coords(), dtype=dtype)
        return pts * self.scales.to(dtype).unsqueeze(1)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reconstruction with the original shape; dtype of the original unless given."""
        y = self.rotated(torch.float32)
        w = inverse_rht(y, self.signs, self.tile_size)
        return w.reshape(self.shape).to(dtype or self.dtype)

    def int8_codes(self, on_overflow: str = "error") -> tuple[torch.Tensor, torch.Tensor]:
        """Codes for the int8 tensor-core path: (int8 (rows, K), float32 scale (rows,)).

        ``codes * scale[:, None]`` approximates ``rotated()``. For Z, D4 and E8 (E8 stored doubled) the
        coordinates are integers, so the cast is exact while every |c| <= 127. A row whose coordinates do
        not fit is, with ``on_overflow="rescale"``, divided by the smallest power of two that fits (rounded,
        its scale multiplied back: a lossy row, counted in ``self.last_int8_rescaled_rows``); with
        ``"error"`` (default) a ``ValueError`` names how many rows overflow. A2's second axis is irrational
        (√3/2 steps), so A2 codes are the points rounded on a per-row grid spanning ±127: this adds
        rounding noise of variance (grid step)^2 / 12 per value, which ``bench`` measures.
        """
        if on_overflow not in ("error", "rescale"):
            raise ValueError(f"on_overflow must be 'error' or 'rescale', got {on_overflow!r}")
        c = self.decode_coords()
        spec = lattice_spec(self.lattice)
        self.last_int8_rescaled_rows = 0
        if spec.name == "A2":
            pts = coords_to_points("A2", c, dtype=torch.float32)
            peak = pts.abs().amax(1).clamp_min(1e-30)
            grid = peak / 127.0
            codes = torch.round(pts / grid.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
            return codes, (grid * self.scales).to(torch.float32)
        unit = 0.5 if spec.name == "E8" else 1.0
        scale = self.scales.to(torch.float32) * unit
        peak = c.abs().amax(1)
        over = peak > 127
        if bool(over.any()):
            if on_overflow == "error":
                raise ValueError(
                    f"{int(over.sum())} of {self.rows} rows have lattice coordinates beyond ±127 (max "
                    f"{int(peak.max())}); the int8 cast would clip them. Use fewer bits, on_overflow='rescale' "
                    f"(lossy on those rows), or the fp16/bf16 path")
            shift = torch.ceil(torch.log2(peak.to(torch.float64) / 127.0)).clamp_min(0).to(torch.int64)
            shift = torch.where(over, shift, torch.zeros_like(shift))
            div = (2 ** shift).to(torch.float32).unsqueeze(1)
            c = torch.where(over.unsqueeze(1), torch.round(c.to(torch.float32) / div).to(torch.int32), c)
            scale = scale * div.squeeze(1)
            self.last_int8_rescaled_rows = int(over.sum())
        return c.clamp(-127, 127).to(torch.int8), scale

    # ---- serialization --------------------------------------------------------------------------------
    def to(self, device) -> "LatticeTensor":
        return LatticeTensor(self.shape, self.dtype, self.lattice, self.tile_size, self.block_values, self.seed,
                             self.step_mode, self.signs.to(device), self.scales.to(device), self.words.to(device),
                             self.offsets.to(device), self.ks.to(device))

    def to_bytes(self) -> bytes:
        """Versioned, self-describing blob: magic, u16 version, u32 header length, JSON header (with the side
        arrays' ``layout``), then packed signs (uint8), row steps, ks, block lengths/offsets (compact forms, see
        :mod:`.side`), words (int32); little-endian."""
        layout, side = self._blob_side()
        header = self._blob_header(layout)
        signs = pack_signs(self.signs.detach().cpu()).numpy().tobytes()
        words = self.words.detach().cpu().contiguous().numpy().astype("<i4").tobytes()
        return b"".join([BLOB_MAGIC, struct.pack("<HI", FORMAT_VERSION, len(header)), header, signs, *side, words])

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "LatticeTensor":
        """Rebuild from :meth:`metadata` and :meth:`state_tensors`; validates version and every size."""
        if meta.get("format") != "hyperquant-lattice-tensor":
            raise FormatError("not a HyperQuant lattice tensor")
        ver = meta.get("format_version")
        if ver != FORMAT_VERSION:
            raise FormatError(f"lattice tensor format version {ver} is not supported by this hyperquant-diffusers "
                              f"(reads version {FORMAT_VERSION}); re-quantize or use the matching release")
        try:
            shape = tuple(int(s) for s in meta["shape"])
            dtype = _DTYPES[meta["dtype"]]
            spec = lattice_spec(meta["lattice"])
            tile = check_tile_size(meta["tile_size"])
            bv = int(meta["block_values"])
        except (KeyError, ValueError, TypeError) as e:
            raise FormatError(f"bad lattice tensor header: {e}") from None
        numel = int(math.prod(shape))
        k = shape[-1]
        rows = numel // k
        nb = (numel + bv - 1) // bv
        expect = {"signs": (k // 8,), "scales": (rows,), "ks": (nb, spec.classes), "offsets": (nb + 1,),
                  "words": (int(meta["n_words"]),)}
        for name, shp in expect.items():
            t = tensors.get(name)
            if t is None:
                raise FormatError(f"lattice tensor is missing its '{name}' array")
            if tuple(t.shape) != shp:
                raise FormatError(f"lattice tensor array '{name}' has shape {tuple(t.shape)}, expected {shp}")
        offsets = tensors["offsets"].to(torch.int64)
        if int(offsets[0]) != 0 or int(offsets[-1]) != int(meta["n_words"]) or bool((offsets[1:] < offsets[:-1]).any()):
            raise FormatError("lattice tensor block offsets are inconsistent with its stream")
        return cls(shape, dtype, spec.name, tile, bv, int(meta["seed"]), meta.get("step_mode", "row"),
                   unpack_signs(tensors["signs"]).to(tensors["scales"].device), tensors["scales"].to(torch.float32),
                   tensors["words"].to(torch.int32), offsets, tensors["ks"].to(torch.uint8))

    @classmethod
    def from_bytes(cls, blob: bytes) -> "LatticeTensor":
        """Inverse of :meth:`to_bytes`; raises ``FormatError`` on another version or a truncated blob."""
        import numpy as np

        blob = bytes(blob)
        if len(blob) < 10 or blob[:4] != BLOB_MAGIC:
            raise FormatError("not a HyperQuant lattice tensor blob (bad magic)")
        ver, hlen = struct.unpack("<HI", blob[4:10])
        if ver != FORMAT_VERSION:
            raise FormatError(f"lattice tensor format version {ver} is not supported (this build reads "
                              f"version {FORMAT_VERSION})")
        if 10 + hlen > len(blob):
            raise FormatError("truncated lattice tensor blob (header)")
        try:
            meta = json.loads(blob[10:10 + hlen])
        except ValueError as e:
            raise FormatError(f"corrupt lattice tensor header: {e}") from None
        try:
            shape = [int(s) for s in meta["shape"]]
            numel = int(math.prod(shape))
            spec = lattice_spec(meta["lattice"])
            bv = int(meta["block_values"])
            layout = meta["layout"]
            nb = (numel + bv - 1) // bv
            n_words = int(meta["n_words"])
            k = shape[-1]
        except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
            raise FormatError(f"bad lattice tensor header: {e!r}") from None
        pos = 10 + hlen
        if pos + k // 8 > len(blob):
            raise FormatError("truncated lattice tensor blob (array 'signs')")
        tensors = {"signs": torch.from_numpy(np.frombuffer(blob, np.uint8, k // 8, pos).copy())}
        pos += k // 8
        tensors["scales"], tensors["ks"], tensors["offsets"], pos = decode_side(
            layout, blob, pos, numel // k, nb, spec.classes, FormatError)
        if pos + 4 * n_words > len(blob):
            raise FormatError("truncated lattice tensor blob (array 'words')")
        tensors["words"] = torch.from_numpy(np.frombuffer(blob, "<i4", n_words, pos).astype(np.int32))
        pos += 4 * n_words
        if pos != len(blob):
            raise FormatError(f"lattice tensor blob has {len(blob) - pos} trailing bytes")
        return cls.from_state(meta, tensors)


# ---- quantization ---------------------------------------------------------------------------------------

_GAUSS_H = 0.5 * math.log2(2 * math.pi * math.e)  # differential entropy of N(0,1), bits


def _check_input(w: torch.Tensor, tile_size: int) -> torch.Tensor:
    if not torch.is_tensor(w) or not w.is_floating_point():
        raise ValueError("quantize expects a floating-point torch tensor")
    if w.dim() == 0 or w.numel() == 0:
        raise ValueError("quantize expects a non-empty tensor with at least one dimension")
    k = w.shape[-1]
    if k % tile_size:
        raise ValueError(
            f"last dimension {k} is not divisible by tile_size {tile_size}: pad the input features to a multiple "
            f"of {tile_size} (zero columns), choose a tile that divides {k}, or leave this tensor unquantized")
    w32 = w.detach().reshape(-1, k).to(torch.float32)
    lo, hi = torch.aminmax(w32)  # NaN propagates into both; no per-value mask
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError("cannot quantize a tensor with NaN or infinite values")
    return w32


def _sample_rows(y: torch.Tensor) -> torch.Tensor:
    rows = y.shape[0]
    want = max(1, min(rows, _SEARCH_VALUES // y.shape[1]))
    if want >= rows:
        return torch.arange(rows, device=y.device)
    return torch.linspace(0, rows - 1, want, device=y.device).round().to(torch.int64).unique()


def _side_bits(rows: int, k: int, lattice: str, block_values: int, header_bytes: int = 256) -> float:
    """Bits of every side field for a tensor of this geometry as ``to_bytes`` stores it in the usual case:
    magic, version and header (``header_bytes`` of JSON), packed RHT signs, and the side arrays in their
    compact forms (:mod:`.side`: log8 steps, u4 ks, len8 block lengths). Word padding is not a side field here:
    :func:`.stream.stream_bits` counts it with the stream."""
    spec = lattice_spec(lattice)
    nb = (rows * k + block_values - 1) // block_values
    layout = {"scales": "log8", "ks": "u4", "offsets": "len8"}
    return 8 * (len(BLOB_MAGIC) + 6 + header_bytes + side_nbytes(layout, rows, nb, spec.classes)) + k


def _piecewise(fn, x: torch.Tensor, pieces: int) -> torch.Tensor:
    return fn(x) if pieces == 1 else torch.cat([fn(p) for p in x.chunk(pieces)])


def _encode_rows(lattice: str, y: torch.Tensor, steps: torch.Tensor, block_values: int, rdo: bool,
                 chunk_values: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch path's last pass: lattice points of ``y / steps`` (``y`` (rows, K) float32 RHT'd weights,
    ``steps`` (rows,) float32) and their Rice streams, as ``encode_coords`` returns them (int32 words, int64 word
    offsets (n_blocks+1,), uint8 ks).

    Runs on ~``chunk_values`` values at a time, cut at whole Rice blocks. Points, symbols and bit costs take ~55
    bytes per value, so on a GPU a stacked group of 2^28 values (``kernels.quantize.quantize_many``) would otherwise
    need ~15 GiB beside the weights. Blocks are coded independently (a block's Rice parameters and its
    rate-distortion choices depend on that block alone), so the streams equal those of one pass.
    """
    rows, k = y.shape
    unit = block_values // math.gcd(k, block_values)  # fewest rows that hold whole blocks
    per = max(unit, (chunk_values // k) // unit * unit)
    if per >= rows:
        c = rd_nearest_point(lattice, y / steps.unsqueeze(1), block_values, rdo)
        return encode_coords(c.reshape(-1), lattice, block_values, chunk_values=chunk_values)
    words, offsets, ks, base = [], [torch.zeros(1, dtype=torch.int64, device=y.device)], [], 0
    for r0 in range(0, rows, per):
        c = rd_nearest_point(lattice, y[r0:r0 + per] / steps[r0:r0 + per].unsqueeze(1), block_values, rdo)
        w_, o_, k_ = encode_coords(c.reshape(-1), lattice, block_values, chunk_values=chunk_values)
        del c
        words.append(w_)
        offsets.append(o_[1:] + base)
        ks.append(k_)
        base += w_.numel()
    return torch.cat(words), torch.cat(offsets), torch.cat(ks)


def quantize(
    w: torch.Tensor,
    bits: float | None = 4.0,
    *,
    snr_db: float | None = None,
    lattice: str = "E8",
    tile_size: int = DEFAULT_TILE,
    seed: int = 0,
    rht_signs: str = "tiled",
    block_values: int = DEFAULT_BLOCK_VALUES,
    step_mode: str = "row",
    tol_bits: float = 0.002,
    rdo: bool = True,
    chunk_values: int = 1 << 21,
    alpha_hint: float | None = None,
    pieces: int = 1,
) -> LatticeTensor:
    """Quantize ``w`` (..., K) with HyperQuant; runs on ``w``'s device.

    Give ``bits`` (target total bits per scalar, all side information counted, in [1, 8]; a rate that leaves no
    more than ``stream.code_floor_bits`` after the side information is refused with a ValueError) or ``snr_db`` (target
    signal-to-noise ratio, dB) — if ``snr_db`` is given it wins. One step size per row (``step_mode="row"``,
    proportional to the row's RMS so every row gets the same SNR) or per tensor (``"tensor"``); a single
    multiplier is searched on a sample of rows so the whole tensor lands on the target. ``rdo`` picks each
    lattice point rate–distortion optimally for the Rice code (see :mod:`.rdo`) instead of the nearest one.
    ``chunk_values`` values per pass of the final point search and Rice coding (the torch code; the CPU kernels
    work block by block): larger is faster on a GPU, smaller needs less memory. The result does not depend on it.
    ``alpha_hint``: where the step-multiplier search starts (the ``search_alpha`` attribute of an earlier result on
    weights of the same distribution, e.g. the previous stacked group of one shape); the search still runs until
    the sampled rate is on target, it only needs fewer steps. The result carries ``search_alpha`` (not stored).
    ``rht_signs``: "tiled" (default; one tile's ``seed``-drawn signs repeated along K, which the GPU activation
    pass folds into its Hadamard operand) or "independent" (a sign per value); see ``constants.RHT_SIGN_MODES``.
    ``pieces``: the rows of ``w`` (2-D) are ``pieces`` stacked weights that will be split and stored as one blob
    each (``kernels.quantize.quantize_many``): the ``bits`` target then counts a header and RHT signs per piece,
    so each piece lands on ``bits`` as if quantized alone (else stacking small weights gives each piece the
    bits of the headers it no longer carries: 4.8 instead of 4 bps for 64x64 pieces).
    """
    spec = lattice_spec(lattice)
    if rht_signs not in RHT_SIGN_MODES:
        raise ValueError(f"rht_signs must be one of {RHT_SIGN_MODES}, got {rht_signs!r}")
    tile_size = check_tile_size(tile_size)
    if snr_db is None:
        if bits is None:
            raise ValueError("give bits or snr_db")
        bits = check_bits(bits)
    elif not math.isfinite(float(snr_db)) or not 0.0 < float(snr_db) < 60.0:
        raise ValueError(f"snr_db must be in (0, 60) dB, got {snr_db!r}")
    if step_mode not in _STEP_MODES:
        raise ValueError(f"step_mode must be one of {_STEP_MODES}, got {step_mode!r}")
    bv = int(block_values)
    if bv < MIN_BLOCK_VALUES or bv > MAX_BLOCK_VALUES or bv & (bv - 1):
        raise ValueError(f"block_values must be a power of two in [{MIN_BLOCK_VALUES}, {MAX_BLOCK_VALUES}], got {block_values}")
    w32 = _check_input(w, tile_size)
    rows, k = w32.shape
    if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1 or rows % pieces or (
            pieces > 1 and w.dim() != 2):
        raise ValueError(f"pieces must be a positive integer that divides the rows of a 2-D weight, got {pieces!r} "
                         f"for shape {tuple(w.shape)}")
    signs = random_signs(k, seed, period=tile_size if rht_signs == "tiled" else None).to(w32.device)
    y = rht(w32, signs, tile_size)
    del w32  # a float32 copy of the input (unless it was one): not needed past the RHT
    if step_mode == "row":
        sigma = y.square().mean(1).sqrt()
    else:
        sigma = y.square().mean().sqrt().expand(rows).clone()
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    # The stored row steps lie on a 1/16-octave grid (side.log8_steps): rho is sigma rounded to it (rho * alpha
    # is then on the grid for every alpha). The search runs on rows normalized by the exact sigma (unit RMS, so
    # a sample of rows measures the rate well) and corrects for the rounding: scaling a row's step by f changes
    # its rate by -log2(f) bits per value at high rate, so the whole tensor's rate moves by -grid_shift.
    # each piece on its own grid, based at its own smallest step, as if quantized alone (one shared base would
    # leave every other piece's steps off its blob's grid: stored as float32, 3 bytes more per row)
    rho = _piecewise(log8_steps, sigma, pieces)
    grid_shift = float(torch.log2(rho.double() / sigma.double()).mean())

    sample = _sample_rows(y)
    ys = y[sample] / sigma[sample].unsqueeze(1)
    n_s = ys.numel()
    vol = spec.volume ** (1.0 / spec.dim)

    def measure(alpha: float) -> float:
        c = rd_nearest_point(spec.name, ys / alpha, bv, rdo)
        if snr_db is not None:
            err = (ys - coords_to_points(spec.name, c) * alpha).square().sum()
            return 10.0 * math.log10(float(ys.square().sum()) / max(float(err), 1e-300))
        return stream_bits(c.reshape(-1), spec.name, bv) / n_s

    if snr_db is not None:
        # a row whose step is f times sigma * alpha gets f^2 times the noise: aim the search that much higher
        f2 = (rho.double() / sigma.double()).square()
        target = float(snr_db) + 10.0 * math.log10(float((sigma.double().square() * f2).sum() / sigma.double().square().sum()))
        # high-rate theory: D = G V^(2/d) alpha^2 per unit-variance value
        log_a = 0.5 * math.log2(10 ** (-target / 10.0) / (spec.nsm * vol**2))
        slope = -20.0 * math.log10(2.0)  # dB per doubling of alpha
        tol = 0.01
    else:
        # the header's exact length, up to the digits of n_words (guessed from the rate); one per piece
        shape = tuple(w.shape) if pieces == 1 else (rows // pieces, k)
        head = {**_metadata(shape, w.dtype, spec.name, tile_size, bv, int(seed), step_mode,
                            int(rows * k * bits / 32 / pieces)),
                "layout": {"scales": "log8", "ks": "u4", "offsets": "len8", "scale_base": 0.0123456789, "len_base": 999}}
        header_bytes = len(json.dumps(head, sort_keys=True).encode())
        target = bits - pieces * _side_bits(rows // pieces, k, spec.name, bv, header_bytes) / (rows * k)
        side_bps = bits - target
        if target <= 0.05:
            raise ValueError(f"a {rows}x{k} tensor is too small for {bits} bits per scalar: its side information "
                             f"alone takes {side_bps:.2f}; leave it unquantized")
        target += grid_shift
        log_a = _GAUSS_H - target - math.log2(vol)
        slope = -1.0
        # a small tensor's rate is dominated by side fields and sampling noise; 0.01 bps is as close as it matters
        tol = tol_bits if rows * k >= _SEARCH_VALUES else max(tol_bits, 0.01)
        # land in [target - tol, target] (on the sampled rows) rather than around it: never above the request
        target -= 0.5 * tol
        tol *= 0.5
        floor = code_floor_bits(spec.name, bv)
        if target - tol <= floor:
            # no step reaches it: the rate falls toward the all-zero stream's as the step grows
            raise ValueError(
                f"{bits} bits per scalar is too few for a {rows}x{k} tensor with {spec.name}: its side information "
                f"takes {side_bps:.2f} and Rice-coded {spec.name} coordinates at least {floor:.3f} more (every "
                f"coordinate zero); ask for more than {side_bps + floor:.2f} bits"
                + ("" if floor <= min(code_floor_bits(n, bv) for n in LATTICES) else
                   ", use a pair-coded lattice (Z, D4 or A2: at least 0.5)") + ", or leave it unquantized")
    if alpha_hint is not None:
        if not (math.isfinite(float(alpha_hint)) and float(alpha_hint) > 0):
            raise ValueError(f"alpha_hint must be a positive finite number, got {alpha_hint!r}")
        log_a = math.log2(float(alpha_hint))
    # Secant search on log2(alpha). Rate and SNR both fall as alpha grows, so f > 0 means alpha is too small;
    # the bracket [lo, hi] keeps a wild secant step from leaving the region where the root lies.
    lo = hi = None
    f_prev = x_prev = None
    for _ in range(30):
        f = measure(2.0 ** log_a) - target
        if abs(f) <= tol:
            break
        if f > 0:
            lo = log_a
        else:
            hi = log_a
        if f_prev is not None and f != f_prev:
            s = (f - f_prev) / (log_a - x_prev)
            if s < 0:
                slope = s
        x_prev, f_prev = log_a, f
        # steps of 2^-30..2^30 RMS bound every reachable rate (a shallow secant slope near the floor would
        # otherwise overflow 2 ** log_a)
        nxt = min(max(log_a - f / slope, -30.0), 30.0)
        if lo is not None and hi is not None and not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        log_a = nxt
    alpha = 2.0 ** log_a
    # row steps are stored on a 1/16-octave grid (side.log8_steps): quantize with the rounded step, so the
    # stored step is the one the coordinates were computed with
    steps = _piecewise(log8_steps, (rho * alpha).to(torch.float32), pieces)
    # CPU kernels: the division by the steps and both steps below in one pass per block (None where they do
    # not apply); else the two steps
    enc = (cpu_kernels.quantize_encode(spec.name, y, bv, rdo, rd_lambda(spec.name), row_steps=steps)
           if cpu_kernels.usable(y) else None)
    if enc is None:
        enc = _encode_rows(spec.name, y, steps, bv, rdo, int(chunk_values))
    words, offsets, ks = enc
    q = LatticeTensor(tuple(w.shape), w.dtype, spec.name, tile_size, bv, int(seed), step_mode, signs, steps,
                      words, offsets, ks)
    q.search_alpha = alpha
    return q
