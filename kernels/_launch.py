"""Cached Triton launches: after the first launch of a kernel for a given argument signature, later launches call the
compiled kernel directly instead of going through ``JITFunction.run``.

Why: ``JITFunction.run`` re-derives the kernel's specialization from every argument, builds its cache key (a
string of the options), checks the globals the kernel used and builds launch metadata for the (empty) launch hooks
on every call: 20-40 µs of host time per launch measured on the H100 host (bench/RESULTS.md, "host" sections).
A quantized layer launches 2-3 kernels; LTX-2 runs 1344 such layers per step, and its step is close to host-bound.

Correctness rests on the key: two launches share a compiled kernel only when every argument that Triton
specializes on is equal in the key. The key is deliberately stricter than Triton's own: tensors by dtype and
16-byte alignment of their address (what Triton specializes pointers on), integers by exact value (Triton
specializes on ``== 1``, divisibility by 16 and the 32/64-bit range; an exact value implies all three), tensor
descriptors by dtype, alignment, shape, strides, block shape and padding, everything else by type; constexprs and
launch options by value. A new key costs one ordinary launch (which compiles or finds the kernel in Triton's own
cache). Any argument of a kind not listed above, launch hooks installed (profilers), the Triton interpreter, or
``HYPERQUANT_FAST_LAUNCH=0`` take the ordinary path. ``tests/test_kernels.py`` checks on the GPU that both paths
give identical results.
"""

from __future__ import annotations

import os

import torch

from ._triton import interpreting

_STATE = {"on": os.environ.get("HYPERQUANT_FAST_LAUNCH", "1") not in ("0", "")}
#: compiled-kernel entries kept per kernel before the cache is cleared (exact integer keys grow with every distinct
#: token count a model sees; a cleared key just takes one ordinary launch again)
MAX_ENTRIES = 512


def set_fast_launch(on: bool) -> None:
    """Launch compiled kernels directly once their signature was seen (default on; see the module docstring)."""
    _STATE["on"] = bool(on)


def fast_launch_enabled() -> bool:
    return _STATE["on"]


class _Unkeyable(Exception):
    pass


_Tensor = torch.Tensor


class _FreeI32:
    """Key of an unspecialized (``do_not_specialize``) integer in the 32-bit range: Triton compiles one kernel for
    every such value."""

    def __repr__(self):
        return "<free i32>"


_FREE_I32 = _FreeI32()


def _other_key(a):
    # the rarer kinds, off the per-argument fast path of :meth:`CachedLauncher.__call__`
    if a is _FREE_I32:
        return a
    if isinstance(a, _Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if isinstance(a, bool):
        return ("bool", a)          # True == 1 as a dict key: keep the two kinds apart
    if a is None or isinstance(a, int):
        return a
    if isinstance(a, float):
        return float
    if type(a).__name__ == "TensorDescriptor":
        b = a.base
        return (b.dtype, b.data_ptr() & 15 == 0, tuple(a.shape), tuple(a.strides), tuple(a.block_shape),
                getattr(a, "padding", None))
    raise _Unkeyable(type(a).__name__)


def launch_key(args: tuple, kw: dict, device: int) -> tuple:
    """The cache key of a launch (see the module docstring); raises ``_Unkeyable`` for an argument of another kind."""
    return (tuple([(a.dtype, a.data_ptr() & 15 == 0) if type(a) is _Tensor else a if type(a) is int
                   else _other_key(a) for a in args]), tuple(kw.items()), device)


_DRIVER: dict = {}


def _raw_stream_fn():
    """Triton's driver function (device index -> current raw CUDA stream), as its own launch calls it."""
    f = _DRIVER.get("stream")
    if f is None:
        from triton.runtime import driver

        f = _DRIVER["stream"] = driver.active.get_current_stream
    return f


def _hooks_empty(h) -> bool:
    return h is None or (hasattr(h, "calls") and not h.calls)


class CachedLauncher:
    """``CachedLauncher(jit_fn)(grid, *runtime_args, stream=None, **constexprs_and_options)``.

    ``runtime_args``: the kernel's non-constexpr parameters, positionally, in signature order; the constexprs and
    launch options (``num_warps``, ``num_stages``) by keyword. The kernel's constexpr parameters must all follow its
    runtime parameters (true of every kernel in this package; otherwise every launch takes the ordinary path).
    ``stream``: a ``torch.cuda.Stream`` to launch on instead of the current stream.
    """

    def __init__(self, fn, free_ints: tuple = ()):
        self.fn = fn
        self.names = list(fn.arg_names)
        self.entries: dict = {}
        # integer arguments that change on every launch (seeds): keyed by their 32-bit range alone, which is all
        # Triton specializes on when the kernel declares them ``do_not_specialize``
        self.free = tuple(self.names.index(n) for n in free_ints)
        params = getattr(fn, "params", None)
        for i in self.free:
            if params is not None and not params[i].do_not_specialize:
                raise ValueError(f"{fn.__name__}: {self.names[i]} must be do_not_specialize to be keyed by range")

    def _key_args(self, args: tuple) -> tuple:
        a = list(args)
        for i in self.free:
            v = a[i]
            if type(v) is int and -2**31 <= v < 2**31:
                a[i] = _FREE_I32
        return tuple(a)

    def _ordinary(self, grid, args, kw, stream):
        if stream is None:
            return self.fn[grid](*args, **kw)
        with torch.cuda.stream(stream):
            return self.fn[grid](*args, **kw)

    def __call__(self, grid, *args, stream=None, **kw):
        if not _STATE["on"] or interpreting():
            return self._ordinary(grid, args, kw, stream)
        rt = _DRIVER.get("runtime_knobs")
        if rt is None:
            from triton import knobs

            rt = _DRIVER["runtime_knobs"] = knobs.runtime
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        if not (_hooks_empty(enter) and _hooks_empty(leave)):
            return self._ordinary(grid, args, kw, stream)
        dev = torch.cuda.current_device()
        try:
            key = launch_key(self._key_args(args) if self.free else args, kw, dev)
        except _Unkeyable:
            return self._ordinary(grid, args, kw, stream)
        ent = self.entries.get(key)
        if ent is None:
            ck = self._ordinary(grid, args, kw, stream)
            tail_names = self.names[len(args):]
            if ck is None or any(n not in kw for n in tail_names):
                return ck  # not cacheable: stays on the ordinary path (one key lookup per launch)
            if len(self.entries) >= MAX_ENTRIES:
                self.entries.clear()
            self.entries[key] = (ck, tuple(kw[n] for n in tail_names))
            return ck
        ck, tail = ent
        raw = stream.cuda_stream if stream is not None else _raw_stream_fn()(dev)
        g = tuple(grid) + (1,) * (3 - len(grid))
        ck.run(g[0], g[1], g[2], raw, ck.function, ck.packed_metadata, None, None, None, *args, *tail)
        return ck
