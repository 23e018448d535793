"""Lattice quantization of attention keys/values on the HyperQuant codec, with inner-product bias correction.

Every K or V vector (one token, one head: ``head_dim`` = D values) is rotated by the codec's per-tile RHT along
D, divided by its own step size ``s = alpha * rms(RHT(x))`` (one int8 log-coded value per vector: the per-token scale), and
mapped to a lattice point (E8, D4, A2 or Z). ``alpha`` is calibrated once per (lattice, method, rate, D) so the
entropy-coded (Rice) rate of the codes plus every side field lands on ``bits`` per value (see
:func:`step_multiplier`).

Bias correction, so that ``E[<q, k_hat>] = <q, k>`` for every query ``q``:

* ``"dither"`` — subtractive dither (Zamir & Feder): ``c = Q(y/s + u)``, ``y_hat = (P(c) - u) s`` with ``u``
  uniform on the lattice's Voronoi cell, regenerated from a stored seed at decode time. The error ``y_hat - y`` is
  then uniform on ``s * V``, independent of ``y``, zero-mean: ``Var <q, k_hat> = |q|^2 s^2 G V^(2/d)`` exactly
  (``G`` the lattice's normalized second moment, ``V`` its cell volume; :func:`dither_error_variance`).
* ``"qjl"`` — nearest-point quantization at ``bits - m/D - 8/D`` plus a 1-bit QJL correction of the residual
  ``r = y - y_q``: ``m`` sign bits ``sign(S r)`` with ``S`` an (m, D) standard Gaussian matrix (seeded) and the
  norm ``|r|`` (int8 log code, rounded at random so that its mean is exact): ``y_hat = y_q + sqrt(pi/2) |r| / m * S^T sign(S r)``. Over ``S``,
  ``E[s sign(<s, r>)] = sqrt(2/pi) r/|r|`` so ``E[y_hat] = y``; ``Var <q, k_hat> = |r|^2/m (pi/2 |q|^2 - <q, r>^2/|r|^2)``
  (:func:`qjl_error_variance`).
* ``"none"`` — plain nearest point: deterministic, biased (the ablation).

The RHT is orthogonal, so inner products in the rotated domain equal those of the original vectors; all
corrections are done there.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..codec import coords_to_points, inverse_rht, lattice_spec, nearest_point, random_signs, rht
from ..codec.constants import KV_METHODS, MAX_KV_BITS, MIN_KV_BITS, check_tile_size
from ..codec.stream import decode_coords, encode_coords, stream_bits

#: Bias-correction methods.
METHODS = KV_METHODS
#: How a cached K/V tensor holds its lattice codes (see :meth:`KVQuantizer.compress`).
CACHE_FORMATS = ("rice", "int8")
#: Coordinates per Rice block of a stored K/V stream.
BLOCK_VALUES = 4096
#: Bytes of a stored K/V tensor's fixed header (shape, dtype, seeds, lattice) — counted in ``nbytes``.
HEADER_BYTES = 32
#: Per-vector steps (and QJL residual norms) are stored as int8 codes e with value 2^(e / STEP_CODES_PER_OCTAVE):
#: 8 bits per vector, relative spacing 9 %, range 2^-16 .. 2^15.9. Encoder and decoder both use the coded value,
#: so its coarseness only moves the rate a little, never the unbiasedness.
STEP_CODES_PER_OCTAVE = 8


def encode_log8(x: torch.Tensor) -> torch.Tensor:
    """Positive float tensor -> int8 codes of ``2^(e/8)`` (nearest in the log domain, clamped; 0 -> smallest)."""
    e = torch.round(torch.log2(x.clamp_min(1e-30)) * STEP_CODES_PER_OCTAVE)
    return e.clamp(-128, 127).to(torch.int8)


def encode_log8_unbiased(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Like :func:`encode_log8` but rounding at random between the two neighbouring codes so that
    ``E[decode_log8(code)] = x`` exactly (inside the code range)."""
    lo = torch.floor(torch.log2(x.clamp_min(1e-30)) * STEP_CODES_PER_OCTAVE).clamp(-128, 126)
    a, b = decode_log8(lo), decode_log8(lo + 1)
    p = ((x - a) / (b - a)).clamp(0.0, 1.0)
    up = torch.rand(x.shape, generator=generator, device=x.device) < p
    return (lo + up.to(lo.dtype)).to(torch.int8)


