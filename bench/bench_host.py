"""Host cost of a quantized linear call (issues 4 and 7): how long the CPU takes to issue one ``LatticeLinear``
forward, per residency and MMA type, with Triton's ordinary launch and with the cached launch
(``kernels/_launch.py``), next to bf16 ``F.linear``.

At M = 256 tokens the kernels take a few µs each, so the GPU waits on the host and the wall time per call is the
host time. Two 4096x4096 layers are called alternately (``l2(l1(x))``: a compressed layer's prefetch always has a
successor, and no activation is shared). Also the launch alone: one ``rht_quantize`` call, ordinary vs cached.
Prints µs per layer call and, with ``--profile``, the top of a cProfile of the compressed int8 call.

    python bench/bench_host.py [--json OUT.json] [--profile]
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


def per_call_us(fn, calls_per_iter: int, iters: int = 400, warmup: int = 20) -> dict:
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--m", type=int, default=256)
    args = ap.parse_args(argv)
    from hyperquant_diffusers.kernels import _launch, dispatch
    from hyperquant_diffusers.kernels.act_quant import rht_quantize
    from hyperquant_diffusers.nn import LatticeLinear

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(args.m, 4096, device=dev, dtype=torch.bfloat16)
    out = {"device": torch.cuda.get_device_name(), "m": args.m, "torch": torch.__version__}
    lin1 = torch.nn.Linear(4096, 4096, device=dev, dtype=torch.bfloat16)
    lin2 = torch.nn.Linear(4096, 4096, device=dev, dtype=torch.bfloat16)
    out["bf16"] = per_call_us(lambda: F.linear(F.linear(x, lin1.weight, lin1.bias), lin2.weight, lin2.bias), 2)
    print("bf16 F.linear", out["bf16"], flush=True)
    s = torch.ones(4096, device=dev, dtype=torch.bfloat16)
    for fast in (False, True):
        _launch.set_fast_launch(fast)
        key = "cached" if fast else "ordinary"
        out[f"rht_quantize_{key}"] = per_call_us(lambda: rht_quantize(x, s, 128, "int8", signs_cast=s), 1)
        print(f"rht_quantize launch, {key}", out[f"rht_quantize_{key}"], flush=True)
        for residency in ("int8", "compressed"):
            for mma in ("int8", "fp8"):
                l1 = LatticeLinear.from_linear(lin1, bits=4.0, residency=residency, mma=mma)
                l2 = LatticeLinear.from_linear(lin2, bits=4.0, residency=residency, mma=mma)
                r = per_call_us(lambda: l2(l1(x)), 2)
                out[f"{residency}_{mma}_{key}"] = r
                print(f"{residency} resident, {mma} MMA, {key} launch:", r, flush=True)
                if args.profile and fast and residency == "compressed" and mma == "int8":
                    pr = cProfile.Profile()
                    pr.enable()
                    for _ in range(200):
                        l2(l1(x))
                    pr.disable()
                    torch.cuda.synchronize()
                    buf = io.StringIO()
                    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
                    print(buf.getvalue()[:7000], flush=True)
                del l1, l2
                dispatch.release_decode_buffers()
    _launch.set_fast_launch(True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
