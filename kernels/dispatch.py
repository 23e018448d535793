"""CUDA forward of ``LatticeLinear``: fused activation RHT + quantization, weight codes, quantized GEMM.

``cuda_forward(module, x)`` is what ``hyperquant_diffusers.nn.LatticeLinear.forward`` calls on CUDA tensors:

1. ``xq, sx = rht_quantize(x)`` -- one Triton pass: per-tile RHT of the activations and per-token int8 or
   fp8-e4m3 codes (:mod:`.act_quant`); signs that repeat every tile are folded into the Hadamard operand once per
   layer (``_rht_operands``). Consecutive layers fed the same tensor with the same RHT signs (an attention's
   to_q / to_k / to_v) reuse one result (``set_activation_sharing``).
2. Weight codes in the MMA's type:
   * int8 residency: the module's resident ``codes``, (out, in), one byte per weight in the MMA's operand type:
     int8, or e4m3 for a layer whose MMA is fp8 (exact for |c| <= 16, rounded to 3 mantissa bits above: the fp8
     path's extra weight error; the layer keeps the exact values of the rounded codes aside for saving). int8
     codes asked for by the fp8 MMA are cast per call (:mod:`.cast`).
   * compressed residency: the Rice stream is decoded by the Triton block decoder (:mod:`.rice_decode`) straight
     into reused buffers, in int8 or e4m3 as the MMA needs. While a layer computes, the layer that followed it
     last time is decoded on a side stream into the other of two buffers (``set_prefetch``), so the decode
     overlaps the GEMMs, attention and elementwise work instead of adding to them.
3. The GEMM with per-token x per-row scales, bias and the output cast in its epilogue (:mod:`.int8_gemm`: Triton
   TMA kernels for int8 and fp8; ``torch._scaled_mm`` for fp8 at small M).

Falls back to ``module.reference_forward`` (float32 torch) for A2 (no integer code), an MMA type other than
int8/fp8, or when Triton cannot run. A compressed layer whose coordinates exceed the code range (checked once per
layer on its first call) uses ``module.int8_weight()`` (the codec's rescaling path) instead of the kernel.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from hyperquant_diffusers.codec import tile_signs

from ._bits import release_scratch
from ._pools import outside_graph_pools
from ._triton import num_sms, triton_available
from .act_quant import rht_quantize, signed_hadamard
from .int8_gemm import fp8_linear, int8_linear, require_fp8_mma
from .rice_decode import rice_decode

_KERNEL_LATTICES = ("Z", "D4", "E8")
_BUFFERS: dict = {}


def _decode_buffer(device, dtype, n: int) -> torch.Tensor:
    """The shared just-in-time decode buffer of ``device``/``dtype``, at least ``n`` elements (grown, reused)."""
    key = (str(device), dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        _BUFFERS.pop(key, None)
        buf = _BUFFERS[key] = outside_graph_pools(device, torch.empty, n, dtype=dtype, device=device)
    return buf[:n]


def decode_buffer_nbytes() -> int:
    """Bytes held by the shared decode buffers and prefetch slots (counted in compressed-residency reports)."""
    return (sum(b.numel() * b.element_size() for b in _BUFFERS.values())
            + sum(pf.nbytes() for pf in _PREFETCHERS.values()))


def release_decode_buffers() -> None:
    """Free the shared decode buffers, the prefetch slots and the decoders' scratch rows (rebuilt on next use)."""
    for pf in _PREFETCHERS.values():
        pf.drain()
    _BUFFERS.clear()
    _PREFETCHERS.clear()
    _PREFETCH["generation"] += 1
    release_scratch()


def _cache(module) -> dict:
    c = module.__dict__.get("_hq_kernel_cache")
    if c is None:
        c = {}
        module.__dict__["_hq_kernel_cache"] = c
    return c


def _code_scale_compressed(module) -> torch.Tensor:
    unit = 0.5 if module.lattice == "E8" else 1.0  # E8 coordinates are stored doubled (codec contract)
    return (module.hq_scales.view(torch.float32) * unit).contiguous()