def _gpu_decode(kv: "CompressedKV", lattice: str) -> torch.Tensor | None:
    """Coordinates of a CUDA-resident stream through the parallel Triton Rice decoder (the torch decoder costs
    seconds per denoising step on a full-size model: bench/RESULTS.md); None where that decoder does not apply
    (CPU, A2, no Triton GPU backend, or a coordinate beyond the int8 range it writes)."""
    if not kv.words.is_cuda or lattice not in ("Z", "D4", "E8"):
        return None
    try:
        from ..kernels.rice_decode import rice_decode
        # checked (a host sync) on the first decode only: the stream is immutable, so a later decode of it is too
        out, _, _ = rice_decode(kv.words, kv.offsets, kv.ks, kv.numel, lattice, BLOCK_VALUES,
                                check=not kv.decode_checked, stats=False)
    except (ImportError, RuntimeError, ValueError):
        return None
    kv.decode_checked = True
    return out.to(torch.int32)


#: When :meth:`KVQuantizer.fake_quantize` takes the fused Triton kernel (``kernels/kv_quant.py``) instead of the
#: codec's torch operations: "off"; "cuda" for CUDA tensors; "always" also for CPU tensors through Triton's
#: interpreter (``TRITON_INTERPRET=1``; for tests). The kernel takes Z, D4 and E8 with dither or plain nearest
#: point, head dimensions 16-256; anything else (A2, QJL) keeps the torch path. Its dither is another draw than
#: the torch path's (Philox instead of torch's generator), same distribution. Default "cuda": on an H200 it matches
#: the codec given its dither and fake-quantizes a 2 x 6144 x 32 x 128 bf16 K in 0.78 ms against the torch path's
#: 16 ms (bench/RESULTS.md, twentieth session).
#: "text": whether the text K/V take the kernel too, where ``when`` lets it: the cache's compression and decode
#: and the uncached text path together (they must draw the same dither; the uncached path encodes and decodes, see
#: :meth:`KVQuantizer.fake_quantize_as_cached`). On by default: on the H200 the full-size LTX-2 step with cached
#: 4-bit text K/V takes 1.07 s against 1.26 s with the text K/V on the torch path (bench/RESULTS.md, 21st session).
FUSED_KERNEL_MODES = ("off", "cuda", "always")
_FUSED = {"when": "cuda", "text": True}


def set_fused_kernel(when: str, text: bool | None = None) -> None:
    """Choose when K/V fake quantization runs the fused kernel: one of :data:`FUSED_KERNEL_MODES`; ``text``
    (None: unchanged) whether the text K/V (cached or not) go through it too."""
    if when not in FUSED_KERNEL_MODES:
        raise ValueError(f"fused K/V kernel mode must be one of {FUSED_KERNEL_MODES}, got {when!r}")
    if text is not None and not isinstance(text, bool):
        raise ValueError(f"text must be True, False or None, got {text!r}")
    _FUSED["when"] = when
    if text is not None:
        _FUSED["text"] = text


def fused_kernel_mode() -> str:
    return _FUSED["when"]


def fused_text_kernel() -> bool:
    """Whether the text K/V take the fused kernel where :func:`fused_kernel_mode` lets them."""
    return _FUSED["text"]


def _fused_kernel_applies(q: "KVQuantizer", x: torch.Tensor) -> bool:
    when = _FUSED["when"]
    if when == "off" or q.cfg.method == "qjl" or getattr(q, "fused_unsupported", "not checked"):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    try:
        from ..kernels._triton import interpreting, triton_available
    except ImportError:
        return False
    if not triton_available():
        return False
    return x.is_cuda and not interpreting() if when == "cuda" else (x.is_cuda or interpreting())


def decode_log8(e: torch.Tensor) -> torch.Tensor:
    """int8 codes -> float32 values ``2^(e/8)``."""
    return torch.exp2(e.to(torch.float32) / STEP_CODES_PER_OCTAVE)


