"""Compile the package's Triton kernels for a GPU architecture on a machine without a GPU (sm_90: the H100).

Triton's CPU interpreter runs a kernel's Python semantics, not its compiler: a kernel can pass every interpreter
test and still fail to compile for the GPU (a reassigned constexpr, a plain global, a type the backend rejects).
This module records the arguments a real launch passes (the launcher runs on CPU tensors with its kernel swapped
for a recorder) and compiles that kernel with ``triton.compile`` for the target, down to a cubin: what CI can check
without a GPU. Triton's own ``ptxas`` ships in its wheel.

Run it in a process where ``TRITON_INTERPRET`` is unset (kernels built under the interpreter are not compilable):
``python -m hyperquant_diffusers.testing.triton_compile`` prints one JSON line per case and exits non-zero if any
case failed.
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch

#: torch dtype -> Triton pointer element type string (the ones the package's kernels take)
_PTR = {torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.int64: "i64", torch.float32: "fp32",
        torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8e4nv"}


class _Recorder:
    """Stands in for a :class:`~hyperquant_diffusers.kernels._launch.CachedLauncher`: keeps each launch's
    arguments instead of running it."""

    def __init__(self, launcher):
        self.fn = launcher.fn
        self.calls: list = []

    def __call__(self, grid, *args, **kw):
        self.calls.append((args, kw))


@contextlib.contextmanager
def recording(*modules):
    """Within the block, the ``_kernel()`` (or ``_kernels()``) launchers of ``modules`` record launches instead of
    running them, and the modules believe Triton can run (on the GPU, not the interpreter). Yields {module name:
    recorder}, or {kernel name: recorder} for a module whose builder returns a tuple of launchers."""
    saved, recs = [], {}
    try:
        for m in modules:
            builder = "_kernel" if hasattr(m, "_kernel") else "_kernels"
            built = getattr(m, builder)()
            if isinstance(built, tuple):     # a module with several kernels builds them together
                rec = tuple(_Recorder(b) for b in built)
                recs.update({r.fn.__name__: r for r in rec})
            else:
                rec = _Recorder(built)
                recs[m.__name__.rsplit(".", 1)[-1]] = rec
            for name, value in ((builder, lambda rec=rec: rec), ("require_triton", lambda: None),
                                ("interpreting", lambda: False)):
                if hasattr(m, name):
                    saved.append((m, name, getattr(m, name)))
                    setattr(m, name, value)
        yield recs
    finally:
        for m, name, value in reversed(saved):
            setattr(m, name, value)


def _specialize(a, name: str) -> tuple[str, list]:
    """(signature type, attributes) of a runtime argument as Triton's launcher specializes it on the GPU: pointers
    16-byte aligned and integers divisible by 16 get ``tt.divisibility`` (which decides vector widths and shared
    memory), an integer equal to 1 becomes a constant. Without Triton's own specializer (an older Triton), the
    plain types, unspecialized."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:
        native_specialize_impl = None
    if native_specialize_impl is not None:
        ty, key = native_specialize_impl(CUDABackend, a, False, True, True)
        return ty, (CUDABackend.parse_attr(key) if isinstance(key, str) else [])
    if isinstance(a, torch.Tensor):
        return "*" + _PTR[a.dtype], []
    if isinstance(a, bool):
        return "i1", []
    if isinstance(a, int):
        return ("i32" if -2**31 <= a < 2**31 else "i64"), []
    if isinstance(a, float):
        return "fp32", []
    if type(a).__name__ == "TensorDescriptor":   # Hopper TMA: element type and block shape
        return f"tensordesc<{_PTR[a.base.dtype]}[{', '.join(map(str, a.block_shape))}]>", []
    raise TypeError(f"{name}: cannot type a {type(a).__name__} argument")


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers and spill bytes (stores + loads) that Triton's ptxas reports for ``ptx`` (``ptxas -v``)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name", f"sm_{arch}a", path, "-o", os.devnull], capture_output=True,
                           text=True, check=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills)}


