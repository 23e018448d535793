"""LoRA on quantized layers (CUDA): what an adapter costs beside a ``LatticeLinear``, and what merging costs.

For the LTX-2 linear shapes (out x in) at M tokens (default 12288 = batch 2 x 6144 video tokens), rank-r bf16
adapters (peft ``LoraConfig``, ``lora_alpha = r``), 4 bps E8, int8-resident, each ``--mma``:

* bf16 ``nn.Linear`` alone and with peft's LoRA (what a bf16 user pays);
* ``LatticeLinear`` alone; with the adapter through peft's own ``lora.Linear.forward`` (B(A(x)), scaled, added:
  three passes over the output); through :class:`~hyperquant_diffusers.nn.lora.LatticeLoraLinear` (one ``addmm``
  into the quantized layer's output); merged (``merge()`` re-quantized the layer: the quantized layer's speed);
* the time of one ``merge()`` (dequantize + delta + re-quantize on the GPU) and ``unmerge()`` (restore);
* errors vs float64: the adapted layer vs ``x W_hat^T + b + x A^T B^T``, the merged layer vs the same with the
  merged weight's own quantization error, both relative Frobenius.

Median ms from ``triton.testing.do_bench`` (L2 flushed before each call), each variant's activation quantized at
every call (activation sharing off).

    python -m hyperquant_diffusers.bench.bench_lora [--m 12288] [--rank 32] [--mma int8 fp8] [--json OUT]
    python -m hyperquant_diffusers.bench.bench_lora --sweep     # the add kernel's launch configs alone
    python -m hyperquant_diffusers.bench.bench_lora --full-size [--layers 48] [--residency int8 compressed]
        [--per-layer-fuse]

``--fuse-retention`` (CPU or GPU): how much of a LoRA's weight change ``dW`` survives ``merge()`` (re-quantizing
``W_hat + dW``) as ``|dW| / |W|`` grows: the kept fraction ``<W_fused - W_hat, dW> / |dW|^2``, the share of codes
left unchanged, and relative Frobenius errors: the unfused layer's (``W_hat + dW`` vs ``W + dW``), the
re-quantization's (the fused weight vs ``W_hat + dW``) and the fused layer's (vs ``W + dW``).

``--full-size``: the default-config LTX-2 transformer (18.9B parameters, random weights; inputs, quantization and
timing as ``bench_ltx2_full``), a rank-r LoRA on every quantized linear (``add_adapter``, seeded random A and B,
``|B A|`` about 20% of ``|W|``): the step time of bf16, bf16 + LoRA, quantized, quantized + unfused LoRA,
``fuse_lora`` seconds, the fused step, ``unfuse_lora`` seconds; each output's relative L2 vs bf16 (+ LoRA), host
memory the kept original codes take, and whether unfusing gives the unfused output back bit for bit.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

SHAPES = [(4096, 4096), (16384, 4096), (4096, 16384), (2048, 2048)]


def bench(fn, warmup=10, rep=50):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _adapted(base: nn.Module, rank: int, seed: int):
    import peft

    m = nn.Sequential()
    m.add_module("proj", base)
    m = peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"]), m)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in (m.proj.lora_A["default"].weight, m.proj.lora_B["default"].weight):
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[1]) ** 0.5)
    return m.proj


def run_shape(n: int, k: int, m_tokens: int, rank: int, mma: str) -> dict:
    from hyperquant_diffusers.kernels.dispatch import no_activation_sharing
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from hyperquant_diffusers import LatticeLinear

    dev = "cuda"
    torch.manual_seed(0)
    lin = nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
    x = torch.randn(m_tokens, k, device=dev, dtype=torch.bfloat16)
    row = {"shape": f"{n}x{k}", "m": m_tokens, "rank": rank, "mma": mma}
    with torch.no_grad(), no_activation_sharing():
        row["bf16_ms"] = bench(lambda: lin(x))
        dense_lora = _adapted(lin, rank, seed=1)
        row["bf16_lora_ms"] = bench(lambda: dense_lora(x))
        base = dense_lora.get_base_layer()
        q = LatticeLinear.from_linear(base, bits=4.0, mma=mma)
        row["quantized_ms"] = bench(lambda: q(x))
        wrapped = _adapted(q, rank, seed=1)
        assert type(wrapped).__name__ == "LatticeLoraLinear"
        row["peft_unfused_ms"] = bench(lambda: PeftLoraLinear.forward(wrapped, x))
        row["fused_add_ms"] = bench(lambda: wrapped(x))
        a = wrapped.lora_A["default"].weight.double()
        b = wrapped.lora_B["default"].weight.double()
        xs = x[:1024]
        xd = xs.double()
        w_hat = q.dequantize(torch.float64)
        ref = xd @ (w_hat + b @ a).T + q.bias.double()
        row["fused_rel_err"] = rel(wrapped(xs), ref)
        row["peft_rel_err"] = rel(PeftLoraLinear.forward(wrapped, xs), ref)
        wrapped.merge()      # the first merge of a shape compiles the quantizer's kernels: not timed
        wrapped.unmerge()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        wrapped.merge()
        torch.cuda.synchronize()
        row["merge_s"] = time.perf_counter() - t0
        row["merged_ms"] = bench(lambda: wrapped(x))
        row["merged_rel_err"] = rel(wrapped(xs), ref)
        w_m = q.dequantize(torch.float64)
        row["merged_weight_rel_err"] = rel(w_m, w_hat + b @ a)
        row["original_weight_rel_err"] = rel(w_hat, lin.weight.double())
        t0 = time.perf_counter()
        wrapped.unmerge()
        torch.cuda.synchronize()
        row["unmerge_s"] = time.perf_counter() - t0
        row["unmerge_bit_exact"] = bool(torch.equal(q.dequantize(torch.float64), w_hat))
    return row


SWEEP = [(128, 128, 8, False), (128, 128, 8, True), (64, 256, 8, True), (128, 256, 8, True), (32, 512, 4, True),
         (64, 128, 4, True), (256, 128, 8, True)]


def sweep(m_tokens: int, rank: int) -> list[dict]:
    """kernels/lora_add.py alone on (M, N) bf16 outputs, each launch config: ms, GB/s of the output's read + write,
    and its error vs float64 (every config checked on the device)."""
    from hyperquant_diffusers.kernels.lora_add import lora_add_, lora_add_reference

    rows = []
    for n in (2048, 4096, 16384):
        g = torch.Generator(device="cuda").manual_seed(n)
        out = torch.randn(m_tokens, n, device="cuda", generator=g).to(torch.bfloat16)
        xa = torch.randn(m_tokens, rank, device="cuda", generator=g).to(torch.bfloat16)
        b = torch.randn(n, rank, device="cuda", generator=g).to(torch.bfloat16)
        small = (out[:512].clone(), xa[:512])
        ref = lora_add_reference(small[0], small[1], b, 0.5)
        t_addmm = bench(lambda o=out, x=xa, w=b: o.addmm_(x, w.t(), alpha=0.5))
        for cfg in SWEEP:
            err = float((lora_add_(small[0].clone(), small[1], b, 0.5, config=cfg).double() - ref).abs().max()
                        / ref.abs().max())
            t = bench(lambda o=out, x=xa, w=b, c=cfg: lora_add_(o, x, w, 0.5, config=c))
            rows.append({"n": n, "config": list(cfg), "ms": t, "gbs": 2 * out.numel() * 2 / t / 1e6, "err": err,
                         "addmm_ms": t_addmm})
            print(f"N={n} {cfg}: {t:.4f} ms, {rows[-1]['gbs']:.0f} GB/s, err {err:.1e} (addmm_ {t_addmm:.4f} ms)",
                  flush=True)
    return rows


RETENTION_RELS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.5, 1.0)


@torch.no_grad()
def fuse_retention(device: str, rank: int = 16, shape: tuple[int, int] = (1024, 1024), bits: float = 4.0,
                   rels=RETENTION_RELS) -> list[dict]:
    """See the module docstring (``--fuse-retention``): one seeded float weight (normal, 4 bps E8 by default), a
    rank-``rank`` random delta scaled to each ``|dW| / |W|``, merged through peft on a fresh LatticeLinear."""
    import warnings

    from hyperquant_diffusers import LatticeLinear
    from hyperquant_diffusers.nn.lora import fused_lora_retained

    n, k = shape
    torch.manual_seed(0)
    lin = nn.Linear(k, n, device=device)
    w = lin.weight.double()
    rows = []
    for rel_size in rels:
        q = LatticeLinear.from_linear(lin, bits=bits)
        m = _adapted(q, rank, seed=1)
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        d = b.double() @ a.double()
        if rel_size == 0:
            b.zero_()
        else:
            b.mul_(rel_size * w.norm() / d.norm())
        dw = b.double() @ a.double()
        w_hat = q.dequantize(torch.float64)
        c0 = q.int8_weight()[0].clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the warning is what this measures
            m.merge()
        w_f = q.dequantize(torch.float64)
        tgt = w + dw
        row = {"rel_delta": rel_size, "kept": fused_lora_retained(nn.ModuleDict({"proj": m}))["proj"],
               "codes_unchanged": float((q.int8_weight()[0] == c0).double().mean()),
               "unfused": rel(w_hat + dw, tgt), "e2": rel(w_f, w_hat + dw), "fused": rel(w_f, tgt)}
        row["fused_over_unfused"] = row["fused"] / row["unfused"]
        rows.append(row)
        print(f"| {rel_size:.2f} | {row['kept']:.3f} | {row['codes_unchanged']:.3f} | {row['unfused']:.4f} | "
              f"{row['e2']:.4f} | {row['fused']:.4f} | {row['fused_over_unfused']:.2f} |", flush=True)
    return rows


def merge_parts(rank: int, residencies: list[str], reps: int = 3) -> list[dict]:
    """Where one ``merge()`` spends its time, per LTX-2 shape and residency (4 bps E8): median seconds of each
    stage run alone (dequantize, the adapter's delta, the host copy of the original codes, ``codec.quantize``
    with and without a step-search hint, loading the new codes), the whole merge, and ``quantize_many`` on 8
    stacked weights per weight. A compressed layer's dequantize is timed with the GPU Rice decoder (what merging
    uses) and with the codec's torch decoder."""
    import statistics

    from hyperquant_diffusers.kernels.quantize import quantize_many

    from hyperquant_diffusers import LatticeLinear
    from hyperquant_diffusers.codec import quantize

    def t(fn):
        out = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    def one(n: int, k: int, residency: str) -> dict:
        torch.manual_seed(0)
        lin = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        q = LatticeLinear.from_linear(lin, bits=4.0, mma="int8", residency=residency)
        wrapped = _adapted(q, rank, seed=1)
        wrapped.merge()         # compiles every kernel the stages use
        wrapped.unmerge()
        w = q.dequantize(torch.float32) + wrapped.get_delta_weight("default").float()
        kw = {"bits": q.bits, "lattice": q.lattice, "tile_size": q.tile_size, "seed": q.seed,
              "rht_signs": q.rht_sign_mode(), "block_values": q.block_values}
        qt = quantize(w, **kw)
        row = {"shape": f"{n}x{k}", "residency": residency,
               "dequantize_s": t(lambda: q.dequantize(torch.float32)),
               "delta_s": t(lambda: wrapped.get_delta_weight("default")),
               "state_to_host_s": t(lambda: q.weight_state(device="cpu")),
               "quantize_s": t(lambda: quantize(w, **kw)),
               "quantize_hinted_s": t(lambda: quantize(w, alpha_hint=qt.search_alpha, **kw)),
               "load_s": t(lambda: q.load_lattice_tensor(qt))}
        if residency == "compressed":
            row["dequantize_torch_decoder_s"] = t(lambda: q.dequantize(torch.float32, decoder="torch"))
        ws = [w + 1e-3 * i for i in range(8)]
        row["quantize_many_8_per_layer_s"] = t(lambda: quantize_many(ws, **kw)) / 8

        def merge_unmerge():
            wrapped.merge()
            wrapped.unmerge()
        row["merge_unmerge_s"] = t(merge_unmerge)
        return row

    rows = []
    for residency in residencies:
        for n, k in SHAPES:
            rows.append(one(n, k, residency))
            print("# merge parts " + json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def _seed_lora(model, seed: int = 7) -> None:
    """Seeded random A and B for every LoRA layer, ``|B A| ~ 0.2 |W|`` for weights of std 0.02 (a strong but
    ordinary adapter): entries of std ``(0.004**2 / r) ** 0.25`` each."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            r = min(p.shape)
            p.copy_(torch.randn(p.shape, device=p.device, generator=g) * (0.004 ** 2 / r) ** 0.25)


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def full_size(layers: int, rank: int, residencies: list[str], steps: int, emit, batched: bool = True) -> dict:
    """See the module docstring (``--full-size``). ``emit(tag, dict)`` prints each part as it is measured.
    ``batched``: ``fuse_lora`` re-quantizes same-shape layers together, as on a model the backend loaded
    (``nn.lora.batch_fuse_lora``); False: one codec call per layer."""
    import gc

    from hyperquant_diffusers.bench.bench_ltx2_full import (
        GiB,
        build_meta,
        init_random,
        make_inputs,
        quantize_model,
        rel_l2,
        set_mode,
        step_stats,
        sync,
    )
    from peft import LoraConfig

    from hyperquant_diffusers.nn import LatticeLinear
    from hyperquant_diffusers.nn.lora import batch_fuse_lora, fused_lora_retained

    res: dict = {"layers": layers, "rank": rank, "device": torch.cuda.get_device_name()}
    inputs = make_inputs()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    model = build_meta(layers).to_empty(device="cuda")
    init_random(model)
    s, _, ref = step_stats(model, inputs, steps)
    res["bf16_s"] = s
    # the LoRA on the layers the backend quantizes, named before quantization replaces them
    from hyperquant_diffusers.config import HyperQuantConfig
    from hyperquant_diffusers.quantizers.policy import plan_conversion

    targets = sorted(plan_conversion(model, HyperQuantConfig(bits=4.0))[0])
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    model.add_adapter(cfg, adapter_name="bench")
    _seed_lora(model)
    s, _, ref_lora = step_stats(model, inputs, steps)
    res["bf16_lora_s"] = s
    res["lora_effect_rel_l2"] = rel_l2(ref_lora, ref)
    res["n_lora_layers"] = len(targets)
    emit("bf16", res)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    for residency in residencies:
        run = res[residency] = {}
        model = build_meta(layers).to_empty(device="cuda")
        init_random(model)
        run["quantize_s"], run["n_quantized"], _, _ = quantize_model(model, 4.0)
        set_mode(model, residency, "int8")
        if batched:
            batch_fuse_lora(model)     # what the backend does to a model it loads
        run["fuse_batched"] = batched
        gc.collect()
        torch.cuda.empty_cache()
        s, _, out = step_stats(model, inputs, steps)
        run["quantized_s"] = s
        run["quantized_vs_bf16_rel_l2"] = rel_l2(out, ref)
        model.add_adapter(cfg, adapter_name="bench")
        lora_types = {type(m).__name__ for n, m in model.named_modules() if hasattr(m, "base_layer")
                      and isinstance(m.base_layer, LatticeLinear)}
        run["wrapper_types"] = sorted(lora_types)
        _seed_lora(model)
        s, _, unfused = step_stats(model, inputs, steps)
        run["unfused_s"] = s
        run["unfused_vs_bf16_lora_rel_l2"] = rel_l2(unfused, ref_lora)
        emit(f"{residency} unfused", run)
        rss0 = _rss_gib()
        run["gpu_gib_before_fuse"] = torch.cuda.memory_allocated() / GiB
        torch.cuda.reset_peak_memory_stats()
        run["fuse_s"] = timed(model.fuse_lora)
        # the merge's working set: the waiting groups, the stacked copy and the codec's buffers
        run["gpu_gib_peak_during_fuse"] = torch.cuda.max_memory_allocated() / GiB
        run["host_gib_kept"] = _rss_gib() - rss0
        run["gpu_gib_after_fuse"] = torch.cuda.memory_allocated() / GiB
        kept = sorted(fused_lora_retained(model).values())
        run["kept_min_median_max"] = [kept[0], kept[len(kept) // 2], kept[-1]] if kept else None
        s, _, fused = step_stats(model, inputs, steps)
        run["fused_s"] = s
        run["fused_vs_bf16_lora_rel_l2"] = rel_l2(fused, ref_lora)
        run["fused_vs_unfused_rel_l2"] = rel_l2(fused, unfused)
        emit(f"{residency} fused", run)
        run["unfuse_s"] = timed(model.unfuse_lora)
        _, _, back = step_stats(model, inputs, 1)
        run["unfused_again_bit_exact"] = all(torch.equal(a, b) for a, b in zip(back, unfused))
        run["fuse_again_s"] = timed(model.fuse_lora)   # kernels compiled, originals on the host
        emit(f"{residency} unfused again", run)
        del model, out, unfused, fused, back
        gc.collect()
        torch.cuda.empty_cache()
    return res


def _write_json(path: str | None, obj) -> None:
    """Write ``obj`` to ``path`` (indented; non-JSON values as strings); nothing when no path was given."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=12288)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--mma", nargs="+", default=["int8", "fp8"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="time kernels/lora_add.py's launch configs only")
    ap.add_argument("--full-size", action="store_true", help="the full LTX-2 transformer with a LoRA on every "
                    "quantized linear: step times, fuse_lora / unfuse_lora seconds, errors")
    ap.add_argument("--fuse-retention", action="store_true", help="how much of a LoRA's delta survives merge() "
                    "as the delta grows (runs on the CPU without a GPU)")
    ap.add_argument("--bits", type=float, default=4.0, help="--fuse-retention: bits per scalar of the codec")
    ap.add_argument("--merge-parts", action="store_true", help="time the stages of one merge() per shape")
    ap.add_argument("--layers", type=int, default=48, help="--full-size: transformer blocks")
    ap.add_argument("--residency", nargs="+", default=["int8", "compressed"], choices=["int8", "compressed"],
                    help="--full-size and --merge-parts: the residencies measured")
    ap.add_argument("--steps", type=int, default=2, help="--full-size: timed steps per variant")
    ap.add_argument("--per-layer-fuse", action="store_true",
                    help="--full-size: fuse_lora with one codec call per layer (the default batches same-shape "
                         "layers, as on a model the backend loaded)")
    args = ap.parse_args(argv)
    if args.fuse_retention:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"# {dev}: 1024x1024 normal weight, {args.bits:g} bps E8, rank-16 random delta; relative Frobenius "
              "errors")
        print("| abs(dW)/abs(W) | kept | codes unchanged | unfused error | re-quantization error | fused error | "
              "fused / unfused |")
        print("|---|---|---|---|---|---|---|")
        rows = fuse_retention(dev, rank=16, bits=args.bits)
        _write_json(args.json, rows)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_lora needs a CUDA GPU")
    if args.merge_parts:
        rows = merge_parts(args.rank, args.residency)
        _write_json(args.json, rows)
        return
    if args.full_size:
        def emit(tag, d):
            print(f"# {tag}: " + json.dumps(d, default=str), flush=True)
        res = full_size(args.layers, args.rank, args.residency, args.steps, emit, batched=not args.per_layer_fuse)
        _write_json(args.json, res)
        return
    if args.sweep:
        rows = sweep(args.m, args.rank)
        _write_json(args.json, rows)
        return
    rows = []
    print(f"# {torch.cuda.get_device_name()}, M={args.m}, rank {args.rank}, 4 bps E8 int8-resident; ms (median)")
    print("| shape | mma | bf16 | bf16+LoRA | quantized | +LoRA peft | +LoRA fused add | merged | merge s | "
          "unmerge s | err fused / peft / merged | W err merged / original |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mma in args.mma:
        for n, k in SHAPES:
            r = run_shape(n, k, args.m, args.rank, mma)
            rows.append(r)
            print(f"| {r['shape']} | {mma} | {r['bf16_ms']:.3f} | {r['bf16_lora_ms']:.3f} | {r['quantized_ms']:.3f} "
                  f"| {r['peft_unfused_ms']:.3f} | {r['fused_add_ms']:.3f} | {r['merged_ms']:.3f} | "
                  f"{r['merge_s']:.2f} | {r['unmerge_s']:.3f} | {r['fused_rel_err']:.2e} / {r['peft_rel_err']:.2e} / "
                  f"{r['merged_rel_err']:.2e} | {r['merged_weight_rel_err']:.4f} / {r['original_weight_rel_err']:.4f}"
                  f"{'' if r['unmerge_bit_exact'] else ' UNMERGE NOT EXACT'} |", flush=True)
    _write_json(args.json, rows)


if __name__ == "__main__":
    main()
