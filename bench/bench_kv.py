"""KV-compression benchmark: bytes of the cached text K/V vs bf16, and time saved per denoising step by not
recomputing the text K/V.

CPU (default): the tiny LTX-2 transformer of the test pipelines, plus one full-size-shaped text K/V pair
(LTX-2 video: 1024 tokens x 32 heads x 128; audio: 1024 x 32 x 64, drawn at random) to measure the compression at
real head dimensions. GPU: ``--full-size --device cuda`` builds the default-config LTX2VideoTransformer3DModel
(48 layers; ~35 GiB in bf16) on the meta device, materializes it with ``to_empty`` and initializes it at random.

    python bench/bench_kv.py                                   # CPU, tiny model
    python bench/bench_kv.py --full-size --device cuda         # GPU, full-size LTX-2 (80 GB GPU)
    python bench/bench_kv.py --full-size --device cuda --frames 121 --height 512 --width 768 --json out.json

Time per step is the median over ``--repeat`` transformer calls of a CFG batch (2 rows), after ``WARMUP_CALLS``
untimed calls (the first fills the cache, the second decodes it first). Variants: ``recompute`` (diffusers' own
processors: text K/V projected every call), ``cache-exact`` (text K/V cached uncompressed, kv_bits=None),
``cache-<b>bps`` (text K/V cached Rice coded at b bits; self-attention K/V quantized on the fly too),
``cache-<b>bps-int8`` (the same codes held as int8), ``nocache-<b>bps`` (everything quantized on the fly, text K/V
recomputed). These run the codec's torch operations (``kv.quantizer.set_fused_kernel("off")``).

``--fused-kernel`` (CUDA): every ``<b>bps`` variant again as ``...-fused``, with the self / cross attention K/V
through the fused kernel (``set_fused_kernel("cuda")``, the default on CUDA; ``kernels/kv_quant.py``), and as
``...-fused-text`` with the text K/V (the cache's encode and decode) through it too (``text=True``), and a
shape-level timing of one LTX-2 video self-attention K (batch 2 x 6144 tokens x 32 heads x 128, bf16) through the
torch path and the kernel, with the kernel checked against the codec given its own dither.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

BITS = (2.0, 3.0, 4.0, 6.0)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_model(full_size: bool, device: str, dtype: torch.dtype, layers: int | None = None):
    from diffusers import LTX2VideoTransformer3DModel

    if not full_size:
        torch.manual_seed(0)
        m = LTX2VideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, cross_attention_dim=64,
            audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=4, audio_attention_head_dim=16,
            audio_cross_attention_dim=64, num_layers=2, caption_channels=64, rope_double_precision=False,
            rope_type="split")
        return m.to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        m = LTX2VideoTransformer3DModel(**({} if layers is None else {"num_layers": layers}))
    m = m.to(dtype).to_empty(device=device)  # cast on meta first: never materialize float32 (~70 GiB)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for b in m.buffers():
            if b.is_floating_point():
                b.zero_()
    return m.eval()


def make_inputs(m, args, device, dtype):
    cfg = m.config
    g = torch.Generator(device="cpu").manual_seed(1)
    if args.full_size:
        f = (args.frames - 1) // 8 + 1
        h, w = args.height // 32, args.width // 32
        a = round(args.frames / 24.0 * 16000 / 160 / 4)
    else:
        f, h, w, a = 2, 4, 4, 5
    b, L = 2, args.text_len
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return dict(hidden_states=r(b, f * h * w, cfg.in_channels), audio_hidden_states=r(b, a, cfg.audio_in_channels),
                encoder_hidden_states=r(b, L, cfg.caption_channels),
                audio_encoder_hidden_states=r(b, L, cfg.caption_channels),
                encoder_attention_mask=torch.ones(b, L, device=device),
                audio_encoder_attention_mask=torch.ones(b, L, device=device),
                timestep=torch.full((b,), 500.0, device=device), num_frames=f, height=h, width=w,
                audio_num_frames=a, fps=24.0, return_dict=False), dict(video_tokens=f * h * w, audio_tokens=a,
                                                                      text_tokens=L, batch=b)


#: untimed calls per variant: the first fills the text-K/V cache, the second is the first to decode it (its
#: Rice streams are checked on that first decode only, so the unchecked decoder's Triton compilation falls here)
WARMUP_CALLS = 2


def time_variant(m, inputs, device, repeat, fused=False, fused_text=False, **kv):
    from hyperquant_diffusers.kv import disable_kv_compression, enable_kv_compression
    from hyperquant_diffusers.kv.quantizer import fused_kernel_mode, fused_text_kernel, set_fused_kernel

    before = (fused_kernel_mode(), fused_text_kernel())
    set_fused_kernel("cuda" if fused else "off", text=fused_text)
    handle = enable_kv_compression(m, **kv) if kv else None
    times = []
    try:
        with torch.no_grad():
            ts = [900.0 - 800.0 * i / max(1, repeat + 1) for i in range(repeat + WARMUP_CALLS)]
            for i, t in enumerate(ts):
                inputs["timestep"] = torch.full_like(inputs["timestep"], t)
                _sync(device)
                t0 = time.perf_counter()
                m(**inputs)
                _sync(device)
                if i >= WARMUP_CALLS:
                    times.append(time.perf_counter() - t0)
        stats = handle.stats() if handle else None
    finally:
        if handle:
            disable_kv_compression(m)
        set_fused_kernel(*before)
    return statistics.median(times), stats


def shape_level(bits_list, device, seed=0):
    """Compress one full-size-shaped LTX-2 text K (video 1024x32x128 and audio 1024x32x64), random data with a
    spread of per-token scales and per-channel gains; bytes vs bf16 at each rate."""
    from hyperquant_diffusers.kv import KVQuantConfig, KVQuantizer

    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for name, shape in (("video text K/V (1024x32x128)", (1024, 32, 128)), ("audio text K/V (1024x32x64)",
                                                                              (1024, 32, 64))):
        x = torch.randn(*shape, generator=g) * torch.exp(0.5 * torch.randn(shape[-1], generator=g))
        x = (x * torch.rand(shape[0], 1, 1, generator=g).add(0.2)).to(device=device, dtype=torch.bfloat16)
        for bits in bits_list:
            q = KVQuantizer(KVQuantConfig(bits=bits, lattice="E8", method="dither"), shape[-1])
            t0 = time.perf_counter()
            ck = q.compress(x, call_seed=1)
            _sync(device)
            t1 = time.perf_counter()
            y = ck.dequantize()
            _sync(device)
            t2 = time.perf_counter()
            c8 = q.compress(x, call_seed=1, fmt="int8")
            _sync(device)
            t3 = time.perf_counter()
            c8.dequantize()
            _sync(device)
            t4 = time.perf_counter()
            err = (y.float() - x.float()).square().sum() / x.float().square().sum()
            rows.append(dict(tensor=name, bits=bits, bytes=ck.nbytes, bf16_bytes=x.numel() * 2,
                             ratio=x.numel() * 2 / ck.nbytes, bits_per_value=ck.bits_per_value,
                             snr_db=float(-10 * torch.log10(err)), compress_s=t1 - t0, decompress_s=t2 - t1,
                             int8_bytes=c8.nbytes, int8_ratio=x.numel() * 2 / c8.nbytes,
                             int8_decompress_s=t4 - t3))
    return rows


def fused_shape_level(device, bits=4.0, repeat=10, shape=(2, 6144, 32, 128)):
    """One LTX-2 video self-attention K (bf16) fake-quantized by the torch path and by the fused kernel with each
    way of multiplying by the Hadamard matrix: ms per call (median of ``repeat`` after a warm-up), the kernel's
    effective bandwidth (one bf16 read + one write), and its largest difference from the codec given the kernel's
    own dither: per vector, in bf16 units in the last place of the vector's largest value; vectors off by more
    than one such unit chose another lattice point (near-ties, counted)."""
    from hyperquant_diffusers.kernels.kv_quant import HADAMARD_MODES, kv_fake_quantize, kv_fake_quantize_reference
    from hyperquant_diffusers.kv import KVQuantConfig, KVQuantizer
    from hyperquant_diffusers.kv.quantizer import STEP_CODES_PER_OCTAVE

    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(*shape, generator=g) * torch.exp(0.5 * torch.randn(shape[-1], generator=g)))
    x = x.to(device=device, dtype=torch.bfloat16)
    q = KVQuantizer(KVQuantConfig(bits=bits, lattice="E8", method="dither"), shape[-1], seed=1)
    call = dict(dither=True, seed=5, codes_per_octave=STEP_CODES_PER_OCTAVE)

    def clock(fn):
        fn()
        ts = []
        for _ in range(repeat):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    res = dict(shape=list(shape), bits=bits, torch_ms=clock(lambda: q.fake_quantize(x, 5, fused=False)) * 1e3)
    for mode in HADAMARD_MODES:
        t = clock(lambda: kv_fake_quantize(x, q.signs, q.tile, q.alpha, "E8", hadamard=mode, **call))
        out, u, e = kv_fake_quantize(x, q.signs, q.tile, q.alpha, "E8", hadamard=mode, return_dither=True, **call)
        ref, _ = kv_fake_quantize_reference(x, q.signs, q.tile, q.alpha, "E8", dither=u, step_codes=e)
        r32, o32 = ref.float(), out.float()
        # one bf16 unit in the last place of each vector's largest value: the float32 sums round either way
        ulp = torch.exp2(torch.floor(torch.log2(r32.abs().amax(-1, keepdim=True).clamp_min(1e-30))) - 7)
        err = ((o32 - r32).abs() / ulp).amax(-1).reshape(-1)
        same = err <= 1.0    # larger: another lattice point (a near-tie that the float32 sums resolved otherwise)
        res[mode] = dict(ms=t * 1e3, speedup=res["torch_ms"] / (t * 1e3), gb_s=x.numel() * 4 / t / 1e9,
                         vectors=err.numel(), vectors_other_point=int((~same).sum()),
                         max_ulps_same_point=float(err[same].max()))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-size", action="store_true", help="default-config LTX-2 transformer (48 layers)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=None, help="full-size only: fewer blocks (smoke tests)")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--frames", type=int, default=121)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default 1024 full-size, 16 tiny)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per variant (after WARMUP_CALLS untimed ones)")
    ap.add_argument("--bits", type=float, nargs="*", default=list(BITS))
    ap.add_argument("--no-shape-level", action="store_true", help="skip the full-size-shaped K/V byte count")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--fused-kernel", action="store_true",
                    help="CUDA: also every kv_bits variant with the fused K/V kernel, and its shape-level timing")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="time only these variants (names as printed, e.g. recompute cache-4bps-fused-text)")
    args = ap.parse_args(argv)
    if args.fused_kernel and not args.device.startswith("cuda"):
        ap.error("--fused-kernel needs --device cuda (on the CPU the kernel runs only in Triton's interpreter)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.text_len is None:
        args.text_len = 1024 if args.full_size else 16
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                          else torch.float32)
    out = dict(layers=args.layers, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=platform.platform(),
               processor=platform.processor() or platform.machine(), torch=torch.__version__,
               threads=torch.get_num_threads(), device=args.device, dtype=str(dtype), full_size=args.full_size)
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()

    if not args.no_shape_level:
        out["shape_level"] = shape_level(args.bits, args.device)
        print("\nfull-size-shaped text K/V, E8 + dither (bytes include every side field):")
        print(f"{'tensor':30s} {'bps':>4s} {'bytes':>9s} {'bf16':>9s} {'ratio':>6s} {'SNR dB':>7s} "
              f"{'comp s':>7s} {'decomp s':>8s} | {'int8 ratio':>10s} {'decomp s':>8s}")
        for r in out["shape_level"]:
            print(f"{r['tensor']:30s} {r['bits']:4.1f} {r['bytes']:9d} {r['bf16_bytes']:9d} {r['ratio']:6.2f} "
                  f"{r['snr_db']:7.2f} {r['compress_s']:7.3f} {r['decompress_s']:8.3f} | {r['int8_ratio']:10.2f} "
                  f"{r['int8_decompress_s']:8.3f}")

    if args.fused_kernel:
        r = out["fused_shape_level"] = fused_shape_level(args.device)
        print(f"\nfused K/V kernel, one {tuple(r['shape'])} bf16 K at {r['bits']:g} bps: torch path "
              f"{r['torch_ms']:.2f} ms")
        for mode in ("ieee", "bf16"):
            k = r[mode]
            print(f"  kernel, {mode} Hadamard products: {k['ms']:.3f} ms ({k['speedup']:.1f}x, {k['gb_s']:.0f} GB/s); "
                  f"vs the codec given its dither: {k['vectors_other_point']} of {k['vectors']} vectors at another "
                  f"lattice point, the rest within {k['max_ulps_same_point']:.2f} bf16 ulps of their largest value")

    m = build_model(args.full_size, args.device, dtype, args.layers)
    inputs, geo = make_inputs(m, args, args.device, dtype)
    out["geometry"] = geo
    variants = [("recompute", {}), ("cache-exact", dict(kv_bits=None, cache_text_kv=True))]
    for b in args.bits:
        variants.append((f"cache-{b:g}bps", dict(kv_bits=b, cache_text_kv=True)))
        variants.append((f"cache-{b:g}bps-int8", dict(kv_bits=b, cache_text_kv=True, cache_format="int8")))
        variants.append((f"nocache-{b:g}bps", dict(kv_bits=b, cache_text_kv=False)))
    if args.fused_kernel:
        quantized = [(name, kv) for name, kv in variants if kv.get("kv_bits")]
        variants += [(f"{name}-fused", dict(kv, fused=True)) for name, kv in quantized]
        variants += [(f"{name}-fused-text", dict(kv, fused=True, fused_text=True)) for name, kv in quantized]
    if args.variants is not None:
        unknown = sorted(set(args.variants) - {name for name, _ in variants})
        if unknown:
            ap.error(f"unknown variants {unknown}; these exist: {[name for name, _ in variants]}")
        variants = [(name, kv) for name, kv in variants if name in args.variants]
    res = {}
    print(f"\nmodel: {'full-size' if args.full_size else 'tiny'} LTX-2, {geo}, {dtype}, {args.device}")
    print(f"{'variant':24s} {'s/step':>9s} {'text KV bytes':>14s} {'bf16 bytes':>12s} {'ratio':>6s} {'ref bytes':>10s}")
    for name, kv in variants:
        try:
            t, st = time_variant(m, inputs, args.device, args.repeat, **kv)
        except ValueError as e:  # e.g. a rate below the Rice floor at this head dimension
            print(f"{name:24s} skipped: {e}")
            res[name] = dict(skipped=str(e))
            continue
        row = dict(s_per_step=t)
        if st is not None:
            pk = st["peak"]
            row.update(kv_bytes=pk["kv_bytes"], kv_bf16_bytes=pk["kv_bf16_bytes"], ratio=pk["compression_vs_bf16"],
                       reference_bytes=pk["reference_bytes"], entries=pk["entries"])
        res[name] = row
        ratio = f"{row['ratio']:6.2f}" if row.get("ratio") else "     -"
        print(f"{name:24s} {t:9.4f} {row.get('kv_bytes', 0):14d} {row.get('kv_bf16_bytes', 0):12d} {ratio} "
              f"{row.get('reference_bytes', 0):10d}")
    out["variants"] = res
    if "recompute" in res and "cache-exact" in res:
        base = res["recompute"]["s_per_step"]
        saved = out["time_saved_per_step_s"] = base - res["cache-exact"]["s_per_step"]
        print(f"\ntime saved per step by caching the text K/V (exact cache vs recompute): {saved * 1e3:.2f} ms "
              f"of {base * 1e3:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
