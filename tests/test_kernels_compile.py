"""The Triton kernels compile for the H100 (sm_90) on a machine without a GPU (hyperquant_diffusers.testing.triton_compile):
the decoders, the cast, the activation pass, the GEMMs (all but the epilogue that follows ``torch._int_mm``) and the
fused K/V fake quantization.

Triton's interpreter, which runs the kernels in the CPU tests, does not compile them: a kernel can pass there and
fail on the device. Each check runs in a subprocess without TRITON_INTERPRET (the test session may have set it)."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    # from a file: Triton reads a kernel's source through inspect
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)


def test_kernels_compile_for_sm90(tmp_path):
    p = _run("from hyperquant_diffusers.testing import triton_compile as t; raise SystemExit(t.main())", tmp_path)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in rows if not r["ok"]]
    assert p.returncode == 0 and not failed, (failed, p.stderr[-3000:])
    kernels = [r["kernel"] for r in rows]
    # both E8 decoders x 3 variants and the default one's fp8 fast path, the rank decoder for D4, Z and D4 in fp8,
    # the cast
    assert kernels.count("rice_decode_kernel") == 7 and kernels.count("rank_decode_kernel") == 3
    assert kernels.count("codes_to_e4m3_kernel") == 1
    # activation RHT + quantization: one-pass (4096 and 16384 wide), split-K (two kernels), fused two-pass
    assert kernels.count("rht_quant_onepass_kernel") == 2 and kernels.count("rht_amax_split_kernel") == 1
    assert kernels.count("rht_quant_split_kernel") == 1 and kernels.count("rht_quant_kernel") == 1
    # the TMA GEMM (int8 and fp8 at M = 12288, int8 at M = 256) and the pointer GEMM
    assert kernels.count("int8_gemm_tma_kernel") == 3 and kernels.count("int8_gemm_kernel") == 1
    # the persistent GEMM: int8 and fp8, each at its default launch and with an unsplit, unflattened epilogue
    persistent = [r for r in rows if r["kernel"] == "gemm_persistent_kernel"]
    assert len(persistent) == 4 and sum(r["FP8"] for r in persistent) == 2
    assert {(r["SUBTILE"], r["FLATTEN"]) for r in persistent} == {(True, True), (False, False)}
    # the decoders' fp8 output goes through the GPU's e4m3x2 conversion (inline PTX, which only ptxas checks, and
    # it did: ok means a cubin); their int8 output has none
    decoders = [r for r in rows if r["kernel"] in ("rice_decode_kernel", "rank_decode_kernel")]
    assert all(r["HW"] for r in decoders)
    fp8 = [r for r in decoders if r["OUT_FP8"]]
    assert len(fp8) == 4 and sum(1 for r in fp8 if r.get("SG")) == 2
    assert all(r["e4m3x2_cvts"] > 0 for r in fp8)
    assert not any(r["e4m3x2_cvts"] for r in decoders if not r["OUT_FP8"])
    assert sum(1 for r in rows if r["kernel"] == "rice_decode_kernel" and r.get("NT", 1) > 1) == 1
    # no local arrays in the PTX; ptxas may still spill under a register cap, which the vector decoder sets on
    # purpose (its launches are compiled with it)
    assert not any(r["local_memory"] for r in rows)
    from hyperquant_diffusers.kernels.rice_decode_vectors import _TUNE as vectors_tune
    assert {r.get("maxnreg") for r in rows if r.get("SG")} == {vectors_tune["maxnreg"]}
    # the fused K/V kernel: five launches, bf16 tensor-core Hadamard products on the GPU (the interpreter cannot
    # run them), and the default launch fits its registers: no spills from bf16 K/V (LTX-2's) at either head
    # dimension; fp16 / float32 input (two / three bf16 parts) may spill a few bytes at D = 128 (16 B for fp16)
    # (the cache's encode and decode, MODE 1 and 2, are bf16 launches too)
    kv = [r for r in rows if r["kernel"] == "kv_fake_quant_kernel"]
    assert len(kv) == 7 and all(r["HW"] for r in kv)
    assert sorted(r["MODE"] for r in kv) == [0, 0, 0, 0, 0, 1, 2]
    assert sum(1 for r in kv if r["MMA_BF16"]) == 6
    tc = [r for r in kv if r["MMA_BF16"]]
    assert all(r["registers"] <= 255 for r in tc) and sum(1 for r in tc if r["PARTS_IN"] == 1) == 4, kv
    assert all(r["spill_bytes"] == 0 for r in tc if r["PARTS_IN"] == 1), kv
    assert all(r["spill_bytes"] <= 64 for r in tc), kv


def test_compile_check_reports_a_kernel_the_gpu_compiler_rejects(tmp_path):
    # the interpreter accepts a reassigned constexpr; the compiler does not, and the check must say so
    p = _run('''
        import json, torch, triton, triton.language as tl
        from hyperquant_diffusers.testing.triton_compile import _Recorder, compile_recorded

        @triton.jit
        def broken(x_ptr, N: tl.constexpr):
            for s in tl.static_range(2):
                width: tl.constexpr = 4 >> s
                tl.store(x_ptr + s, width)

        class L:
            fn = broken
        rec = _Recorder(L())
        rec(None, torch.zeros(2, dtype=torch.int32), N=2, num_warps=1)
        print(json.dumps(compile_recorded(rec)))
    ''', tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (row,) = json.loads(p.stdout.strip().splitlines()[-1])
    assert row["ok"] is False and "constexpr cannot be reassigned" in row["error"]


def test_compile_check_specializes_arguments_as_the_gpu_launch_does():
    # what decides vector widths and shared memory on the GPU: 16-byte aligned pointers and integers divisible by 16
    # carry tt.divisibility, an integer equal to 1 is compiled in as a constant; the check must compile that variant
    from hyperquant_diffusers.testing.triton_compile import _specialize

    pytest.importorskip("triton._C.libtriton", reason="Triton without its native specializer")
    if not hasattr(importlib.import_module("triton._C.libtriton"), "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl: the check compiles unspecialized")
    div16 = [["tt.divisibility", 16]]
    base = torch.zeros(64, dtype=torch.bfloat16)
    assert _specialize(base, "x") == ("*bf16", div16)
    assert _specialize(base[1:], "x") == ("*bf16", [])          # 2-byte offset: not 16-byte aligned
    assert _specialize(4096, "K") == ("i32", div16)
    assert _specialize(4097, "K") == ("i32", [])
    assert _specialize(1, "K")[0] == "constexpr"
    assert _specialize(2 ** 33, "n")[0] == "i64"
    assert _specialize(0.5, "s") == ("fp32", [])
