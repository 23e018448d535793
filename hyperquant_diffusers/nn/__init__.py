"""Quantized layers: :class:`LatticeLinear` and :func:`memory_footprint`."""

from .lattice_linear import LatticeLinear, compressed_shapes, memory_footprint

__all__ = ["LatticeLinear", "compressed_shapes", "memory_footprint"]