def _decode_into(module, buf, wdtype, n, check: bool, programs: int | None = None, stream=None) -> None:
    rice_decode(module.hq_words, module.hq_offsets, module.hq_ks, n, module.lattice, module.block_values,
                out=buf, out_dtype=wdtype, check=check, stats=check, programs=programs, stream=stream)


def weight_codes(module, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, in) int8 or float8_e4m3fn, float32 scale (out,)) of a LatticeLinear for MMA ``fmt``.

    Compressed residency decodes the stream (just in time, or picks up the side stream's prefetch, see
    :class:`_Prefetcher`); the returned codes live in a buffer reused by later layers, valid until the next call.
    """
    wdtype = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
    codes = getattr(module, "codes", None)
    if codes is not None:
        # a layer with mma="fp8" holds e4m3 codes (LatticeLinear.fit_codes_to_mma); int8 codes serve the fp8 MMA
        # too (fp8_linear casts them per call, kernels/cast.py); e4m3 codes asked for as int8 are rebuilt exactly
        if codes.dtype != wdtype and wdtype == torch.int8:
            return module.int8_weight()
        return codes, module.code_scale
    cache = _cache(module)
    n = module.out_features * module.in_features
    if capturing(module.hq_words):
        return _captured_codes(module, cache, wdtype, n)
    if cache.get("fallback"):
        return module.int8_weight()
    if "sw" not in cache:
        cache["sw"] = outside_graph_pools(module.hq_words.device, _code_scale_compressed, module)
    if not cache.get("checked"):
        # first call: decode on the compute stream with the stream checks (one host sync), no prefetching; with
        # the prefetch on, into one of its two slots (no third buffer of the largest layer's size)
        pf = _module_prefetcher(module, cache, wdtype) if _PREFETCH["on"] and module.hq_words.is_cuda else None
        if pf is not None:
            pf.drain()
            buf = pf.checked_slot(n)
        else:
            buf = _decode_buffer(module.hq_words.device, wdtype, n)
        try:
            _decode_into(module, buf, wdtype, n, check=True)
        except ValueError:
            cache["fallback"] = True  # coordinates beyond the code range: the codec's rescaling path
            return weight_codes(module, fmt)
        cache["checked"] = True
        if pf is not None:
            pf.observe(module)
        return buf.view(module.out_features, module.in_features), cache["sw"]
    if _PREFETCH["on"] and module.hq_words.is_cuda:
        buf = _module_prefetcher(module, cache, wdtype).acquire(module, n)
    else:
        buf = _decode_buffer(module.hq_words.device, wdtype, n)
        _decode_into(module, buf, wdtype, n, check=False)
    return buf.view(module.out_features, module.in_features), cache["sw"]


def capturing(t: torch.Tensor) -> bool:
    """Whether work on ``t``'s device is being recorded into a CUDA graph right now (``torch.cuda.graph``, or
    ``torch.compile`` with ``mode="reduce-overhead"``, whose CUDA graphs replay the kernels without running this
    Python again)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _require_warm(module, what: str) -> None:
    raise RuntimeError(
        f"HyperQuant: a CUDA graph is being captured through a LatticeLinear ({module.out_features}x"
        f"{module.in_features}) that has never run outside a capture; its first call {what}, which needs a device "
        "sync that a capture cannot contain. Run the model once before capturing (torch.compile's "
        "mode=\"reduce-overhead\" does its warm-up runs first; with torch.cuda.graph, call the model once before "
        "the capture, as its documentation asks)")


