"""Fast CPU path of the codec's hot loops: fused numba kernels behind the torch reference.

The torch code (:mod:`.lattices`, :mod:`.rdo`, :mod:`.rank_rdo`, :mod:`.stream`, :mod:`.rice`) is the
reference and the GPU path; on the CPU it spends its time in hundreds of elementwise passes. The kernels of
:mod:`.jit_points` and :mod:`.jit_stream` do the same work in one or two passes per block and give the same
coordinates, Rice parameters and words bit for bit (``tests/test_codec_cpu_kernels.py`` checks it on random and
adversarial inputs). Each function here returns ``None`` where it does not apply, and the caller runs the torch
code: inputs not on the CPU, not float32 / int32 / int64, empty, malformed (so the torch code raises its usual
errors), or with magnitudes beyond ``MAX_ABS_Y`` (where the reference's float32 arithmetic stops being exact on
integers, and its E8 RDO switches to per-candidate costs).

The kernels are used when numba imports and ``HYPERQUANT_CPU_KERNELS`` is not ``"0"`` (set it to force the torch
code, e.g. to compare); without numba (the GPU image installs the package without dependencies) the torch code
runs, silently. They run on ``torch.get_num_threads()`` Python threads over disjoint block ranges (the kernels
release the GIL), so no numba threading layer meets torch's OpenMP runtime. numba compiles them on first use
and caches the machine code next to the modules (``cache=True``; a few seconds once per environment).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .constants import MAX_ABS_COORD, MAX_RICE_K, lattice_spec

#: Inputs of the point quantizers (lattice units) are handled here only below this magnitude: every float32
#: value the reference forms from them (rounded sums of 8, doubled coordinates) is then an exact integer.
MAX_ABS_Y = float(1 << 20)
#: Fewer values than this run in the calling thread (thread hand-off costs more than it saves).
_MIN_PARALLEL_VALUES = 1 << 16

_lock = threading.Lock()
_state: dict = {}


def _load():
    """(jit_points, jit_stream, sum-8 order, jit_hadamard, jit_fused) or None when numba is missing or torch's
    sum order is unknown."""
    with _lock:
        if "mods" not in _state:
            try:
                from . import jit_fused, jit_hadamard, jit_points, jit_stream
            except ImportError:  # numba not installed: the torch path
                _state["mods"] = None
            else:
                order = _sum8_order(jit_points)
                _state["mods"] = None if order is None else (jit_points, jit_stream, order, jit_hadamard,
                                                             jit_fused)
        return _state["mods"]


def _sum8_order(jp):
    """Which order torch's CPU ``sum(dim=1)`` of a (M, 8) float32 tensor adds in (it depends on the vector
    width torch was dispatched to): a ``jit_points.SUM8_*`` code, or None if neither (then no kernels)."""
    rng = np.random.RandomState(12345)
    x = (10.0 ** rng.uniform(-8.0, 0.0, size=(256, 8))).astype(np.float32)
    got = torch.from_numpy(x).sum(1).numpy()
    seq = np.zeros(256, dtype=np.float32)
    for i in range(8):
        seq = (seq + x[:, i]).astype(np.float32)
    p = [(x[:, i] + x[:, i + 4]).astype(np.float32) for i in range(4)]
    ilp = (((p[0] + p[1]).astype(np.float32) + p[2]).astype(np.float32) + p[3]).astype(np.float32)
    if np.array_equal(got, seq):
        return jp.SUM8_SEQUENTIAL
    if np.array_equal(got, ilp):
        return jp.SUM8_ILP4
    return None


def enabled() -> bool:
    """Whether the kernels run (numba present, ``HYPERQUANT_CPU_KERNELS`` not "0", torch's sum order known)."""
    if os.environ.get("HYPERQUANT_CPU_KERNELS", "1").strip() == "0":
        return False
    return _load() is not None


def usable(t: torch.Tensor) -> bool:
    """Whether ``t`` may take the kernels: a CPU tensor outside autograd (the kernels build no graph; a tensor that
    requires grad keeps the torch code, which differentiates) while :func:`enabled`."""
    return t.device.type == "cpu" and not t.requires_grad and enabled()


# ---- threads ------------------------------------------------------------------------------------------


def _pool() -> ThreadPoolExecutor:
    """This process's worker threads (created on demand, as many as CPUs at most)."""
    with _lock:
        if _state.get("pool_pid") != os.getpid():  # a forked child must not reuse its parent's (dead) threads
            _state["pool"] = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="hq-cpu")
            _state["pool_pid"] = os.getpid()
        return _state["pool"]


