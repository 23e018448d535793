"""LoRA (peft) on :class:`LatticeLinear`: the adapter added in one pass, and merging that re-quantizes.

peft wraps every targeted linear (``LatticeLinear`` is an ``nn.Linear``) in its ``lora.Linear``. Two of that
wrapper's methods assume a float weight or cost more than they need here, so a wrapper whose base layer is a
``LatticeLinear`` becomes a :class:`LatticeLoraLinear` (same state, same peft API) the moment peft sets its
``base_layer`` -- a module-registration hook (:func:`install_lora_hook`, installed when this package is imported),
because neither diffusers' ``load_lora_weights`` nor peft's ``inject_adapter_in_model`` takes a layer mapping.

* forward: ``y = lattice(x) + sum_a scale_a * (A_a x) B_a^T``, the adapter product accumulated into the quantized
  layer's output in one pass per adapter (on CUDA the Triton kernel ``kernels/lora_add.py``, elsewhere and under
  ``torch.compile`` an in-place ``addmm``; out of place when autograd records). peft writes ``B(A(x))``, scales
  it and adds it: three passes over the (tokens, out_features) output. A LoRA bias, per-sample ``adapter_names``, disabled or merged adapters
  run peft's own forward. LoRA variants (DoRA, ...) need the dense weight at every step: refused with a named
  error when the adapter is created.
* merge (``fuse_lora``): the lattice codes cannot absorb a float delta, so the layer is re-quantized from its
  dequantized original weight plus the deltas of all merged adapters (:meth:`LatticeLinear.requantize`, same codec
  settings): after the merge the layer runs at the quantized layer's speed and holds the same number of bytes.
  The original codes are kept in host memory, so unmerge (``unfuse_lora``) restores them bit for bit and a second
  merge starts from them again (no quantization error accumulates). ``unload_lora_weights`` after ``fuse_lora``
  leaves the re-quantized layer in place: such a model saves as an ordinary HyperQuant checkpoint.
* batched merges (:func:`batched_merges`; every ``fuse_lora`` of a diffusers model the backend loaded runs in one,
  :func:`batch_fuse_lora`): the merges wait, and layers of one shape and codec settings are re-quantized as one
  stacked group (``LatticeLinear.requantized_many``), as the model's weights were when it loaded. On a GPU the
  per-call work of the codec (the rate search's launches and host syncs) dominates a layer's re-quantization, so
  this halves a full LTX-2 ``fuse_lora`` (bench/RESULTS.md). A waiting merge holds no float weight: each layer's
  ``W_hat + dW`` is computed into its group's stacked buffer when the group is due
  (``kernels.quantize.quantize_filled``), so the fuse needs one group's buffer and the codec's working set
  beside the model (4.9 GiB for the full LTX-2 at the default group size, 9.1 GiB when the merges waited with
  their weights).

  The merged codes quantize ``W_hat + dW``: a delta much smaller than the codec's error at the layer's rate
  mostly rounds back to the original codes (at 4 bps E8 a random rank-16 delta of 1-3% of ``|W|`` keeps under 4%
  of itself, one of 10% ~91%, one of 20% ~99%; ``bench/bench_lora.py --fuse-retention``). Each merge measures the
  fraction it kept (:func:`fused_lora_retained`) and warns, once per set of adapters, when a layer kept less than
  :data:`RETAINED_WARN` of it: the fused model is then closer to the model without the LoRA, and the adapter
  should stay unfused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
import types
import warnings

import torch
from torch import nn

from ..codec.constants import DEFAULT_GROUP_VALUES
from .group_buffer import MAX_BUFFERED_GROUPS, GroupBuffer
from .lattice_linear import LatticeLinear

_HOOK = {"handle": None}

#: a merge that keeps less than this fraction of its adapters' weight change (see fused_lora_retained) warns
RETAINED_WARN = 0.5

#: the adapter sets (sorted name tuples) already warned about in this process: one warning per fuse, not per layer
_WARNED: set[tuple[str, ...]] = set()


def retained_fraction(w_hat: torch.Tensor, w_fused: torch.Tensor, delta: torch.Tensor) -> float:
    """``<w_fused - w_hat, delta> / |delta|^2``: how much of the weight change ``delta`` a re-quantized weight
    carries (1: all of it, 0: rounded away; 1.0 for a zero delta). Tensors of one shape, float32 (the sums in
    float32: a ratio, not a weight, so no float64 copy of a large layer is made)."""
    d = delta.flatten().float()
    dd = float(torch.dot(d, d))
    if dd == 0.0:
        return 1.0
    return float(torch.dot((w_fused.float() - w_hat.float()).flatten(), d)) / dd


def fused_lora_retained(model: nn.Module) -> dict[str, float]:
    """``{module name: fraction}`` for every merged (``fuse_lora``) LoRA layer on a LatticeLinear in ``model``: the
    fraction of its merged adapters' weight change ``dW = sum scale * B A`` that the re-quantized codes carry,
    ``<W_fused - W_hat, dW> / |dW|^2`` (1: all of it; near 0: the delta was smaller than the codec's error and
    rounded away, so the fused layer acts as if it had no adapter)."""
    return {name: m._hq_retained for name, m in model.named_modules()
            if getattr(m, "_hq_retained", None) is not None and getattr(m, "merged", False)}


@dataclasses.dataclass
class _MergePlan:
    """One layer's merge, decided but not yet re-quantized."""
    names: list[str]                 # adapters this merge adds
    merged: list[str]                # all adapters merged once it is done
    weight: torch.Tensor | None      # W_hat + sum of the merged deltas, float32 on the layer's device; None while
                                     # a batched merge waits (its group's buffer is filled from the adapters)
    bias: torch.Tensor | None        # the merged bias (the base layer's own when no adapter has a bias)
    original: dict                   # the base layer's original weight_state, host copies