def _captured_codes(module, cache: dict, wdtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A compressed-resident layer's codes while a CUDA graph is captured: decoded just in time on the capturing
    stream into a buffer of the graph's own memory pool. Not through the prefetcher: its side stream, its events
    and its host-side choice of the next layer would be frozen into the graph (and waiting on an event recorded
    outside the capture invalidates it), and a shared buffer could be freed or grown after the capture while the
    graph still writes to it."""
    if not cache.get("checked") or "sw" not in cache:
        _require_warm(module, "checks the coordinate range of its stream")
    if cache.get("fallback"):
        raise RuntimeError(
            f"HyperQuant: a compressed-resident LatticeLinear ({module.out_features}x{module.in_features}) has "
            "lattice coordinates beyond the int8 code range, so each call rebuilds its codes on the host (the codec's "
            "rescaling path), which cannot be captured in a CUDA graph. Use residency=\"int8\" for this model, or a "
            "torch.compile mode without CUDA graphs")
    buf = torch.empty(n, dtype=wdtype, device=module.hq_words.device)
    _decode_into(module, buf, wdtype, n, check=False)
    return buf.view(module.out_features, module.in_features), cache["sw"]


#: compressed residency: decode the predicted next layer on a side stream while this one computes (default on;
#: ``set_prefetch(False)`` decodes every layer just in time on the compute stream)
#: programs_per_sm: the side-stream decode's grid (None: the decoder's own). With the two-pass decoder (2 warps per
#: program) 8 per SM was best on the full LTX-2 compressed step: 1.004 s vs 1.038 s with the prefetch off, 1.020 s
#: (16/SM), 1.113 s (4/SM), 1.198 s (2/SM), 1.515 s (1/SM) (bench/RESULTS.md, 2026-11-24 04:15 UTC)
#: when: where the side-stream decode of the next layer is launched: "acquire" (as this layer's codes are fetched,
#: before its GEMM is launched), "after_launch" (right after this layer's GEMM is launched) or "after_gemm" (after
#: the GEMM is launched, and the side stream waits for the GEMM to finish: the decode never takes SMs from it)
_PREFETCH = {"on": True, "programs_per_sm": 8, "generation": 0, "when": "acquire"}
PREFETCH_WHEN = ("acquire", "after_launch", "after_gemm")
_PREFETCHERS: dict = {}


def set_prefetch(on: bool) -> None:
    """Turn the side-stream prefetch of compressed-resident layers' codes on or off (process-wide)."""
    for pf in _PREFETCHERS.values():
        pf.drain()
    _PREFETCH["on"] = bool(on)


def set_prefetch_when(when: str) -> None:
    """Where the side-stream prefetch is launched (see ``_PREFETCH``); one of ``PREFETCH_WHEN``."""
    if when not in PREFETCH_WHEN:
        raise ValueError(f"prefetch 'when' must be one of {PREFETCH_WHEN}, got {when!r}")
    for pf in _PREFETCHERS.values():
        pf.drain()
    _PREFETCH["when"] = when


def _prefetcher(device, wdtype) -> "_Prefetcher":
    key = (str(device), wdtype)
    pf = _PREFETCHERS.get(key)
    if pf is None:
        pf = _PREFETCHERS[key] = _Prefetcher(device, wdtype)
    return pf


def _module_prefetcher(module, cache: dict, wdtype) -> "_Prefetcher":
    """The prefetcher serving ``module``, remembered in its kernel cache (one lookup per call instead of building
    the device key); ``release_decode_buffers`` starts a new generation, so no module keeps an old one alive."""
    ent = cache.get(("pf", wdtype))
    if ent is None or ent[0] != _PREFETCH["generation"]:
        ent = cache[("pf", wdtype)] = (_PREFETCH["generation"], _prefetcher(module.hq_words.device, wdtype))
    return ent[1]


class _Prefetcher:
    """Overlaps the Rice decode of the next compressed-resident layer with the current layer's work.

    Two decode buffers (slots) per device and code dtype. The layer that follows each layer is learned from the
    calls themselves (last seen successor, held by weak reference), so any model whose layers run in a repeating
    order benefits and a wrong guess only costs a just-in-time decode. Ordering between the compute stream and the
    side stream is by events only: the side stream writes a slot after the compute stream's last use of it
    (``free``), the compute stream reads a slot after the side stream's write (``written``). The four events are
    created once and re-recorded (a wait takes the event's state when it is enqueued), and the side-stream decode
    is launched on the side stream directly: this path runs once per layer call, so its host time counts.
    """

    def __init__(self, device, wdtype):
        self.device, self.wdtype = torch.device(device), wdtype
        self.index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.stream = torch.cuda.Stream(self.device)
        self.bufs: list = [None, None]
        self.ev_written = [torch.cuda.Event(), torch.cuda.Event()]
        self.ev_free = [torch.cuda.Event(), torch.cuda.Event()]
        self.written: list = [False, False]   # ev_written[j] holds the side stream's last prefetch into slot j
        self.free: list = [False, False]      # ev_free[j] holds the compute stream's last use of slot j
        self.ready: dict = {}               # id(module) -> (weakref of the module, slot holding its codes)
        self.succ: dict = {}                # id(module) -> weakref of the module seen after it
        self.prev = None                    # weakref of the module served last
        self.pending = None                 # (module, slot, values) chosen to prefetch, not yet launched
        self.last_slot = 1

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs if b is not None)

    def drain(self) -> None:
        """Wait for the side stream and forget the prefetched slots (before buffers change or checks run)."""
        torch.cuda.current_stream(self.index).wait_stream(self.stream)
        self.ready.clear()
        self.pending = None

    def observe(self, module) -> None:
        if self.prev is not None and self.prev() is not None:
            self.succ[id(self.prev())] = weakref.ref(module)
        self.prev = weakref.ref(module)

    def _slot(self, j: int, n: int) -> torch.Tensor:
        b = self.bufs[j]
        if b is None or b.numel() < n:
            # growing happens while the largest layer is first seen: wait for every use of the old buffers
            torch.cuda.current_stream(self.index).synchronize()
            self.stream.synchronize()
            sizes = [max(n, 0 if x is None else x.numel()) for x in self.bufs]
            self.bufs = [None, None]   # the old slots are freed before the new ones are taken
            self.bufs = outside_graph_pools(self.device, lambda: [
                torch.empty(s, dtype=self.wdtype, device=self.device) for s in sizes])
            self.written, self.free, self.ready = [False, False], [False, False], {}
            b = self.bufs[j]
        return b[:n]

    def checked_slot(self, n: int) -> torch.Tensor:
        """A slot for a decode on the compute stream (after :meth:`drain`): the one not used last."""
        j = 1 - self.last_slot
        buf = self._slot(j, n)
        self._forget(j)
        self.last_slot = j
        return buf

    def acquire(self, module, n: int) -> torch.Tensor:
        """The decoded codes (n,) of ``module`` for use on the current stream; picks the next layer to prefetch
        (launched here or by :meth:`release`, as ``_PREFETCH["when"]`` says)."""
        main = torch.cuda.current_stream(self.index)
        self.pending = None               # a prefetch chosen by a call that never reached release: dropped
        self.observe(module)
        entry = self.ready.pop(id(module), None)
        # the weak reference guards against a dead module whose id a new module now has
        j = entry[1] if entry is not None and entry[0]() is module else None
        buf = None
        if j is not None and self.bufs[j] is not None and self.bufs[j].numel() >= n:
            buf = self.bufs[j][:n]
            main.wait_event(self.ev_written[j])
        else:
            j = 1 - self.last_slot
            buf = self._slot(j, n)
            if self.written[j]:
                main.wait_event(self.ev_written[j])
            _decode_into(module, buf, self.wdtype, n, check=False)
        self._forget(j)
        self.last_slot = j
        nxt = self.succ.get(id(module))
        nxt = nxt() if nxt is not None else None
        if nxt is not None and nxt is not module and self._prefetchable(nxt):
            k = 1 - j
            nn_ = nxt.out_features * nxt.in_features
            if self.bufs[k] is not None and self.bufs[k].numel() >= nn_:
                self.pending = (nxt, k, nn_)
                if _PREFETCH["when"] == "acquire":
                    self._launch_pending()
        return buf

    def _launch_pending(self) -> None:
        nxt, k, nn_ = self.pending
        self.pending = None
        self._forget(k)
        if self.free[k]:
            self.stream.wait_event(self.ev_free[k])
        pps = _PREFETCH["programs_per_sm"]
        _decode_into(nxt, self.bufs[k][:nn_], self.wdtype, nn_, check=False,
                     programs=num_sms(self.index) * pps if pps else None, stream=self.stream)
        self.ev_written[k].record(self.stream)
        self.written[k] = True
        self.ready[id(nxt)] = (weakref.ref(nxt), k)

    def release(self) -> None:
        """Called after the consumer of the last acquired slot was launched on the compute stream; launches the
        pending prefetch ("after_launch"), or makes it wait for that consumer to finish first ("after_gemm")."""
        self.ev_free[self.last_slot].record(torch.cuda.current_stream(self.index))
        self.free[self.last_slot] = True
        if self.pending is not None:
            if _PREFETCH["when"] == "after_gemm":
                self.stream.wait_event(self.ev_free[self.last_slot])
            self._launch_pending()

    def _forget(self, j: int) -> None:
        for key in [key for key, v in self.ready.items() if v[1] == j]:
            del self.ready[key]

    def _prefetchable(self, m) -> bool:
        c = m.__dict__.get("_hq_kernel_cache") or {}
        return (getattr(m, "codes", None) is None and getattr(m, "hq_words", None) is not None
                and m.hq_words.is_cuda and m.hq_words.device == self.device and c.get("checked")
                and not c.get("fallback") and (m.mma == "fp8") == (self.wdtype == torch.float8_e4m3fn))


