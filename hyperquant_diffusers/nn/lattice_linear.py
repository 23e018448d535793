"""``LatticeLinear``: an ``nn.Linear`` whose weight is stored as HyperQuant lattice codes.

Storage (never a float copy of the weight):

* ``residency="compressed"``: the LatticeTensor state as *persistent integer buffers*
  ``hq_signs`` uint8 (K/8,) packed RHT signs, ``hq_scales`` int32 (N,) = float32 per-row step sizes stored
  bit-for-bit as int32 (integer dtype so no loader ever casts them to bf16), ``hq_ks`` uint8 (blocks, classes)
  Rice parameters, ``hq_offsets`` int32 (blocks+1,) word offsets, ``hq_words`` int32 (n_words,) Rice stream.
  About ``bits/16`` of the bf16 weight bytes.
* ``residency="int8"``: after loading, the Rice stream is decoded once into ``codes`` int8 (N, K) lattice
  coordinates and ``code_scale`` float32 (N,) (``codes * code_scale[:, None]`` == the rotated weight exactly, for
  the integer lattices Z/D4/E8), and the ``hq_*`` buffers are dropped: 0.5x bf16. ``state_dict()`` re-encodes the
  ``hq_*`` tensors from the int8 codes (Rice coding is deterministic, so they are bit-identical to the loaded ones).
  With ``mma="fp8"`` the one byte per weight is the fp8 MMA's own operand instead: ``codes`` float8_e4m3fn (the
  round-to-nearest e4m3 of each code, exact for |c| <= 16), so nothing is cast per call. The exact int8 value of
  every code e4m3 rounds (~1.6% of the codes at 4 bps E8) is kept in host memory (``code_fix_idx`` int32 flat
  indices, ``code_fix_val`` int8: plain CPU tensors, not buffers, so the device holds one byte per weight as with
  int8 codes; :meth:`host_nbytes` counts them); :meth:`exact_codes`, ``state_dict()`` and the CPU reference use
  them and stay exact. Setting ``mma`` converts between the two forms.

Forward: ``y = rht(x) @ W_rot.T + bias`` where ``W_rot`` is the rotated (RHT-domain) weight as decoded from the
codes; since the RHT is orthonormal this equals ``x @ W_hat.T`` for the dequantized weight ``W_hat``. On CPU (and on
CUDA when no kernel is available) this reference is computed in float32 and cast to ``x.dtype``. On CUDA the layer
calls ``hyperquant_diffusers.kernels.dispatch.cuda_forward(self, x)`` when that function exists. Under
``torch.compile`` the layer is one opaque custom op, ``torch.ops.hyperquant.lattice_linear`` (:mod:`.compiled_op`),
that runs this same forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..codec import FORMAT_VERSION as CODEC_FORMAT_VERSION
from ..codec import LatticeTensor, lattice_spec, rht
from ..codec.constants import DEFAULT_BLOCK_VALUES, DEFAULT_GROUP_VALUES, DEFAULT_TILE, GPU_ENCODE_CHUNK
from ..codec.stream import encode_coords
from ..codec.tensor import _DTYPES, unpack_signs
from . import compiled_op

_COMPRESSED = ("hq_signs", "hq_scales", "hq_ks", "hq_offsets", "hq_words")
#: buffers whose dtype is part of the quantized state: a dtype cast of the model (``.to(torch.bfloat16)``,
#: ``.half()``) moves them but must not convert them (float32 scales rounded to bf16 would silently change the
#: weights; e4m3 codes would stop being the fp8 MMA's operand). The ``hq_*`` buffers are integers, which dtype casts
#: never touch.
_KEEP_DTYPE = ("codes", "code_scale", "signs_f32")
#: compute paths on CUDA and weight residencies a LatticeLinear supports (HyperQuantConfig checks against these)
MMA_TYPES = ("int8", "fp8", "float")
RESIDENCIES = ("int8", "compressed")
_CUDA_FORWARD = None  # resolved once: a callable, or False when the kernels package is absent


def _cuda_forward():
    global _CUDA_FORWARD
    if _CUDA_FORWARD is None:
        try:
            from ..kernels.dispatch import cuda_forward  # owned by the kernels engineer (issue 4)

            _CUDA_FORWARD = cuda_forward
        except (ImportError, AttributeError):
            _CUDA_FORWARD = False
    return _CUDA_FORWARD


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"unsupported weight dtype {dtype}")


def _encode_chunk(device: torch.device) -> dict:
    """``quantize`` keyword for one layer quantized on ``device``: larger Rice-encode passes on a GPU (the stream is
    the same; full-size LTX-2 ``fuse_lora`` 118 s -> 108 s on the H200), the codec's default elsewhere."""
    return {"chunk_values": GPU_ENCODE_CHUNK} if torch.device(device).type == "cuda" else {}


