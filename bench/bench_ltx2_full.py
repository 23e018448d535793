"""Full-size LTX-2 on one GPU (issue 7): bf16 vs HyperQuant E8 at 4 (and 3, 5) bps, each residency and MMA.

The default-config ``LTX2VideoTransformer3DModel`` (48 blocks, 18.9B parameters) is built on the meta device,
materialized on the GPU with ``to_empty`` and filled with seeded random weights (normal(0, 0.02) matrices, small
biases, unit norm gains): fine for memory and speed, meaningless for quality. One denoising step = one
transformer forward at batch 2 (CFG), 121 frames at 768x512 -> 16 x 16 x 24 = 6144 video tokens, 126 audio
tokens (121 / 24 s x 16000 / 160 / 4), 1024 text tokens of 3840 channels for each modality, as the LTX-2 pipeline
builds them.

Measured: weight memory, peak memory of a step, seconds per step (median of ``--steps`` after one warm-up),
time to quantize every linear from bf16 on the GPU (the backend's conversion plan; same-shape layers stacked,
``hyperquant_diffusers.kernels.quantize``), time to load a saved compressed checkpoint vs the bf16 one
(safetensors from local disk, page cache dropped when the OS allows), and the relative L2 difference of the
step's output vs bf16.

    python bench/bench_ltx2_full.py [--bits 4 3 5] [--layers 48] [--json OUT] [--ckpt-dir /tmp/hq_ckpt]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from hyperquant_diffusers.codec.constants import DEFAULT_GROUP_VALUES  # noqa: E402

GiB = float(1 << 30)
TARGETS = {"compressed_weight_gib": 9.5, "compressed_peak_vs_bf16": 0.65, "int8_weight_gib": 18.5,
           "int8_step_vs_bf16": 0.9, "compressed_step_vs_bf16": 1.0, "quantize_s": 60.0}


def sync():
    torch.cuda.synchronize()


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def build_meta(layers: int):
    from diffusers import LTX2VideoTransformer3DModel

    with torch.device("meta"):
        kw = {} if layers == 48 else {"num_layers": layers}
        return LTX2VideoTransformer3DModel(**kw).to(torch.bfloat16)


@torch.no_grad()
def init_random(model, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=g)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.01, generator=g)


def make_inputs(batch=2, frames=16, h=16, w=24, audio=126, text=1024, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = torch.bfloat16

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g).to(bf)

    return dict(hidden_states=r(batch, frames * h * w, 128), audio_hidden_states=r(batch, audio, 128),
                encoder_hidden_states=r(batch, text, 3840), audio_encoder_hidden_states=r(batch, text, 3840),
                timestep=torch.full((batch,), 500.0, device="cuda"),
                encoder_attention_mask=torch.ones(batch, text, device="cuda", dtype=torch.int64),
                audio_encoder_attention_mask=torch.ones(batch, text, device="cuda", dtype=torch.int64),
                num_frames=frames, height=h, width=w, fps=24.0, audio_num_frames=audio, return_dict=False)


@torch.no_grad()
def step_stats(model, inputs, steps: int):
    # two warm-up steps: the first checks every compressed stream once (a checked decode variant) and learns the
    # layer order for the prefetch, the second compiles the unchecked fast-path kernels
    for _ in range(2):
        out = model(**inputs)
    sync()
    times, host = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        out = model(**inputs)
        host.append(time.perf_counter() - t0)   # until the forward returned: the host's share of the step
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / GiB
    _LAST_TIMES[:] = times
    _LAST_HOST[:] = host
    return statistics.median(times), peak, [o.float() for o in out]


def compiled_stats(model, inputs, steps: int, ref) -> dict:
    """The step with the model's repeated blocks compiled (``compile_repeated_blocks(fullgraph=True)`` done by the
    caller; eager elsewhere through ``torch.compiler.set_stance("force_eager")``): the first call's seconds (Dynamo
    + Inductor compile, or a cache hit), then :func:`step_stats`, and the output's relative L2 vs ``ref``."""
    try:
        with torch.compiler.set_stance("default"), torch.no_grad():
            sync()
            t0 = time.perf_counter()
            model(**inputs)
            sync()
            first = time.perf_counter() - t0
            s, peak, out = step_stats(model, inputs, steps)
    # a compile failure is a result to report; the eager numbers stand
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    v, a = rel_l2(out, ref)
    return {"first_call_s": first, "s_per_step": s, "step_times": list(_LAST_TIMES), "host_issue_s": list(_LAST_HOST),
            "peak_gib": peak, "rel_l2_video": v, "rel_l2_audio": a}


