"""The HyperQuant codec: per-tile RHT -> nearest lattice point -> bit-stripped, Rice-coded indices.

Pure torch; knows nothing of diffusers. See :func:`quantize` and :class:`LatticeTensor`.
"""

from .constants import FORMAT_VERSION, LATTICES, lattice_spec
from .hadamard import fwht, inverse_rht, random_signs, rht, tile_signs
from .lattices import coords_to_points, nearest_a2, nearest_d4, nearest_e8, nearest_point, nearest_z
from .rice import RiceStreamError, rice_decode, rice_encode
from .tensor import FormatError, LatticeTensor, quantize

__all__ = [
    "FORMAT_VERSION", "LATTICES", "lattice_spec", "fwht", "rht", "inverse_rht", "random_signs", "tile_signs",
    "coords_to_points", "nearest_point", "nearest_z", "nearest_a2", "nearest_d4", "nearest_e8",
    "RiceStreamError", "rice_encode", "rice_decode", "FormatError", "LatticeTensor", "quantize",
]
