"""Quantize-on-load of a full-size-config LTX-2 transformer through the real ``from_pretrained`` (issue 3), on CUDA.

A ``LTX2VideoTransformer3DModel`` of the default config with ``--layers`` blocks (48 = the full 18.9B model) gets
seeded random bf16 weights (as in ``bench_ltx2_full.py``) and is saved with ``save_pretrained`` to ``--dir``. Then it
is loaded with ``quantization_config=HyperQuantConfig(bits=4, quantize_batch_values=B)`` and ``device_map="cuda"``,
once per ``B`` in ``--batch-values`` (0 = one layer at a time). Each row reports: load seconds (includes reading the
bf16 file; the page cache is dropped first when the OS allows), the number of quantized layers, the realized bits
per weight of the Rice streams, and the peak GPU memory allocated during the load vs the bf16 weights' bytes (it
includes diffusers' allocator warm-up, a transient tensor of a quarter of the bf16 bytes, freed before loading).

    python bench/bench_onload.py [--layers 8] [--batch-values 268435456 0] [--dir /tmp/hq_onload] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from hyperquant_diffusers.codec.constants import DEFAULT_GROUP_VALUES  # noqa: E402

from bench.bench_ltx2_full import GiB, build_meta, drop_caches, init_random  # noqa: E402


def save_random(layers: int, path: str) -> int:
    """Save a seeded random bf16 transformer; returns its parameter bytes."""
    model = build_meta(layers)
    model = model.to_empty(device="cuda")
    with torch.no_grad():
        init_random(model)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return nbytes


def load_quantized(path: str, batch_values: int) -> dict:
    import hyperquant_diffusers  # noqa: F401
    from diffusers import LTX2VideoTransformer3DModel
    from hyperquant_diffusers import HyperQuantConfig, LatticeLinear

    dropped = drop_caches()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    cfg = HyperQuantConfig(bits=4.0, lattice="E8", residency="compressed", quantize_batch_values=batch_values)
    model = LTX2VideoTransformer3DModel.from_pretrained(path, quantization_config=cfg, torch_dtype=torch.bfloat16,
                                                        device_map="cuda")
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    lat = [m for m in model.modules() if isinstance(m, LatticeLinear)]
    assert lat and all(m.hq_words.is_cuda for m in lat)
    stored = sum(m.stored_nbytes() for m in lat)
    numel = sum(m.in_features * m.out_features for m in lat)
    out = {"batch_values": batch_values, "load_s": round(dt, 1), "layers": len(lat),
           "bits_per_weight": round(8 * stored / numel, 3),
           "peak_alloc_gib": round((torch.cuda.max_memory_allocated() - base) / GiB, 2), "page_cache_dropped": dropped}
    del model, lat
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch-values", type=int, nargs="+", default=[DEFAULT_GROUP_VALUES, 0])
    ap.add_argument("--dir", default="/tmp/hq_onload")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_onload needs CUDA")
    path = os.path.join(a.dir, f"ltx2_{a.layers}l_bf16")
    bf16 = save_random(a.layers, path)
    res = {"device": torch.cuda.get_device_name(), "layers": a.layers, "bf16_gib": round(bf16 / GiB, 2), "runs": []}
    print(f"{res['device']}: LTX-2 transformer, {a.layers} blocks, bf16 weights {res['bf16_gib']} GiB", flush=True)
    for bv in a.batch_values:
        r = load_quantized(path, bv)
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, a.json)
    return res


if __name__ == "__main__":
    main()
