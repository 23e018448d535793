"""The one place where the codec's numbers live (format version, limits, lattice table)."""

from __future__ import annotations

from dataclasses import dataclass
import math

#: Version of the serialized ``LatticeTensor`` blob (``LatticeTensor.to_bytes``). Bump on any layout change.
FORMAT_VERSION = 2
#: Magic prefix of a serialized ``LatticeTensor`` blob.
BLOB_MAGIC = b"HQLT"

#: Allowed range of the RHT tile (values along the contraction axis); always a power of two.
MIN_TILE, MAX_TILE = 16, 1024
DEFAULT_TILE = 128

#: Values per independently decodable Rice block (a power of two, multiple of every lattice dimension).
DEFAULT_BLOCK_VALUES = 4096
MIN_BLOCK_VALUES, MAX_BLOCK_VALUES = 256, 1 << 20

#: Requested rate range, bits per scalar.
MIN_BITS, MAX_BITS = 1.0, 8.0

#: Rice parameters are searched in [0, MAX_RICE_K].
MAX_RICE_K = 24
#: A unary quotient reaching ESCAPE_Q marks an escape: the magnitude follows raw in ESCAPE_BITS bits.
ESCAPE_Q = 24
ESCAPE_BITS = 32
#: Largest lattice coordinate magnitude the codec accepts (keeps int64 bit packing exact).
MAX_ABS_COORD = (1 << 30) - 1
#: Row steps in a blob ("log8"): step = base * STEP_MANTISSAS[c % 16] * 2 ** (c // 16) for an 8-bit code c, i.e.
#: 1/16-octave steps over 16 octaves. The mantissas are the float32 values of 2 ** (j / 16), written out so that
#: encoder and decoder never depend on a platform's exp2.
STEP_MANTISSAS = tuple(float.fromhex(h) for h in (
    "0x1.000000p+0", "0x1.0b5586p+0", "0x1.172b84p+0", "0x1.2387a6p+0", "0x1.306fe0p+0", "0x1.3dea64p+0",
    "0x1.4bfdaep+0", "0x1.5ab07ep+0", "0x1.6a09e6p+0", "0x1.7a1148p+0", "0x1.8ace54p+0", "0x1.9c4918p+0",
    "0x1.ae89fap+0", "0x1.c199bep+0", "0x1.d5818ep+0", "0x1.ea4afap+0"))
#: A2 points are coded by their rank in the norm order of the lattice (see ``a2_index``); the ranks below this
#: are tabulated (a disk of radius ~600 lattice units); a point outside is coded as this rank (an escape)
#: followed by its two coordinates raw (ESCAPE_BITS each).
A2_RANK_TABLE = 1 << 20


@dataclass(frozen=True)
class LatticeSpec:
    """A lattice as the codec uses it.

    ``dim``: vectors of this many scalars are quantized jointly.
    ``nsm``: normalized second moment G of the Voronoi cell (Conway & Sloane, Table 2.3).
    ``volume``: Voronoi-cell volume of the lattice at unit step (Z: Z^1; A2: hexagonal, minimum distance 1;
    D4: integer vectors of even sum; E8: D8 ∪ (D8 + ½), minimum norm √2). A step size ``delta`` scales it by
    ``delta ** dim``.
    ``code``: small integer identifying the lattice in the blob header.
    ``classes``: number of symbol classes with their own Rice parameter per block (1 for every lattice: the
    coordinates of Z, D4 and E8 are exchangeable, and A2 codes one rank per point).
    """

    name: str
    dim: int
    nsm: float
    code: int
    volume: float
    classes: int


LATTICES: dict[str, LatticeSpec] = {
    "Z": LatticeSpec("Z", 1, 1.0 / 12.0, 0, 1.0, 1),
    "A2": LatticeSpec("A2", 2, 5.0 / (36.0 * math.sqrt(3.0)), 1, math.sqrt(3.0) / 2.0, 1),
    "D4": LatticeSpec("D4", 4, 0.0766032, 2, 2.0, 1),
    "E8": LatticeSpec("E8", 8, 0.0716821, 3, 1.0, 1),
}
LATTICE_BY_CODE = {spec.code: spec for spec in LATTICES.values()}


def lattice_spec(name: str) -> LatticeSpec:
    """Look up a lattice by name (case-insensitive); raise ``ValueError`` naming the choices."""
    key = str(name).upper()
    if key not in LATTICES:
        raise ValueError(f"unknown lattice {name!r}; choose one of {sorted(LATTICES)}")
    return LATTICES[key]


def check_tile_size(tile_size: int) -> int:
    """Validate an RHT tile size: a power of two in [MIN_TILE, MAX_TILE]."""
    t = int(tile_size)
    if t != tile_size or t < MIN_TILE or t > MAX_TILE or (t & (t - 1)) != 0:
        raise ValueError(
            f"tile_size must be a power of two between {MIN_TILE} and {MAX_TILE}, got {tile_size!r}"
        )
    return t


def check_bits(bits: float) -> float:
    """Validate a requested rate in bits per scalar."""
    b = float(bits)
    if not math.isfinite(b) or b < MIN_BITS or b > MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}] bits per scalar, got {bits!r}")
    return b
