"""Kernel benchmark (issue 4): quantized linear vs bf16 ``F.linear`` on the LTX-2 shapes, on a CUDA GPU.

For each LTX-2 linear shape (out x in) = 4096x4096, 16384x4096, 4096x16384, 2048x2048 and M = 12288 / 256 tokens:
bf16 ``F.linear`` vs ``LatticeLinear`` (4 bps E8) end to end (activation RHT + quantization + weight codes + GEMM
+ epilogue) in each residency (int8 resident / compressed resident) and MMA type (int8 / fp8), the parts
(act-quant, Rice decode, GEMM paths: Triton fused epilogue vs ``torch._int_mm`` + epilogue, fp8 ``_scaled_mm``),
errors vs the float64 product, bit-exact decode, Rice decode throughput, quantize(+encode) throughput, and the
nvfp4 / mxfp4 cast error of the lattice output. Median times from ``triton.testing.do_bench``.

    python bench/bench_kernels.py [--json OUT.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

SHAPES = [(4096, 4096), (16384, 4096), (4096, 16384), (2048, 2048)]
MS = [12288, 256]
TARGETS = {"int8": 1.25, "fp8": 1.5, "compressed_within": 0.15}


def bench(fn, warmup=25, rep=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def ceilings(dev):
    out = {}
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = bench(lambda: a @ b)
    out["bf16_tflops"] = 2 * 8192 ** 3 / t / 1e9
    ai = torch.randint(-127, 128, (8192, 8192), device=dev, dtype=torch.int8)
    bi = torch.randint(-127, 128, (8192, 8192), device=dev, dtype=torch.int8)
    t = bench(lambda: torch._int_mm(ai, bi.t()))
    out["int8_int_mm_tops"] = 2 * 8192 ** 3 / t / 1e9
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    t = bench(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    out["fp8_tflops"] = 2 * 8192 ** 3 / t / 1e9
    x = torch.empty(1 << 30, device=dev, dtype=torch.uint8)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    out["copy_tbps"] = 2 * x.numel() / t / 1e9
    del a, b, ai, bi, a8, b8, x, y
    return out


def sweeps(dev, parts=("decode", "actq", "gemm")):
    """Launch-shape sweeps on the 4096x4096 layer: the units Rice decoder (programs per SM, warps, unit bits; the
    vector decoder's own sweep is in :func:`decoder_ab_case`) and the Triton int8 GEMM tile configs at M = 12288;
    the fastest become the defaults for the rest of the run."""
    from hyperquant_diffusers.codec import quantize
    from hyperquant_diffusers.kernels import int8_gemm, rice_decode as rd

    out = {"decode": {}, "gemm": {}}
    w = torch.randn(4096, 4096, device=dev) * 0.02
    q = quantize(w, bits=4.0, lattice="E8")
    offs = q.offsets.to(torch.int32)
    buf = torch.empty(q.numel, dtype=torch.int8, device=dev)
    best = None
    # (unit_bits, programs per SM, warps, chunk words, sub): the measured best and its neighbours
    decode_cands = ((16, 32, 2, 32, 512), (16, 16, 2, 32, 512), (16, 32, 2, 16, 512), (8, 32, 2, 32, 512),
                    (16, 16, 4, 64, 1024), (16, 32, 4, 64, 1024), (16, 16, 8, 128, 2048),
                    (32, 32, 2, 32, 512)) if "decode" in parts else ((16, 32, 2, 32, 512),)
    for ub, pps, nw, cwd, sub in decode_cands:
        t = bench(lambda: rd.rice_decode(q.words, offs, q.ks, q.numel, "E8", q.block_values, out=buf,
                                         stats=False, programs=pps * 132, num_warps=nw, unit_bits=ub,
                                         chunk_words=cwd, sub=sub, impl="units"))
        out["decode"][f"ub{ub}_pps{pps}_w{nw}_cw{cwd}_sub{sub}"] = t
        if best is None or t < best[0]:
            best = (t, pps, nw, ub, cwd, sub)
    rd._TUNE.update(programs_per_sm=best[1], num_warps=best[2], unit_bits=best[3], chunk_words=best[4], sub=best[5])
    out["decode_best"] = best
    out["decode_best_gvalues_s"] = q.numel / best[0] / 1e6
    # the same decode with the per-block statistics (amax, error flags) computed: their cost
    out["decode_with_stats_ms"] = bench(lambda: rd.rice_decode(q.words, offs, q.ks, q.numel, "E8", q.block_values,
                                                               out=buf, stats=True))
    if "actq" not in parts and "gemm" not in parts:
        print("# sweeps", json.dumps(out), flush=True)
        return out
    # act-quant launch shapes
    from hyperquant_diffusers.kernels import act_quant as aq
    from hyperquant_diffusers.codec import random_signs

    out["actq"] = {}
    for mm, kk in ((12288, 4096), (12288, 16384), (256, 4096), (256, 16384)):
        xx = torch.randn(mm, kk, device=dev).to(torch.bfloat16)
        ss = random_signs(kk, 0).to(dev, torch.bfloat16)
        cands = [("onepass", dict(onepass_elems=el, onepass_warps=nw, onepass_pps=0, onepass_stages=1,
                                  onepass_stages_long=1))
                 for el, nw in ((8192, 4), (8192, 8), (16384, 8), (16384, 16), (32768, 16), (4096, 4))
                 if el >= kk or el * 2 >= kk]
        if mm > 2048:  # persistent grids with a software-pipelined row-block loop
            cands += [("onepass", dict(onepass_elems=el, onepass_warps=nw, onepass_pps=pps, onepass_stages=st,
                                       onepass_stages_long=st))
                      for el, nw, pps, st in ((8192, 4, 4, 2), (8192, 4, 8, 2), (8192, 4, 4, 3), (8192, 8, 2, 2),
                                              (16384, 8, 2, 2), (4096, 4, 8, 2), (4096, 2, 16, 2), (8192, 4, 6, 2))
                      if el >= kk or el * 2 >= kk]
        if mm > 2048:
            for bm, nw, st, pps in ((64, 8, 4, 0), (64, 8, 3, 0), (32, 4, 4, 1), (32, 8, 4, 1), (32, 4, 3, 2),
                                    (64, 8, 4, 1), (16, 4, 4, 2), (32, 4, 4, 2), (16, 4, 4, 4), (64, 4, 4, 1)):
                cands.append(("fused", dict(fused_bm=bm, fused_warps=nw, fused_stages=st, fused_pps=pps)))
        else:
            for bm, kc, nw in ((16, 256, 4), (16, 512, 4), (16, 1024, 4), (32, 512, 4), (16, 512, 2)):
                cands.append(("split", dict(split_bm=bm, split_kc=kc, split_warps=nw)))
            cands.append(("fused", dict(fused_bm=16, fused_warps=4, fused_stages=2)))
        bestc = None
        saved = dict(aq._TUNE)
        for impl, tune in cands:
            aq._TUNE.update(tune)
            t = bench(lambda: aq.rht_quantize(xx, ss, 128, "int8", signs_cast=ss, impl=impl))
            out["actq"][f"{mm}x{kk} {impl} {tune}"] = t
            print(f"# sweep actq {mm}x{kk} {impl} {tune}: {t:.4f} ms", flush=True)
            if bestc is None or t < bestc[0]:
                bestc = (t, impl, tune)
            aq._TUNE.clear()
            aq._TUNE.update(saved)
        out["actq"][f"{mm}x{kk} best"] = bestc
        out["actq"][f"{mm}x{kk} best_gbs"] = 3 * mm * kk / bestc[0] / 1e6
        # measured only: the defaults in kernels/act_quant.py come from this sweep (per K), not from one case
        out["actq"][f"{mm}x{kk} onepass_vs_fused_or_split"] = min(
            (t for key, t in out["actq"].items() if key.startswith(f"{mm}x{kk} onepass")), default=None)
        del xx
    xq = torch.randint(-127, 128, (12288, 4096), dtype=torch.int8, device=dev)
    wq = torch.randint(-40, 41, (4096, 4096), dtype=torch.int8, device=dev)
    sx = torch.rand(12288, device=dev)
    sw = torch.rand(4096, device=dev)
    b = torch.randn(4096, device=dev).to(torch.bfloat16)
    bestg = None
    for cfg in ((128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4), (256, 128, 128, 8, 8, 3),
                (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 4, 5), (64, 256, 128, 8, 4, 4)):
        try:
            t = bench(lambda: int8_gemm.int8_gemm_triton(xq, sx, wq, sw, b, config=cfg))
        except Exception as e:  # a config that does not fit shared memory
            out["gemm"][str(cfg)] = repr(e)[:80]
            continue
        out["gemm"][str(cfg)] = t
        if bestg is None or t < bestg[0]:
            bestg = (t, cfg)
    int8_gemm._CONFIGS["large"] = bestg[1]
    out["gemm_best"] = bestg
    bestt = None
    for ws in (False, True):
        int8_gemm._TMA["warp_specialize"] = ws
        for cfg in ((128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 4),
                    (128, 128, 128, 8, 4, 4), (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 4)):
            tag = ("tma_ws" if ws else "tma") + str(cfg)
            try:
                t = bench(lambda: int8_gemm.int8_gemm_tma(xq, sx, wq, sw, b, config=cfg))
            except Exception as e:
                out["gemm"][tag] = repr(e)[:120]
                continue
            out["gemm"][tag] = t
            print(f"# sweep gemm {tag}: {t:.4f} ms", flush=True)
            if bestt is None or t < bestt[0]:
                bestt = (t, cfg, ws)
    int8_gemm._TMA["warp_specialize"] = False
    if bestt is not None:
        int8_gemm._TMA["config"] = bestt[1]
        int8_gemm._TMA["warp_specialize"] = bestt[2]
        out["gemm_tma_best"] = bestt
        out["gemm_tma_best_tops"] = 2 * 12288 * 4096 * 4096 / bestt[0] / 1e9
        y1 = int8_gemm.int8_gemm_tma(xq, sx, wq, sw, b)
        y0 = int8_gemm.int8_gemm_triton(xq, sx, wq, sw, b)
        out["tma_vs_ptr_max_abs_diff"] = float((y1.float() - y0.float()).abs().max())
    out["gemm_best_tops"] = 2 * 12288 * 4096 * 4096 / bestg[0] / 1e9
    print("# sweeps", json.dumps(out), flush=True)
    return out


def layer_case(n, k, dev, bits=4.0, seed=0):
    from hyperquant_diffusers.codec import quantize
    from hyperquant_diffusers.kernels.dispatch import make_int8_resident
    from hyperquant_diffusers.nn import LatticeLinear

    g = torch.Generator(device=dev).manual_seed(seed)
    w = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    bias = (torch.randn(n, device=dev, generator=g) * 0.01).to(torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    q = quantize(w, bits=bits, lattice="E8")
    torch.cuda.synchronize()
    tq = time.perf_counter() - t0
    comp = LatticeLinear.from_lattice_tensor(q, bias, bits=bits, mma="int8", residency="compressed")
    i8 = LatticeLinear.from_lattice_tensor(q, bias, bits=bits, mma="int8", residency="compressed")
    assert make_int8_resident(i8)
    return w, bias, q, comp, i8, tq


def _fp8_is_tma(m: int) -> bool:
    from hyperquant_diffusers.kernels.int8_gemm import _FP8_PATH

    return _FP8_PATH["path"] == "tma" or (_FP8_PATH["path"] == "auto" and m > 256)


def chain_case(dev, m=12288):
    """The four LTX-2 shapes as one chain of layers (as a block runs them), each residency, and the compressed
    chain with the side-stream prefetch on and off; plus to_q/to_k/to_v on one input with and without activation
    sharing. ms per chain (median)."""
    from hyperquant_diffusers.kernels import dispatch
    from hyperquant_diffusers.nn import LatticeLinear

    out = {}
    torch.manual_seed(3)
    lin = [torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16) for (n, k) in SHAPES]
    for li in lin:
        torch.nn.init.normal_(li.weight, 0, 0.02)
    xs = [torch.randn(m, li.in_features, device=dev).to(torch.bfloat16) for li in lin]
    i8 = [LatticeLinear.from_linear(li, bits=4.0, residency="int8") for li in lin]
    cp = [LatticeLinear.from_linear(li, bits=4.0, residency="compressed") for li in lin]

    def chain(mods):
        return lambda: [mo(x) for mo, x in zip(mods, xs)]

    dispatch.set_activation_sharing(False)
    out["bf16_ms"] = bench(chain(lin))
    for mma in ("int8", "fp8"):
        for mo in i8 + cp:
            mo.mma = mma
        out[f"int8res_{mma}_ms"] = bench(chain(i8))
        dispatch.set_prefetch(False)
        out[f"compres_{mma}_jit_ms"] = bench(chain(cp))
        dispatch.set_prefetch(True)
        chain(cp)()
        chain(cp)()
        out[f"compres_{mma}_prefetch_ms"] = bench(chain(cp))
        ys = chain(cp)()
        dispatch.set_prefetch(False)
        out[f"compres_{mma}_prefetch_exact"] = all(torch.equal(a, b) for a, b in zip(ys, chain(cp)()))
        dispatch.set_prefetch(True)
        out[f"compres_vs_int8res_{mma}_jit"] = out[f"compres_{mma}_jit_ms"] / out[f"int8res_{mma}_ms"] - 1
        out[f"compres_vs_int8res_{mma}_prefetch"] = out[f"compres_{mma}_prefetch_ms"] / out[f"int8res_{mma}_ms"] - 1
    for mo in i8 + cp:
        mo.mma = "int8"
    # to_q / to_k / to_v: three 4096x4096 layers on one activation
    qkv = [LatticeLinear.from_linear(torch.nn.Linear(4096, 4096, device=dev, dtype=torch.bfloat16), bits=4.0)
           for _ in range(3)]
    # two inputs used in turn, so every iteration's first layer misses the sharing entry as a new activation would
    pair = [xs[0], xs[0].clone()]
    it = {"i": 0}

    def qkv_run(mods, fn=None):
        def go():
            it["i"] ^= 1
            xx = pair[it["i"]]
            return [fn(mo, xx) if fn else mo(xx) for mo in mods]
        return go

    out["qkv_bf16_ms"] = bench(qkv_run([lin[0]] * 3))
    out["qkv_int8_unshared_ms"] = bench(qkv_run(qkv))
    dispatch.set_activation_sharing(True)
    out["qkv_int8_shared_ms"] = bench(qkv_run(qkv))
    ys = qkv_run(qkv)()
    dispatch.set_activation_sharing(False)
    out["qkv_shared_exact"] = all(torch.equal(a, mo(pair[it["i"]])) for a, mo in zip(ys, qkv))
    dispatch.set_activation_sharing(False)
    print("# chain", json.dumps(out), flush=True)
    return out


def cast_case(dev):
    """int8 codes -> e4m3: torch's cast vs kernels/cast.py (launch-shape sweep), 16.7M and 67M codes; bit-exact."""
    from hyperquant_diffusers.kernels import cast

    out = {}
    for n, k in ((4096, 4096), (16384, 4096)):
        c = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
        o = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=dev)
        key = f"{n}x{k}"
        out[f"{key} torch_ms"] = bench(lambda: c.to(torch.float8_e4m3fn))
        best = None
        for blk, nw in ((4096, 4), (8192, 8), (16384, 8), (16384, 16), (32768, 16)):
            cast._TUNE.update(block=blk, warps=nw)
            t = bench(lambda: cast.codes_to_e4m3(c, out=o))
            out[f"{key} kernel b{blk} w{nw} ms"] = t
            if best is None or t < best[0]:
                best = (t, blk, nw)
        cast._TUNE.update(block=best[1], warps=best[2])
        out[f"{key} best"] = best
        out[f"{key} best_tbps"] = 2 * n * k / best[0] / 1e9
        out[f"{key} bit_exact"] = bool(torch.equal(cast.codes_to_e4m3(c).view(torch.uint8),
                                                   c.to(torch.float8_e4m3fn).view(torch.uint8)))
    print("# cast", json.dumps(out), flush=True)
    return out


