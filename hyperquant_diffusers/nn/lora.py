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
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from .lattice_linear import LatticeLinear

_HOOK = {"handle": None}


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
            nothing."""
            names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
            if not names:
                return
            base = self.get_base_layer()
            merged = list(self.merged_adapters) + names
            current = base.weight_state()           # references: put back if the merge fails
            if self._hq_original is not None:
                base.load_weight_state(self._hq_original)
            try:
                w = base.dequantize(torch.float32)
                for a in merged:
                    w += self.get_delta_weight(a).to(w.device, torch.float32)
                bias = base.bias
                if bias is not None and any(self.lora_bias[a] for a in merged):
                    bias = bias.detach().float() + sum(self.lora_B[a].bias.detach().float() * self.scaling[a]
                                                       for a in merged if self.lora_bias[a])
                elif any(self.lora_bias[a] for a in merged):
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has "
                                       "no bias.")
                if not bool(torch.isfinite(w).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {names} seem to be "
                                     "broken")
                original = self._hq_original or base.weight_state(device="cpu")
                base.requantize(w)
            except BaseException:
                base.load_weight_state(current)
                raise
            if bias is not None and bias is not base.bias:
                with torch.no_grad():
                    base.bias.copy_(bias)
            self._hq_original = original
            self.merged_adapters.extend(names)

        def unmerge(self) -> None:
            """Put back the base layer's original codes (and bias), bit for bit."""
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            self.get_base_layer().load_weight_state(self._hq_original)
            self._hq_original = None
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