#: layers reading the same activation (an attention's to_q / to_k / to_v) share its RHT + quantization when their
#: RHT signs are equal (the backend quantizes every layer with one seed): one entry, the last activation seen
_ACT_SHARE = {"on": True, "entry": None}
_SIGNS: dict = {}


def set_activation_sharing(on: bool) -> None:
    """Share one activation quantization between consecutive layers fed the same tensor (default on)."""
    _ACT_SHARE["on"] = bool(on)
    _ACT_SHARE["entry"] = None


@contextlib.contextmanager
def no_activation_sharing():
    """Within the block, no layer reuses or records a shared activation quantization. For eager layer calls made
    inside a compiled graph (the K/V compression ops project the text K/V there), where the activation may be a
    buffer that compiled code reuses without bumping its version counter."""
    saved = _ACT_SHARE["on"]
    _ACT_SHARE["on"] = False
    _ACT_SHARE["entry"] = None
    try:
        yield
    finally:
        _ACT_SHARE["on"] = saved


def _interned_signs(signs: torch.Tensor, dtype, device) -> torch.Tensor:
    """The RHT signs cast to ``dtype`` on ``device``, one tensor object per distinct sign vector (so equal signs
    are recognized by identity in the activation-sharing key)."""
    key = (dtype, str(device), signs.numel(), bytes(signs.to("cpu", torch.int8).numpy().tobytes()))
    t = _SIGNS.get(key)
    if t is None:
        t = _SIGNS[key] = signs.to(device=device, dtype=dtype).contiguous()
    return t