def actq_long_case(dev):
    """Act-quant launch shapes for the rows the auto rule changed (K = 16384: one program per row) and the
    4096-wide default, int8; GB/s counts the 3-byte floor (2 in, 1 out)."""
    from hyperquant_diffusers.codec import random_signs
    from hyperquant_diffusers.kernels import act_quant as aq

    out = {}
    saved = dict(aq._TUNE)
    for mm, kk in ((12288, 16384), (256, 16384), (12288, 4096), (12288, 2048), (12288, 8192), (256, 4096)):
        xx = torch.randn(mm, kk, device=dev).to(torch.bfloat16)
        ss = random_signs(kk, 0).to(dev, torch.bfloat16)
        key = f"{mm}x{kk}"
        out[f"{key} auto"] = bench(lambda: aq.rht_quantize(xx, ss, 128, "int8", signs_cast=ss))
        cands = [("fused", {}), ("split", {})] if kk > 8192 else []
        for pps in (0, 1, 2, 4, 8):
            for st in (1, 2, 3):
                for nw in ((4, 8) if kk <= 8192 else (8, 16)):
                    tune = dict(onepass_pps=pps, onepass_stages=st, onepass_stages_long=st, onepass_warps=nw,
                                onepass_warps_long=nw)
                    if pps == 0 and st > 1:
                        continue
                    cands.append(("onepass", tune))
        best = None
        for impl, tune in cands:
            aq._TUNE.clear()
            aq._TUNE.update(saved)
            aq._TUNE.update(tune)
            try:
                t = bench(lambda: aq.rht_quantize(xx, ss, 128, "int8", signs_cast=ss, impl=impl))
            except Exception as e:  # a shape that does not fit (shared memory, registers)
                out[f"{key} {impl} {tune}"] = repr(e)[:80]
                continue
            out[f"{key} {impl} {tune}"] = t
            if best is None or t < best[0]:
                best = (t, impl, tune)
        aq._TUNE.clear()
        aq._TUNE.update(saved)
        out[f"{key} best"] = best
        out[f"{key} best_tbps"] = 3 * mm * kk / best[0] / 1e9
        out[f"{key} auto_tbps"] = 3 * mm * kk / out[f"{key} auto"] / 1e9
        print(f"# actq {key}: auto {out[f'{key} auto']:.4f} ms, best {best}", flush=True)
        del xx
    return out


def actq_block_case(dev, shapes=((12288, 2048), (12288, 4096))):
    """The one-pass act-quant kernel's block size (values held per program: ``onepass_elems``) swept with its
    programs per SM, pipeline stages and warps, int8 and fp8 codes, on the LTX-2 activations whose pass costs the
    most relative to their GEMM. TB/s counts the 3-byte floor per value (2 in, 1 out)."""
    from hyperquant_diffusers.codec import random_signs
    from hyperquant_diffusers.kernels import act_quant as aq

    out = {}
    saved = dict(aq._TUNE)
    try:
        for mm, kk in shapes:
            xx = torch.randn(mm, kk, device=dev).to(torch.bfloat16)
            ss = random_signs(kk, 0).to(dev, torch.bfloat16)
            for fmt in ("int8", "fp8"):
                key = f"{mm}x{kk} {fmt}"
                ref = aq.rht_quantize(xx, ss, 128, fmt, signs_cast=ss)
                out[f"{key} default"] = bench(lambda: aq.rht_quantize(xx, ss, 128, fmt, signs_cast=ss))
                best = (out[f"{key} default"], "default")
                for elems in (4096, 8192, 16384, 32768):
                    for pps in (1, 2, 4):
                        for st in (2, 3):
                            for nw in (4, 8):
                                tune = dict(onepass_elems=elems, onepass_pps=pps, onepass_stages=st,
                                            onepass_warps=nw)
                                aq._TUNE.clear()
                                aq._TUNE.update(saved)
                                aq._TUNE.update(tune)
                                name = f"{key} e{elems} p{pps} s{st} w{nw}"
                                try:
                                    q, sx = aq.rht_quantize(xx, ss, 128, fmt, signs_cast=ss)
                                    same = bool(torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8))
                                                and torch.equal(sx, ref[1]))
                                    t = bench(lambda: aq.rht_quantize(xx, ss, 128, fmt, signs_cast=ss))
                                except Exception as e:  # a block that does not fit (registers, shared memory)
                                    out[name] = repr(e)[:80]
                                    continue
                                out[name] = (t, same)
                                if same and t < best[0]:
                                    best = (t, name)
                out[f"{key} best"] = best
                out[f"{key} best_tbps"] = 3 * mm * kk / best[0] / 1e9
                out[f"{key} default_tbps"] = 3 * mm * kk / out[f"{key} default"] / 1e9
                print(f"# actq-block {key}: default {out[f'{key} default']:.4f} ms, best {best}", flush=True)
            del xx
    finally:
        aq._TUNE.clear()
        aq._TUNE.update(saved)
    return out


def _kernel_us(fn, calls=50):
    """Mean device time (µs) per call of the CUDA kernels ``fn`` launches, from the profiler (GPU time without
    the host, whatever the launch costs)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    tot = 0.0
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        tot += ev.cuda_time_total if t is None else t
    return tot / calls


def actq_tma_case(dev, shapes=((12288, 2048), (12288, 4096), (12288, 16384), (1024, 4096))):
    """The one-pass act-quant kernel against its TMA variant (``impl="tma"``: bulk copies in, the product straight
    from shared memory, a bulk store out) at a few launches, int8 and fp8, folded signs; every output compared bit
    for bit with the one-pass kernel's. ms from do_bench (host included) and µs of kernel time (profiler)."""
    from hyperquant_diffusers.codec import random_signs, tile_signs
    from hyperquant_diffusers.kernels import act_quant as aq

    out = {}
    saved = dict(aq._TUNE)
    try:
        for mm, kk in shapes:
            xx = torch.randn(mm, kk, device=dev).to(torch.bfloat16)
            sg = random_signs(kk, 0, period=128)
            hh = aq.signed_hadamard(tile_signs(sg, 128), torch.bfloat16, dev)
            for fmt in ("int8", "fp8"):
                key = f"{mm}x{kk} {fmt}"

                def run(impl):
                    return aq.rht_quantize(xx, sg, 128, fmt, hadamard=hh, impl=impl)

                ref = run("onepass")
                row = {"onepass": (bench(lambda: run("onepass")), _kernel_us(lambda: run("onepass")))}
                for elems, pps, st in ((8192, 2, 3), (8192, 2, 4), (8192, 3, 2), (8192, 1, 6), (16384, 1, 4),
                                       (4096, 4, 3), (4096, 3, 4)):
                    aq._TUNE.update(onepass_elems=elems, tma_pps=pps, tma_stages=st)
                    name = f"tma e{elems} p{pps} s{st}"
                    try:
                        q, sx = run("tma")
                        same = bool(torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8))
                                    and torch.equal(sx, ref[1]))
                        row[name] = (bench(lambda: run("tma")), _kernel_us(lambda: run("tma")), same)
                    except Exception as e:  # a launch that does not fit (shared memory)
                        row[name] = repr(e)[:120]
                    aq._TUNE.clear()
                    aq._TUNE.update(saved)
                out[key] = row
                print(f"# actq-tma {key}: " + json.dumps(row), flush=True)
            del xx
    finally:
        aq._TUNE.clear()
        aq._TUNE.update(saved)
    return out


def _random_gemm_operands(dev, m, n, k):
    """Random GEMM operands at the LTX-2 codes' ranges: int8 activation codes (m, k) in [-127, 127], weight codes
    (n, k) in [-12, 12], float32 per-token and per-row scales, a bf16 bias (n,); as ``(xq, sx, wq, sw, bias)``."""
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    wq = torch.randint(-12, 13, (n, k), dtype=torch.int8, device=dev)
    sx = torch.rand(m, device=dev) + 0.5
    sw = torch.rand(n, device=dev) * 1e-3 + 1e-3
    return xq, sx, wq, sw, torch.randn(n, device=dev).to(torch.bfloat16)


def sm_scaling_case(dev, m=12288, programs=(264, 132, 66, 33, 16), gemm_programs=(132, 116, 100, 66)):
    """How the activation pass and the GEMM slow down when given fewer SMs: the question behind running the pass
    beside the GEMM (a pass that is bandwidth-bound runs nearly as fast on a quarter of the SMs, one that is bound
    by each SM's own work does not). Kernel time (profiler, µs per call) of the one-pass and TMA passes (int8,
    folded signs) at 12288 x 2048 and x 4096 launched on ``programs`` programs (one per SM up to the SM count),
    next to two copy floors of the same bytes (bf16 -> int8 conversion copy: the pass's HBM traffic; bf16 clone);
    and the persistent GEMMs (int8, fp8) of 2048x2048 and 4096x4096 on ``gemm_programs`` programs."""
    from hyperquant_diffusers.codec import random_signs, tile_signs
    from hyperquant_diffusers.kernels import act_quant as aq, int8_gemm as G

    out = {"sms": torch.cuda.get_device_properties(dev).multi_processor_count}
    saved_tune, saved_sms = dict(aq._TUNE), aq.num_sms
    try:
        for kk in (2048, 4096):
            xx = torch.randn(m, kk, device=dev).to(torch.bfloat16)
            sg = random_signs(kk, 0, period=128)
            hh = aq.signed_hadamard(tile_signs(sg, 128), torch.bfloat16, dev)
            qbuf = torch.empty(m, kk, device=dev, dtype=torch.int8)
            row = {"copy_to_int8": _kernel_us(lambda: qbuf.copy_(xx)), "clone_bf16": _kernel_us(lambda: xx.clone()),
                   "bytes_mb": m * kk * 3 / 1e6}
            ref = aq.rht_quantize(xx, sg, 128, "int8", hadamard=hh, impl="onepass")
            for impl in ("onepass", "tma"):
                for p in programs:
                    # grid = min(row blocks, num_sms() x programs per SM): one program per SM up to the SM count
                    aq.num_sms = (lambda _i, p=p: p)
                    aq._TUNE.update(onepass_pps=1, tma_pps=1)
                    q, sx = aq.rht_quantize(xx, sg, 128, "int8", hadamard=hh, impl=impl)
                    same = bool(torch.equal(q, ref[0]) and torch.equal(sx, ref[1]))
                    row[f"{impl}_p{p}"] = (_kernel_us(lambda: aq.rht_quantize(xx, sg, 128, "int8", hadamard=hh,
                                                                              impl=impl)), same)
                    aq.num_sms = saved_sms
                    aq._TUNE.clear()
                    aq._TUNE.update(saved_tune)
            out[f"act_{m}x{kk}"] = row
            print(f"# sm-scaling act {m}x{kk}: " + json.dumps(row), flush=True)
            del xx, qbuf, ref
        for (n, k) in ((2048, 2048), (4096, 4096)):
            xq, sx, wq, sw, _ = _random_gemm_operands(dev, m, n, k)
            x8, w8 = xq.to(torch.float8_e4m3fn), wq.to(torch.float8_e4m3fn)
            row = {}
            for fmt, f, ops in (("int8", G.int8_gemm_persistent, (xq, sx, wq, sw, None)),
                                ("fp8", G.fp8_gemm_persistent, (x8, sx, w8, sw, None))):
                base = f(*ops)
                for p in gemm_programs:
                    y = f(*ops, programs=p)
                    row[f"{fmt}_p{p}"] = (_kernel_us(lambda: f(*ops, programs=p)), bool(torch.equal(y, base)))
            out[f"gemm_{n}x{k}"] = row
            print(f"# sm-scaling gemm {n}x{k}: " + json.dumps(row), flush=True)
            del xq, wq, x8, w8
    finally:
        aq.num_sms = saved_sms
        aq._TUNE.clear()
        aq._TUNE.update(saved_tune)
    return out