def compressed_shapes(out_features: int, in_features: int, lattice: str, block_values: int,
                      n_words: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every ``hq_*`` buffer of a (out_features x in_features) LatticeLinear."""
    nb = (out_features * in_features + block_values - 1) // block_values
    classes = lattice_spec(lattice).classes
    return {"hq_signs": ((in_features // 8,), torch.uint8), "hq_scales": ((out_features,), torch.int32),
            "hq_ks": ((nb, classes), torch.uint8), "hq_offsets": ((nb + 1,), torch.int32),
            "hq_words": ((int(n_words),), torch.int32)}


class LatticeLinear(nn.Linear):
    """Linear layer with a lattice-quantized weight. Shapes: x (..., in_features) -> (..., out_features).

    A subclass of ``nn.Linear`` (as diffusers' GGUF and bitsandbytes layers are) so that code which dispatches on
    the layer type treats it as a linear layer: peft wraps it in its ``lora.Linear`` (``load_lora_weights`` on a
    quantized pipeline; the adapter runs beside the quantized product, unmerged). It never holds a float weight:
    :attr:`weight` is an empty placeholder and ``nn.Linear.__init__`` / ``reset_parameters`` are not used.

    Construct empty (buffers uninitialized, e.g. on the meta device before a checkpoint loads) with the layout
    arguments, or from a float layer with :meth:`from_linear`. Call :meth:`finalize` once the ``hq_*`` buffers
    hold real data (the backend does it after loading) to switch to the configured residency.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, lattice: str = "E8",
                 bits: float = 4.0, tile_size: int = DEFAULT_TILE, block_values: int = DEFAULT_BLOCK_VALUES,
                 seed: int = 0, mma: str = "int8", residency: str = "int8", n_words: int = 0,
                 weight_dtype: torch.dtype = torch.bfloat16, device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate (and initialize) a float weight
        if in_features % tile_size:
            raise ValueError(f"in_features={in_features} is not a multiple of tile_size={tile_size}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.lattice, self.bits, self.tile_size = lattice_spec(lattice).name, bits, int(tile_size)
        if mma not in MMA_TYPES:
            raise ValueError(f"LatticeLinear mma must be one of {MMA_TYPES}, got {mma!r}")
        if residency not in RESIDENCIES:
            raise ValueError(f"LatticeLinear residency must be one of {RESIDENCIES}, got {residency!r}")
        self.block_values, self.seed, self.residency = int(block_values), int(seed), residency
        self._mma = mma
        self.weight_dtype = weight_dtype
        self.n_words = int(n_words)
        self.is_finalized = False  # True once the configured residency is in place
        for name, (shape, dt) in compressed_shapes(self.out_features, self.in_features, self.lattice,
                                                   self.block_values, self.n_words).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))
        self.register_buffer("codes", None, persistent=False)
        self.register_buffer("code_scale", None, persistent=False)
        self.code_fix_idx = self.code_fix_val = None  # host-side exact values of rounded e4m3 codes (see above)
        self.register_buffer("signs_f32", None, persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype or weight_dtype))
        else:
            self.register_parameter("bias", None)
        self.op_id = compiled_op.register(self)   # how the compiled op finds this layer (see compiled_op)

    def reset_parameters(self) -> None:
        """No-op: the weight is defined by the loaded codes, never re-initialized (``nn.Linear``'s initializer
        would draw a random float weight)."""

    def __setstate__(self, state):
        # copy.deepcopy and unpickling build a layer without __init__: the compiled op must find it too
        super().__setstate__(state)
        self.op_id = compiled_op.register(self)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: float, lattice: str = "E8", tile_size: int = DEFAULT_TILE,
                    block_values: int = DEFAULT_BLOCK_VALUES, seed: int = 0, rht_signs: str = "tiled",
                    mma: str = "int8", residency: str = "int8") -> LatticeLinear:
        """Quantize ``linear.weight`` (on its own device) and return the finalized LatticeLinear."""
        from ..codec import quantize

        w = linear.weight.detach()
        q = quantize(w, bits=bits, lattice=lattice, tile_size=tile_size, seed=seed, rht_signs=rht_signs,
                     block_values=block_values, **_encode_chunk(w.device))
        return cls.from_lattice_tensor(q, linear.bias, bits=bits, mma=mma, residency=residency)

    @classmethod
    def from_lattice_tensor(cls, q: LatticeTensor, bias: torch.Tensor | None, *, bits: float, mma: str = "int8",
                            residency: str = "int8") -> LatticeLinear:
        if len(q.shape) != 2:
            raise ValueError(f"a linear weight is 2-D, got shape {q.shape}")
        out_f, in_f = q.shape
        m = cls(in_f, out_f, bias is not None, lattice=q.lattice, bits=bits, tile_size=q.tile_size,
                block_values=q.block_values, seed=q.seed, mma=mma, residency=residency,
                n_words=int(q.words.numel()), weight_dtype=q.dtype, device=q.device)
        m.load_stream(q)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        m.finalize()
        return m

    def load_stream(self, q: LatticeTensor) -> None:
        """Copy ``q``'s serialized state into the (allocated, unfinalized) ``hq_*`` buffers."""
        st = q.state_tensors()
        with torch.no_grad():
            self.hq_signs.copy_(st["signs"])
            self.hq_scales.copy_(st["scales"].view(torch.int32))
            self.hq_ks.copy_(st["ks"])
            self.hq_offsets.copy_(st["offsets"])
            self.hq_words.copy_(st["words"])

    def finalize(self) -> LatticeLinear:
        """Switch to the configured residency once the ``hq_*`` buffers are loaded (idempotent).

        int8 residency: decode once to int8 codes and drop the Rice stream. If a row's coordinates exceed
        +-127 (only at high rates), the layer stays compressed-resident instead and says so in ``extra_repr``.
        """
        if self.is_finalized:
            return self
        if self.hq_words is None or self.hq_words.is_meta:
            raise RuntimeError("LatticeLinear.finalize() called before its codes were loaded")
        if self.bias is not None and self.bias.requires_grad:
            self.bias.requires_grad_(False)
        self.signs_f32 = unpack_signs(self.hq_signs)
        if self.residency == "int8" and self.hq_words.is_cuda and self._gpu_make_int8_resident():
            self.fit_codes_to_mma()
            self.is_finalized = True
            return self
        if self.residency == "int8":
            q = self._lattice_tensor_from_stream()
            try:
                codes, scale = q.int8_codes(on_overflow="error")
            except ValueError:
                self.residency = "compressed"  # lossless fallback; visible in extra_repr / memory report
            else:
                self.codes, self.code_scale = codes.contiguous(), scale.contiguous()
                for name in _COMPRESSED:
                    setattr(self, name, None)
                self.fit_codes_to_mma()
        self.is_finalized = True
        return self

    def _apply(self, fn, recurse=True):
        # device moves apply to every buffer; dtype casts skip the quantized state (see _KEEP_DTYPE)
        keep = {n: b for n, b in self._buffers.items() if n in _KEEP_DTYPE and b is not None}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers.get(name)
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    # ---- replacing the weight (LoRA merging, nn/lora.py) ----------------------------------------------
    def rht_sign_mode(self) -> str:
        """The codec's ``rht_signs`` mode these signs were drawn in: "tiled" (one tile's signs repeated along K)
        or "independent"; with the layer's seed it reproduces the same signs."""
        s, t = self.signs, self.tile_size
        tiled = torch.equal(s.reshape(-1, t), s[:t].expand(s.numel() // t, t))
        return "tiled" if tiled else "independent"

    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the weight by the HyperQuant quantization of ``weight`` (out_features, in_features), float, with
        this layer's codec settings (lattice, bits per scalar, tile, Rice block size, seed and sign mode: the same
        RHT signs), on the layer's device; mma and residency are kept. Lossy as any quantization: the new codes
        are the nearest (rate-distortion) lattice points of ``weight``, not of the old codes plus a delta."""
        from ..codec import quantize

        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"requantize: weight of shape {tuple(weight.shape)} for a {self.out_features}x"
                             f"{self.in_features} LatticeLinear")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("requantize: the weight has NaN or infinite values")
        signs = self.signs
        q = quantize(weight.detach().to(signs.device, torch.float32), bits=self.bits, lattice=self.lattice,
                     tile_size=self.tile_size, seed=self.seed, rht_signs=self.rht_sign_mode(),
                     block_values=self.block_values, **_encode_chunk(signs.device))
        self._check_requantized_signs(q)
        self.load_lattice_tensor(q)

    def requantize_key(self) -> tuple:
        """What layers must share to be re-quantized as one stacked group (:meth:`requantize_many`): weight shape,
        lattice, bits per scalar, tile, Rice block size, seed, RHT sign mode and device."""
        return ((self.out_features, self.in_features), self.lattice, float(self.bits), self.tile_size,
                self.block_values, self.seed, self.rht_sign_mode(), self.signs.device)

    @staticmethod
    def requantize_many(layers: list[LatticeLinear], weights: list[torch.Tensor], *,
                        max_values: int = DEFAULT_GROUP_VALUES) -> None:
        """:meth:`requantize` of each layer from its weight (out_features, in_features), float, with the layers
        stacked into groups of at most ``max_values`` values per codec call (``kernels.quantize.quantize_many``:
        one rate search per group, the step multiplier shared by the group, as when a model loads; faster than
        one call per layer on a GPU). The layers must have one :meth:`requantize_key`. All codes are computed
        before any layer changes, so a failure leaves every layer as it was."""
        for m, q in zip(layers, LatticeLinear.requantized_many(layers, weights, max_values=max_values)):
            m.load_lattice_tensor(q)

    @staticmethod
    def requantized_many(layers: list[LatticeLinear], weights: list[torch.Tensor] | None = None, *,
                         fill=None, max_values: int = DEFAULT_GROUP_VALUES) -> list[LatticeTensor]:
        """The LatticeTensors :meth:`requantize_many` loads, one per layer, on the layers' device; no layer
        changes. Give ``weights`` or ``fill``: ``fill(i, out)`` writes layer ``i``'s weight into ``out``, a float32
        (out_features, in_features) view of its group's stacked buffer on the layers' device
        (``kernels.quantize.quantize_filled``), so that no weight has to exist as a tensor of its own meanwhile.
        A non-finite weight raises ``ValueError`` before its group is quantized (with ``fill``, groups before it
        may have been quantized; no layer has changed)."""
        from ..kernels.quantize import quantize_filled, quantize_many

        if (weights is None) == (fill is None):
            raise ValueError("requantized_many: give either weights or fill")
        if weights is not None and len(layers) != len(weights):
            raise ValueError(f"requantize_many: {len(layers)} layers and {len(weights)} weights")
        if not layers:
            return []
        keys = {m.requantize_key() for m in layers}
        if len(keys) != 1:
            raise ValueError(f"requantize_many: the layers differ in shape or codec settings ({sorted(map(str, keys))});"
                             " group them by LatticeLinear.requantize_key()")
        first = layers[0]
        dev = first.signs.device
        shape = (first.out_features, first.in_features)
        kw = dict(bits=first.bits, lattice=first.lattice, tile_size=first.tile_size, seed=first.seed,
                  rht_signs=first.rht_sign_mode(), block_values=first.block_values,
                  max_values=max(int(max_values), shape[0] * shape[1]))
        if fill is not None:
            def checked_fill(i: int, out: torch.Tensor) -> None:
                fill(i, out)
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"requantize_many: the weight of layer {i} has NaN or infinite values")

            qs = quantize_filled(shape, len(layers), checked_fill, device=dev, dtype=torch.float32, **kw)
        else:
            for m, w in zip(layers, weights):
                if tuple(w.shape) != shape:
                    raise ValueError(f"requantize_many: weight of shape {tuple(w.shape)} for a {m.out_features}x"
                                     f"{m.in_features} LatticeLinear")
                if not bool(torch.isfinite(w).all()):
                    raise ValueError("requantize_many: a weight has NaN or infinite values")
            qs = quantize_many([w.detach().to(dev, torch.float32) for w in weights], **kw)
        for m, q in zip(layers, qs):
            m._check_requantized_signs(q)
        return qs

    def _check_requantized_signs(self, q: LatticeTensor) -> None:
        if not torch.equal(unpack_signs(q.state_tensors()["signs"]).to(self.signs.device), self.signs):
            raise RuntimeError(f"requantize: this layer's RHT signs are not those seed {self.seed} draws (its state "
                               "was loaded from a layer quantized with another seed); the layer cannot be "
                               "re-quantized with its own signs")

    def load_lattice_tensor(self, q: LatticeTensor) -> None:
        """Make ``q`` (same shape, lattice, tile and block size) this layer's weight, in the layer's residency and
        MMA form: the stream buffers are re-created for its word count, loaded and finalized."""
        if (tuple(q.shape) != (self.out_features, self.in_features) or q.lattice != self.lattice
                or q.tile_size != self.tile_size or q.block_values != self.block_values):
            raise ValueError(f"load_lattice_tensor: a {tuple(q.shape)} {q.lattice} tensor (tile {q.tile_size}, "
                             f"blocks of {q.block_values}) for a {self.out_features}x{self.in_features} "
                             f"{self.lattice} layer (tile {self.tile_size}, blocks of {self.block_values})")
        dev = self.signs.device
        self._forget_weight()
        self.n_words = int(q.words.numel())
        for name, (shape, dt) in compressed_shapes(self.out_features, self.in_features, self.lattice,
                                                   self.block_values, self.n_words).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=dev))
        self.load_stream(q)
        self.finalize()

    def _forget_weight(self) -> None:
        # everything derived from the current codes, here and in the kernels' per-layer cache
        self.codes = self.code_scale = self.code_fix_idx = self.code_fix_val = None
        self.signs_f32 = None
        self.is_finalized = False
        self.__dict__.pop("_hq_kernel_cache", None)

    def weight_state(self, device: torch.device | str | None = None) -> dict:
        """The tensors that define the weight now (resident buffers, the host-side exact values of rounded e4m3
        codes, the bias) and the layout attributes, for :meth:`load_weight_state`. ``device``: copy the tensors
        there (e.g. "cpu" to keep them off the GPU); None keeps references to the buffers (no copy; the bias is
        copied either way)."""
        def move(t):
            if t is None or device is None:
                return t
            return t.to(device, copy=True)

        bufs = {n: move(self._buffers.get(n)) for n in _COMPRESSED + _KEEP_DTYPE}
        # the bias is always copied: it is a parameter that merging updates in place
        bias = None if self.bias is None else self.bias.detach().to(device or self.bias.device, copy=True)
        return {"buffers": bufs, "code_fix": (move(self.code_fix_idx), move(self.code_fix_val)), "bias": bias,
                "n_words": self.n_words, "residency": self.residency, "is_finalized": self.is_finalized}

    def load_weight_state(self, state: dict) -> None:
        """Put back a :meth:`weight_state`, bit for bit, on the layer's current device."""
        dev = self.signs.device
        self._forget_weight()
        for n, t in state["buffers"].items():
            self._buffers[n] = None if t is None else t.to(dev, copy=True)   # the state stays reusable
        if state["code_fix"][0] is not None:
            self.code_fix_idx, self.code_fix_val = (t.cpu() for t in state["code_fix"])
        if state["bias"] is not None:
            with torch.no_grad():
                self.bias.copy_(state["bias"])
        self.n_words, self.residency, self.is_finalized = state["n_words"], state["residency"], state["is_finalized"]

    # ---- the MMA type and the form of the resident codes ----------------------------------------------
    @property
    def mma(self) -> str:
        """Compute path on CUDA: "int8", "fp8" or "float". Setting it on an int8-resident layer converts the
        resident codes to that MMA's operand type (int8 <-> e4m3 with the exact values of rounded codes)."""
        return self._mma

    @mma.setter
    def mma(self, value: str) -> None:
        if value not in MMA_TYPES:
            raise ValueError(f"LatticeLinear.mma must be one of {MMA_TYPES}, got {value!r}")
        self._mma = value
        self.fit_codes_to_mma()

    def fit_codes_to_mma(self) -> None:
        """Hold the resident codes in the form the MMA reads: float8_e4m3fn (+ exact values of the rounded codes)
        for "fp8", int8 otherwise. No-op for compressed residency."""
        codes = self.codes
        if codes is None:
            return
        if self._mma == "fp8" and codes.dtype == torch.int8:
            c8 = codes.to(torch.float8_e4m3fn)
            flat = codes.reshape(-1)
            idx = (c8.reshape(-1).to(torch.float32) != flat.to(torch.float32)).nonzero().reshape(-1)
            self.code_fix_idx = idx.to(torch.int32).cpu()
            self.code_fix_val = flat[idx].cpu()
            self.codes = c8
        elif self._mma != "fp8" and codes.dtype != torch.int8:
            self.codes = self.exact_codes()
            self.code_fix_idx = self.code_fix_val = None

    def exact_codes(self) -> torch.Tensor:
        """The resident int8 lattice codes (out, in), rebuilt from the e4m3 form when the layer holds that."""
        if self.codes is None or self.codes.dtype == torch.int8:
            return self.codes
        return self._exact_codes_float(torch.float32).to(torch.int8)

    def _exact_codes_float(self, dtype) -> torch.Tensor:
        c = self.codes.to(dtype)
        if self.codes.dtype != torch.int8 and self.code_fix_idx is not None and self.code_fix_idx.numel():
            c.view(-1)[self.code_fix_idx.to(c.device, torch.long)] = self.code_fix_val.to(c.device, dtype)
        return c

    def _gpu_make_int8_resident(self) -> bool:
        """Decode the stream with the parallel GPU Rice decoder (kernels/rice_decode.py) instead of the torch
        decoder: ~0.7 s instead of minutes for a full LTX-2 (bench/RESULTS.md). False if the kernels cannot run
        here or a coordinate exceeds ±127; the caller then takes the torch path, which handles both."""
        if self.lattice not in ("E8", "D4", "Z"):  # A2's int8 codes are rounded points, not its coordinates
            return False
        try:
            from ..kernels.dispatch import make_int8_resident
        except ImportError:
            return False
        try:
            return bool(make_int8_resident(self))
        except RuntimeError:  # no usable Triton GPU backend on this machine
            return False

    def _gpu_decoded_codes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int8 codes, float32 scale) of a compressed-resident layer on CUDA from the GPU Rice decoder (fresh
        tensors), or None where the torch decoder must serve (CPU, A2, no Triton GPU backend, |coordinate| > 127).
        The torch decoder of a full-size layer takes seconds; LoRA merging dequantizes twice per layer."""
        if self.hq_words is None or not self.hq_words.is_cuda or self.lattice not in ("E8", "D4", "Z"):
            return None
        try:
            from ..kernels.dispatch import decoded_codes
        except ImportError:
            return None
        try:
            return decoded_codes(self)
        except RuntimeError:  # no usable Triton GPU backend on this machine
            return None

    # ---- accessors for the kernels --------------------------------------------------------------------
    @property
    def signs(self) -> torch.Tensor:
        """float32 ±1 RHT signs (in_features,)."""
        if self.signs_f32 is None:
            return unpack_signs(self.hq_signs)
        return self.signs_f32

    @property
    def weight(self) -> torch.Tensor:
        """An EMPTY placeholder (0 elements) with the original weight dtype, on the layer's device.

        Model code sometimes reads ``linear.weight.dtype`` / ``.device`` (e.g. T5 casts to ``wo.weight.dtype``);
        this answers those without materializing a float weight. Use :meth:`dequantize` for the values.
        """
        ref = next((b for b in (self.codes, self.hq_words) if b is not None), None)
        return torch.empty(0, dtype=self.weight_dtype, device=ref.device if ref is not None else "cpu")

    def _meta(self, n_words: int) -> dict:
        return {"format": "hyperquant-lattice-tensor", "format_version": CODEC_FORMAT_VERSION,
                "shape": [self.out_features, self.in_features], "dtype": _dtype_name(self.weight_dtype),
                "lattice": self.lattice, "tile_size": self.tile_size, "block_values": self.block_values,
                "seed": self.seed, "step_mode": "row", "n_words": int(n_words)}

    def _lattice_tensor_from_stream(self) -> LatticeTensor:
        st = {"signs": self.hq_signs, "scales": self.hq_scales.view(torch.float32), "ks": self.hq_ks,
              "offsets": self.hq_offsets, "words": self.hq_words}
        return LatticeTensor.from_state(self._meta(self.hq_words.numel()), st)

    def _compressed_from_codes(self) -> dict[str, torch.Tensor]:
        """Re-encode the int8 codes into the ``hq_*`` tensors (bit-identical to the loaded stream)."""
        unit = 0.5 if self.lattice == "E8" else 1.0  # E8 coordinates are stored doubled (codec contract)
        words, offsets, ks = encode_coords(self.exact_codes().to(torch.int32).reshape(-1), self.lattice,
                                           self.block_values)
        scales = (self.code_scale / unit).to(torch.float32)
        from ..codec.tensor import pack_signs

        return {"hq_signs": pack_signs(self.signs_f32), "hq_scales": scales.view(torch.int32).contiguous(),
                "hq_ks": ks.to(torch.uint8).contiguous(), "hq_offsets": offsets.to(torch.int32).contiguous(),
                "hq_words": words.contiguous()}

    def lattice_tensor(self) -> LatticeTensor:
        """The weight as a codec ``LatticeTensor`` (on this layer's device)."""
        if self.hq_words is not None:
            return self._lattice_tensor_from_stream()
        st = self._compressed_from_codes()
        return LatticeTensor.from_state(self._meta(st["hq_words"].numel()), {
            "signs": st["hq_signs"], "scales": st["hq_scales"].view(torch.float32), "ks": st["hq_ks"],
            "offsets": st["hq_offsets"], "words": st["hq_words"]})

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes (out, in), float32 scale (out,)): ``codes * scale[:, None]`` = rotated weight."""
        if self.codes is not None:
            return self.exact_codes(), self.code_scale
        return self._lattice_tensor_from_stream().int8_codes(on_overflow="rescale")

    def rotated_weight(self, dtype=torch.float32, decoder: str = "auto") -> torch.Tensor:
        """RHT-domain weight (out, in) exactly as the codes define it. A compressed-resident layer decodes its
        stream: ``decoder="auto"`` takes the GPU Rice decoder on CUDA where it serves (the same values, bit for
        bit), ``"torch"`` always the codec's own decoder (what the references use)."""
        if decoder not in ("auto", "torch"):
            raise ValueError(f"decoder must be 'auto' or 'torch', got {decoder!r}")
        if self.codes is not None:
            return self._exact_codes_float(dtype) * self.code_scale.to(dtype).unsqueeze(1)
        decoded = self._gpu_decoded_codes() if decoder == "auto" else None
        if decoded is not None:
            return decoded[0].to(dtype) * decoded[1].to(dtype).unsqueeze(1)
        return self._lattice_tensor_from_stream().rotated(dtype)

    def dequantize(self, dtype: torch.dtype | None = None, decoder: str = "auto") -> torch.Tensor:
        """The reconstructed weight (out, in) in ``dtype`` (default: the original weight dtype); ``decoder`` as in
        :meth:`rotated_weight`."""
        from ..codec import inverse_rht

        w = inverse_rht(self.rotated_weight(torch.float32, decoder), self.signs, self.tile_size)
        return w.to(dtype or self.weight_dtype)

    # ---- compute --------------------------------------------------------------------------------------
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``rht(x) @ W_rot.T + bias``, cast to ``x.dtype``. Works on any device; a compressed layer's
        stream is decoded by the codec's torch decoder, independent of the GPU kernels it checks."""
        xr = rht(x.to(torch.float32), self.signs, self.tile_size)
        y = torch.matmul(xr, self.rotated_weight(torch.float32, decoder="torch").T)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LatticeLinear expects (..., {self.in_features}) input, got {tuple(x.shape)}")
        if torch.compiler.is_compiling() and not (x.requires_grad and torch.is_grad_enabled()):
            # one opaque op per layer in a compiled graph (see compiled_op); a gradient needs the reference
            if self.signs_f32 is None:
                raise RuntimeError("LatticeLinear is not finalized (its codes have not been loaded): call "
                                   "finalize() before running it under torch.compile")
            return torch.ops.hyperquant.lattice_linear(x, self.op_id, self.out_features, self.mma,
                                                       self.resident_tensors())
        return self.eager_forward(x)

    def resident_tensors(self) -> list[torch.Tensor]:
        """The tensors the layer computes from whose shapes its dimensions fix, in a fixed order, those it holds:
        int8 codes and their scale, or the Rice stream's index and scales; the RHT signs; the bias. The compiled op
        takes them as arguments (see compiled_op). Not the stream's words: their count differs from layer to layer,
        and Dynamo keeps buffer shapes static, so identical blocks would no longer share a graph (a state load or a
        device move that replaces the words replaces the index with them)."""
        ts = (self.codes, self.code_scale, self.hq_offsets, self.hq_ks, self.hq_scales, self.hq_signs,
              self.signs_f32, self.bias)
        return [t for t in ts if t is not None]

    def eager_forward(self, x: torch.Tensor, share_activation: bool = True) -> torch.Tensor:
        """The forward outside ``torch.compile``: the CUDA kernels when they serve this layer and input, else
        :meth:`reference_forward`. ``share_activation``: let layers fed the same tensor share one activation
        quantization (eager only; the compiled op passes False)."""
        if x.is_cuda:
            fn = _cuda_forward()
            if fn:
                return fn(self, x, share_activation=share_activation)
        return self.reference_forward(x)

    # ---- state dict: always the compressed form -------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.hq_words is None and self.codes is not None:
            for name, t in self._compressed_from_codes().items():
                destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        incoming = state_dict.get(prefix + "hq_words")
        if incoming is not None and (self.hq_words is None or self.hq_words.numel() != incoming.numel()):
            # an int8-resident layer receiving a compressed state, or a stream of another length (a re-quantized
            # layer's, see requantize): re-create the stream buffers, load, re-finalize in the same residency
            n_words = incoming.numel()
            held = next((b for b in (self.codes, self.hq_words) if b is not None), None)
            dev = held.device if held is not None else None
            residency = "int8" if self.hq_words is None else self.residency
            for name, (shape, dt) in compressed_shapes(self.out_features, self.in_features, self.lattice,
                                                       self.block_values, n_words).items():
                self.register_buffer(name, torch.empty(shape, dtype=dt, device=dev))
            self._forget_weight()
            self.n_words = int(n_words)
            self.residency = residency
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            self.finalize()
            return
        refinalize = self.is_finalized and incoming is not None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if refinalize:
            self._forget_weight()   # the derived signs and the kernels' per-layer cache follow the loaded stream
            self.finalize()

    # ---- reporting ------------------------------------------------------------------------------------
    def resident_nbytes(self) -> int:
        """Bytes this layer's weight representation occupies in memory now (buffers, bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False) if b is not None)

    def host_nbytes(self) -> int:
        """Bytes this layer keeps in host memory beside its buffers: the exact values of the codes that e4m3
        rounds (``mma="fp8"`` with int8 residency; 5 bytes per rounded code), else 0."""
        return sum(t.numel() * t.element_size() for t in (self.code_fix_idx, self.code_fix_val) if t is not None)

    def stored_nbytes(self) -> int:
        """Bytes of the ``hq_*`` tensors a checkpoint holds for this layer (bias excluded)."""
        if self.hq_words is not None:
            return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in _COMPRESSED)
        return sum(t.numel() * t.element_size() for t in self._compressed_from_codes().values())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"lattice={self.lattice}, bits={self.bits}, tile={self.tile_size}, mma={self.mma}, "
                f"residency={self.residency}" + (", codes=e4m3" if self.codes is not None
                                                 and self.codes.dtype != torch.int8 else ""))


def memory_footprint(model: nn.Module) -> dict[str, int | float]:
    """True memory of ``model``: bytes held by LatticeLinear weight buffers vs everything else.

    Returns ``{"lattice_bytes", "other_bytes", "total_bytes", "quantized_params", "dense_bf16_bytes",
    "lattice_host_bytes"}`` where ``quantized_params`` counts the weight scalars the LatticeLinears represent,
    ``dense_bf16_bytes`` what those weights would take in bf16 (for a compression ratio), and
    ``lattice_host_bytes`` what the LatticeLinears keep in host memory outside their buffers (the exact values of
    e4m3-rounded codes, :meth:`LatticeLinear.host_nbytes`; not in ``total_bytes``, which counts the model's
    parameters and buffers wherever they are).
    """
    lattice_bytes = other = qparams = host = 0
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, LatticeLinear):
            lattice_bytes += mod.resident_nbytes()
            host += mod.host_nbytes()
            qparams += mod.in_features * mod.out_features
            for b in mod.buffers(recurse=False):
                seen.add(id(b))
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            other += t.numel() * t.element_size()
    return {"lattice_bytes": lattice_bytes, "other_bytes": other, "total_bytes": lattice_bytes + other,
            "quantized_params": qparams, "dense_bf16_bytes": 2 * qparams, "lattice_host_bytes": host}


__all__ = ["LatticeLinear", "memory_footprint", "compressed_shapes", "MMA_TYPES", "RESIDENCIES"]
