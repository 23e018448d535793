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


#: programmatic dependent launch (Hopper and newer): the GEMMs are launched with ``launch_pdl`` and wait for the
#: kernel before them (``griddepcontrol.wait``) before touching memory, and the activation kernels let their
#: dependent launch as soon as all their programs have started (``griddepcontrol.launch_dependents``). The GEMM's
#: programs are then set up while the previous kernel's last programs still run, instead of after it has drained.
#: ``HYPERQUANT_PDL=0`` or :func:`set_pdl` turn it off (same results: the wait comes before every memory access).
_PDL = {"on": os.environ.get("HYPERQUANT_PDL", "1") not in ("", "0")}


def set_pdl(on: bool) -> None:
    """Launch the GEMMs with programmatic dependent launch where the GPU has it (default on, Hopper and newer)."""
    _PDL["on"] = bool(on)


def pdl_enabled(device_index: int = 0) -> bool:
    """Whether launches on this device use programmatic dependent launch: on, a compute capability of 9.0 or more,
    a Triton with grid-dependency control, and not the CPU interpreter (which cannot run its PTX)."""
    return (_PDL["on"] and not interpreting() and device_capability(device_index) >= (9, 0)
            and _gdc_available())


@functools.lru_cache(maxsize=None)
def _gdc_available() -> bool:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True