class _MergeBatch:
    """Merges waiting to be re-quantized in same-settings groups (:func:`batched_merges`)."""

    def __init__(self, group_values: int):
        self.group_values = int(group_values)
        self.buffer = GroupBuffer(MAX_BUFFERED_GROUPS * self.group_values)
        self.pending: dict[int, nn.Module] = {}    # id(wrapper) -> wrapper, for settle()

    def add(self, wrapper, plan: _MergePlan) -> None:
        base = wrapper.get_base_layer()
        numel = base.out_features * base.in_features
        self.pending[id(wrapper)] = wrapper
        for _, group in self.buffer.add(base.requantize_key(), (wrapper, plan), numel, self.group_values // numel):
            self._run(group)

    def settle(self, wrapper) -> None:
        """Re-quantize everything waiting when ``wrapper`` is among it (before it merges again or unmerges)."""
        if id(wrapper) in self.pending:
            self.flush()

    def flush(self) -> None:
        for _, group in self.buffer.pop_all():
            self._run(group)

    def drop(self) -> None:
        """Forget what waits: those layers were never changed and stay unmerged."""
        self.buffer.pop_all()
        self.pending.clear()

    def _run(self, group: list) -> None:
        wrappers = [w for w, _ in group]
        bases = [w.get_base_layer() for w in wrappers]
        for w in wrappers:
            self.pending.pop(id(w), None)

        def fill(i: int, out: torch.Tensor) -> None:
            wrapper, plan = group[i]
            wrapper._merged_weight_into(plan.merged, plan.original, out)

        # the merged weights are computed into the group's stacked buffer, one at a time: nothing float waits
        qs = LatticeLinear.requantized_many(bases, fill=fill, max_values=self.group_values)
        for (wrapper, plan), base, q in zip(group, bases, qs):
            if wrapper._hq_original is not None:      # a re-merge: the layer holds the codes of its first merge
                base.load_weight_state(plan.original)
            w_hat = base.dequantize(torch.float32)
            base.load_lattice_tensor(q)
            wrapper._finish_merge(plan, w_hat)


_ACTIVE = threading.local()


def _active_batch() -> _MergeBatch | None:
    return getattr(_ACTIVE, "batch", None)


def _check_group_values(where: str, group_values) -> None:
    if isinstance(group_values, bool) or not isinstance(group_values, int) or group_values < 1:
        raise ValueError(f"{where}: group_values must be a positive integer, got {group_values!r}")


@contextlib.contextmanager
def batched_merges(group_values: int = DEFAULT_GROUP_VALUES):
    """Within the block, LoRA merges onto LatticeLinear layers (``fuse_lora``, peft's ``merge``) are re-quantized
    in groups: layers of one shape and codec settings (``LatticeLinear.requantize_key``) are stacked, up to
    ``group_values`` float values per codec call (``kernels.quantize.quantize_many``, as when a model loads: the
    rate search's step multiplier is shared by the group). A layer's merge takes effect when its group fills or
    the block ends; until then the layer runs as before the merge (the adapters beside the original codes, or a
    re-merge's earlier merged codes without the new adapters).

    Every ``fuse_lora`` of a diffusers model that the backend quantized runs in such a block
    (:func:`batch_fuse_lora`); wrap ``pipe.fuse_lora(...)`` in it to batch a transformers text encoder's merges
    too. If the block raises, the merges still waiting are dropped: those layers stay unmerged. Nested blocks join
    the outer one."""
    if _active_batch() is not None:
        yield
        return
    _check_group_values("batched_merges", group_values)
    batch = _ACTIVE.batch = _MergeBatch(group_values)
    try:
        yield
        batch.flush()
    except BaseException:
        batch.drop()
        raise
    finally:
        _ACTIVE.batch = None


def _batched_fuse_lora(self, *args, **kwargs):
    with batched_merges(self.__dict__.get(_FUSE_GROUP_ATTR, DEFAULT_GROUP_VALUES)):
        return type(self).fuse_lora(self, *args, **kwargs)


_batched_fuse_lora.__name__ = "fuse_lora"   # a pickled bound method is looked up by this name


#: the model attribute that holds its fuse_lora's ``group_values`` (a plain int: copy.deepcopy keeps it)
_FUSE_GROUP_ATTR = "_hq_fuse_group_values"


def batch_fuse_lora(model: nn.Module, group_values: int = DEFAULT_GROUP_VALUES) -> None:
    """Make ``model.fuse_lora`` (diffusers' ``PeftAdapterMixin``; ``pipe.fuse_lora`` calls it) run in
    :func:`batched_merges` with ``group_values`` float values per codec call (the backend passes the model's
    ``quantize_batch_values``, 1 when that is 0: one layer per call): an attribute of this model object only, so
    other models are untouched. No-op for a model without ``fuse_lora``. Full-size LTX-2 on an H200, time and peak
    GPU memory: see bench/RESULTS.md (``bench_lora --full-size``)."""
    _check_group_values("batch_fuse_lora", group_values)
    if callable(getattr(type(model), "fuse_lora", None)):
        # a bound method (not a closure) so that copy.deepcopy binds the copy's to the copy
        model.__dict__["fuse_lora"] = types.MethodType(_batched_fuse_lora, model)
        model.__dict__[_FUSE_GROUP_ATTR] = group_values


def install_lora_hook() -> None:
    """Register (once per process) the module-registration hook that turns peft's ``lora.Linear`` wrappers of a
    LatticeLinear into :class:`LatticeLoraLinear`. It looks only at a submodule registered as ``base_layer``."""
    if _HOOK["handle"] is None:
        _HOOK["handle"] = torch.nn.modules.module.register_module_module_registration_hook(_on_register)


def _on_register(module: nn.Module, name: str, submodule) -> None:
    # returns None: the registered submodule itself is kept; only the wrapper's class changes
    if name == "base_layer" and isinstance(submodule, LatticeLinear):
        cls = lattice_lora_class()
        if cls is not None and type(module) is cls.__bases__[0]:
            module.__class__ = cls   # peft's lora.Linear is mid-__init__: the adapter is created by our subclass


@functools.cache
def _lora_add():
    """The kernels' ``lora_add`` module (one-pass in-place adapter add on CUDA), or None without it."""
    try:
        from ..kernels import lora_add
    except ImportError:
        return None
    return lora_add


@functools.cache
def lattice_lora_class():
    """:class:`LatticeLoraLinear` (built on first use: it subclasses peft's ``lora.Linear``), or None without
    peft."""
    try:
        from peft.tuners.lora.layer import Linear as PeftLoraLinear
        from peft.tuners.tuners_utils import check_adapters_to_merge
    except ImportError:
        return None

    class LatticeLoraLinear(PeftLoraLinear):
        """peft's ``lora.Linear`` around a :class:`LatticeLinear`: fused adapter add, merging by re-quantization
        (see the module docstring). Shapes as the base layer: x (..., in_features) -> (..., out_features)."""

        _hq_original = None    # the base layer's weight_state (host copies) while adapters are merged
        _hq_retained = None    # fraction of the merged delta the re-quantized codes carry (fused_lora_retained)

        def resolve_lora_variant(self, *, config, **kwargs):
            variant = super().resolve_lora_variant(config=config, **kwargs)
            if variant is not None:
                raise NotImplementedError(
                    f"HyperQuant: the LoRA variant {type(variant).__name__} (DoRA and the like) needs the dense base "
                    f"weight at every step; it is not supported on a quantized layer "
                    f"({self.get_base_layer().out_features}x{self.get_base_layer().in_features} LatticeLinear). "
                    "Plain LoRA is; or exclude this module from quantization (modules_to_not_convert).")
            return variant

        def _plain_adapters(self) -> list[str] | None:
            """The active adapters when none has a LoRA bias, else None."""
            names = [a for a in self.active_adapters if a in self.lora_A]
            if any(self.lora_B[a].bias is not None for a in names):
                return None
            return names

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            names = None if (args or kwargs or self.disable_adapters or self.merged) else self._plain_adapters()
            if names is None:
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)
            if not names:
                return result
            n = result.shape[-1]
            out = result.reshape(-1, n)
            # in place unless autograd has to see the product (training the adapter on the quantized base)
            grad = torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for a in names for p in (self.lora_A[a].weight, self.lora_B[a].weight)))
            # the one-pass Triton add on CUDA, eager; compiled graphs and the CPU take addmm
            kernel = _lora_add() if out.is_cuda and not grad and not torch.compiler.is_compiling() else None
            for a in names:
                lora_a = self.lora_A[a]
                xa = lora_a(self.lora_dropout[a](self._cast_input_dtype(x, lora_a.weight.dtype)))
                xa = xa.reshape(-1, xa.shape[-1]).to(out.dtype)
                b = self.lora_B[a].weight.to(out.dtype)
                if grad:
                    out = torch.addmm(out, xa, b.t(), alpha=self.scaling[a])
                elif kernel is not None and kernel.serves(out, xa, b):
                    kernel.lora_add_(out, xa, b, self.scaling[a])
                else:
                    out.addmm_(xa, b.t(), alpha=self.scaling[a])
            return out.view(result.shape)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            """Merge adapters by re-quantizing the base layer from its original weight plus every merged adapter's
            delta. ``safe_merge`` is implied: a non-finite merged weight raises ``ValueError`` and changes
            nothing. Inside :func:`batched_merges` (every ``fuse_lora`` of a model the backend quantized) a
            first merge waits and is re-quantized with the other layers of its shape and codec settings in one
            codec call; the layer changes when the block ends (or its group fills)."""
            batch = _active_batch()
            if batch is not None:
                batch.settle(self)
            names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
            if not names:
                return
            if batch is not None:
                # the layer keeps its current codes until the batch re-quantizes its group, which computes the
                # merged weight then (into the group's buffer): a waiting merge holds no float weight
                batch.add(self, self._merge_plan(names, None))
                return
            base = self.get_base_layer()
            current = base.weight_state()           # references: put back if the merge fails
            if self._hq_original is not None:
                base.load_weight_state(self._hq_original)
            try:
                w_hat = base.dequantize(torch.float32)
                plan = self._merge_plan(names, w_hat)
                base.requantize(plan.weight)
                self._finish_merge(plan, w_hat)
            except BaseException:
                base.load_weight_state(current)
                raise

        def _merge_plan(self, names: list[str], w_hat: torch.Tensor | None) -> _MergePlan:
            """What a merge of ``names`` re-quantizes: ``w_hat`` (the base layer's original weight, float32; a
            re-merge has loaded the original codes) plus the deltas; the base layer is not changed. ``w_hat``
            None (a batched merge): the plan holds no weight, and the check for non-finite values runs on the
            adapters' factors and scales (a decoded weight is finite; the product is formed, and the sum checked,
            when the batch computes the merged weight: forming it here too would be one more full-size product
            per layer)."""
            base = self.get_base_layer()
            merged = list(self.merged_adapters) + names
            with torch.no_grad():
                if w_hat is None:
                    w = None
                    finite = all(math.isfinite(self.scaling[a]) and bool(torch.isfinite(self.lora_A[a].weight).all())
                                 and bool(torch.isfinite(self.lora_B[a].weight).all()) for a in merged)
                else:
                    w = w_hat.clone()
                    for a in merged:
                        w += self.get_delta_weight(a).to(w.device, torch.float32)
                    finite = bool(torch.isfinite(w).all())
            bias = base.bias
            if bias is not None and any(self.lora_bias[a] for a in merged):
                bias = bias.detach().float() + sum(self.lora_B[a].bias.detach().float() * self.scaling[a]
                                                   for a in merged if self.lora_bias[a])
            elif any(self.lora_bias[a] for a in merged):
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has "
                                   "no bias.")
            if not finite or (bias is not None and not bool(torch.isfinite(bias).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {names} seem to be "
                                 "broken")
            original = self._hq_original or base.weight_state(device="cpu")
            return _MergePlan(names, merged, w, bias, original)

        def _merged_weight_into(self, merged: list[str], original: dict, out: torch.Tensor) -> None:
            """Write ``W_hat + sum of the deltas of merged`` (float32, the sums in the order of
            :meth:`_merge_plan`) into ``out`` (out_features, in_features) float32; ``original``: the base layer's
            original weight_state, loaded for the dequantization when the layer holds a first merge's codes."""
            base = self.get_base_layer()
            with torch.no_grad():
                if self._hq_original is None:
                    out.copy_(base.dequantize(torch.float32))
                else:
                    current = base.weight_state()
                    base.load_weight_state(original)
                    try:
                        out.copy_(base.dequantize(torch.float32))
                    finally:
                        base.load_weight_state(current)
                for a in merged:
                    out += self.get_delta_weight(a).to(out.device, torch.float32)

        def _finish_merge(self, plan: _MergePlan, w_hat: torch.Tensor) -> None:
            """Bookkeeping once the base layer holds the re-quantized codes of the merge: the kept fraction
            (against ``w_hat``, the original weight, float32), bias, merged names, the warning."""
            base = self.get_base_layer()
            if plan.weight is not None:
                delta = plan.weight.sub_(w_hat)       # the merged weight is not needed any more
            else:                                     # a batched merge: the deltas again (a rank-r product each)
                with torch.no_grad():
                    delta = None
                    for a in plan.merged:
                        d = self.get_delta_weight(a).to(w_hat.device, torch.float32)
                        delta = d if delta is None else delta.add_(d)
            retained = retained_fraction(w_hat, base.dequantize(torch.float32), delta)
            del delta, w_hat
            plan.weight = None
            if plan.bias is not None and plan.bias is not base.bias:
                with torch.no_grad():
                    base.bias.copy_(plan.bias)
            self._hq_original = plan.original
            self._hq_retained = retained
            self.merged_adapters.extend(plan.names)
            key = tuple(sorted(plan.merged))
            if retained < RETAINED_WARN and key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(
                    f"HyperQuant fuse_lora: re-quantizing a {base.out_features}x{base.in_features} layer at "
                    f"{base.bits:g} bits per scalar kept {100 * retained:.0f}% of the weight change of adapter(s) "
                    f"{list(key)}: the change is smaller than the codec's error at this rate and rounds back to the "
                    "original codes, so the fused model acts much as if it had no LoRA. Keep the adapter unfused "
                    "(unfuse_lora), or quantize with more bits. hyperquant_diffusers.nn.lora.fused_lora_retained"
                    "(model) gives the fraction per layer (warned once per set of adapters).", stacklevel=3)

        def unmerge(self) -> None:
            """Put back the base layer's original codes (and bias), bit for bit."""
            batch = _active_batch()
            if batch is not None:
                batch.settle(self)
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            self.get_base_layer().load_weight_state(self._hq_original)
            self._hq_original = self._hq_retained = None
            self.merged_adapters.clear()

        def __repr__(self) -> str:
            return "hyperquant." + super().__repr__()

    LatticeLoraLinear.__module__ = __name__
    LatticeLoraLinear.__qualname__ = "LatticeLoraLinear"   # pickle finds it through the module __getattr__
    return LatticeLoraLinear


def __getattr__(name: str):
    if name == "LatticeLoraLinear":
        cls = lattice_lora_class()
        if cls is not None:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