#: persistent GEMM launches for ``gemm_occupancy_case``: (config, programs per SM). Triton keeps a wgmma with an
#: int32 accumulator synchronous (its pipeliner makes only fp32-accumulator dots "properly async": the int8 K loop
#: waits for each MMA group before issuing the next), so the int8 GEMM's tensor cores idle between K steps unless
#: a second program on the same SM issues its MMAs meanwhile: tiles small enough in shared memory for two per SM.
OCCUPANCY_SWEEP = [((256, 128, 128, 8, 8, 3, True, True), 1), ((128, 128, 128, 8, 4, 3, True, True), 2),
                   ((128, 128, 128, 8, 8, 3, True, True), 2), ((128, 128, 128, 8, 4, 2, True, True), 2),
                   ((64, 128, 128, 8, 4, 4, True, True), 2), ((128, 128, 64, 8, 4, 4, True, True), 2),
                   ((128, 128, 128, 8, 4, 3, True, True), 1), ((128, 128, 128, 16, 4, 3, True, True), 2),
                   ((64, 256, 128, 8, 4, 3, True, True), 1), ((128, 256, 128, 16, 8, 3, True, True), 1)]


def gemm_occupancy_case(dev, m=12288, shapes=None, rounds=3):
    """The persistent GEMMs at each launch of ``OCCUPANCY_SWEEP`` (one and two programs per SM), int8 and fp8
    operands, M tokens: kernel time (profiler, µs, warm L2) and ``do_bench`` ms (L2 flushed), median of ``rounds``
    alternating rounds; every int8 output compared bit for bit with the default launch's, every output with the
    float64 product (rel. error)."""
    from hyperquant_diffusers.kernels import int8_gemm as G

    nsm = torch.cuda.get_device_properties(dev).multi_processor_count
    out = {}
    for (n, k) in (shapes or SHAPES):
        torch.manual_seed(n + k)
        xq, sx, wq, sw, b = _random_gemm_operands(dev, m, n, k)
        x8, w8 = xq.to(torch.float8_e4m3fn), wq.to(torch.float8_e4m3fn)
        ops = {"int8": (xq, sx, wq, sw, b), "fp8": (x8, sx, w8, sw, b)}
        row = {}
        for fmt, f in (("int8", G.int8_gemm_persistent), ("fp8", G.fp8_gemm_persistent)):
            ref = G.quantized_linear_reference(*ops[fmt])
            base = f(*ops[fmt])
            fns, checks = {}, {}
            for cfg, pps in OCCUPANCY_SWEEP:
                name = "-".join(str(int(v)) for v in cfg) + f"/{pps}"
                try:
                    y = f(*ops[fmt], config=cfg, programs=nsm * pps)
                    torch.cuda.synchronize()
                except Exception as e:  # a launch the compiler or the GPU rejects (shared memory) is a result
                    checks[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
                    continue
                checks[name] = {"rel": rel(y, ref), "equal_default": bool(torch.equal(y, base))}
                fns[name] = (lambda cfg=cfg, pps=pps: f(*ops[fmt], config=cfg, programs=nsm * pps))
            t = {key: [] for key in fns}
            for _ in range(rounds):
                for key, fn in fns.items():
                    t[key].append((bench(fn), _kernel_us(fn, calls=20)))
            med = {key: [sorted(v[i] for v in vals)[len(vals) // 2] for i in (0, 1)] for key, vals in t.items()}
            row[fmt] = {"ms_flushed_and_us_warm": med, "checks": checks}
            print(f"# occupancy {n}x{k} {fmt}: " + json.dumps(row[fmt]), flush=True)
        out[f"{n}x{k}"] = row
        del xq, wq, x8, w8, ops
        torch.cuda.empty_cache()
    return out


def actq_crossover_case(dev, shapes=((4096, 4096), (4096, 16384)), ms=(1024, 2048, 4096, 6144, 8192, 12288),
                        rounds=5):
    """Where the TMA activation kernel starts to pay in an eager layer call (it saves GPU time but costs the host
    12-25 µs per call for its descriptors): int8-resident layers of each shape (int8 and fp8 MMA) at several token
    counts, the activation pass forced to the one-pass or the TMA kernel, timed eagerly (``do_bench``: the host's
    time shows where it exceeds the GPU's) in alternating rounds, plus the host time per call. Outputs of the two
    kernels compared bit for bit. ms / µs medians."""
    from hyperquant_diffusers.kernels import act_quant as aq, dispatch

    dispatch.set_activation_sharing(False)
    saved = dict(aq._TUNE)
    out = {}
    try:
        for n, k in shapes:
            w, bias, q, comp, i8, _ = layer_case(n, k, dev)
            i8f = _int8_resident_layer(q, bias, "fp8")
            for m in ms:
                x = torch.randn(m, k, device=dev).to(torch.bfloat16)
                row = {}
                for mma, layer in (("int8", i8), ("fp8", i8f)):
                    ys, t, host = {}, {"onepass": [], "tma": []}, {}
                    for impl in t:
                        aq._TUNE.update(large_m_impl=impl, large_min_values=0)
                        ys[impl] = layer(x)
                        host[impl] = _host_us(lambda: layer(x))
                    for _ in range(rounds):
                        for impl in t:
                            aq._TUNE.update(large_m_impl=impl, large_min_values=0)
                            t[impl].append(bench(lambda: layer(x)))
                    med = {impl: statistics.median(v) for impl, v in t.items()}
                    row[mma] = {"eager_ms": med, "host_us": host, "tma_over_onepass": med["tma"] / med["onepass"],
                                "same_output": bool(torch.equal(ys["onepass"], ys["tma"]))}
                out[f"{n}x{k} M={m}"] = row
                print(f"# actq-crossover {n}x{k} M={m}: " + json.dumps(row), flush=True)
    finally:
        aq._TUNE.clear()
        aq._TUNE.update(saved)
        dispatch.set_activation_sharing(True)
    return out


def actq_fold_case(dev, shapes=((12288, 2048), (12288, 4096), (12288, 16384), (256, 4096)), rounds=7):
    """Folded sign flip vs the flip in the kernel (``act_quant.rht_quantize``'s ``hadamard``), int8 and fp8 codes:
    "independent" (a sign per value, the flip in the kernel: checkpoints before 2026-12-02), "tiled" (tile-periodic
    signs, flip still in the kernel) and "folded" (the same tiled signs folded into diag(d) H: the new default path).
    Folded must give the same bits as tiled, and the codes must match the float32 reference (int8: at most one
    code apart, from the summation order). Alternating rounds, ms medians. (Commit c6f0a49's version also swept
    the folded kernel's launch, and 9cde76b's timed the int8 rounding change: bench/RESULTS.md.)"""
    from hyperquant_diffusers.codec import random_signs, tile_signs
    from hyperquant_diffusers.kernels import act_quant as aq

    out = {}
    for mm, kk in shapes:
        xx = torch.randn(mm, kk, device=dev).to(torch.bfloat16)
        si = random_signs(kk, 0).to(dev, torch.bfloat16)
        st = random_signs(kk, 0, period=128).to(dev, torch.bfloat16)
        hs = aq.signed_hadamard(tile_signs(st, 128), xx.dtype, xx.device)
        for fmt in ("int8", "fp8"):
            key = f"{mm}x{kk} {fmt}"
            a = aq.rht_quantize(xx, st, 128, fmt, signs_cast=st)
            b = aq.rht_quantize(xx, st, 128, fmt, signs_cast=st, hadamard=hs)
            out[f"{key} folded_same_bits"] = bool(torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
                                                  and torch.equal(a[1], b[1]))
            ref = aq.rht_quantize_reference(xx, st, 128, fmt)
            d = (b[0].float() - ref[0].float()).abs()
            out[f"{key} frac_codes_differing_from_reference"] = float((d > 0).float().mean())
            out[f"{key} max_scale_rel_diff"] = float(((b[1] - ref[1]).abs() / ref[1]).max())
            fns = {"independent": lambda: aq.rht_quantize(xx, si, 128, fmt, signs_cast=si),
                   "tiled": lambda: aq.rht_quantize(xx, st, 128, fmt, signs_cast=st),
                   "folded": lambda: aq.rht_quantize(xx, st, 128, fmt, signs_cast=st, hadamard=hs)}
            ts = {k: [] for k in fns}
            for _ in range(rounds):
                for k, fn in fns.items():
                    ts[k].append(bench(fn))
            for k in fns:
                out[f"{key} {k}"] = statistics.median(ts[k])
            out[f"{key} speedup"] = out[f"{key} independent"] / out[f"{key} folded"]
            out[f"{key} folded_tbps"] = 3 * mm * kk / out[f"{key} folded"] / 1e9
            print(f"# actq-fold {key}: " + " ".join(f"{k} {out[f'{key} {k}']:.4f}" for k in fns)
                  + f" ms (x{out[f'{key} speedup']:.2f}), same bits {out[f'{key} folded_same_bits']}, codes off "
                  f"the reference {out[f'{key} frac_codes_differing_from_reference']:.2e}", flush=True)
        del xx
    return out


#: (values per program, programs per SM, stages, warps) of the one-pass kernel tried by actq_launch_case
ACTQ_LAUNCHES = ((8192, 2, 3, 4), (8192, 2, 2, 4), (8192, 3, 2, 4), (4096, 3, 3, 4), (4096, 3, 2, 4),
                 (4096, 4, 2, 4), (4096, 2, 3, 4), (16384, 1, 3, 8), (16384, 1, 2, 4))


def actq_launch_case(dev, shapes=((12288, 2048), (12288, 4096)), rounds=3):
    """The folded one-pass act-quant kernel (int8) at the launches of ``ACTQ_LAUNCHES`` (the first is the default);
    every output compared with the default's bits. ms, median of ``rounds`` alternating rounds."""
    from hyperquant_diffusers.codec import random_signs, tile_signs
    from hyperquant_diffusers.kernels import act_quant as aq

    out = {}
    saved = dict(aq._TUNE)
    try:
        for mm, kk in shapes:
            xx = torch.randn(mm, kk, device=dev).to(torch.bfloat16)
            st = random_signs(kk, 0, period=128).to(dev, torch.bfloat16)
            hs = aq.signed_hadamard(tile_signs(st, 128), xx.dtype, xx.device)
            ref = aq.rht_quantize(xx, st, 128, "int8", signs_cast=st, hadamard=hs)
            ts = {c: [] for c in ACTQ_LAUNCHES}
            for r in range(rounds):
                for c in ACTQ_LAUNCHES:
                    aq._TUNE.clear()
                    aq._TUNE.update(saved)
                    aq._TUNE.update(onepass_elems=c[0], onepass_pps=c[1], onepass_stages=c[2], onepass_warps=c[3])
                    try:
                        if r == 0:
                            q, sx = aq.rht_quantize(xx, st, 128, "int8", signs_cast=st, hadamard=hs)
                            out[f"{mm}x{kk} {c} same_bits"] = bool(torch.equal(q, ref[0]) and torch.equal(sx, ref[1]))
                        ts[c].append(bench(lambda: aq.rht_quantize(xx, st, 128, "int8", signs_cast=st, hadamard=hs)))
                    except Exception as e:  # a launch that does not fit (registers, shared memory)
                        out[f"{mm}x{kk} {c}"] = repr(e)[:80]
            for c, t in ts.items():
                if t:
                    out[f"{mm}x{kk} {c}"] = statistics.median(t)
            print(f"# actq-launch {mm}x{kk}: " + ", ".join(f"{c}: {out[f'{mm}x{kk} {c}']:.4f}" for c in ts if ts[c]),
                  flush=True)
            del xx
    finally:
        aq._TUNE.clear()
        aq._TUNE.update(saved)
    return out


def decode_fmt_case(dev, rounds=5, shapes=((4096, 4096), (16384, 4096), (2048, 2048))):
    """The default E8 decoder's int8 vs e4m3 output (4 bps): both checked against the codec's decode (e4m3 through
    torch's cast), then timed in alternating rounds (fast path, no statistics). ms medians."""
    from hyperquant_diffusers.codec import quantize
    from hyperquant_diffusers.kernels.rice_decode import rice_decode

    out = {}
    for n, k in shapes:
        q = quantize(torch.randn(n, k, device=dev) * 0.02, bits=4.0, lattice="E8")
        offs = q.offsets.to(torch.int32)
        bufs = {dt: torch.empty(q.numel, dtype=dt, device=dev) for dt in (torch.int8, torch.float8_e4m3fn)}
        ts = {dt: [] for dt in bufs}
        for dt, buf in bufs.items():
            rice_decode(q.words, offs, q.ks, q.numel, "E8", q.block_values, out=buf, out_dtype=dt, stats=False)
            c = q.decode_coords().reshape(-1)
            want = c.clamp(-127, 127).to(torch.int8) if dt == torch.int8 else c.clamp(-448, 448).float().to(dt)
            out[f"{n}x{k} {str(dt)[6:]} exact"] = bool(torch.equal(buf.view(torch.uint8), want.view(torch.uint8)))
        for _ in range(rounds):
            for dt, buf in bufs.items():
                ts[dt].append(bench(lambda: rice_decode(q.words, offs, q.ks, q.numel, "E8", q.block_values, out=buf,
                                                        out_dtype=dt, stats=False)))
        for dt in bufs:
            out[f"{n}x{k} {str(dt)[6:]}"] = statistics.median(ts[dt])
        print(f"# decode {n}x{k}: int8 {out[f'{n}x{k} int8']:.4f} e4m3 {out[f'{n}x{k} float8_e4m3fn']:.4f} ms, exact "
              f"{out[f'{n}x{k} int8 exact']} / {out[f'{n}x{k} float8_e4m3fn exact']}", flush=True)
    return out


def overlap_default_tiles(dev):
    """:func:`overlap_case` with the default GEMM tiles and 8 or 16 side-stream decode programs per SM only."""
    from hyperquant_diffusers.kernels import int8_gemm

    return overlap_case(dev, gemm_tiles=(tuple(int8_gemm._TMA["config"]),), pps_list=(8, 16))


def load_decoder_file(path: str, tag: str):
    """A version of ``kernels/rice_decode_vectors.py`` (another commit's, say: ``git show REV:kernels/...``) loaded
    as a sibling module of the package's kernels, so its relative imports resolve there; returns the module (its
    ``launch`` is the decoder's entry point)."""
    import importlib.util

    import hyperquant_diffusers.kernels as kernels_pkg

    name = f"{kernels_pkg.__name__}._decoder_file_{tag}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def decoder_files_case(dev, paths, rounds=5):
    """Versions of the vector E8 decoder side by side (``load_decoder_file``), in one process: on each LTX-2 weight
    shape at 4 bps, every version's int8 and e4m3 output compared byte for byte with the codec's decoder (clamped to
    int8, or cast by torch), then the versions timed in alternating rounds (median of per-round ``do_bench``
    medians, ms; no statistics). Speed-ups are against the first file."""
    from hyperquant_diffusers.codec import quantize
    from hyperquant_diffusers.kernels.rice_decode import ESCAPE_Q

    mods = {f"{i}:{os.path.basename(p)}": load_decoder_file(p, str(i)) for i, p in enumerate(paths)}
    out = {"files": list(paths), "shapes": {}}
    for n, k in SHAPES:
        torch.manual_seed(0)
        q = quantize(torch.randn(n, k, device=dev) * 0.02, bits=4.0, lattice="E8")
        offs = q.offsets.to(torch.int32)
        nb = offs.numel() - 1
        c = q.decode_coords().reshape(-1)
        for dt in (torch.int8, torch.float8_e4m3fn):
            want = c.clamp(-127, 127).to(torch.int8) if dt == torch.int8 else c.clamp(-448, 448).float().to(dt)
            bufs = {name: torch.empty(q.numel, dtype=dt, device=dev) for name in mods}
            fns = {name: (lambda m=m, b=bufs[name]: m.launch(q.words, offs, q.ks, b, b, b, q.numel, nb,
                                                               q.block_values, ESCAPE_Q, stats=False))
                   for name, m in mods.items()}
            row = {}
            for name, f in fns.items():
                bufs[name].view(torch.uint8).fill_(0x5A)
                f()
            torch.cuda.synchronize()
            for name in mods:
                row[f"{name} exact_vs_codec"] = bool(torch.equal(bufs[name].view(torch.uint8), want.view(torch.uint8)))
            times = {name: [] for name in mods}
            for _ in range(rounds):
                for name, f in fns.items():
                    times[name].append(bench(f))
            first = None
            for name in mods:
                t = sorted(times[name])[rounds // 2]
                first = first or t
                row[f"{name} ms"] = t
                row[f"{name} gvalues_s"] = q.numel / t / 1e6
                row[f"{name} speedup"] = first / t
            out["shapes"][f"{n}x{k}_{str(dt).split('.')[-1]}"] = row
            print(f"# decoder files {n}x{k} {dt}: " + json.dumps(row), flush=True)
        del q, c
    return out


def decoder_ab_case(dev, rounds=5):
    """The two E8 Rice decoders (``kernels/rice_decode.py`` IMPLS) on the LTX-2 weight shapes: each output
    compared bit for bit with the codec's decoder (int8, and e4m3 through torch's cast) and with the other
    implementation, then timed in alternating rounds (median of per-round ``do_bench`` medians, fast path: no
    statistics). Then a launch sweep of the vector decoder on 4096x4096; the faster exact implementation (at its best
    launch) is the default for the rest of the run (so ``--decoder-ab`` then measures the steady-state chains with
    it)."""
    from hyperquant_diffusers.codec import quantize
    from hyperquant_diffusers.kernels import rice_decode as rd, rice_decode_vectors as rdv

    out = {"shapes": {}}
    for (n, k), bits_list in (((4096, 4096), (3.0, 4.0, 5.0)), ((16384, 4096), (4.0,)), ((4096, 16384), (4.0,)),
                              ((2048, 2048), (4.0,))):
        w = torch.randn(n, k, device=dev) * 0.02
        for bits in bits_list:
            q = quantize(w, bits=bits, lattice="E8")
            offs = q.offsets.to(torch.int32)
            c = q.decode_coords().reshape(-1)
            ref = c.clamp(-127, 127).to(torch.int8)
            ref8 = c.clamp(-448, 448).to(torch.float32).to(torch.float8_e4m3fn)   # torch's cast: nearest, ties even
            for dt in (torch.int8, torch.float8_e4m3fn):
                bufs = {i: torch.empty(q.numel, dtype=dt, device=dev) for i in rd.IMPLS}
                fns = {i: (lambda i=i: rd.rice_decode(q.words, offs, q.ks, q.numel, "E8", q.block_values,
                                                      out=bufs[i], out_dtype=dt, stats=False, impl=i))
                       for i in rd.IMPLS}
                row = {}
                for i, f in fns.items():
                    f()
                    _, amax, err = rd.rice_decode(q.words, offs, q.ks, q.numel, "E8", q.block_values, out_dtype=dt,
                                                  impl=i)
                    row[f"{i}_flags_clear"] = int(err.abs().sum()) == 0
                torch.cuda.synchronize()
                want = ref if dt == torch.int8 else ref8
                for i in rd.IMPLS:
                    row[f"{i}_exact_vs_codec"] = bool(torch.equal(bufs[i].view(torch.uint8), want.view(torch.uint8)))
                row["impls_identical"] = all(torch.equal(bufs[i].view(torch.uint8), bufs["units"].view(torch.uint8))
                                             for i in rd.IMPLS)
                times = {i: [] for i in rd.IMPLS}
                for _ in range(rounds):
                    for i, f in fns.items():
                        times[i].append(bench(f))
                for i in rd.IMPLS:
                    t = sorted(times[i])[rounds // 2]
                    row[f"{i}_ms"] = t
                    row[f"{i}_gvalues_s"] = q.numel / t / 1e6
                row["speedup_vectors"] = row["units_ms"] / row["vectors_ms"]
                out["shapes"][f"{n}x{k}_{bits:g}bps_{str(dt).split('.')[-1]}"] = row
                print("# decoder", f"{n}x{k}", bits, dt, json.dumps(row), flush=True)
    # launch sweep of the vector decoder (programs per SM, warps, unary words per step, coordinates per tile,
    # register cap: fewer registers, more resident programs, some spilled)
    w = torch.randn(4096, 4096, device=dev) * 0.02
    q = quantize(w, bits=4.0, lattice="E8")
    offs = q.offsets.to(torch.int32)
    buf = torch.empty(q.numel, dtype=torch.int8, device=dev)
    sweep, best = {}, None
    saved_cap = rdv._TUNE["maxnreg"]
    # (programs per SM, warps, pass-1 words per step, words per lane, tile values, register cap)
    for pps, nw, cw, uw, sub, cap in ((16, 4, 384, 3, 4096, None), (32, 4, 128, 1, 4096, 64),
                                      (32, 4, 384, 3, 4096, 64), (32, 4, 256, 2, 4096, 64),
                                      (32, 4, 512, 4, 4096, 64), (24, 4, 384, 3, 4096, 64),
                                      (24, 4, 384, 3, 4096, 80), (40, 4, 384, 3, 4096, 56),
                                      (64, 2, 192, 3, 2048, 64), (16, 8, 768, 3, 4096, 64),
                                      (32, 8, 768, 3, 4096, 40), (32, 4, 192, 3, 4096, 64)):
        rdv._TUNE["maxnreg"] = cap
        t = bench(lambda: rd.rice_decode(q.words, offs, q.ks, q.numel, "E8", q.block_values, out=buf, stats=False,
                                         impl="vectors", programs=pps * 132, num_warps=nw, chunk_words=cw,
                                         lane_words=uw, sub=sub))
        sweep[f"pps{pps}_w{nw}_cw{cw}_uw{uw}_sub{sub}_cap{cap}"] = t
        if best is None or t < best[0]:
            best = (t, pps, nw, cw, uw, sub, cap)
    rdv._TUNE["maxnreg"] = saved_cap
    out["vectors_sweep"] = sweep
    out["vectors_best"] = best
    units_t = out["shapes"]["4096x4096_4bps_int8"]["units_ms"]
    exact = all(r["vectors_exact_vs_codec"] and r["impls_identical"] and r["vectors_flags_clear"]
                for r in out["shapes"].values())
    if exact and best[0] < units_t:
        rdv._TUNE.update(programs_per_sm=best[1], num_warps=best[2], chunk_words=best[3], lane_words=best[4],
                         sub=best[5], maxnreg=best[6])
        rd._TUNE["impl"] = "vectors"
    else:
        rd._TUNE["impl"] = "units"
    out["default_for_the_run"] = {"impl": rd._TUNE["impl"], "vectors_tune": dict(rdv._TUNE)}
    print("# decoder sweep", json.dumps({k: out[k] for k in ("vectors_best", "default_for_the_run")}), flush=True)
    return out


def _host_us(fn, calls=100):
    """Host time of one call of ``fn`` (µs) while the GPU is kept busy ahead of it (so no call waits on the GPU):
    what decides whether a layer is host-bound."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1.5e9))   # ~1 s of GPU work queued first
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def host_gemm_case(dev, m=12288, n=2048, k=2048, repeats=8):
    """Host time of one GEMM launch (µs, GPU kept busy ahead), the one-tile-per-program TMA kernel and the
    persistent kernel alternately, int8 and fp8: the persistent launch passes three TMA descriptors instead of two.
    Then a cProfile of 200 eager int8-resident layer calls (int8 and fp8 MMA) at this shape: where a call's host
    time goes."""
    import cProfile
    import io
    import pstats

    from hyperquant_diffusers.kernels import dispatch, int8_gemm as G

    dispatch.set_activation_sharing(False)
    torch.manual_seed(5)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    wq = torch.randint(-12, 13, (n, k), dtype=torch.int8, device=dev)
    sx, sw = torch.rand(m, device=dev) + 0.5, torch.rand(n, device=dev) * 1e-3
    b = torch.randn(n, device=dev).to(torch.bfloat16)
    x8, w8 = xq.to(torch.float8_e4m3fn), wq.to(torch.float8_e4m3fn)
    fns = {"int8_tma": lambda: G.int8_gemm_tma(xq, sx, wq, sw, b),
           "int8_persistent": lambda: G.int8_gemm_persistent(xq, sx, wq, sw, b),
           "fp8_tma": lambda: G.fp8_gemm_tma(x8, sx, w8, sw, b),
           "fp8_persistent": lambda: G.fp8_gemm_persistent(x8, sx, w8, sw, b)}
    t = {key: [] for key in fns}
    for _ in range(repeats):
        for key, f in fns.items():
            t[key].append(_host_us(f))
    out = {"host_us_median": {key: sorted(v)[len(v) // 2] for key, v in t.items()}, "host_us": t}
    print("# host-gemm " + json.dumps(out["host_us_median"]), flush=True)
    w, bias, q, comp, i8, _ = layer_case(n, k, dev)
    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
    for mma in ("int8", "fp8"):
        mo = _int8_resident_layer(q, bias, mma)
        mo(x)
        torch.cuda.synchronize()
        torch.cuda._sleep(int(1.5e9))
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            mo(x)
        pr.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
        out[f"profile_{mma}"] = buf.getvalue()
    return out


def interleaved_case(dev, m=12288, rounds=7, shapes=None):
    """Per-layer end to end at M tokens, the variants measured in turn for ``rounds`` rounds (each a
    ``do_bench`` median) so that clock and power drift hit all of them alike; reports each variant's median over
    rounds and its speed-up over bf16 (median of the per-round ratios). Variants: bf16 ``F.linear``, int8-resident
    int8, int8-resident fp8 with e4m3 codes resident, the same with int8 codes cast per call, compressed int8 and
    fp8 (just-in-time decode: a single layer called again and again cannot prefetch itself)."""
    from hyperquant_diffusers.kernels import dispatch
    from hyperquant_diffusers.kernels.act_quant import rht_quantize
    from hyperquant_diffusers.kernels.int8_gemm import fp8_gemm_persistent, fp8_gemm_tma, int8_gemm_tma
    from hyperquant_diffusers.nn import LatticeLinear

    dispatch.set_activation_sharing(False)
    out = {}
    for (n, k) in (shapes or SHAPES):
        w, bias, q, comp, i8, _ = layer_case(n, k, dev)

        def layer(mma, int8_resident):
            mo = LatticeLinear.from_lattice_tensor(q, bias, bits=4.0, mma="int8", residency="compressed")
            if int8_resident:
                assert dispatch.make_int8_resident(mo)
            mo.mma = mma
            return mo

        i8f = layer("fp8", True)            # e4m3 codes resident
        i8c = layer("int8", True)
        i8c._mma = "fp8"                    # int8 codes, cast to e4m3 per call
        cp8 = layer("fp8", False)
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        sg, hs = dispatch._rht_operands(i8.signs, 128, x.dtype, x.device)   # what the layers' forward uses
        xq, sx = rht_quantize(x, sg, 128, "int8", signs_cast=sg, hadamard=hs)
        xq8, sx8 = rht_quantize(x, sg, 128, "fp8", signs_cast=sg, hadamard=hs)
        fns = {"bf16": lambda: F.linear(x, w, bias), "int8res_int8": lambda: i8(x), "int8res_fp8_e4m3": lambda: i8f(x),
               "int8res_fp8_cast": lambda: i8c(x), "compres_int8": lambda: comp(x), "compres_fp8": lambda: cp8(x),
               # the parts, in the same rounds
               "actq_int8": lambda: rht_quantize(x, sg, 128, "int8", signs_cast=sg, hadamard=hs),
               "actq_fp8": lambda: rht_quantize(x, sg, 128, "fp8", signs_cast=sg, hadamard=hs),
               "gemm_int8_tma": lambda: int8_gemm_tma(xq, sx, i8.codes, i8.code_scale, bias),
               "gemm_fp8_tma": lambda: fp8_gemm_tma(xq8, sx8, i8f.codes, i8f.code_scale, bias),
               "gemm_fp8_persistent": lambda: fp8_gemm_persistent(xq8, sx8, i8f.codes, i8f.code_scale, bias)}
        for f in fns.values():
            f()
        t = {key: [] for key in fns}
        for _ in range(rounds):
            for key, f in fns.items():
                t[key].append(bench(f, warmup=100, rep=100))
        med = {key: sorted(v)[len(v) // 2] for key, v in t.items()}
        row = {"ms": med, "rounds": t}
        row["speedup"] = {key: sorted(a / b for a, b in zip(t["bf16"], v))[rounds // 2] for key, v in t.items()}
        row["compres_vs_int8res_int8"] = med["compres_int8"] / med["int8res_int8"] - 1
        row["compres_vs_int8res_fp8"] = med["compres_fp8"] / med["int8res_fp8_e4m3"] - 1
        row["e4m3_equals_cast"] = bool(torch.equal(i8f(x), i8c(x)))
        row["host_us"] = {key: _host_us(fns[key]) for key in ("bf16", "int8res_int8", "int8res_fp8_e4m3",
                                                               "compres_int8", "compres_fp8")}
        out[f"{n}x{k}"] = row
        print(f"# interleaved {n}x{k} M={m} "
              + json.dumps({"ms": med, "speedup": row["speedup"], "host_us": row["host_us"]}), flush=True)
        del w, q, comp, i8, i8f, i8c, cp8, x
        torch.cuda.empty_cache()
    return out


def eager_probe_case(dev, m=12288, shape=(16384, 4096), calls=20):
    """Where a compressed fp8 layer's eager time goes (the ninth session read it +24-27% over int8-resident in the
    eager interleaved rounds but +14% CUDA-graphed). For the compressed layers (int8, fp8 built as fp8, fp8 built
    as int8 then switched: the interleaved bench's way) and the int8-resident fp8 layer, with the prefetch on and
    off: the ``do_bench`` median (L2 flushed before each call), the back-to-back time per call (events around
    ``calls`` calls), and the profiler's GPU time per call of each kernel."""
    from torch.profiler import ProfilerActivity, profile

    from hyperquant_diffusers.kernels import dispatch
    from hyperquant_diffusers.nn import LatticeLinear

    dispatch.set_activation_sharing(False)
    n, k = shape
    w, bias, q, comp, i8, _ = layer_case(n, k, dev)
    cp8 = LatticeLinear.from_lattice_tensor(q, bias, bits=4.0, mma="fp8", residency="compressed")
    cp8b = LatticeLinear.from_lattice_tensor(q, bias, bits=4.0, mma="int8", residency="compressed")
    cp8b.mma = "fp8"
    i8f = _int8_resident_layer(q, bias, "fp8")
    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
    mods = {"int8res_fp8": i8f, "compres_int8": comp, "compres_fp8": cp8, "compres_fp8_switched": cp8b}
    was_on = dispatch._PREFETCH["on"]
    out = {}
    try:
        for pf in (True, False):
            dispatch.set_prefetch(pf)
            for name, mo in mods.items():
                fn = (lambda mo=mo: mo(x))
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                row = {"do_bench_ms": bench(fn)}
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(calls):
                    fn()
                e1.record()
                torch.cuda.synchronize()
                row["back_to_back_ms"] = e0.elapsed_time(e1) / calls
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(calls):
                        fn()
                    torch.cuda.synchronize()
                kern = {}
                for ev in prof.key_averages():
                    t = getattr(ev, "device_time_total", None)
                    if t is None:
                        t = ev.cuda_time_total
                    if t > 0:
                        kern[ev.key[:60]] = {"count": ev.count, "us_per_call": t / calls}
                row["kernels"] = kern
                row["kernel_ms_per_call"] = sum(v["us_per_call"] for v in kern.values()) / 1e3
                out[f"{name} prefetch={'on' if pf else 'off'}"] = row
                print(f"# eager-probe {n}x{k} {name} prefetch={pf}: do_bench {row['do_bench_ms']:.4f} ms, "
                      f"back-to-back {row['back_to_back_ms']:.4f} ms, kernels {row['kernel_ms_per_call']:.4f} ms "
                      + json.dumps({kk: round(v["us_per_call"], 1) for kk, v in kern.items()}), flush=True)
    finally:
        dispatch.set_prefetch(was_on)
    return out


def final_graphed_case(dev):
    """:func:`graphed_case` on all four LTX-2 shapes at M = 12288 and M = 256 (GPU time per layer call), each
    (shape, M) in a fresh process: capturing graphs of several shapes in one process tripped a PyTorch allocator
    assertion (``owner_PrivatePool->cudaMalloc_count > 0``, with expandable segments) on the third shape."""
    import subprocess
    import tempfile

    out = {}
    for m in MS:
        for (n, k) in SHAPES:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--graphed-one", f"{n}x{k}x{m}",
                                    "--json", f.name], capture_output=True, text=True)
                print("\n".join(ln for ln in p.stdout.splitlines() if ln.startswith("#")), flush=True)
                if p.returncode:
                    out[f"M={m} {n}x{k}"] = {"error": p.stderr[-1500:]}
                    print(f"# graphed {n}x{k} M={m} failed: {p.stderr[-300:]}", flush=True)
                    continue
                with open(f.name) as fh:
                    out[f"M={m} {n}x{k}"] = json.load(fh)["graphed"]
    return out


def final_interleaved_case(dev):
    """:func:`interleaved_case` (eager, host included) on all four shapes at M = 256."""
    return interleaved_case(dev, m=256, rounds=5)


def final_overlap_case(dev):
    """:func:`overlap_case` (four distinct layers in turn) on all four shapes with the code's GEMM tiles and the
    code's prefetch grid (8 programs per SM) against the just-in-time decode."""
    from hyperquant_diffusers.kernels import int8_gemm

    return overlap_case(dev, gemm_tiles=(int8_gemm._TMA["config"],), pps_list=(8,),
                        whens=("acquire", "after_launch", "after_gemm"))


#: the persistent GEMM launches --gemm-sweep tries, (BM, BN, BK, GROUP_M, warps, stages, SUBTILE, FLATTEN)
PERSISTENT_SWEEP = [(128, 256, 128, 8, 8, 3, True, True), (128, 256, 128, 8, 8, 3, True, False),
                    (128, 256, 128, 8, 8, 3, False, True), (128, 256, 128, 8, 8, 4, True, True),
                    (128, 256, 64, 8, 8, 4, True, True), (128, 256, 64, 8, 8, 6, True, True),
                    (128, 128, 128, 8, 8, 4, True, True), (128, 128, 128, 8, 4, 4, True, True),
                    (256, 128, 128, 8, 8, 3, True, True), (128, 256, 128, 16, 8, 3, True, True),
                    (128, 128, 128, 16, 4, 3, True, True, 2)]


def _graphed(fn):
    """``fn`` captured in a CUDA graph (after a warm-up call on a side stream): a callable replaying it. Timing
    the replay gives the GPU time of ``fn`` without the host's launch cost."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def graphed_case(dev, m=12288, rounds=5, shapes=((2048, 2048), (4096, 4096))):
    """GPU time per layer call without the host: each variant (bf16, int8-resident int8 / fp8, compressed int8 /
    fp8 with the just-in-time decode) captured in a CUDA graph and its replay timed, in alternating rounds. Where
    an eager layer is host-bound (2048², bench/RESULTS.md) this is the time a graph-captured or host-ahead model
    sees. Outputs of the graphs equal the eager calls'. ms medians; speed-up = median of per-round ratios."""
    from hyperquant_diffusers.kernels import dispatch
    from hyperquant_diffusers.nn import LatticeLinear

    dispatch.set_activation_sharing(False)
    was_on = dispatch._PREFETCH["on"]
    dispatch.set_prefetch(False)        # one layer replayed: nothing to prefetch, and no side stream in a graph
    out = {}
    try:
        for (n, k) in shapes:
            w, bias, q, comp, i8, _ = layer_case(n, k, dev)
            i8f = _int8_resident_layer(q, bias, "fp8")
            cp8 = LatticeLinear.from_lattice_tensor(q, bias, bits=4.0, mma="fp8", residency="compressed")
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            mods = {"bf16": lambda: F.linear(x, w, bias), "int8res_int8": lambda: i8(x),
                    "int8res_fp8": lambda: i8f(x), "compres_int8": lambda: comp(x), "compres_fp8": lambda: cp8(x)}
            key = f"{n}x{k}"
            graphs, res = {}, {}
            for name, fn in mods.items():
                want = fn().clone()
                holder = {}

                def cap(fn=fn, holder=holder):
                    holder["y"] = fn()
                graphs[name] = _graphed(cap)
                graphs[name]()
                torch.cuda.synchronize()
                res[f"{key} {name} graph_equals_eager"] = bool(torch.equal(holder["y"], want))
            t = {name: [] for name in graphs}
            for _ in range(rounds):
                for name, g in graphs.items():
                    t[name].append(bench(g))
            for name, v in t.items():
                res[f"{key} {name}"] = statistics.median(v)
                res[f"{key} {name} speedup"] = statistics.median(a / b for a, b in zip(t["bf16"], v))
            res[f"{key} compres_vs_int8res_int8"] = res[f"{key} compres_int8"] / res[f"{key} int8res_int8"] - 1
            res[f"{key} compres_vs_int8res_fp8"] = res[f"{key} compres_fp8"] / res[f"{key} int8res_fp8"] - 1
            out.update(res)
            print(f"# graphed {key} M={m}: " + ", ".join(f"{nm} {res[f'{key} {nm}']:.4f} ms ({res[f'{key} {nm} speedup']:.2f}x)"
                                                   for nm in graphs) + f"; same as eager: "
                  f"{all(v for kk, v in res.items() if kk.endswith('graph_equals_eager'))}", flush=True)
            # (no empty_cache: the decode's scratch, cached per stream, was allocated in a graph's private pool)
            del graphs, w, q, comp, i8, i8f, cp8, x
    finally:
        dispatch.set_prefetch(was_on)
    return out


def layer_parts_case(dev, m=12288, shapes=None, calls=20):
    """Where a layer's GPU time goes: the profiler's device time per kernel (µs per call, summed by kernel name)
    of the int8-resident and the compressed layer (just-in-time decode, prefetch off, as ``graphed_case`` times
    them), int8 and fp8 MMA, at M tokens."""
    from torch.profiler import ProfilerActivity, profile

    from hyperquant_diffusers.kernels import dispatch
    from hyperquant_diffusers.nn import LatticeLinear

    dispatch.set_activation_sharing(False)
    was_on = dispatch._PREFETCH["on"]
    dispatch.set_prefetch(False)
    out = {}
    try:
        for (n, k) in (shapes or SHAPES):
            w, bias, q, comp, i8, _ = layer_case(n, k, dev)
            layers = {"int8res_int8": i8, "int8res_fp8": _int8_resident_layer(q, bias, "fp8"), "compres_int8": comp,
                      "compres_fp8": LatticeLinear.from_lattice_tensor(q, bias, bits=4.0, mma="fp8",
                                                                       residency="compressed")}
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            row = {}
            for name, mod in layers.items():
                for _ in range(3):
                    mod(x)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(calls):
                        mod(x)
                    torch.cuda.synchronize()
                parts = {}
                for ev in prof.key_averages():
                    t = getattr(ev, "device_time_total", None)
                    t = ev.cuda_time_total if t is None else t
                    if t > 0:
                        parts[ev.key[:60]] = round(t / calls, 2)
                row[name] = parts
            out[f"{n}x{k}"] = row
            print(f"# parts {n}x{k}: " + json.dumps(row), flush=True)
            del w, q, comp, i8, layers, x
    finally:
        dispatch.set_prefetch(was_on)
    return out


def gemm_sweep_case(dev, m=12288, shapes=None, rounds=3):
    """The GEMMs alone at M tokens: the one-tile-per-program TMA kernel (the code's default) against the
    persistent kernel at each launch of ``PERSISTENT_SWEEP``, int8 and fp8 operands; every launch's output checked
    against the float64 product of the same codes (rel. error) and, for int8, against the TMA kernel bit for bit.
    Then per layer (int8 residency, M tokens) with the best persistent launch on and off, eager and replayed from a
    CUDA graph (GPU time without the host's launch cost), next to bf16 ``F.linear``. ms, median of per-round
    ``do_bench`` medians."""
    from hyperquant_diffusers.kernels import dispatch, int8_gemm as G

    dispatch.set_activation_sharing(False)
    out = {}
    for (n, k) in (shapes or SHAPES):
        torch.manual_seed(n + k)
        xq, sx, wq, sw, b = _random_gemm_operands(dev, m, n, k)
        x8 = (torch.randn(m, k, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        w8 = wq.to(torch.float8_e4m3fn)
        ref = {"int8": G.quantized_linear_reference(xq, sx, wq, sw, b),
               "fp8": G.quantized_linear_reference(x8.float(), sx, w8.float(), sw, b)}
        ops = {"int8": (xq, sx, wq, sw, b), "fp8": (x8, sx, w8, sw, b)}
        row = {}
        for fmt in ("int8", "fp8"):
            tma = G.fp8_gemm_tma if fmt == "fp8" else G.int8_gemm_tma
            per = G.fp8_gemm_persistent if fmt == "fp8" else G.int8_gemm_persistent
            y_tma = tma(*ops[fmt])
            fns = {"tma": lambda: tma(*ops[fmt])}
            checks = {"tma": {"rel": rel(y_tma, ref[fmt])}}
            for cfg in PERSISTENT_SWEEP:
                name = "p" + "-".join(str(int(v)) for v in cfg)
                try:
                    y = per(*ops[fmt], config=cfg)
                    torch.cuda.synchronize()
                except Exception as e:  # a launch the compiler or the GPU rejects is a result, not a crash
                    checks[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    continue
                checks[name] = {"rel": rel(y, ref[fmt]), "equal_tma": bool(torch.equal(y, y_tma))}
                fns[name] = (lambda cfg=cfg: per(*ops[fmt], config=cfg))
            t = {key: [] for key in fns}
            for _ in range(rounds):
                for key, f in fns.items():
                    t[key].append(bench(f))
            med = {key: sorted(v)[len(v) // 2] for key, v in t.items()}
            ok = [key for key in med if key != "tma" and checks[key]["rel"] < 1e-2]
            best = min(ok, key=med.get) if ok else None
            row[fmt] = {"ms": med, "checks": checks, "best": best,
                        "tops": {key: 2 * m * n * k / v / 1e9 for key, v in med.items()}}
            print(f"# gemm {n}x{k} {fmt} tma {med['tma']:.4f} best {best} "
                  f"{med.get(best, float('nan')):.4f} ms", flush=True)
        out[f"{n}x{k}"] = row
        del xq, wq, x8, w8, ref, ops
        torch.cuda.empty_cache()
    # per layer with the best persistent launch (each format's most common best across the shapes)
    saved = dict(G.PERSISTENT)
    for fmt in ("int8", "fp8"):
        bests = [out[s_][fmt]["best"] for s_ in out if out[s_][fmt]["best"]]
        if bests:
            name = max(set(bests), key=bests.count)
            G.PERSISTENT[fmt] = next(c for c in PERSISTENT_SWEEP
                                     if "p" + "-".join(str(int(v)) for v in c) == name)
    out["persistent_chosen"] = {fmt: G.PERSISTENT[fmt] for fmt in ("int8", "fp8")}
    for (n, k) in (shapes or SHAPES):
        w, bias, q, comp, i8, _ = layer_case(n, k, dev)
        i8f = _int8_resident_layer(q, bias, "fp8")
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        ref64 = x.double() @ q.dequantize(torch.float64).T + bias.double()
        fns, errs = {"bf16": lambda: F.linear(x, w, bias)}, {}
        for use in ((), ("int8", "fp8")):
            G.PERSISTENT["use"] = use
            tag = "persistent" if use else "tma"
            errs[f"int8_{tag}"] = rel(i8(x), ref64)
            errs[f"fp8_{tag}"] = rel(i8f(x), ref64)
            fns[f"int8res_int8_{tag}"] = (lambda: i8(x))
            fns[f"int8res_fp8_{tag}"] = (lambda: i8f(x))
            for key, f in ((f"int8res_int8_{tag}_graph", lambda: i8(x)), (f"int8res_fp8_{tag}_graph", lambda: i8f(x)),
                           ("bf16_graph", lambda: F.linear(x, w, bias))):
                try:
                    fns[key] = _graphed(f)
                except Exception as e:  # a capture failure is a finding: record it, time the rest
                    errs[key] = f"capture failed: {type(e).__name__}: {str(e)[:200]}"
        # the eager variants read PERSISTENT["use"] at call time: time each with its own setting
        uses = {key: (("int8", "fp8") if "persistent" in key else ()) for key in fns}
        t = {key: [] for key in fns}
        for _ in range(rounds + 2):
            for key, f in fns.items():
                G.PERSISTENT["use"] = uses[key]
                t[key].append(bench(f, warmup=50, rep=100))
        med = {key: sorted(v)[len(v) // 2] for key, v in t.items()}
        sp = {key: sorted(a / b_ for a, b_ in zip(t["bf16"], v))[len(v) // 2] for key, v in t.items()}
        out[f"layer_{n}x{k}"] = {"ms": med, "speedup": sp, "rel_err_vs_fp64": errs}
        print(f"# layer {n}x{k} " + json.dumps({"ms": med, "speedup": sp, "err": errs}), flush=True)
        del w, q, comp, i8, i8f, x, ref64
        torch.cuda.empty_cache()
    G.PERSISTENT.clear()
    G.PERSISTENT.update(saved)
    return out


def _int8_resident_layer(q, bias, mma):
    """A LatticeLinear of ``q`` with int8 residency (e4m3 codes resident when ``mma`` is fp8)."""
    from hyperquant_diffusers.kernels import dispatch
    from hyperquant_diffusers.nn import LatticeLinear

    mo = LatticeLinear.from_lattice_tensor(q, bias, bits=4.0, mma="int8", residency="compressed")
    assert dispatch.make_int8_resident(mo)
    mo.mma = mma
    return mo


def kernel_resources() -> dict:
    """Registers, spills and shared memory of every compiled variant of the decode, act-quant and GEMM kernels seen
    so far (from the cached launchers): what decides whether two kernels can share an SM."""
    from hyperquant_diffusers.kernels import act_quant, int8_gemm, rice_decode

    out = {}
    launchers = {"rice_decode": rice_decode._kernel(), "int8_gemm_tma": int8_gemm._kernels()[2],
                 "act_quant_onepass": act_quant._kernel()[3]}
    for name, cl in launchers.items():
        for i, (ck, tail) in enumerate(cl.entries.values()):
            md = ck.metadata
            out[f"{name}[{i}] {tail}"] = {"regs": ck.n_regs, "spills": ck.n_spills, "shared_bytes": md.shared,
                                          "warps": md.num_warps}
    return out


#: TMA GEMM tiles (BM, BN, BK, GROUP_M, warps, stages) the steady-state chains try: the default (192 KB of shared
#: memory and 230 registers x 256 threads per program leave no room for a decode program beside it) and smaller
#: footprints that leave room
OVERLAP_GEMM_TILES = ((128, 256, 128, 8, 8, 4), (128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4),
                      (128, 128, 128, 8, 4, 3))


def overlap_case(dev, m=12288, nlayers=4, shapes=None, gemm_tiles=OVERLAP_GEMM_TILES, pps_list=(8, 16, 32),
                 whens=("acquire",)):
    """Per-layer cost in steady state: ``nlayers`` distinct layers of one shape called in turn (as consecutive layers
    of a model; activation sharing off, so every call runs its own activation pass), int8-resident vs compressed
    with the decode just in time and with the side-stream prefetch (decode grid programs/SM; launched where each of
    ``whens`` says, ``dispatch.PREFETCH_WHEN``), each with the TMA GEMM tiles of ``gemm_tiles``. ms per layer
    (median over chains)."""
    from hyperquant_diffusers.codec import quantize
    from hyperquant_diffusers.kernels import dispatch, int8_gemm
    from hyperquant_diffusers.kernels.dispatch import make_int8_resident
    from hyperquant_diffusers.nn import LatticeLinear

    dispatch.set_activation_sharing(False)
    out = {}
    saved = dict(dispatch._PREFETCH)
    saved_tma = dict(int8_gemm._TMA)
    for (n, k) in (shapes or SHAPES):
        key = f"{n}x{k}"
        g = torch.Generator(device=dev).manual_seed(n + k)
        x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
        lin, i8, cp = [], [], []
        for _ in range(nlayers):
            li = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
            torch.nn.init.normal_(li.weight, 0, 0.02)
            q = quantize(li.weight.detach(), bits=4.0, lattice="E8")
            c = LatticeLinear.from_lattice_tensor(q, li.bias.detach(), bits=4.0, residency="compressed")
            r = LatticeLinear.from_lattice_tensor(q, li.bias.detach(), bits=4.0, residency="compressed")
            assert make_int8_resident(r)
            lin.append(li)
            cp.append(c)
            i8.append(r)

        def chain(mods):
            return lambda: [mo(x) for mo in mods]

        row = {"bf16": bench(chain(lin)) / nlayers}
        for mma in ("int8", "fp8"):
            for mo in i8 + cp:
                mo.mma = mma
            best, best_i8 = None, None
            for tile in gemm_tiles:
                for cfg in ("config", "fp8"):
                    int8_gemm._TMA[cfg] = tile
                sfx = "tile" + "x".join(map(str, tile))
                t8 = row[f"int8res_{mma}_{sfx}"] = bench(chain(i8)) / nlayers
                if best_i8 is None or t8 < best_i8[0]:
                    best_i8 = (t8, sfx)
                dispatch.set_prefetch(False)
                row[f"compres_{mma}_jit_{sfx}"] = bench(chain(cp)) / nlayers
                ref = chain(cp)()
                dispatch.set_prefetch(True)
                for pps in pps_list:
                    for when in whens:
                        dispatch._PREFETCH.update(programs_per_sm=pps, when=when)
                        chain(cp)()
                        chain(cp)()
                        tag = f"compres_{mma}_prefetch_pps{pps}_{sfx}" + ("" if when == "acquire" else f"_{when}")
                        t = row[tag] = bench(chain(cp)) / nlayers
                        if best is None or t < best[0]:
                            best = (t, tag)
                row[f"compres_{mma}_prefetch_exact_{sfx}"] = all(torch.equal(a, b) for a, b in zip(chain(cp)(), ref))
                dispatch._PREFETCH.update(programs_per_sm=saved["programs_per_sm"], when=saved["when"])
            int8_gemm._TMA.update(saved_tma)
            dflt = "tile" + "x".join(map(str, saved_tma["config"]))
            row[f"int8res_{mma}"] = row.get(f"int8res_{mma}_{dflt}", best_i8[0])
            row[f"int8res_{mma}_best"] = best_i8
            row[f"compres_{mma}_best"] = best
            row[f"compres_vs_int8res_{mma}_best"] = best[0] / best_i8[0] - 1
            row[f"compres_vs_int8res_{mma}_jit"] = (row.get(f"compres_{mma}_jit_{dflt}", float("nan"))
                                                    / row[f"int8res_{mma}"] - 1)
            row[f"speedup_int8res_{mma}"] = row["bf16"] / best_i8[0]
        out[key] = row
        print(f"# overlap {key} " + json.dumps(row), flush=True)
        del lin, i8, cp, x
        torch.cuda.empty_cache()
    dispatch._PREFETCH.update(saved)
    int8_gemm._TMA.update(saved_tma)
    out["kernel_resources"] = kernel_resources()
    print("# resources " + json.dumps(out["kernel_resources"]), flush=True)
    return out


def run(args):
    from hyperquant_diffusers.kernels import fp4
    from hyperquant_diffusers.kernels.act_quant import rht_quantize
    from hyperquant_diffusers.kernels.cast import codes_to_e4m3
    from hyperquant_diffusers.kernels.dispatch import weight_codes
    from hyperquant_diffusers.kernels.int8_gemm import (fp8_gemm_tma, fp8_linear, int8_gemm_int_mm, int8_gemm_tma,
                                                        int8_gemm_triton, set_fp8_path, set_int8_path)
    from hyperquant_diffusers.kernels.quantize import quantize_many
    from hyperquant_diffusers.kernels.rice_decode import rice_decode

    from hyperquant_diffusers.kernels import dispatch

    # every per-layer timing below calls a layer again on the same input: with activation sharing on, those
    # calls would skip the act-quant pass, so it is off here and measured on its own (chain_case)
    dispatch.set_activation_sharing(False)
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import triton

    res["triton"] = triton.__version__
    res["ceilings"] = ceilings(dev)
    print("# ceilings", json.dumps(res["ceilings"]), flush=True)
    rows = []
    dec_rows = []
    res["sweeps"] = {"gemm_tma_best": "code defaults"} if args.no_sweeps else sweeps(dev)
    shapes = SHAPES[:1] + SHAPES[3:] if args.quick else SHAPES
    for (n, k) in shapes:
        w, bias, q, comp, i8, tq = layer_case(n, k, dev)
        nval = n * k
        # bit-exact decode vs the codec (fresh random weights per shape)
        out8, amax, err = rice_decode(q.words, q.offsets.to(torch.int32), q.ks, nval, "E8", q.block_values)
        ref = q.decode_coords().reshape(-1)
        exact = bool(torch.equal(out8.to(torch.int32), ref.clamp(-127, 127))) and int(err.abs().sum()) == 0
        offs32 = q.offsets.to(torch.int32)
        td = bench(lambda: rice_decode(q.words, offs32, q.ks, nval, "E8", q.block_values, out=out8))
        stream_bytes = q.words.numel() * 4
        dec = {"shape": f"{n}x{k}", "bit_exact": exact, "decode_ms": td, "gvalues_s": nval / td / 1e6,
               "out_gbs": nval / td / 1e6, "stream_gbs": stream_bytes / td / 1e6,
               "stream_bps": q.stream_bits_per_scalar, "quantize_codec_s": tq, "max_abs_coord": int(ref.abs().max())}
        # fp4 cast error of the lattice output (rotated weight) and of the dequantized weight
        rot = q.rotated()
        dec["nvfp4_rel_err"] = fp4.fp4_cast_error(rot, "nvfp4")
        dec["mxfp4_rel_err"] = fp4.fp4_cast_error(rot, "mxfp4")
        dec["lattice_rel_err"] = rel(q.dequantize(torch.float32), w.float())
        del rot
        dec_rows.append(dec)
        print("# decode", json.dumps(dec), flush=True)
        what = q.dequantize(torch.float64)  # the weight the quantized layer represents
        for m in MS:
            torch.manual_seed(m + n)
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            row = {"shape": f"{n}x{k}", "M": m}
            ref64 = x.double() @ what.T + bias.double()
            refw = x.double() @ w.double().T + bias.double()
            row["bf16_ms"] = bench(lambda: F.linear(x, w, bias))
            row["bf16_err_vs_fp64"] = rel(F.linear(x, w, bias), refw)
            # parts
            sgn = i8.signs.to(torch.bfloat16)
            row["actq_int8_ms"] = bench(lambda: rht_quantize(x, sgn, 128, "int8", signs_cast=sgn))
            row["actq_fp8_ms"] = bench(lambda: rht_quantize(x, sgn, 128, "fp8", signs_cast=sgn))
            xq, sx = rht_quantize(x, i8.signs, 128, "int8")
            xq8, sx8 = rht_quantize(x, i8.signs, 128, "fp8")
            wq, sw = i8.codes, i8.code_scale
            wq8 = wq.to(torch.float8_e4m3fn)
            row["gemm_triton_ms"] = bench(lambda: int8_gemm_triton(xq, sx, wq, sw, bias))
            row["gemm_int_mm_ms"] = bench(lambda: int8_gemm_int_mm(xq, sx, wq, sw, bias))
            row["cast_fp8_torch_ms"] = bench(lambda: wq.to(torch.float8_e4m3fn))
            row["cast_fp8_ms"] = bench(lambda: codes_to_e4m3(wq))  # what fp8_linear runs on int8 codes
            set_fp8_path("scaled_mm")
            row["gemm_fp8_ms"] = bench(lambda: fp8_linear(xq8, sx8, wq8, sw, bias))
            if "gemm_tma_best" in res["sweeps"]:
                row["gemm_fp8_tma_ms"] = bench(lambda: fp8_gemm_tma(xq8, sx8, wq8, sw, bias))
                row["fp8_tma_vs_scaled_mm_rel"] = rel(fp8_gemm_tma(xq8, sx8, wq8, sw, bias),
                                                      fp8_linear(xq8, sx8, wq8, sw, bias))
                set_fp8_path("auto")
            else:
                set_fp8_path("scaled_mm")
            row["fp8_path"] = "tma" if _fp8_is_tma(m) else "scaled_mm"
            row["decode_int8_ms"] = bench(lambda: weight_codes(comp, "int8"))
            row["decode_fp8_ms"] = bench(lambda: weight_codes(comp, "fp8"))
            # end to end, each residency x MMA; int8 GEMM path chosen per run
            tma_ok = "gemm_tma_best" in res["sweeps"]
            paths = ("triton", "tma", "int_mm") if tma_ok else ("triton", "int_mm")
            row["gemm_tma_ms"] = bench(lambda: int8_gemm_tma(xq, sx, wq, sw, bias)) if tma_ok else float("nan")
            for path in paths:
                set_int8_path(path)
                for mod, rname in ((i8, "int8res"), (comp, "compres")):
                    mod.mma = "int8"
                    row[f"e2e_{rname}_int8_{path}_ms"] = bench(lambda: mod(x))
                    if rname == "int8res":
                        y = mod(x)
                        row[f"err_int8_{path}_vs_fp64"] = rel(y, ref64)
            best = min(paths, key=lambda p: row[f"e2e_int8res_int8_{p}_ms"])
            row["int8_path"] = best
            set_int8_path(best)
            for mod, rname in ((i8, "int8res"), (comp, "compres")):
                mod.mma = "int8"
                row[f"e2e_{rname}_int8_ms"] = row[f"e2e_{rname}_int8_{best}_ms"]
                mod.mma = "fp8"   # int8 residency: the layer now holds e4m3 codes (LatticeLinear.fit_codes_to_mma)
                row[f"e2e_{rname}_fp8_ms"] = bench(lambda: mod(x))
                if rname == "int8res":
                    row["err_fp8_vs_fp64"] = rel(mod(x), ref64)
                    y8 = mod(x)
                    mod.mma = "int8"
                    mod._mma = "fp8"  # int8 codes under the fp8 MMA: the per-call cast (kernels/cast.py)
                    row["e2e_int8res_fp8_cast_per_call_ms"] = bench(lambda: mod(x))
                    row["fp8_e4m3_resident_equals_cast"] = bool(torch.equal(mod(x), y8))
                if rname == "compres":
                    row["err_compres_fp8_vs_fp64"] = rel(mod(x), ref64)
                mod.mma = "int8"
            row["err_compres_int8_vs_fp64"] = rel(comp(x), ref64)
            row["err_int8_vs_orig_weight"] = rel(i8(x), refw)
            # fp4 (emulated): output error of the nvfp4/mxfp4-cast lattice weight with bf16 activations
            for f in ("nvfp4", "mxfp4"):
                qf = (fp4.nvfp4_quantize if f == "nvfp4" else fp4.mxfp4_quantize)(i8.rotated_weight())
                wf = (fp4.nvfp4_dequantize if f == "nvfp4" else fp4.mxfp4_dequantize)(qf)
                from hyperquant_diffusers.codec import inverse_rht

                wf = inverse_rht(wf, i8.signs, 128)
                row[f"err_{f}_vs_fp64"] = rel(x.double() @ wf.double().T + bias.double(), ref64)
                del qf, wf
            row["speedup_int8res_fp8_cast_per_call"] = row["bf16_ms"] / row["e2e_int8res_fp8_cast_per_call_ms"]
            for key in ("int8res_int8", "int8res_fp8", "compres_int8", "compres_fp8"):
                row[f"speedup_{key}"] = row["bf16_ms"] / row[f"e2e_{key}_ms"]
            row["compres_vs_int8res_int8"] = row["e2e_compres_int8_ms"] / row["e2e_int8res_int8_ms"] - 1
            row["compres_vs_int8res_fp8"] = row["e2e_compres_fp8_ms"] / row["e2e_int8res_fp8_ms"] - 1
            rows.append(row)
            print("# row", json.dumps(row), flush=True)
            del x, xq, xq8, ref64, refw
        del w, q, comp, i8, what
        torch.cuda.empty_cache()
    res["rows"], res["decode"] = rows, dec_rows
    # the per-layer loop leaves the last row's best int8 path set (the pointer GEMM at M = 256): the chains below
    # take the code's own choice, as a model would
    set_int8_path("auto")
    set_fp8_path("auto")
    res["chain"] = chain_case(dev)
    res["overlap"] = overlap_case(dev, shapes=shapes)
    # quantize + encode throughput: codec per layer vs stacked (kernels.quantize.quantize_many)
    qt = {}
    ws = [(torch.randn(4096, 4096, device=dev) * 0.02).to(torch.bfloat16) for _ in range(16)]
    from hyperquant_diffusers.codec import quantize

    quantize(ws[0], bits=4.0)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for wi in ws[:4]:
        quantize(wi, bits=4.0)
    torch.cuda.synchronize()
    qt["codec_per_layer_s"] = (time.perf_counter() - t0) / 4
    qt["codec_values_per_s"] = 4096 * 4096 / qt["codec_per_layer_s"]
    quantize_many(ws[:2], bits=4.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    qs = quantize_many(ws, bits=4.0)
    torch.cuda.synchronize()
    qt["stacked16_s"] = time.perf_counter() - t0
    qt["stacked_values_per_s"] = 16 * 4096 * 4096 / qt["stacked16_s"]
    qt["stacked_bps"] = [round(q_.bits_per_scalar, 4) for q_ in qs[:4]]
    qt["ltx2_18.9B_codec_est_s"] = 18.87e9 / qt["codec_values_per_s"]
    qt["ltx2_18.9B_stacked_est_s"] = 18.87e9 / qt["stacked_values_per_s"]
    # where a stacked quantize spends its time (268M values)
    from hyperquant_diffusers.codec import nearest_point, rht, random_signs as rs
    from hyperquant_diffusers.codec.stream import choose_ks, encode_coords

    big = torch.cat(ws).float()
    sg = rs(4096, 0).to(dev)

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, r

    qt["phase_rht_s"], y = timed(lambda: rht(big, sg, 128))
    step = (y.square().mean(1).sqrt() * 0.5).unsqueeze(1)
    qt["phase_nearest_s"], c = timed(lambda: nearest_point("E8", y / step))
    del y
    qt["phase_choose_ks_s"], _ = timed(lambda: choose_ks(c.reshape(-1), "E8", 4096))
    for ch in (1 << 21, 1 << 24):
        qt[f"phase_encode_chunk{ch}_s"], _ = timed(lambda: encode_coords(c.reshape(-1), "E8", 4096, chunk_values=ch))
    del c, big
    res["quantize"] = qt
    print("# quantize", json.dumps(qt), flush=True)
    return res


def ncu_target(what):
    """A few launches of one kernel for ``ncu --launch-skip 2``: the decode and GEMM at 4096x4096 / M = 12288, the
    activation pass at 12288x2048."""
    from hyperquant_diffusers.codec import quantize, random_signs
    from hyperquant_diffusers.kernels.act_quant import rht_quantize
    from hyperquant_diffusers.kernels.int8_gemm import int8_gemm_tma
    from hyperquant_diffusers.kernels.rice_decode import rice_decode

    dev = torch.device("cuda")
    if what == "decode":
        q = quantize(torch.randn(4096, 4096, device=dev) * 0.02, bits=4.0, lattice="E8")
        offs = q.offsets.to(torch.int32)
        buf = torch.empty(q.numel, dtype=torch.int8, device=dev)
        for _ in range(4):
            rice_decode(q.words, offs, q.ks, q.numel, "E8", q.block_values, out=buf, stats=False)
    elif what == "actq":   # the default path: tile-periodic signs, the flip folded into the Hadamard operand
        from hyperquant_diffusers.codec import tile_signs
        from hyperquant_diffusers.kernels.act_quant import signed_hadamard

        x = torch.randn(12288, 2048, device=dev).to(torch.bfloat16)
        s = random_signs(2048, 0, period=128).to(dev, torch.bfloat16)
        hs = signed_hadamard(tile_signs(s, 128), x.dtype, x.device)
        for _ in range(4):
            rht_quantize(x, s, 128, "int8", signs_cast=s, hadamard=hs)
    else:
        xq = torch.randint(-127, 128, (12288, 4096), dtype=torch.int8, device=dev)
        wq = torch.randint(-40, 41, (4096, 4096), dtype=torch.int8, device=dev)
        sx, sw = torch.rand(12288, device=dev), torch.rand(4096, device=dev)
        for _ in range(4):
            int8_gemm_tma(xq, sx, wq, sw, None)
    torch.cuda.synchronize()


def table(res):
    lines = [f"device {res['device']}, torch {res['torch']}, triton {res['triton']}, {res['date']}",
             "ceilings: " + ", ".join(f"{k}={v:.0f}" for k, v in res["ceilings"].items()), "",
             "| shape | M | bf16 ms | int8-res int8 | int8-res fp8 (e4m3 codes) | int8-res fp8 (cast per call) | "
             "compr int8 | compr fp8 | int8 path | compr/int8 int8 | err int8 | err fp8 | err nvfp4 | err mxfp4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        def c(key):
            return f"{r[f'e2e_{key}_ms']:.3f} ({r[f'speedup_{key}']:.2f}x)"
        lines.append(f"| {r['shape']} | {r['M']} | {r['bf16_ms']:.3f} | {c('int8res_int8')} | {c('int8res_fp8')} | "
                     f"{c('int8res_fp8_cast_per_call')} | "
                     f"{c('compres_int8')} | {c('compres_fp8')} | {r['int8_path']} | "
                     f"{100 * r['compres_vs_int8res_int8']:+.0f}% | {r['err_int8_triton_vs_fp64']:.2e} | "
                     f"{r['err_fp8_vs_fp64']:.2e} | {r['err_nvfp4_vs_fp64']:.2e} | {r['err_mxfp4_vs_fp64']:.2e} |")
    lines += ["", "| shape | M | actq int8 | actq fp8 | GEMM triton | GEMM tma | GEMM _int_mm+epi | GEMM fp8 | decode int8 | "
              "decode fp8 | cast fp8 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['M']} | {r['actq_int8_ms']:.3f} | {r['actq_fp8_ms']:.3f} | "
                     f"{r['gemm_triton_ms']:.3f} | {r['gemm_tma_ms']:.3f} | {r['gemm_int_mm_ms']:.3f} | {r['gemm_fp8_ms']:.3f} | "
                     f"{r['decode_int8_ms']:.3f} | {r['decode_fp8_ms']:.3f} | {r['cast_fp8_ms']:.3f} |")
    lines += ["", "| shape | bit-exact | decode ms | Gvalues/s | stream GB/s | stream bps | codec quantize s | "
              "lattice err | nvfp4 cast err | mxfp4 cast err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in res["decode"]:
        lines.append(f"| {d['shape']} | {d['bit_exact']} | {d['decode_ms']:.3f} | {d['gvalues_s']:.1f} | "
                     f"{d['stream_gbs']:.0f} | {d['stream_bps']:.3f} | {d['quantize_codec_s']:.3f} | "
                     f"{d['lattice_rel_err']:.4f} | {d['nvfp4_rel_err']:.4f} | {d['mxfp4_rel_err']:.4f} |")
    lines += ["", "| shape | M | GEMM fp8 _scaled_mm | GEMM fp8 tma | fp8 path |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['M']} | {r['gemm_fp8_ms']:.3f} | {r.get('gemm_fp8_tma_ms', float('nan')):.3f} | "
                     f"{r['fp8_path']} |")
    lines += ["", "steady state, ms per layer (4 distinct layers of a shape in turn, M = 12288; compressed: the best "
              "prefetch variant):", "| shape | bf16 | int8-res int8 | compr int8 | vs int8-res | int8-res fp8 | "
              "compr fp8 | vs int8-res fp8 | best variants |", "|---|---|---|---|---|---|---|---|---|"]
    for key, o in res.get("overlap", {}).items():
        if key == "kernel_resources":
            continue
        lines.append(f"| {key} | {o['bf16']:.3f} | {o['int8res_int8_best'][0]:.3f} ({o['speedup_int8res_int8']:.2f}x) | "
                     f"{o['compres_int8_best'][0]:.3f} | {100 * o['compres_vs_int8res_int8_best']:+.1f}% | "
                     f"{o['int8res_fp8_best'][0]:.3f} ({o['speedup_int8res_fp8']:.2f}x) | {o['compres_fp8_best'][0]:.3f} | "
                     f"{100 * o['compres_vs_int8res_fp8_best']:+.1f}% | {o['compres_int8_best'][1]}, "
                     f"{o['compres_fp8_best'][1]} |")
    lines += ["", "chain (4 shapes in sequence, M = 12288) and q/k/v sharing: " + json.dumps(res["chain"])]
    lines += ["", "quantize: " + json.dumps(res["quantize"])]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="4096x4096 and 2048x2048 only")
    ap.add_argument("--sweeps-only", action="store_true", help="only the launch-shape sweeps (printed as JSON)")
    ap.add_argument("--no-sweeps", action="store_true", help="skip the sweeps; use the launch shapes in the code")
    ap.add_argument("--decode-sweep", action="store_true", help="only the Rice decode launch-shape sweep")
    ap.add_argument("--decoder-ab", action="store_true",
                    help="the two E8 decoders compared (exactness, time), a sweep of the vector one, then the "
                         "steady-state chains with the faster (JSON to --json)")
    ap.add_argument("--overlap-only", action="store_true", help="only the steady-state chains (JSON to --json)")
    ap.add_argument("--interleaved", action="store_true",
                    help="only the per-layer variants measured in interleaved rounds at M = 12288 (JSON to --json)")
    ap.add_argument("--actq-sweep", action="store_true", help="only the act-quant launch-shape sweep (JSON to --json)")
    ap.add_argument("--actq-block", action="store_true",
                    help="only the one-pass act-quant block size x launch sweep, K = 2048 and 4096 (JSON)")
    ap.add_argument("--actq-fold", action="store_true",
                    help="only: act-quant with the sign flip folded into the Hadamard operand vs in the kernel, a few "
                         "launches of the folded kernel, and the decoder's int8 vs e4m3 output (JSON)")
    ap.add_argument("--graphed", action="store_true",
                    help="only: per-layer GPU time from CUDA-graph replays (2048² and 4096²), and the decoder's int8 "
                         "vs e4m3 output (JSON)")
    ap.add_argument("--eager-probe", action="store_true",
                    help="only: a compressed fp8 layer's eager time taken apart (profiler), prefetch on and off (JSON)")
    ap.add_argument("--final", action="store_true",
                    help="only: the per-layer tables at one commit: steady-state chains on all four shapes (each "
                         "place of the prefetch), CUDA-graphed at M = 12288 and 256 (JSON)")
    ap.add_argument("--interleaved-m256", action="store_true",
                    help="only: the eager per-layer variants at M = 256 (host included; JSON)")
    ap.add_argument("--graphed-one", default=None, metavar="NxKxM",
                    help="only: the CUDA-graphed per-layer variants of one shape and token count (JSON)")
    ap.add_argument("--actq-tma", action="store_true",
                    help="only: the one-pass act-quant kernel vs its TMA variant at a few launches (JSON)")
    ap.add_argument("--layer-parts", action="store_true",
                    help="only the kernel time of each part of the quantized layers (profiler; JSON to --json)")
    ap.add_argument("--gemm-occupancy", action="store_true",
                    help="only the persistent GEMMs at one and two programs per SM (JSON to --json)")
    ap.add_argument("--sm-scaling", action="store_true",
                    help="only the activation pass and the GEMMs on fewer SMs (kernel time; JSON to --json)")
    ap.add_argument("--actq-crossover", action="store_true",
                    help="only: eager int8-resident layers at 1024-12288 tokens with the one-pass vs the TMA "
                         "activation kernel, and the host time of each (JSON)")
    ap.add_argument("--actq-impl", default=None, choices=("auto", "onepass", "tma"),
                    help="the activation kernel the layers' 'auto' choice uses wherever it applies (sets "
                         "large_min_values to 0; default: the code's choice and threshold)")
    ap.add_argument("--host-gemm", action="store_true",
                    help="only: host time of the TMA vs persistent GEMM launch, and a cProfile of a layer call (JSON)")
    ap.add_argument("--gemm-sweep", action="store_true",
                    help="only the GEMMs: TMA vs persistent launches, then per layer eager and CUDA-graphed (JSON)")
    ap.add_argument("--overlap", action="store_true",
                    help="only: the e4m3 cast sweep, the act-quant launch shapes of long rows, and the steady-state "
                         "per-layer chains (compressed decode overlap variants); JSON to --json")
    ap.add_argument("--decoder-files", nargs="+", default=None, metavar="FILE",
                    help="only: versions of kernels/rice_decode_vectors.py (e.g. from git show REV:path) compared "
                         "for exactness and time on the LTX-2 shapes, in one process (JSON)")
    ap.add_argument("--ncu-target", choices=("decode", "actq", "gemm"), default=None,
                    help="only launch this kernel a few times on the 4096x4096 / M=12288 case (run under ncu)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    if args.ncu_target:
        ncu_target(args.ncu_target)
        return
    if args.actq_impl and args.actq_impl != "auto":
        from hyperquant_diffusers.kernels import act_quant

        act_quant._TUNE.update(large_m_impl=args.actq_impl, large_min_values=0)
    if args.graphed_one:
        n, k, m = map(int, args.graphed_one.split("x"))
        with torch.no_grad():
            res = {"graphed": graphed_case(torch.device("cuda"), m=m, shapes=((n, k),))}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    if args.decode_sweep:
        with torch.no_grad():
            sweeps(torch.device("cuda"), parts=("decode",))
        return
    # the partial runs: each writes {device, date, <its parts>} to --json
    only = {"overlap_only": {"overlap": overlap_case}, "interleaved": {"interleaved": interleaved_case},
            "decoder_ab": {"decoder": decoder_ab_case, "overlap": overlap_default_tiles},
            "actq_sweep": {"actq": actq_long_case}, "gemm_sweep": {"gemm": gemm_sweep_case},
            "actq_block": {"actq_block": actq_block_case}, "graphed": {"graphed": graphed_case, "decode_fmt": decode_fmt_case},
            "actq_fold": {"actq_fold": actq_fold_case, "actq_launch": actq_launch_case,
                                                  "decode_fmt": decode_fmt_case},
            "host_gemm": {"host_gemm": host_gemm_case}, "actq_tma": {"actq_tma": actq_tma_case},
            "actq_crossover": {"actq_crossover": actq_crossover_case},
            "sm_scaling": {"sm_scaling": sm_scaling_case},
            "gemm_occupancy": {"gemm_occupancy": gemm_occupancy_case},
            "layer_parts": {"layer_parts": layer_parts_case},
            "decoder_files": {"decoder_files": lambda dev: decoder_files_case(dev, args.decoder_files)},
            "eager_probe": {"eager_probe": eager_probe_case},
            "final": {"overlap": final_overlap_case, "graphed": final_graphed_case},
            "interleaved_m256": {"interleaved_m256": final_interleaved_case},
            "overlap": {"cast": cast_case, "actq": actq_long_case, "overlap": overlap_case}}
    for flag, parts in only.items():
        if getattr(args, flag):
            dev = torch.device("cuda")
            res = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            with torch.no_grad():
                for key, fn in parts.items():
                    res[key] = fn(dev)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=1)
            return
    if args.sweeps_only:
        with torch.no_grad():
            sweeps(torch.device("cuda"), parts=("actq", "gemm"))
        return
    with torch.no_grad():
        res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(table(res))


if __name__ == "__main__":
    main()