@dataclass(frozen=True)
class KVQuantConfig:
    """What the K/V quantizer does.

    ``bits``: target rate in bits per value, side information counted (1.5 to 8).
    ``lattice``: "E8", "D4", "A2" or "Z". ``method``: one of :data:`METHODS`.
    ``tile_size``: RHT tile along the head dimension; ``None`` or anything >= the head dimension = the head dimension
    itself (which must then be a power of two in [16, 1024]). ``seed``: base seed of the RHT signs, dither and QJL projections.
    """

    bits: float = 4.0
    lattice: str = "E8"
    method: str = "dither"
    tile_size: int | None = None
    seed: int = 0

    def __post_init__(self):
        b = float(self.bits)
        if not math.isfinite(b) or not MIN_KV_BITS <= b <= MAX_KV_BITS:
            raise ValueError(f"kv_bits must be in [{MIN_KV_BITS}, {MAX_KV_BITS}] bits per value, got {self.bits!r}")
        object.__setattr__(self, "bits", b)
        object.__setattr__(self, "lattice", lattice_spec(self.lattice).name)
        if self.method not in METHODS:
            raise ValueError(f"bias_correction must be one of {METHODS}, got {self.method!r}")
        if self.tile_size is not None:
            check_tile_size(self.tile_size)

    def tile_for(self, head_dim: int) -> int:
        """RHT tile for vectors of ``head_dim`` values; raises ``ValueError`` naming the problem."""
        d = int(head_dim)
        spec = lattice_spec(self.lattice)
        if d % spec.dim:
            raise ValueError(f"head dimension {d} is not a multiple of the {spec.name} lattice dimension {spec.dim}")
        # the RHT runs within one head: a tile longer than the head (e.g. a weight tile passed through) means "the
        # whole head"
        t = d if self.tile_size is None or self.tile_size >= d else self.tile_size
        try:
            t = check_tile_size(t)
        except ValueError as e:
            raise ValueError(f"cannot rotate K/V of head dimension {d}: {e}; pass tile_size= dividing {d}") from None
        if d % t:
            raise ValueError(f"tile_size {t} does not divide the head dimension {d}")
        return t


