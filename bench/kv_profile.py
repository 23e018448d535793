"""CUDA only: where a full-size LTX-2 call's time goes with K/V compression (``torch.profiler``, a few blocks).

    python bench/kv_profile.py [--layers 4] [--out kv_profile.txt]

For each variant (cache-exact, the 4 bps Rice and int8 text-K/V caches, no cache; the fused K/V kernel as
``set_fused_kernel`` says, default "cuda"): two untimed calls, one call timed with CUDA events, one profiled;
writes the profiler's tables sorted by GPU and by CPU time. Numbers: bench/RESULTS.md, "## Kernels".
"""

from __future__ import annotations

import argparse
import types

import torch

VARIANTS = (("cache-exact", dict(kv_bits=None, cache_text_kv=True)),
            ("cache-4bps", dict(kv_bits=4.0, cache_text_kv=True)),
            ("cache-4bps-int8", dict(kv_bits=4.0, cache_text_kv=True, cache_format="int8")),
            ("nocache-4bps", dict(kv_bits=4.0, cache_text_kv=False)))


def main(argv=None) -> None:
    from hyperquant_diffusers.bench.bench_kv import build_model, make_inputs
    from torch.profiler import ProfilerActivity, profile

    from hyperquant_diffusers.kv import disable_kv_compression, enable_kv_compression

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="kv_profile.txt")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs CUDA")
    geo = types.SimpleNamespace(full_size=True, frames=121, height=512, width=768, text_len=1024)
    m = build_model(True, "cuda", torch.bfloat16, args.layers)
    inputs, _ = make_inputs(m, geo, "cuda", torch.bfloat16)
    with open(args.out, "w") as out, torch.no_grad():
        for name, kv in VARIANTS:
            enable_kv_compression(m, **kv)
            try:
                for t in (900.0, 800.0):
                    inputs["timestep"].fill_(t)
                    m(**inputs)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                inputs["timestep"].fill_(700.0)
                a.record()
                m(**inputs)
                b.record()
                b.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    inputs["timestep"].fill_(600.0)
                    m(**inputs)
                    torch.cuda.synchronize()
            finally:
                disable_kv_compression(m)
            avg = prof.key_averages()
            out.write(f"\n===== {name}: {args.layers} blocks, {a.elapsed_time(b):.1f} ms per call =====\n"
                      f"{avg.table(sort_by='cuda_time_total', row_limit=22, max_name_column_width=60)}\n"
                      f"--- by CPU time ---\n{avg.table(sort_by='cpu_time_total', row_limit=15)}\n")
            print(name, f"{a.elapsed_time(b):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
