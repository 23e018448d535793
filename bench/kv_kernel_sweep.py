"""CUDA only: time launch shapes of the fused K/V kernel (``kernels/kv_quant.py``, "bf16" Hadamard products) on
LTX-2's K/V shapes, against the torch path and a plain copy. CUDA events, median of 30 calls, ms.

    python bench/kv_kernel_sweep.py [--json out.json]

The shapes (batch 2, 32 heads): the video self-attention K (6144 tokens x 128), the same with D4, the audio K
(126 x 64) and the text K (1024 x 128). Numbers: bench/RESULTS.md, "## Kernels".
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

SHAPES = (((2, 6144, 32, 128), "E8"), ((2, 6144, 32, 128), "D4"), ((2, 126, 32, 64), "E8"),
          ((2, 1024, 32, 128), "E8"))
#: (values per program, warps, programs per SM)
LAUNCH_SHAPES = ((2048, 8, 4), (1024, 4, 4), (1024, 8, 4), (2048, 4, 4), (4096, 8, 4), (2048, 8, 2), (2048, 8, 8),
                 (512, 4, 8))


def cuda_ms(fn, n: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main(argv=None) -> list[dict]:
    from hyperquant_diffusers.kernels import kv_quant

    from hyperquant_diffusers.kv import KVQuantConfig, KVQuantizer
    from hyperquant_diffusers.kv.quantizer import STEP_CODES_PER_OCTAVE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs CUDA")
    tune = kv_quant._TUNE
    saved = (dict(tune["bf16"]), tune["pps"])
    rows = []
    try:
        for shape, lat in SHAPES:
            x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            q = KVQuantizer(KVQuantConfig(bits=4.0, lattice=lat, method="dither"), shape[-1], seed=1)
            row = dict(shape=list(shape), lattice=lat)
            for bv, warps, pps in LAUNCH_SHAPES:
                tune["bf16"].update(block_values=bv, warps=warps)
                tune["pps"] = pps
                row[f"{bv},{warps},{pps}"] = cuda_ms(lambda x=x, q=q, lat=lat: kv_quant.kv_fake_quantize(
                    x, q.signs, q.tile, q.alpha, lat, dither=True, seed=3, hadamard="bf16",
                    codes_per_octave=STEP_CODES_PER_OCTAVE))
            tune["bf16"].update(saved[0])
            tune["pps"] = saved[1]
            row["torch"] = cuda_ms(lambda x=x, q=q: q.fake_quantize(x, 3, fused=False), n=5)
            row["copy"] = cuda_ms(x.clone)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        tune["bf16"].update(saved[0])
        tune["pps"] = saved[1]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