#: (residency, mma) of every quantized mode, in the order a run visits them
ALL_MODES = (("compressed", "int8"), ("compressed", "fp8"), ("int8", "int8"), ("int8", "fp8"))

#: the timed steps of the last step_stats call (s), and how long the host took to issue each (s)
_LAST_TIMES: list = []
_LAST_HOST: list = []


@torch.no_grad()
def profile_step(model, inputs, tag, out_dir):
    """One step under torch.profiler: device time per kernel family (printed) and the top kernels (file)."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs)
        sync()
    fam = {}
    total = 0.0
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if not t:
            continue
        n = e.key.lower()
        if "rice_decode" in n:
            k = "rice_decode"
        elif "rht_quant" in n or "rht_amax" in n:
            k = "act_quant (rht)"
        elif "int8_gemm" in n or "gemm_persistent" in n or "gemm_tma" in n:
            k = "quantized gemm (Triton)"
        elif "flash" in n or "attention" in n or "fmha" in n or "sdpa" in n:
            k = "attention"
        elif "gemm" in n or "cutlass" in n or "sm90" in n or "nvjet" in n or "matmul" in n:
            k = "bf16/fp8 gemm (cuBLAS)"
        else:
            k = "other (elementwise, norms, rope, ...)"
        fam[k] = fam.get(k, 0.0) + t
        total += t
    fam = {k: round(v / 1e3, 2) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])}
    fam["total_ms"] = round(total / 1e3, 2)
    if out_dir:
        with open(os.path.join(out_dir, f"profile_{tag}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30,
                                              max_name_column_width=90))
    return fam


@torch.no_grad()
def graphed_step(model, inputs, ref_out, replays: int = 3) -> dict:
    """The step captured in one CUDA graph and replayed: its time is the GPU's alone, with no host issue time.
    Returns {"s_per_step", "step_times", "rel_l2_vs_eager"} or {"error"} when the forward cannot be captured
    (a host sync inside it)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(s):
            for _ in range(2):
                model(**inputs)
        torch.cuda.current_stream().wait_stream(s)
        sync()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(**inputs)
        g.replay()
        sync()
    except Exception as e:  # the point: report why the capture failed, whatever it is
        sync()
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    times = []
    for _ in range(replays):
        sync()
        t0 = time.perf_counter()
        g.replay()
        sync()
        times.append(time.perf_counter() - t0)
    res = {"s_per_step": statistics.median(times), "step_times": times,
           "rel_l2_vs_eager": rel_l2([o.float() for o in out], ref_out)}
    del g, out
    gc.collect()
    torch.cuda.empty_cache()
    return res


def rel_l2(out, ref):
    return [float((a - b).norm() / b.norm()) for a, b in zip(out, ref)]


def weight_bytes(model):
    from hyperquant_diffusers.nn.lattice_linear import memory_footprint

    fp = memory_footprint(model)
    return fp["total_bytes"], fp


def quantize_model(model, bits: float, group_values: int = DEFAULT_GROUP_VALUES):
    """Quantize the backend's conversion plan, stacked per shape; returns (seconds, n_layers, layout)."""
    from hyperquant_diffusers.config import HyperQuantConfig
    from hyperquant_diffusers.kernels.quantize import quantize_many
    from hyperquant_diffusers.nn import LatticeLinear
    from hyperquant_diffusers.quantizers.core import _set_submodule
    from hyperquant_diffusers.quantizers.policy import plan_conversion

    cfg = HyperQuantConfig(bits=bits, lattice="E8", residency="compressed", mma="int8")
    convert, skipped = plan_conversion(model, cfg)
    groups: dict = {}
    for name, lin in convert.items():
        groups.setdefault((tuple(lin.weight.shape), lin.weight.dtype), []).append(name)
    sync()
    t0 = time.perf_counter()
    layout = {}
    for _, names in groups.items():
        lins = [convert[n] for n in names]
        qs = quantize_many([lin.weight for lin in lins], bits=bits, lattice="E8", tile_size=cfg.tile_size,
                           seed=cfg.seed, block_values=cfg.block_values, max_values=group_values)
        for name, lin, q in zip(names, lins, qs):
            new = LatticeLinear.from_lattice_tensor(q, lin.bias, bits=bits, mma="int8", residency="compressed")
            _set_submodule(model, name, new)
            layout[name] = (lin.out_features, lin.in_features, lin.bias is not None, new.n_words)
            convert[name] = None
            del lin
        del lins, qs
    sync()
    dt = time.perf_counter() - t0
    gc.collect()
    torch.cuda.empty_cache()
    return dt, len(layout), layout, skipped


