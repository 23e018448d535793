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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=12288)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--mma", nargs="+", default=["int8", "fp8"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="time kernels/lora_add.py's launch configs only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_lora needs a CUDA GPU")
    if args.sweep:
        rows = sweep(args.m, args.rank)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
