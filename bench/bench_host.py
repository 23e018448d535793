"""Host cost of a quantized linear call (issues 4 and 7): how long the CPU takes to issue one ``LatticeLinear``
forward, per residency and MMA type, with Triton's ordinary launch and with the cached launch
(``kernels/_launch.py``), next to bf16 ``F.linear``.

At M = 256 tokens the kernels take a few µs each, so the GPU waits on the host and the wall time per call is the
host time; at M = 12288 (few enough calls that the launch queue never fills) the host time is the issue time.
Two 4096x4096 layers are called alternately (``l2(l1(x))``: a compressed layer's prefetch always has a successor,
and no activation is shared). Also the launch alone (one ``rht_quantize`` call, ordinary vs cached) and, at small
M, the host cost of the parts of a call. Prints µs per layer call and, with ``--profile``, the top of a cProfile
of each residency x MMA call at the first M.

    python bench/bench_host.py [--json OUT.json] [--profile] [--m 256 12288]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def per_call_us(fn, calls_per_iter: int, iters: int = 400, warmup: int = 5) -> dict:
    """Host µs (until the Python loop returns) and wall µs (after the GPU finishes) per call: median of 5 runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) / (iters * calls_per_iter) * 1e6)
        wall.append((t2 - t0) / (iters * calls_per_iter) * 1e6)
    host.sort()
    wall.sort()
    return {"host_us": round(host[2], 1), "wall_us": round(wall[2], 1)}


def parts(x, lin) -> dict:
    """Host µs of the pieces of one int8-resident / compressed call at x's token count (cached launches)."""
    from hyperquant_diffusers.kernels import dispatch
    from hyperquant_diffusers.kernels.act_quant import rht_quantize
    from hyperquant_diffusers.kernels.int8_gemm import int8_linear
    from hyperquant_diffusers.nn import LatticeLinear

    m, k = x.shape
    s = torch.ones(k, device=x.device, dtype=x.dtype)
    res = {"torch.empty": per_call_us(lambda: torch.empty(m, k, device=x.device, dtype=torch.int8), 1),
           "torch.cuda.current_stream": per_call_us(lambda: torch.cuda.current_stream(), 1),
           "rht_quantize": per_call_us(lambda: rht_quantize(x, s, 128, "int8", signs_cast=s), 1)}
    ll = LatticeLinear.from_linear(lin, bits=4.0, residency="int8")
    xq, sx = rht_quantize(x, s, 128, "int8", signs_cast=s)
    res["int8_linear"] = per_call_us(lambda: int8_linear(xq, sx, ll.codes, ll.code_scale, ll.bias), 1)
    lc = LatticeLinear.from_linear(lin, bits=4.0, residency="compressed")
    dispatch.set_prefetch(False)
    dispatch.weight_codes(lc, "int8")
    res["weight_codes_just_in_time"] = per_call_us(lambda: dispatch.weight_codes(lc, "int8"), 1, iters=100)
    dispatch.set_prefetch(True)
    dispatch.release_decode_buffers()
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--m", type=int, nargs="+", default=[256, 12288])
    args = ap.parse_args(argv)
    from hyperquant_diffusers.kernels import _launch, dispatch
    from hyperquant_diffusers.kernels.act_quant import rht_quantize
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(0)
    dev = "cuda"
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    lin1 = torch.nn.Linear(4096, 4096, device=dev, dtype=torch.bfloat16)
    lin2 = torch.nn.Linear(4096, 4096, device=dev, dtype=torch.bfloat16)
    for m in args.m:
        x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
        # large M: few enough calls that the launch queue never fills, so the host time is the issue time
        iters = 400 if m <= 1024 else 40
        res = out[f"m{m}"] = {}
        res["bf16"] = per_call_us(lambda: F.linear(F.linear(x, lin1.weight, lin1.bias), lin2.weight, lin2.bias), 2,
                                  iters=iters)
        print(f"M={m} bf16 F.linear", res["bf16"], flush=True)
        s = torch.ones(4096, device=dev, dtype=torch.bfloat16)
        for fast in (False, True):
            _launch.set_fast_launch(fast)
            key = "cached" if fast else "ordinary"
            res[f"rht_quantize_{key}"] = per_call_us(lambda: rht_quantize(x, s, 128, "int8", signs_cast=s), 1,
                                                     iters=iters)
            print(f"M={m} rht_quantize alone, {key} launch", res[f"rht_quantize_{key}"], flush=True)
            for residency in ("int8", "compressed"):
                for mma in ("int8", "fp8"):
                    l1 = LatticeLinear.from_linear(lin1, bits=4.0, residency=residency, mma=mma)
                    l2 = LatticeLinear.from_linear(lin2, bits=4.0, residency=residency, mma=mma)
                    r = per_call_us(lambda: l2(l1(x)), 2, iters=iters)
                    res[f"{residency}_{mma}_{key}"] = r
                    print(f"M={m} {residency} resident, {mma} MMA, {key} launch:", r, flush=True)
                    if args.profile and fast and m == args.m[0]:
                        pr = cProfile.Profile()
                        pr.enable()
                        for _ in range(200):
                            l2(l1(x))
                        pr.disable()
                        torch.cuda.synchronize()
                        buf = io.StringIO()
                        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
                        print(f"# cProfile, M={m} {residency} resident, {mma} MMA, 200 x 2 calls", flush=True)
                        print(buf.getvalue()[:7000], flush=True)
                    del l1, l2
                    dispatch.release_decode_buffers()
        _launch.set_fast_launch(True)
        if m <= 1024:
            res["parts"] = parts(x, lin1)
            print(f"M={m} parts (cached launch)", res["parts"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