def set_mode(model, residency: str, mma: str) -> float:
    """Switch every LatticeLinear's MMA; int8 residency decodes the streams once on the GPU. Returns seconds."""
    from hyperquant_diffusers.kernels.dispatch import make_int8_resident
    from hyperquant_diffusers.nn import LatticeLinear

    sync()
    t0 = time.perf_counter()
    for m in model.modules():
        if isinstance(m, LatticeLinear):
            m.mma = mma
            if residency == "int8" and m.residency == "compressed":
                make_int8_resident(m)
    sync()
    return time.perf_counter() - t0


def save_st(model, path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    t0 = time.perf_counter()
    save_file(sd, tmp)
    os.replace(tmp, path)
    return time.perf_counter() - t0, os.path.getsize(path)


def load_bf16(path, layers):
    from safetensors.torch import load_file

    dropped = drop_caches()
    sync()
    t0 = time.perf_counter()
    model = build_meta(layers)
    sd = load_file(path, device="cuda")
    model.load_state_dict(sd, assign=True, strict=True)
    sync()
    return model, time.perf_counter() - t0, dropped


def load_compressed(path, layers, layout, bits):
    from safetensors.torch import load_file

    from hyperquant_diffusers.nn import LatticeLinear
    from hyperquant_diffusers.quantizers.core import _set_submodule

    dropped = drop_caches()
    sync()
    t0 = time.perf_counter()
    model = build_meta(layers)
    for name, (out_f, in_f, has_bias, n_words) in layout.items():
        _set_submodule(model, name, LatticeLinear(in_f, out_f, has_bias, lattice="E8", bits=bits, mma="int8",
                                                  residency="compressed", n_words=n_words, device="meta",
                                                  dtype=torch.bfloat16))
    sd = load_file(path, device="cuda")
    model.load_state_dict(sd, assign=True, strict=True)
    for m in model.modules():
        if isinstance(m, LatticeLinear):
            m.finalize()
    sync()
    return model, time.perf_counter() - t0, dropped


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.0, 5.0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--ckpt-dir", default="/tmp/hq_ckpt")
    ap.add_argument("--tune", action="store_true",
                    help="first run bench_kernels' launch-shape sweeps (decode, act-quant, GEMM) and use the best")
    ap.add_argument("--skip-load-test", action="store_true", help="no checkpoint save/load timing")
    ap.add_argument("--group-values", type=int, default=DEFAULT_GROUP_VALUES,
                    help="values per stacked quantize group (peak memory of quantization grows with it)")
    ap.add_argument("--profile-dir", default=None, help="profile one step of bf16 and each mode of the first rate")
    ap.add_argument("--all-modes-bits", type=float, nargs="*", default=[4.0],
                    help="rates that get every residency x MMA (others: compressed+int8 and int8+int8 only)")
    ap.add_argument("--modes", nargs="+", default=None, choices=[f"{r}-{m}" for r, m in ALL_MODES],
                    help="run only these residency-MMA modes, at every rate (overrides --all-modes-bits); they run in "
                         "the order compressed-int8, compressed-fp8, int8-int8, int8-fp8 (int8 residency is decoded "
                         "from the compressed model, never the reverse)")
    ap.add_argument("--variants", action="store_true",
                    help="also time compressed+int8 with the decode prefetch off, int8+int8 with activation "
                         "sharing off, and both with Triton's ordinary launch instead of the cached one (what each "
                         "saves)")
    ap.add_argument("--graphed-step", action="store_true",
                    help="also time the step captured in one CUDA graph (GPU time without the host), bf16 and each "
                         "mode; compressed modes with the prefetch off (a side stream in a graph is not attempted)")
    ap.add_argument("--prefetch-ab", type=int, default=0, metavar="ROUNDS",
                    help="compressed modes: also time the step with the prefetch off and launched at each place of "
                         "dispatch.PREFETCH_WHEN, in this many alternating rounds")
    ap.add_argument("--compile", action="store_true",
                    help="also time each variant with its transformer blocks compiled (diffusers' "
                         "compile_repeated_blocks(fullgraph=True), Inductor): bf16 and every mode")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode for --compile (default: Inductor's default; \"reduce-overhead\": "
                         "CUDA graphs)")
    ap.add_argument("--compile-whole", action="store_true",
                    help="with --compile: compile the whole transformer (torch.compile of the module) instead of its "
                         "repeated blocks; reduce-overhead needs it (per-block CUDA graphs fail on their own outputs, "
                         "bf16 included: pytorch/pytorch#152887)")
    ap.add_argument("--pps-sweep", action="store_true",
                    help="with --variants: also sweep the side-stream decode grid (programs per SM 1/2/4/8/16)")
    args = ap.parse_args(argv)
    os.makedirs(args.ckpt_dir, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "layers": args.layers, "targets": TARGETS, "runs": []}

    def emit(tag, d):
        print(f"# {tag} " + json.dumps(d), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)

    if args.tune:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_kernels

        sw = bench_kernels.sweeps(torch.device("cuda"))
        res["tune"] = {"decode_best": sw["decode_best"], "gemm_tma_best": sw.get("gemm_tma_best"),
                       "actq": {k: v for k, v in sw["actq"].items() if "best" in k}}
        gc.collect()
        torch.cuda.empty_cache()
    inputs = make_inputs()
    # ---- bf16 ----
    t0 = time.perf_counter()
    model = build_meta(args.layers).to_empty(device="cuda")
    init_random(model)
    sync()
    n_params = sum(p.numel() for p in model.parameters())
    wb = sum(p.numel() * p.element_size() for p in model.parameters())
    s, peak, ref = step_stats(model, inputs, args.steps)
    res["bf16"] = {"params_B": n_params / 1e9, "weight_gib": wb / GiB, "s_per_step": s, "peak_gib": peak,
                   "build_s": time.perf_counter() - t0, "step_times": list(_LAST_TIMES),
                   "host_issue_s": list(_LAST_HOST)}
    if args.profile_dir:
        res["bf16"]["profile_ms"] = profile_step(model, inputs, "bf16", args.profile_dir)
    if args.graphed_step:
        res["bf16"]["graphed"] = graphed_step(model, inputs, ref)
    compile_kw = {"fullgraph": True, **({"mode": args.compile_mode} if args.compile_mode else {})}
    res["compile_mode"] = args.compile_mode if args.compile else None
    res["compile_whole"] = bool(args.compile and args.compile_whole)

    def compile_model(m):
        if args.compile_whole:
            m.compile(**compile_kw)
        else:
            m.compile_repeated_blocks(**compile_kw)
    if args.compile:
        compile_model(model)
        torch.compiler.set_stance("force_eager")    # every other measurement stays eager
        res["bf16"]["compiled"] = c = compiled_stats(model, inputs, args.steps, ref)
        if "error" not in c:
            c["vs_bf16_eager"] = c["s_per_step"] / res["bf16"]["s_per_step"]
    emit("bf16", res["bf16"])
    bf16_path = os.path.join(args.ckpt_dir, "bf16.safetensors")
    if not args.skip_load_test:
        res["bf16"]["save_s"], res["bf16"]["ckpt_bytes"] = save_st(model, bf16_path)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    for bits in args.bits:
        run = {"bits": bits}
        res["runs"].append(run)  # filled in place: a partial run is still written if the job is cut short
        if bits == args.bits[0] and not args.skip_load_test:
            model, run["bf16_load_s"], run["page_cache_dropped"] = load_bf16(bf16_path, args.layers)
        else:  # same seed, same weights as the checkpoint; loading was measured once
            model = build_meta(args.layers).to_empty(device="cuda")
            init_random(model)
        torch.cuda.reset_peak_memory_stats()
        run["quantize_s"], run["n_quantized"], layout, skipped = quantize_model(model, bits, args.group_values)
        run["quantize_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        run["n_skipped"] = len(skipped)
        from hyperquant_diffusers.nn import LatticeLinear

        lls = [m for m in model.modules() if isinstance(m, LatticeLinear)]
        run["bits_per_scalar"] = (sum(m.stored_nbytes() for m in lls) * 8
                                  / sum(m.in_features * m.out_features for m in lls))
        emit(f"quantized{bits}", run)
        if bits == args.bits[0] and not args.skip_load_test:
            cpath = os.path.join(args.ckpt_dir, f"hq{bits}.safetensors")
            run["compressed_save_s"], run["compressed_ckpt_bytes"] = save_st(model, cpath)
            del model, lls
            gc.collect()
            torch.cuda.empty_cache()
            model, run["compressed_load_s"], _ = load_compressed(cpath, args.layers, layout, bits)
            run["int8_from_compressed_decode_s"] = None
        if args.compile:
            compile_model(model)
        if args.modes:
            modes = [(r, m) for r, m in ALL_MODES if f"{r}-{m}" in args.modes]
        elif bits in args.all_modes_bits:
            modes = list(ALL_MODES)
        else:
            modes = [("compressed", "int8"), ("int8", "int8")]
        from hyperquant_diffusers.kernels.dispatch import decode_buffer_nbytes, release_decode_buffers

        for residency, mma in modes:
            t = set_mode(model, residency, mma)
            if residency == "int8" and run.get("int8_from_compressed_decode_s") is None:
                run["int8_from_compressed_decode_s"] = t
            gc.collect()
            torch.cuda.empty_cache()
            wbytes, fp = weight_bytes(model)
            try:
                s, peak, out = step_stats(model, inputs, args.steps)
            except torch.OutOfMemoryError as e:
                run[f"{residency}_{mma}"] = {"error": f"OOM: {str(e)[:200]}"}
                emit("mode", run)
                continue
            d = {"weight_gib": (wbytes + decode_buffer_nbytes()) / GiB, "lattice_gib": fp["lattice_bytes"] / GiB,
                 "decode_buffer_gib": decode_buffer_nbytes() / GiB, "s_per_step": s, "step_times": list(_LAST_TIMES),
                 "host_issue_s": list(_LAST_HOST),
                 "peak_gib": peak,
                 "step_vs_bf16": s / res["bf16"]["s_per_step"], "peak_vs_bf16": peak / res["bf16"]["peak_gib"],
                 "rel_l2_video": rel_l2(out, ref)[0], "rel_l2_audio": rel_l2(out, ref)[1]}
            if args.compile:
                d["compiled"] = c = compiled_stats(model, inputs, args.steps, ref)
                if "error" not in c:
                    c["vs_bf16_compiled"] = c["s_per_step"] / res["bf16"].get("compiled", {}).get("s_per_step",
                                                                                                 float("nan"))
                    c["vs_bf16_eager"] = c["s_per_step"] / res["bf16"]["s_per_step"]
            if args.profile_dir and bits == args.bits[0]:
                d["profile_ms"] = profile_step(model, inputs, f"{bits}_{residency}_{mma}", args.profile_dir)
            run[f"{residency}_{mma}"] = d
            if args.variants and mma == "int8":
                from hyperquant_diffusers.kernels import _launch, dispatch

                _launch.set_fast_launch(False)
                d["s_per_step_ordinary_launch"] = step_stats(model, inputs, args.steps)[0]
                d["host_issue_s_ordinary_launch"] = list(_LAST_HOST)
                _launch.set_fast_launch(True)
                if residency == "compressed":
                    dispatch.set_prefetch(False)
                    d["s_per_step_prefetch_off"] = step_stats(model, inputs, args.steps)[0]
                    dispatch.set_prefetch(True)
                    # the side-stream decode with fewer programs: it leaves more of each SM to the compute stream
                    default_pps = dispatch._PREFETCH["programs_per_sm"]
                    for pps in (1, 2, 4, 8, 16) if args.pps_sweep else ():
                        dispatch._PREFETCH["programs_per_sm"] = pps
                        d[f"s_per_step_prefetch_pps{pps}"] = step_stats(model, inputs, args.steps)[0]
                        d[f"host_issue_s_prefetch_pps{pps}"] = list(_LAST_HOST)
                    dispatch._PREFETCH["programs_per_sm"] = default_pps
                else:
                    dispatch.set_activation_sharing(False)
                    d["s_per_step_sharing_off"] = step_stats(model, inputs, args.steps)[0]
                    dispatch.set_activation_sharing(True)
            from hyperquant_diffusers.kernels import dispatch

            if args.graphed_step:
                dispatch.set_prefetch(False)
                d["graphed"] = graphed_step(model, inputs, out)
                d["graphed"]["vs_bf16_graphed"] = (d["graphed"].get("s_per_step", float("nan"))
                                                   / res["bf16"].get("graphed", {}).get("s_per_step", float("nan")))
                dispatch.set_prefetch(True)
            if args.prefetch_ab and residency == "compressed":
                saved_when = dispatch._PREFETCH["when"]
                ab = {v: [] for v in ("off",) + dispatch.PREFETCH_WHEN}
                for _ in range(args.prefetch_ab):
                    for v in ab:
                        dispatch.set_prefetch(v != "off")
                        if v != "off":
                            dispatch.set_prefetch_when(v)
                        ab[v].append(step_stats(model, inputs, args.steps)[0])
                dispatch.set_prefetch(True)
                dispatch.set_prefetch_when(saved_when)
                d["prefetch_ab_s_per_step"] = ab
                d["prefetch_ab_median"] = {v: statistics.median(t) for v, t in ab.items()}
            emit(f"mode {bits} {residency} {mma}", d)
            del out
            if residency == "int8":
                release_decode_buffers()
        emit(f"run{bits}", run)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(summary(res))


def summary(res):
    b = res["bf16"]
    lines = [f"{res['device']} {res['date']} layers={res['layers']}",
             f"bf16: {b['params_B']:.2f}B params, weights {b['weight_gib']:.1f} GiB, {b['s_per_step']:.3f} s/step, "
             f"peak {b['peak_gib']:.1f} GiB, ckpt save {b.get('save_s', 0):.1f} s",
             "| bps | residency | mma | weight GiB | peak GiB (x bf16) | s/step (x bf16) | rel L2 video | rel L2 audio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        for key in ("compressed_int8", "compressed_fp8", "int8_int8", "int8_fp8"):
            d = r.get(key)
            if not d or "error" in d:
                if d:
                    lines.append(f"| {r['bits']} | {key} | {d['error'][:60]} |")
                continue
            res_, mma = key.split("_")
            lines.append(f"| {r['bits']} | {res_} | {mma} | {d['weight_gib']:.2f} | {d['peak_gib']:.1f} "
                         f"({d['peak_vs_bf16']:.2f}) | {d['s_per_step']:.3f} ({d['step_vs_bf16']:.2f}) | "
                         f"{d['rel_l2_video']:.4f} | {d['rel_l2_audio']:.4f} |")
        lines.append(f"bps {r['bits']}: realized {r['bits_per_scalar']:.3f} bits/weight, quantize {r['quantize_s']:.1f} s "
                     f"({r['n_quantized']} linears, {r['n_skipped']} skipped)"
                     + (f", bf16 load {r['bf16_load_s']:.1f} s" if "bf16_load_s" in r else "")
                     + (f", compressed load {r['compressed_load_s']:.1f} s" if "compressed_load_s" in r else "")
                     + f", int8 decode {r.get('int8_from_compressed_decode_s') or 0:.2f} s"
                     + f", page cache dropped: {r.get('page_cache_dropped')}")
    if "compiled" in b:
        c = b["compiled"]
        what = "whole transformer (torch.compile" if res.get("compile_whole") else "blocks (compile_repeated_blocks"
        lines += [f"compiled {what}(fullgraph=True, mode={res.get('compile_mode') or 'default'})):",
                  "| variant | s/step | x bf16 compiled | x bf16 eager | first call s | rel L2 video |",
                  "|---|---|---|---|---|---|"]
        lines.append(f"| bf16 | {c['error'][:80]} |" if "error" in c else
                     f"| bf16 | {c['s_per_step']:.3f} | 1.00 | {c['vs_bf16_eager']:.2f} | {c['first_call_s']:.1f} | "
                     f"{c['rel_l2_video']:.4f} |")
        for r in res["runs"]:
            for key in ("compressed_int8", "compressed_fp8", "int8_int8", "int8_fp8"):
                c = (r.get(key) or {}).get("compiled")
                if c and "error" in c:
                    lines.append(f"| {r['bits']} {key} | {c['error'][:80]} |")
                elif c:
                    lines.append(f"| {r['bits']} {key} | {c['s_per_step']:.3f} | {c['vs_bf16_compiled']:.2f} | "
                                 f"{c['vs_bf16_eager']:.2f} | {c['first_call_s']:.1f} | {c['rel_l2_video']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
