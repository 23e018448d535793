"""The one place where the codec's numbers live (format version, limits, lattice table)."""

from __future__ import annotations

from dataclasses import dataclass
import math

#: Version of the serialized ``LatticeTensor`` blob (``LatticeTensor.to_bytes``). Bump on any layout change.
#: 3: Z and D4 coded by pair ranks (:mod:`.rank_index`) instead of sign-magnitude coordinates.
FORMAT_VERSION = 3
#: Magic prefix of a serialized ``LatticeTensor`` blob.
BLOB_MAGIC = b"HQLT"

#: Allowed range of the RHT tile (values along the contraction axis); always a power of two.
MIN_TILE, MAX_TILE = 16, 1024
DEFAULT_TILE = 128
#: how the RHT signs of a fresh quantization are drawn: "tiled" (one tile's signs repeated along the row, the
#: default: the GPU activation pass folds the flip into its Hadamard operand, bench/RESULTS.md) or "independent"
#: (a sign per value, what every checkpoint quantized before 2026-12-02 has). A checkpoint stores its signs, so
#: either kind loads anywhere; only the speed of the activation pass differs.
RHT_SIGN_MODES = ("tiled", "independent")

#: Values per pass of the final point search and Rice coding (``quantize(chunk_values=...)``, ``encode_coords``)
#: when quantizing on a GPU. The codec's default (2M) bounds memory on the CPU but costs a GPU launches and host
#: syncs per chunk: with it a full LTX-2 quantizes ~40 s slower (bench/RESULTS.md, H100/H200). A pass needs ~95
#: bytes per value (~3 GiB at 2^25), whatever the size of the stacked group. The stream does not depend on it.
GPU_ENCODE_CHUNK = 1 << 25

#: Float values of same-shape weights stacked into one codec call (one rate search, its step multiplier shared by
#: the group): ``kernels.quantize.quantize_many``'s groups, the backend's ``quantize_batch_values`` while a model
#: loads, and batched LoRA merges. 2^28 = 256M values (LTX-2: 16 layers of 4096x4096; 1 GiB in float32).
DEFAULT_GROUP_VALUES = 1 << 28

#: Values per independently decodable Rice block (a power of two, multiple of every lattice dimension).
DEFAULT_BLOCK_VALUES = 4096
MIN_BLOCK_VALUES, MAX_BLOCK_VALUES = 256, 1 << 20

#: Requested rate range, bits per scalar.
MIN_BITS, MAX_BITS = 1.0, 8.0

#: K/V compression (``kv.quantizer``): its bias corrections and rate range, bits per K/V value (everything stored
#: counted); here so that ``HyperQuantConfig`` validates with the same numbers without importing the K/V package.
KV_METHODS = ("dither", "qjl", "none")
MIN_KV_BITS, MAX_KV_BITS = 1.5, 8.0

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
#: Z and D4 code pairs of integer coordinates by their rank in the norm order of Z^2 or of one checkerboard coset
#: of Z^2 (see ``rank_index``). Their tables hold every point of the disk ``c0^2 + c1^2 <= Z2_RANK_NORM2``
#: (radius 512 lattice units); the escape rank is the table's size, followed by the pair's two coordinates raw.
Z2_RANK_NORM2 = 1 << 18


def _disk_count(norm2: int, coset: int | None = None) -> int:
    """Integer points (c0, c1) with c0^2 + c1^2 <= norm2, all or only those with (c0 + c1) % 2 == coset."""
    b = math.isqrt(norm2)
    total = 0
    for c0 in range(-b, b + 1):
        h = math.isqrt(norm2 - c0 * c0)  # |c1| <= h
        if coset is None:
            total += 2 * h + 1
        else:  # c1 in [-h, h] with c1 ≡ coset - c0 (mod 2)
            par = (coset - c0) % 2
            lo = -h if (-h - par) % 2 == 0 else -h + 1
            total += 0 if lo > h else (h - lo) // 2 + 1
    return total


#: Size of the Z^2 rank table (all points of the disk): rank ``Z2_RANK_TABLE`` is the escape of a Z pair and of
#: the first pair of a D4 vector.
Z2_RANK_TABLE = _disk_count(Z2_RANK_NORM2)
#: Sizes of the rank tables of the even (c0 + c1 even) and the odd checkerboard coset of Z^2 inside the disk;
#: the second pair of a D4 vector lies in the coset of its first pair and is coded by its rank there.
Z2_COSET_RANK_TABLE = (_disk_count(Z2_RANK_NORM2, 0), _disk_count(Z2_RANK_NORM2, 1))
#: Escape rank of a D4 second pair, the same for both cosets (so a decoder finds the escapes before it knows the
#: parities): the larger table's size. A rank in [Z2_COSET_RANK_TABLE[1], Z2_COSET_ESCAPE) of an odd pair is
#: malformed.
Z2_COSET_ESCAPE = max(Z2_COSET_RANK_TABLE)


@dataclass(frozen=True)
class LatticeSpec:
    """A lattice as the codec uses it.

    ``dim``: vectors of this many scalars are quantized jointly.
    ``nsm``: normalized second moment G of the Voronoi cell (Conway & Sloane, Table 2.3).
    ``volume``: Voronoi-cell volume of the lattice at unit step (Z: Z^1; A2: hexagonal, minimum distance 1;
    D4: integer vectors of even sum; E8: D8 ∪ (D8 + ½), minimum norm √2). A step size ``delta`` scales it by
    ``delta ** dim``.
    ``code``: small integer identifying the lattice in the blob header.
    ``classes``: number of symbol classes with their own Rice parameter per block (1 for every lattice: A2 and Z
    code one pair rank per coordinate pair, D4 two per vector, the second with ``k - 1`` (see ``stream``), and
    E8's coordinates are exchangeable).
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