def _rht_operands(signs: torch.Tensor, tile: int, dtype, device):
    """(signs cast to ``dtype`` on ``device``, interned; the folded ``diag(d)·H`` operand when the signs repeat a
    flip ``d`` every tile, else None). Computed once per layer (reading the signs syncs the device once)."""
    s = _interned_signs(signs, dtype, device)
    d = tile_signs(signs, tile)
    return s, (None if d is None else signed_hadamard(d, dtype, device))


def _quantized_activation(x, x2, s, hs, tile: int, fmt: str, share: bool):
    # no sharing while a CUDA graph is captured: an entry recorded there holds graph-pool tensors that stay unwritten
    # until a replay, and one recorded before it holds memory the graph does not own
    if not (share and _ACT_SHARE["on"]) or capturing(x):
        return rht_quantize(x2, s, tile, fmt, signs_cast=s, hadamard=hs)
    key = (x._version, tuple(x.shape), tuple(x.stride()), x.storage_offset(), id(s), tile, fmt)
    ent = _ACT_SHARE["entry"]
    # a weak reference: the entry never keeps an activation alive, and a freed one can never match again
    if ent is not None and ent[0]() is x and ent[1] == key:
        return ent[2], ent[3]
    xq, sx = rht_quantize(x2, s, tile, fmt, signs_cast=s, hadamard=hs)
    _ACT_SHARE["entry"] = (weakref.ref(x), key, xq, sx)
    return xq, sx


#: the Triton GEMMs step K by 128; _scaled_mm needs N % 16. Smaller layers take the torch reference path on CUDA
#: (found by tests/test_backend.py on the device: a tiny T5's 64-wide layers).
GEMM_K_MULTIPLE, GEMM_N_MULTIPLE = 128, 16


