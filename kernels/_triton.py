"""Guarded access to Triton: the package imports (and its torch references run) without Triton or a GPU.

Kernels are built on first use through :func:`jit_cache`, so ``import hyperquant_diffusers.kernels`` never
imports Triton. ``TRITON_INTERPRET=1`` (set before Triton is imported) runs the same kernels on the CPU through
Triton's interpreter, which is how the CPU tests check them on small inputs.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA GPU, or the CPU interpreter via TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return interpreting() or torch.cuda.is_available()


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``). Read once, on the first
    kernel launch (Triton itself reads it when it is imported): this is asked on every launch."""
    v = _INTERPRET.get("v")
    if v is None:
        v = _INTERPRET["v"] = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return v


_INTERPRET: dict = {}


def require_triton() -> None:
    if not triton_available():
        raise RuntimeError("this kernel needs Triton with a CUDA GPU (or TRITON_INTERPRET=1 for the CPU "
                           "interpreter); use the module's torch reference instead")


def jit_cache(builder):
    """Decorator: build the Triton kernel(s) once, on first call, and return them afterwards."""
    return functools.lru_cache(maxsize=None)(builder)


@functools.lru_cache(maxsize=None)
def device_capability(device_index: int = 0) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device: the TMA GEMMs need 9.0 (Hopper), fp8 tensor cores and
    the e4m3 conversions 8.9 (Ada). (9, 0) under the interpreter, which runs the Hopper kernels."""
    if interpreting() or not torch.cuda.is_available():
        return (9, 0)
    return tuple(torch.cuda.get_device_capability(device_index))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    """Streaming multiprocessors of a CUDA device (a small fixed number under the interpreter)."""
    if interpreting() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count