def qjl_dim(cfg: KVQuantConfig, head_dim: int) -> int:
    """Number of QJL sign bits per vector: ``head_dim`` (1 bit/value) at >= 3 bps, ``head_dim // 2`` below."""
    return head_dim if cfg.bits >= 3.0 else max(8, head_dim // 2)


def side_bits_per_value(cfg: KVQuantConfig, head_dim: int) -> float:
    """Bits per value of everything stored besides the Rice stream's codes: the int8 step code per vector, the
    per-block Rice parameters (uint8 per class) and int32 offsets, average word padding (16 bits per block), and
    for QJL the sign bits and the int8 residual-norm code per vector. The header is ignored here (it is O(1))."""
    spec = lattice_spec(cfg.lattice)
    side = 8.0 / head_dim + (8.0 * spec.classes + 32.0 + 16.0) / BLOCK_VALUES
    if cfg.method == "qjl":
        side += (qjl_dim(cfg, head_dim) + 8.0) / head_dim
    return side


def code_bits_target(cfg: KVQuantConfig, head_dim: int) -> float:
    """Rate left for the Rice-coded lattice codes, bits per value; ``ValueError`` if it is too small."""
    target = cfg.bits - side_bits_per_value(cfg, head_dim)
    if target < 0.75:
        raise ValueError(
            f"kv_bits={cfg.bits} leaves only {target:.2f} bits per value for the lattice codes with "
            f"bias_correction={cfg.method!r} at head dimension {head_dim}; use more bits"
            + (" or bias_correction='dither'" if cfg.method == "qjl" else ""))
    return target


# ---- dither ---------------------------------------------------------------------------------------------

def lattice_dither(lattice: str, shape, generator: torch.Generator, device) -> torch.Tensor:
    """Dither uniform on the Voronoi cell of ``lattice`` (lattice units), float32 ``shape`` (last dim % d == 0).

    Draw ``z`` uniform on a fundamental domain of a sublattice (the cube [0, 2)^n for Z, D4 and E8, which all
    contain 2Z^n; the rectangle [0, 1) x [0, sqrt 3) per pair for A2) and return ``z - Q(z)``: reducing a uniform
    point of any fundamental domain modulo the lattice gives a uniform point of its Voronoi cell.
    """
    spec = lattice_spec(lattice)
    z = torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if spec.name == "A2":
        z = (z.reshape(-1, 2) * torch.tensor([1.0, math.sqrt(3.0)], device=device)).reshape(z.shape)
    else:
        z = z * 2.0
    return z - coords_to_points(spec.name, nearest_point(spec.name, z))


def _gen(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def qjl_matrix(m: int, d: int, seed: int, device) -> torch.Tensor:
    """The QJL projection: float32 (m, d) standard Gaussian, seeded."""
    return torch.randn((m, d), generator=_gen(seed, device), device=device, dtype=torch.float32)


# ---- closed-form variances (for tests and reports) ------------------------------------------------------

def dither_error_variance(lattice: str) -> float:
    """Per-coordinate variance of the subtractive-dither error at unit step: ``G * V^(2/d)``."""
    spec = lattice_spec(lattice)
    return spec.nsm * spec.volume ** (2.0 / spec.dim)


def qjl_error_variance(q: torch.Tensor, r: torch.Tensor, m: int, norm_sq_mean=None) -> torch.Tensor:
    """Variance of the QJL estimate ``n X`` of ``<q, r>`` over the projection S and the stored norm ``n``.

    ``X = sqrt(pi/2)/m sum_j sign(<s_j, r>) <s_j, q>`` has ``E[X] = <q, r>/|r|`` and
    ``E[X^2] = (pi/2 |q|^2 + (m - 1) <q, r>^2/|r|^2) / m``; ``n`` is independent of S with ``E[n] = |r|`` and
    ``E[n^2] = norm_sq_mean`` (default ``|r|^2``, an exactly stored norm). Shapes (..., D); float64 result.
    """
    q, r = q.double(), r.double()
    rn2 = r.square().sum(-1)
    c2 = (q * r).sum(-1).square() / rn2.clamp_min(1e-300)
    ex2 = (math.pi / 2 * q.square().sum(-1) + (m - 1) * c2) / m
    n2 = rn2 if norm_sq_mean is None else torch.as_tensor(norm_sq_mean, dtype=torch.float64)
    return n2 * ex2 - c2 * rn2


# ---- rate calibration -----------------------------------------------------------------------------------

#: Calibration tolerance on the code rate, bits per value.
_CAL_TOL = 0.005


@functools.lru_cache(maxsize=256)
def _step_multiplier_cached(lattice: str, dithered: bool, target: float, d: int) -> float:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(12345)
    rows = max(64, (1 << 15) // d)
    # Per-vector normalized rotated vectors: RHT of a vector is close to uniform on its sphere, i.e. Gaussian
    # coordinates divided by the vector's RMS.
    y = torch.randn(rows, d, generator=gen)
    y = y / y.square().mean(1, keepdim=True).sqrt()
    u = lattice_dither(lattice, y.shape, gen, "cpu") if dithered else torch.zeros_like(y)
    spec = lattice_spec(lattice)

    def rate(log_a: float) -> float:
        c = nearest_point(lattice, y / 2.0 ** log_a + u)
        return stream_bits(c.reshape(-1), lattice, BLOCK_VALUES) / y.numel()

    # High-rate start (entropy of N(0,1) minus log step); the rate falls monotonically in log_a, so bracket the
    # root by doubling steps, then Illinois regula falsi.
    x0 = 0.5 * math.log2(2 * math.pi * math.e) - target - math.log2(spec.volume) / spec.dim
    f0 = rate(x0) - target
    # slope is -1 at high rate and shallower below: a step of 1.25 f overshoots slightly, which brackets the root
    step = 1.25 * math.copysign(max(abs(f0), 0.05), f0)
    x1, f1 = x0, f0
    for _ in range(12):
        x1 = min(max(x1 + step, -30.0), 30.0)  # steps of 2^-30..2^30 RMS bound every reachable rate
        f1 = rate(x1) - target
        if (f1 > 0) != (f0 > 0) or abs(f1) < _CAL_TOL:
            break
        x0, f0, step = x1, f1, step * 2.0
    else:
        raise ValueError(
            f"the Rice-coded {lattice} lattice codes cannot reach {target:.3f} bits per value (its floor is "
            f"about {f1 + target:.2f}); use more kv_bits, a larger head dimension (the per-vector step is side information) or a pair-coded "
            f"lattice, A2, Z or D4 (the lowest floor: one Rice bit per pair of values)")
    if abs(f1) < _CAL_TOL:
        return 2.0 ** x1
    a, fa, b, fb, side = x0, f0, x1, f1, 0
    log_a = b
    for _ in range(40):
        log_a = (a * fb - b * fa) / (fb - fa)
        f = rate(log_a) - target
        if abs(f) < _CAL_TOL:
            break
        if (f > 0) == (fb > 0):
            b, fb = log_a, f
            if side == -1:
                fa *= 0.5
            side = -1
        else:
            a, fa = log_a, f
            if side == 1:
                fb *= 0.5
            side = 1
    return 2.0 ** log_a


def step_multiplier(cfg: KVQuantConfig, head_dim: int) -> float:
    """``alpha``: per-vector step = ``alpha * rms``; calibrated once (cached) on random unit-RMS vectors so the
    Rice stream's rate is :func:`code_bits_target` bits per value."""
    target = round(code_bits_target(cfg, head_dim), 4)
    return _step_multiplier_cached(cfg.lattice, cfg.method == "dither", target, int(head_dim))


# ---- the quantizer --------------------------------------------------------------------------------------

@dataclass
class _Rotated:
    """Result of quantizing in the rotated domain. ``coords`` int32 (rows, D); ``steps`` int8 (rows,) step codes
    (:func:`decode_log8`); ``y_hat`` float32 (rows, D) reconstruction in the rotated domain; QJL: ``qjl_bits``
    bool (rows, m), ``qjl_norm`` int8 (rows,) residual-norm codes."""

    coords: torch.Tensor
    steps: torch.Tensor
    y_hat: torch.Tensor
    qjl_bits: torch.Tensor | None = None
    qjl_norm: torch.Tensor | None = None


class KVQuantizer:
    """Quantizes K or V tensors (..., D) vector by vector. One instance per attention layer and tensor (K or V):
    ``seed`` fixes its RHT signs; each call gets its own ``call_seed`` for dither / QJL draws."""

    def __init__(self, cfg: KVQuantConfig, head_dim: int, seed: int | None = None):
        self.cfg = cfg
        self.head_dim = int(head_dim)
        self.tile = cfg.tile_for(self.head_dim)
        self.seed = int(cfg.seed if seed is None else seed)
        self.signs = random_signs(self.head_dim, self.seed)
        self.alpha = step_multiplier(cfg, self.head_dim)
        self.m = qjl_dim(cfg, self.head_dim) if cfg.method == "qjl" else 0
        from ..kernels.kv_quant import check_kv_kernel_args
        # why the fused kernel cannot take this quantizer's vectors (None: it can)
        self.fused_unsupported = check_kv_kernel_args(self.head_dim, self.tile, cfg.lattice)

    def _signs(self, device) -> torch.Tensor:
        if self.signs.device != torch.device(device):
            self.signs = self.signs.to(device)
        return self.signs

    def quantize_rotated(self, x: torch.Tensor, call_seed: int) -> _Rotated:
        """``x`` (..., D) float -> codes and rotated-domain reconstruction (rows = numel / D)."""
        d = self.head_dim
        if x.shape[-1] != d:
            raise ValueError(f"expected K/V vectors of {d} values, got last dimension {x.shape[-1]}")
        lat = self.cfg.lattice
        y = rht(x.detach().reshape(-1, d).to(torch.float32), self._signs(x.device), self.tile)
        rms = y.square().mean(1).sqrt()
        step_codes = encode_log8(rms * self.alpha)
        steps = decode_log8(step_codes)
        z = y / steps.unsqueeze(1)
        out_bits = out_norm = None
        if self.cfg.method == "dither":
            u = lattice_dither(lat, z.shape, _gen(call_seed, x.device), x.device)
            c = nearest_point(lat, z + u)
            y_hat = (coords_to_points(lat, c) - u) * steps.unsqueeze(1)
        else:
            c = nearest_point(lat, z)
            y_hat = coords_to_points(lat, c) * steps.unsqueeze(1)
            if self.cfg.method == "qjl":
                r = y - y_hat
                # the estimator needs E[norm] = |r|: round the norm's code at random (unbiased)
                norm_codes = encode_log8_unbiased(r.norm(dim=1), _gen(call_seed ^ 0x5DEECE66D, x.device))
                norm = decode_log8(norm_codes)
                s = qjl_matrix(self.m, d, call_seed, x.device)
                out_bits = (r @ s.T) >= 0
                y_hat = y_hat + self._qjl_correction(out_bits, norm, s)
                out_norm = norm_codes
        return _Rotated(c, step_codes, y_hat, out_bits, out_norm)

    def _qjl_correction(self, bits: torch.Tensor, norm: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sign = bits.to(torch.float32) * 2.0 - 1.0
        return (math.sqrt(math.pi / 2.0) / self.m) * norm.unsqueeze(1) * (sign @ s)

    def fake_quantize(self, x: torch.Tensor, call_seed: int, fused: bool = True) -> torch.Tensor:
        """Quantize and reconstruct at once (nothing kept): same shape and dtype as ``x``. Runs the fused kernel
        where :func:`set_fused_kernel` says so and it applies (then the dither is Philox's draw from ``call_seed``);
        ``fused=False``: always the torch path, whose draws :meth:`compress` repeats."""
        if fused and _fused_kernel_applies(self, x):
            from ..kernels.kv_quant import kv_fake_quantize
            return kv_fake_quantize(x.detach(), alpha=self.alpha, **self._kernel_args(x, call_seed))
        rot = self.quantize_rotated(x, call_seed)
        return inverse_rht(rot.y_hat, self._signs(x.device), self.tile).reshape(x.shape).to(x.dtype)

    def fake_quantize_as_cached(self, x: torch.Tensor, call_seed: int, fused: bool) -> torch.Tensor:
        """What ``compress(x, call_seed, fused=fused).dequantize()`` returns, without building the entry: the text
        K/V when they are not cached, so that caching them changes nothing, bit for bit. Through the fused kernel
        this is its encode then its decode, two launches: its one-launch fake quantization (:meth:`fake_quantize`)
        chooses the same lattice points but, compiled apart on the GPU, may round the reconstruction differently
        (on the H200 by up to 4 float32 units in the last place of the vector's largest value). Otherwise the torch
        path, whose draws :meth:`compress` repeats."""
        if fused and _fused_kernel_applies(self, x):
            from ..kernels.kv_quant import kv_decode, kv_encode
            args = self._kernel_args(x, call_seed)
            coords, steps = kv_encode(x.detach(), alpha=self.alpha, **args)
            return kv_decode(coords, steps, tuple(x.shape), x.dtype, **args)
        return self.fake_quantize(x, call_seed, fused=False)

    def _kernel_args(self, x: torch.Tensor, call_seed: int) -> dict:
        """The arguments that the fused kernel's fake quantization, encode and decode of ``x`` share."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"expected K/V vectors of {self.head_dim} values, got last dimension {x.shape[-1]}")
        return dict(signs=self._signs(x.device), tile=self.tile, lattice=self.cfg.lattice,
                    dither=self.cfg.method == "dither", seed=call_seed, codes_per_octave=STEP_CODES_PER_OCTAVE)

    def compress(self, x: torch.Tensor, call_seed: int, fmt: str = "rice", fused: bool = False) -> "CompressedKV":
        """Quantize ``x`` (..., D) and store it (:class:`CompressedKV`).

        ``fmt="rice"``: lattice codes entropy coded with the codec's Rice block stream (about ``bits`` per value,
        everything counted; decoding walks the stream). ``fmt="int8"``: the same codes as int8 (int16 if any
        exceeds +-127): same reconstruction, 8 (16) bits per value plus side fields, decoded by a cast.
        ``fused``: quantize with the fused kernel where :func:`set_fused_kernel` lets it (its Philox dither; the
        entry then decodes through the kernel too, to :meth:`fake_quantize_as_cached`'s output for the same seed).
        """
        if fmt not in CACHE_FORMATS:
            raise ValueError(f"cache format must be one of {CACHE_FORMATS}, got {fmt!r}")
        if fused and _fused_kernel_applies(self, x):
            from ..kernels.kv_quant import kv_encode
            coords, steps = kv_encode(x.detach(), alpha=self.alpha, **self._kernel_args(x, call_seed))
            bits = norm = None
            kernel = True
        else:
            rot = self.quantize_rotated(x, call_seed)
            coords, steps, norm = rot.coords, rot.steps, rot.qjl_norm
            bits = None if rot.qjl_bits is None else _pack_bits(rot.qjl_bits)
            kernel = False
        if fmt == "int8":
            small = coords.numel() == 0 or int(coords.abs().max()) <= 127
            codes = coords.to(torch.int8 if small else torch.int16)
            return CompressedKV(self, tuple(x.shape), x.dtype, int(call_seed), None, None, None, steps, bits, norm,
                                codes=codes, kernel=kernel)
        words, offsets, ks = encode_coords(coords.reshape(-1), self.cfg.lattice, BLOCK_VALUES)
        return CompressedKV(self, tuple(x.shape), x.dtype, int(call_seed), words, offsets.to(torch.int32), ks,
                            steps, bits, norm, kernel=kernel)


def _pack_bits(b: torch.Tensor) -> torch.Tensor:
    """bool (rows, m), m % 8 == 0 -> uint8 (rows, m/8)."""
    w = 1 << torch.arange(8, device=b.device, dtype=torch.int32)
    return (b.reshape(b.shape[0], -1, 8).to(torch.int32) * w).sum(-1).to(torch.uint8)


def _unpack_bits(p: torch.Tensor) -> torch.Tensor:
    bits = (p.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=p.device, dtype=torch.int32)) & 1
    return bits.reshape(p.shape[0], -1).bool()


@dataclass
class CompressedKV:
    """A K or V tensor as it is held in memory: the Rice stream of its lattice codes (``words`` int32,
    ``offsets`` int32 per block, ``ks`` uint8 Rice parameters) or the codes themselves (``codes`` int8/int16
    (rows, D), format "int8"), the int8 step code per vector, for QJL the packed
    sign bits (uint8 (rows, m/8)) and int8 residual-norm codes, and the seed of its dither / QJL draws."""

    quantizer: KVQuantizer
    shape: tuple
    dtype: torch.dtype
    call_seed: int
    words: torch.Tensor | None
    offsets: torch.Tensor | None
    ks: torch.Tensor | None
    steps: torch.Tensor
    qjl_bits: torch.Tensor | None = None
    qjl_norm: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    #: quantized by the fused kernel (its Philox dither): decoded by it too (``kernels/kv_quant.kv_decode``)
    kernel: bool = False
    #: the Triton decoder has checked this stream's flags and int8 range once (:func:`_gpu_decode`)
    decode_checked: bool = False

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes held: every stored array plus :data:`HEADER_BYTES`."""
        n = HEADER_BYTES
        for t in (self.words, self.offsets, self.ks, self.steps, self.qjl_bits, self.qjl_norm, self.codes):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def dequantize(self) -> torch.Tensor:
        """Reconstruction, original shape and dtype, on the stream's device."""
        q = self.quantizer
        lat = q.cfg.lattice
        dev = self.steps.device
        if self.codes is not None:
            c = self.codes.to(torch.int32)
        else:
            c = _gpu_decode(self, lat)
            if c is None:
                c = decode_coords(self.words, self.offsets.to(torch.int64), self.ks, self.numel, lat, BLOCK_VALUES)
            c = c.reshape(-1, q.head_dim)
        if self.kernel:
            from ..kernels.kv_quant import kv_decode
            return kv_decode(c, self.steps, self.shape, self.dtype, **q._kernel_args(c, self.call_seed))
        steps = decode_log8(self.steps).unsqueeze(1)
        pts = coords_to_points(lat, c)
        if q.cfg.method == "dither":
            pts = pts - lattice_dither(lat, c.shape, _gen(self.call_seed, dev), dev)
        y_hat = pts * steps
        if q.cfg.method == "qjl":
            s = qjl_matrix(q.m, q.head_dim, self.call_seed, dev)
            y_hat = y_hat + q._qjl_correction(_unpack_bits(self.qjl_bits), decode_log8(self.qjl_norm), s)
        return inverse_rht(y_hat, q._signs(dev), q.tile).reshape(self.shape).to(self.dtype)