def _parallel(n_items: int, values: int, fn) -> None:
    """Run ``fn(i0, i1)`` over ``[0, n_items)`` on ``torch.get_num_threads()`` threads (this one included).

    The range is cut into a few pieces per thread, taken in turn by whichever thread is free: a thread that
    starts late or shares its core (torch's own workers) does not hold the others up."""
    threads = max(1, min(torch.get_num_threads(), n_items))
    if threads == 1 or values < _MIN_PARALLEL_VALUES:
        fn(0, n_items)
        return
    pieces = min(n_items, 4 * threads)
    cuts = [n_items * i // pieces for i in range(pieces + 1)]
    nxt = iter(range(pieces))
    take = threading.Lock()

    def work():
        while True:
            with take:
                i = next(nxt, None)
            if i is None:
                return
            fn(cuts[i], cuts[i + 1])

    pool = _pool()
    futures = [pool.submit(work) for _ in range(threads - 1)]
    work()
    for f in futures:
        f.result()


# ---- tables ---------------------------------------------------------------------------------------------

_LAT = {"Z": 0, "A2": 1, "D4": 2, "E8": 3}  # jit_points.LAT_*
#: Rank tables of the symbols of each rank-coded lattice (table a, table b, period): see ``stream._RANK_KINDS``.
_RANK_TABLES = {"Z": ("Z2", "Z2", 1), "A2": ("A2", "A2", 1), "D4": ("Z2", "Z2coset", 2)}


def _lut_args(lattice: str) -> tuple:
    """(lut_a, b0, b1, esc, lut_b, b0, b1, esc, period) of ``lattice`` for the kernels (E8: dummies)."""
    if lattice not in _RANK_TABLES:
        dummy = np.zeros((1, 1), dtype=np.int32)
        return (dummy, 0, 0, 0, dummy, 0, 0, 0, 1)
    from .rank_index import _tables

    a, b, period = _RANK_TABLES[lattice]
    out = []
    for kind in (a, b):
        t = _tables(kind, "cpu")
        out += [t["lut"].numpy(), int(t["b0"]), int(t["b1"]), int(t["esc"])]
    return (*out, period)


def _sqrt3_args():
    """float32 √3 and √3/2 as the A2 reference rounds them (``lattices._SQRT3``, ``rdo``'s point scale)."""
    from .lattices import _SQRT3

    return np.float32(_SQRT3), np.float32(0.5 * _SQRT3)


# ---- Hadamard transform -------------------------------------------------------------------------------------


def fwht(x: torch.Tensor, tile: int, signs: torch.Tensor | None = None):
    """``hadamard.fwht(x * signs, tile)`` (``signs`` (K,) ±1, or None: no flip) for float32 ``x`` (..., K): a new
    tensor, or None (use the torch code)."""
    mods = _load()
    if mods is None or x.dtype != torch.float32 or x.dim() == 0 or x.numel() == 0:
        return None
    if signs is not None and (signs.dtype != torch.float32 or signs.device.type != "cpu"):
        return None
    k = x.shape[-1]
    rows = x.reshape(-1, k).contiguous().numpy()
    out = np.empty_like(rows)
    s = signs.contiguous().numpy() if signs is not None else np.ones(1, dtype=np.float32)
    scale = np.float32(tile ** -0.5)  # the reference multiplies by the Python float, rounded to float32
    jh = mods[3]
    _parallel(rows.shape[0], rows.size, lambda r0, r1: jh.fwht_rows(rows, s, signs is not None, tile, scale, r0, r1,
                                                                    out))
    return torch.from_numpy(out).reshape(x.shape)


# ---- point quantizers -------------------------------------------------------------------------------------


def _float_input(y: torch.Tensor, dim: int):
    """Flat float32 numpy view of ``y`` and its largest magnitude, or None if the kernels do not apply."""
    if y.dtype != torch.float32 or y.numel() == 0 or y.numel() % dim:
        return None
    flat = y.reshape(-1).contiguous()
    lo, hi = torch.aminmax(flat)
    big = max(-float(lo), float(hi))
    if not big < MAX_ABS_Y:  # also NaN
        return None
    return flat.numpy(), big


def nearest_point(lattice: str, x: torch.Tensor):
    """``lattices.nearest_point``: int32 coordinates shaped like ``x``, or None (use the torch code)."""
    mods = _load()
    spec = lattice_spec(lattice)
    if mods is None or x.dim() == 0 or x.shape[-1] % spec.dim:
        return None
    got = _float_input(x, spec.dim)
    if got is None:
        return None
    jp, _, order, _, _ = mods
    y, _ = got
    n = y.size
    out = np.empty(n, dtype=np.int32)
    sqrt3, _ = _sqrt3_args()
    nvec = n // spec.dim
    _parallel(nvec, n, lambda v0, v1: jp.nearest_range(_LAT[spec.name], y, v0 * spec.dim, v1 * spec.dim, out,
                                                       sqrt3, order))
    return torch.from_numpy(out).reshape(x.shape)


def rd_nearest_point(lattice: str, y: torch.Tensor, block_values: int, lam: float):
    """``rdo.rd_nearest_point`` with ``rdo=True``: int32 coordinates shaped like ``y``, or None.

    Pass 1 per block: nearest points, their Rice bits at every k; then the Rice parameters (``choose_ks``'s
    search); pass 2 per block: the RDO points with them."""
    mods = _load()
    spec = lattice_spec(lattice)
    bv = int(block_values)
    ranked = spec.name in _RANK_TABLES
    if mods is None or bv <= 0 or bv % 8 or (ranked and y.numel() % 2):
        return None
    got = _float_input(y, spec.dim)
    if got is None:
        return None
    from .rdo import _A2_RING2, _E8_TABLE_MAX, _e8_cost_table

    jp, js, order, _, _ = mods
    x, big = got
    cmax = int(2.0 * big) + 6
    if spec.name == "E8" and cmax > _E8_TABLE_MAX:  # the reference computes these costs per candidate
        return None
    n = x.size
    nb = (n + bv - 1) // bv
    lat = _LAT[spec.name]
    luts = _lut_args(spec.name)
    sqrt3, h1 = _sqrt3_args()
    table = np.empty((nb, MAX_RICE_K + 1), dtype=np.int64)
    msum = np.empty(nb, dtype=np.int64)
    nsym = np.empty(nb, dtype=np.int64)
    _parallel(nb, n, lambda b0, b1: jp.nearest_stats(lat, x, b0, b1, bv, n, sqrt3, order, *luts, table, msum, nsym))
    ks = js.choose_ks(table, msum, nsym, bv // 2 if ranked else bv)
    out = np.empty(n, dtype=np.int32)
    if spec.name == "E8":
        lam_bits = _e8_cost_table(int(ks.max()), cmax, lam, torch.float32, "cpu").numpy()
        width = 2 * cmax - 5
        _parallel(nb, n, lambda b0, b1: jp.rd_e8_blocks(x, ks, b0, b1, bv, n, lam_bits, width, cmax, order, out))
    else:
        ring = _A2_RING2.to(torch.int64).numpy()
        lam32 = np.float32(lam)
        _parallel(nb, n, lambda b0, b1: jp.rd_rank_blocks(lat, x, ks, b0, b1, bv, n, lam32, sqrt3, h1, *luts[:8],
                                                          ring, out))
    return torch.from_numpy(out).reshape(y.shape)


# ---- block stream -------------------------------------------------------------------------------------------


def _stream_stats(c: torch.Tensor, lattice: str, block_values: int):
    """Per-block statistics of the coordinates ``c`` (flat) for the stream, or None if the kernels do not apply:
    dict of numpy arrays ``table`` (nb, MAX_RICE_K+1) Rice bits per k, ``msum``, ``nsym``, ``raw`` (head + tail
    bits), plus the flat coordinates ``c`` and the kernel arguments. Raises the reference's errors for a bad
    geometry (``stream._layout``) or, for D4, a vector of odd sum."""
    mods = _load()
    if mods is None or c.dtype not in (torch.int32, torch.int64) or c.numel() == 0:
        return None
    flat = c.reshape(-1).contiguous()
    lo, hi = torch.aminmax(flat)
    if int(hi) > MAX_ABS_COORD or int(lo) < -MAX_ABS_COORD:  # the reference decides (and raises)
        return None
    from .stream import _layout

    spec = lattice_spec(lattice)
    lay = _layout(flat.numel(), spec.name, block_values, "cpu")
    _, js, _, _, _ = mods
    bv = int(block_values)
    # int32 in the kernels (one compiled version): lossless, |c| <= MAX_ABS_COORD < 2**31 was checked above
    cn = flat.to(torch.int32).numpy()
    n, nb = cn.size, lay["nb"]
    kind = js.KIND_E8 if spec.name == "E8" else js.KIND_RANK
    luts = _lut_args(spec.name)
    st = {k: np.empty(nb, dtype=np.int64) for k in ("msum", "nsym", "raw", "amax", "odd")}
    st["table"] = np.empty((nb, MAX_RICE_K + 1), dtype=np.int64)
    _parallel(nb, n, lambda b0, b1: js.block_stats(kind, cn, b0, b1, bv, n, *luts, st["table"], st["msum"],
                                                   st["nsym"], st["raw"], st["amax"], st["odd"]))
    if spec.name == "D4" and st["odd"].any():
        raise ValueError("not D4 points: a vector of four coordinates has an odd sum")
    st.update(c=cn, kind=kind, luts=luts, per=int(lay["per"]), nb=nb, js=js)
    return st


def _ks(st: dict) -> np.ndarray:
    return st["js"].choose_ks(st["table"], st["msum"], st["nsym"], st["per"])


def choose_ks(c: torch.Tensor, lattice: str, block_values: int):
    """``stream.choose_ks``: uint8 (n_blocks, 1), or None."""
    st = _stream_stats(c, lattice, block_values)
    if st is None:
        return None
    return torch.from_numpy(_ks(st).astype(np.uint8)).unsqueeze(1)


def _block_words(st: dict, ks: np.ndarray) -> np.ndarray:
    bits = st["raw"] + st["table"][np.arange(st["nb"]), ks]
    return (bits + 31) // 32


def stream_bits(c: torch.Tensor, lattice: str, block_values: int, ks: torch.Tensor | None = None):
    """``stream.stream_bits``: int, or None."""
    if ks is not None and (ks.numel() == 0 or int(ks.max()) > MAX_RICE_K or ks.dim() != 2):
        return None
    st = _stream_stats(c, lattice, block_values)
    if st is None:
        return None
    k = _ks(st) if ks is None else ks[:, 0].to(torch.int64).cpu().numpy()
    if k.shape[0] != st["nb"]:
        return None
    return int(_block_words(st, k).sum()) * 32


def encode_coords(c: torch.Tensor, lattice: str, block_values: int):
    """``stream.encode_coords``: (int32 words, int64 word offsets (n_blocks+1,), uint8 ks), or None."""
    st = _stream_stats(c, lattice, block_values)
    if st is None:
        return None
    ks = _ks(st)
    off = np.zeros(st["nb"] + 1, dtype=np.int64)
    np.cumsum(_block_words(st, ks), out=off[1:])
    words = np.zeros(int(off[-1]), dtype=np.uint32)
    js, cn, bv = st["js"], st["c"], int(block_values)
    _parallel(st["nb"], cn.size, lambda b0, b1: js.pack_blocks(st["kind"], cn, ks, off, b0, b1, bv, cn.size,
                                                               *st["luts"], words))
    return (torch.from_numpy(words.view(np.int32)), torch.from_numpy(off),
            torch.from_numpy(ks.astype(np.uint8)).unsqueeze(1))


def _guess_holds(kt: np.ndarray, mask: np.ndarray, nsym: np.ndarray, per: int, guess: np.ndarray) -> bool:
    """Whether ``rice.best_rice_k``, called as ``stream._per_block_k`` calls it (full blocks, then a shorter last
    one), gives the Rice parameters ``guess``: ``kt`` (nb, windows) what each window gives each block, ``mask``
    the windows whose minimum lies on a block's edge."""
    nb = kt.shape[0]
    nfull = nb - 1 if nb and nsym[-1] < per else nb
    for g0, g1 in ((0, nfull), (nfull, nb)):
        if g1 <= g0:
            continue
        edges = int(np.bitwise_or.reduce(mask[g0:g1]))
        t = next((t for t in range(kt.shape[1] - 1) if not edges >> t & 1), kt.shape[1] - 1)
        if not np.array_equal(kt[g0:g1, t], guess[g0:g1]):
            return False
    return True


# ---- values to words in one pass -------------------------------------------------------------------------


def quantize_encode(lattice: str, y: torch.Tensor, block_values: int, rdo: bool, lam: float,
                    row_steps: torch.Tensor | None = None):
    """``encode_coords(rd_nearest_point(lattice, y / row_steps[:, None], block_values, rdo))`` in one pass per
    block (:mod:`.jit_fused`): (int32 words, int64 word offsets (n_blocks+1,), uint8 ks (n_blocks, 1)), or None
    (the inputs do not suit the kernels, or a block needed the Rice search's wider window: run the two steps).
    ``y`` float32 (rows, K), ``row_steps`` float32 (rows,) positive (None: no division)."""
    mods = _load()
    spec = lattice_spec(lattice)
    bv = int(block_values)
    ranked = spec.name in _RANK_TABLES
    if mods is None or bv <= 0 or bv % 8 or (ranked and y.numel() % 2) or y.dim() != 2:
        return None
    if row_steps is None:
        row_steps = torch.ones(1, dtype=torch.float32)
        row_len = max(1, y.numel())
        got = _float_input(y, spec.dim)
    else:
        if row_steps.dtype != torch.float32 or row_steps.shape != y.shape[:1] or y.dtype != torch.float32:
            return None
        row_len = y.shape[1]
        # the largest |y / step|: per row the largest |y| over its step (rounding is monotone, so this is exact)
        lo, hi = torch.aminmax(y, dim=1)
        yq_max = (torch.maximum(-lo, hi) / row_steps).max() if y.numel() else torch.zeros(())
        got = None if y.numel() % spec.dim else (y.reshape(-1).contiguous().numpy(), float(yq_max))
        if got is not None and not got[1] < MAX_ABS_Y:
            got = None
    if got is None:
        return None
    from .rdo import _A2_RING2, _E8_TABLE_MAX, _e8_cost_table

    x, big = got
    steps = row_steps.contiguous().numpy()
    cmax = int(2.0 * big) + 6
    if rdo and spec.name == "E8" and cmax > _E8_TABLE_MAX:
        return None
    jf = mods[4]
    n = x.size
    nb = (n + bv - 1) // bv
    lat = _LAT[spec.name]
    sqrt3, h1 = _sqrt3_args()
    if rdo and spec.name == "E8":  # rows of every k: a row's costs do not depend on the table's largest k
        lam_bits = _e8_cost_table(MAX_RICE_K, cmax, lam, torch.float32, "cpu").numpy()
    else:
        lam_bits = np.zeros((1, 4), dtype=np.float32)
    ring = _A2_RING2.to(torch.int64).numpy()
    luts = _lut_args(spec.name)
    ks0, ks = np.zeros(nb, dtype=np.int64), np.empty(nb, dtype=np.int64)
    blk_words = np.empty(nb, dtype=np.int64)
    nwin = mods[1].WINDOWS
    kt0, kt1 = np.zeros((nb, nwin), dtype=np.int64), np.empty((nb, nwin), dtype=np.int64)
    mask0, mask1 = np.zeros(nb, dtype=np.int64), np.empty(nb, dtype=np.int64)
    threads = max(1, min(torch.get_num_threads(), nb))
    pieces = 1 if threads == 1 or n < _MIN_PARALLEL_VALUES else min(nb, 4 * threads)
    cuts = [nb * i // pieces for i in range(pieces + 1)]
    bufs, used = [None] * pieces, [0] * pieces

    def piece(i0, i1):
        for i in range(i0, i1):
            b0, b1 = cuts[i], cuts[i + 1]
            # room for 96 bits per value, more than any block takes; untouched pages of np.zeros cost nothing
            bufs[i] = np.zeros(((min(b1 * bv, n) - b0 * bv) * 96 + 31) // 32 + 1, dtype=np.uint32)
            used[i] = jf.quantize_blocks(lat, bool(rdo), x, steps, row_len, b0, b1, bv, n, sqrt3, h1, mods[2],
                                         np.float32(lam), lam_bits, 2 * cmax - 5, cmax, ring, *luts, ks0, ks,
                                         blk_words, kt0, mask0, kt1, mask1, bufs[i])

    _parallel(pieces, n, piece)
    per = bv // 2 if ranked else bv
    nsym = np.full(nb, per, dtype=np.int64)
    nsym[-1] = (n - (nb - 1) * bv) // (2 if ranked else 1)
    if min(used) < 0 or not _guess_holds(kt1, mask1, nsym, per, ks) or (
            rdo and not _guess_holds(kt0, mask0, nsym, per, ks0)):
        return None
    off = np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(blk_words, out=off[1:])
    words = np.concatenate([bufs[i][: used[i]] for i in range(pieces)])
    return (torch.from_numpy(words.view(np.int32)), torch.from_numpy(off),
            torch.from_numpy(ks.astype(np.uint8)).unsqueeze(1))