def supports(module, x: torch.Tensor) -> bool:
    # the kernels build no autograd graph: an input that needs a gradient takes the (differentiable) reference
    return (x.is_cuda and not (x.requires_grad and torch.is_grad_enabled())
            and module.lattice in _KERNEL_LATTICES and module.mma in ("int8", "fp8")
            and module.in_features % GEMM_K_MULTIPLE == 0 and module.out_features % GEMM_N_MULTIPLE == 0
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton_available())


def cuda_forward(module, x: torch.Tensor, share_activation: bool = True) -> torch.Tensor:
    """``LatticeLinear`` forward on CUDA: (..., in_features) -> (..., out_features) in x's dtype.
    ``share_activation``: allow reusing the previous layer's quantization of the same tensor (eager only: the key
    is the tensor's identity and version counter, which compiled code does not bump when it reuses a buffer)."""
    if not supports(module, x):
        if getattr(module, "codes", None) is None and capturing(x):
            raise RuntimeError(
                f"HyperQuant: a compressed-resident LatticeLinear ({module.out_features}x{module.in_features}, "
                f"{module.lattice}) takes the torch reference path on CUDA (the kernels need an integer lattice, "
                f"in_features a multiple of {GEMM_K_MULTIPLE} and out_features of {GEMM_N_MULTIPLE}), which decodes "
                "its stream on the host at every call; that cannot be captured in a CUDA graph. Use "
                "residency=\"int8\" for such models, or a torch.compile mode without CUDA graphs")
        return module.reference_forward(x)
    k, n = module.in_features, module.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    cache = _cache(module)
    skey = ("signs", x.dtype, x.device)
    ops = cache.get(skey)
    if ops is None:
        if capturing(x):
            _require_warm(module, "reads its RHT signs back to the host")
        ops = cache[skey] = outside_graph_pools(x.device, _rht_operands, module.signs, module.tile_size, x.dtype,
                                                x.device)
    fmt = module.mma
    if fmt == "fp8":
        require_fp8_mma(x.device)     # before the activation pass, whose e4m3 cast needs the same GPUs
    xq, sx = _quantized_activation(x, x2, ops[0], ops[1], module.tile_size, fmt, share_activation)
    wq, sw = weight_codes(module, fmt)
    bias = module.bias
    if fmt == "int8":
        y = int8_linear(xq, sx, wq, sw, bias, out_dtype=x.dtype)
    else:
        out_dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
        bb = bias.to(out_dtype) if bias is not None and bias.dtype != out_dtype else bias
        y = fp8_linear(xq, sx, wq, sw, bb, out_dtype=out_dtype).to(x.dtype)
    if getattr(module, "codes", None) is None and _PREFETCH["on"] and not capturing(x):
        pf = cache.get(("pf", wq.dtype))
        if pf is not None and pf[0] == _PREFETCH["generation"]:
            pf[1].release()
    return y.reshape(*lead, n)


def decoded_codes(module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codes (out, in), float32 scale (out,)) of a compressed-resident LatticeLinear on CUDA, decoded by the
    GPU Rice decoder into fresh tensors (not the shared just-in-time buffer): ``codes * scale[:, None]`` is the
    RHT-domain weight exactly. None if a coordinate exceeds ±127 (the codec's torch path handles those)."""
    n = module.out_features * module.in_features
    try:
        codes, _, _ = rice_decode(module.hq_words, module.hq_offsets, module.hq_ks, n, module.lattice,
                                  module.block_values, check=True)
    except ValueError:
        return None
    return codes.view(module.out_features, module.in_features), _code_scale_compressed(module)


def make_int8_resident(module) -> bool:
    """Decode a compressed-resident LatticeLinear's stream once with the GPU decoder and keep int8 codes (what
    ``LatticeLinear.finalize`` does for ``residency="int8"``, without the torch decoder). Returns False (layer left
    compressed) if a coordinate exceeds ±127."""
    decoded = decoded_codes(module)
    if decoded is None:
        return False
    module.codes, module.code_scale = decoded
    for name in ("hq_signs", "hq_scales", "hq_ks", "hq_offsets", "hq_words"):
        setattr(module, name, None)
    module.residency = "int8"
    _cache(module).clear()
    module.fit_codes_to_mma()   # e4m3 codes for a layer whose MMA is fp8
    return True
