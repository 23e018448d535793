"""Quantized layers: :class:`LatticeLinear`, :func:`memory_footprint`, and the LoRA wrapper of a LatticeLinear
(:func:`lattice_lora_class`; peft's wrappers become it through the hook installed here, see :mod:`.lora`)."""

from .lattice_linear import LatticeLinear, compressed_shapes, memory_footprint
from .lora import install_lora_hook, lattice_lora_class

install_lora_hook()

__all__ = ["LatticeLinear", "compressed_shapes", "install_lora_hook", "lattice_lora_class", "memory_footprint"]