def compile_recorded(rec: _Recorder, arch: int = 90, ptxas_stats: bool = False) -> list[dict]:
    """Compile every launch ``rec`` recorded for ``cuda`` ``sm_<arch>``, specialized as the GPU launch would be
    (:func:`_specialize`); one dict per launch: the constexprs, ``ok`` (ptxas produced a cubin), and on success
    the shared memory (bytes), whether the PTX uses local memory (register spills) and how many
    ``cvt.rn.satfinite.e4m3x2.f32`` it holds (the decoders' inline-asm e4m3 conversion, which only ptxas checks);
    ``ptxas_stats``: also ``registers`` and ``spill_bytes`` from ``ptxas -v`` (one more ptxas run per launch)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(rec.fn.arg_names)
    results = []
    for args, kw in rec.calls:
        sig, const, attrs, equal_1 = {}, {}, {}, {}
        for i, (name, a) in enumerate(zip(names, args)):
            ty, attr = _specialize(a, name)
            if ty == "constexpr":   # an integer argument equal to 1: Triton compiles it in as a constant
                sig[name], equal_1[(i,)] = ty, 1
            else:
                sig[name] = ty
                if attr:
                    attrs[(i,)] = attr
        for name in names[len(args):]:
            if name not in kw:
                raise TypeError(f"{name}: not passed by the launcher")
            sig[name] = "constexpr"
            const[name] = kw[name]
        src = ASTSource(fn=rec.fn, signature=sig, attrs=attrs,
                        constexprs={**equal_1, **{(names.index(k),): v for k, v in const.items()}})
        row = {"kernel": rec.fn.__name__, **const, **({"maxnreg": kw["maxnreg"]} if "maxnreg" in kw else {})}
        try:
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={k: kw[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kw})
            row.update(ok="cubin" in ck.asm, shared_bytes=int(ck.metadata.shared),
                       local_memory=".local" in ck.asm["ptx"],
                       e4m3x2_cvts=ck.asm["ptx"].count("cvt.rn.satfinite.e4m3x2.f32"))
            if ptxas_stats:
                row.update(_ptxas_stats(ck.asm["ptx"], arch))
        except Exception as e:  # the point: report the compiler's error, whatever it is
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
        results.append(row)
    return results


def kernel_cases() -> list[dict]:
    """Compile the E8 Rice decoders (both implementations; int8 and fp8 output; with and without statistics; one
    and several tiles per block; the default one's fp8 output without statistics too), the rank decoder (D4 and Z;
    D4 with fp8 output too), the int8 -> e4m3 cast, the activation RHT + quantization (one-pass on 4096- and
    16384-wide rows, int8 and fp8; split-K; fused two-pass; the TMA kernel at 2048 and 16384 wide) and the GEMMs
    (TMA int8 and fp8 at both tile configurations, the persistent GEMM in two launches each, the pointer GEMM), as
    their launchers launch them on LTX-2-sized streams and activations, and the K/V kernel (:func:`kv_kernel_cases`).
    Not covered: the epilogue after ``torch._int_mm`` (cuBLAS runs first)."""
    from ..codec import quantize, random_signs, tile_signs
    from ..kernels import act_quant, cast, int8_gemm, rank_decode, rice_decode, rice_decode_vectors

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g) * 0.02
    streams = {lat: quantize(w, bits=4.0, lattice=lat) for lat in ("E8", "D4", "Z")}
    with recording(rice_decode, rice_decode_vectors, rank_decode, cast, act_quant, int8_gemm) as recs:
        for impl in rice_decode.IMPLS:
            q = streams["E8"]
            for out_dtype, stats, sub in ((torch.int8, False, None), (torch.float8_e4m3fn, True, None),
                                          (torch.int8, True, 1024)):
                rice_decode.rice_decode(q.words, q.offsets.to(torch.int32), q.ks, q.numel, "E8", q.block_values,
                                        out_dtype=out_dtype, stats=stats, sub=sub, impl=impl)
        # the fp8 layer's decode: the default E8 decoder without statistics
        q = streams["E8"]
        rice_decode.rice_decode(q.words, q.offsets.to(torch.int32), q.ks, q.numel, "E8", q.block_values,
                                out_dtype=torch.float8_e4m3fn, stats=False)
        for lat, out_dtype in (("D4", torch.int8), ("Z", torch.int8), ("D4", torch.float8_e4m3fn)):
            q = streams[lat]
            rice_decode.rice_decode(q.words, q.offsets.to(torch.int32), q.ks, q.numel, lat, q.block_values,
                                    out_dtype=out_dtype, stats=False)
        cast.codes_to_e4m3(torch.zeros(1000, dtype=torch.int8))
        for k, fmt, impl in ((4096, "int8", "auto"), (16384, "fp8", "auto"), (4096, "int8", "split"),
                             (4096, "fp8", "fused")):
            x = torch.zeros(256, k, dtype=torch.bfloat16)
            act_quant.rht_quantize(x, random_signs(k, 0), 128, fmt, impl=impl)
        for k, fmt in ((2048, "int8"), (16384, "fp8")):   # the TMA kernel (folded signs)
            signs = random_signs(k, 0, period=128)
            act_quant.rht_quantize(torch.zeros(1024, k, dtype=torch.bfloat16), signs, 128, fmt, impl="tma",
                                   hadamard=act_quant.signed_hadamard(tile_signs(signs, 128), torch.bfloat16, "cpu"))
        # the GEMMs at M = 12288 and M = 256 (their tiles differ), int8 and fp8 operands, with and without bias
        for m, fp8, bias in ((12288, False, True), (12288, True, True), (256, False, False)):
            a = torch.zeros(m, 512, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
            wq = torch.zeros(256, 512, dtype=a.dtype)
            sx, sw, b = torch.ones(m), torch.ones(256), torch.zeros(256, dtype=torch.bfloat16) if bias else None
            (int8_gemm.fp8_gemm_tma if fp8 else int8_gemm.int8_gemm_tma)(a, sx, wq, sw, b)
            if m > 256:   # the persistent GEMM at its default launch, and with a whole-tile, unflattened epilogue
                persistent = int8_gemm.fp8_gemm_persistent if fp8 else int8_gemm.int8_gemm_persistent
                persistent(a, sx, wq, sw, b)
                persistent(a, sx, wq, sw, b, config=(128, 128, 128, 8, 8, 4, False, False))
        int8_gemm.int8_gemm_triton(torch.zeros(256, 512, dtype=torch.int8), torch.ones(256),
                                   torch.zeros(256, 512, dtype=torch.int8), torch.ones(256), None)
    return [row for rec in recs.values() for row in compile_recorded(rec)] + kv_kernel_cases()


def kv_kernel_cases() -> list[dict]:
    """Compile the fused K/V fake-quantization kernel as its launcher launches it: LTX-2's head dimensions 128
    (video) and 64 (audio), E8 with dither in bf16 through both Hadamard products, D4 without dither from float32
    with the debug outputs, Z from fp16, and the cache's encode and decode of a bf16 K (E8, D = 128); with ptxas's
    register and spill counts."""
    from ..codec import random_signs
    from ..kernels import kv_quant
    from ..kv.quantizer import STEP_CODES_PER_OCTAVE

    cases = ((128, torch.bfloat16, "E8", True, "bf16", False), (128, torch.bfloat16, "E8", True, "ieee", False),
             (64, torch.bfloat16, "E8", True, "bf16", False), (64, torch.float32, "D4", False, "bf16", True),
             (128, torch.float16, "Z", True, "bf16", False))
    call = dict(dither=True, seed=3, codes_per_octave=STEP_CODES_PER_OCTAVE)
    with recording(kv_quant) as recs:
        for d, dtype, lattice, dither, hadamard, debug in cases:
            kv_quant.kv_fake_quantize(torch.zeros(2, 300, 4, d, dtype=dtype), random_signs(d, 0), d, 0.5, lattice,
                                      dither=dither, seed=3, codes_per_octave=STEP_CODES_PER_OCTAVE,
                                      return_dither=debug, hadamard=hadamard)
        # the text-K/V cache's path: encode a bf16 K (E8, D = 128) and decode it
        x = torch.zeros(300, 4, 128, dtype=torch.bfloat16)
        c, e = kv_quant.kv_encode(x, random_signs(128, 0), 128, 0.5, "E8", **call)
        kv_quant.kv_decode(c, e, x.shape, x.dtype, random_signs(128, 0), 128, "E8", **call)
    return compile_recorded(recs["kv_quant"], ptxas_stats=True)


def main() -> int:
    rows = kernel_cases()
    for row in rows:
        print(json.dumps(row, default=str), flush=True)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
