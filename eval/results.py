"""Merge shard records into ``results.json`` (schema below) — the one source of every number in the report.

Schema (``schema_version`` 1; keys are always present, unknown values are ``null``)::

    schema, schema_version, created_utc, versions{hyperquant_diffusers, diffusers, torch}
    model{id, embedded_default, random_weights, note}
    settings{model_id, embedded, frames, height, width, steps, guidance_scale, negative_prompt,
             max_sequence_length, frame_rate, dtype, device, quant_kwargs, extra, seeds, num_processes}
    number_format                      text: units and how non-finite numbers are written
    lpips{available, net, lpips_version, backbone_source, backbone_sha256, reference_backbone,
          unavailable_reason, upsample_factor}
    prompts[{id, text}]
    configs[{name, is_baseline, weight_kwargs, kv_kwargs, bits_per_scalar_nominal, component_bytes{...},
             quantized_linears{lattice_linears, quantized_params, stored_bytes, resident_bytes,
               dense_bf16_bytes, bits_per_scalar_stored, bits_per_scalar_resident, compression_stored_vs_bf16,
               fused_lora_kept{layers, min}|null, per_component}|null,
                                       fused_lora_kept: with --fuse-lora, the fraction of the LoRA's weight
                                       change the re-quantized codes keep (min over layers; per component also
                                       the median)
             quantized_components, quantized_components_bytes, compression_vs_baseline,
             bits_per_scalar_effective, load_seconds, seconds_per_step_mean, seconds_total_mean,
             peak_memory_bytes, peak_memory_kind, num_videos, error}]   error: null, or why it failed
    videos[{config, prompt_id, seed, video_file, frames_file, seconds_per_step, seconds_total,
            peak_memory_bytes, peak_memory_kind, initial_noise_sha256}]
    comparisons[{config, prompt_id, seed, num_frames, psnr_db[F], mse[F], lpips[F]|null, psnr_video_db,
                 psnr_mean_db, psnr_min_db, psnr_max_db, lpips_mean, lpips_max}]
    aggregate{<config>: {psnr_mean_db, psnr_min_db, lpips_mean, per_frame_psnr_db{mean[F], min[F], max[F]},
              num_videos}}
    same_initial_noise                 true when every configuration of a (prompt, seed) started from the
                                       same latents (SHA-256 of the first transformer input), null if unknown

Numbers: PSNR in dB (8-bit RGB, data_range 255), MSE in (8-bit level)^2, LPIPS distance (AlexNet, v0.1), bytes,
seconds. JSON has no Infinity: non-finite numbers are the strings ``"inf"``, ``"-inf"``, ``"nan"``; ``float(x)``
reads either form. PSNR ``"inf"`` means the frame is identical to the baseline's (MSE 0).
"""

from __future__ import annotations

import datetime as _dt
import math

import numpy as np

from . import metrics as M
from .configs import EvalConfig
from .pipeline import COMPONENTS_TO_QUANTIZE, EMBEDDED_NOTE

SCHEMA = "hyperquant-eval/results"
SCHEMA_VERSION = 1
NUMBER_FORMAT = ("PSNR in dB on 8-bit RGB frames (data_range 255); MSE in 8-bit levels squared; LPIPS AlexNet v0.1 "
                 "distance; memory in bytes; time in seconds. Non-finite numbers are the strings \"inf\", \"-inf\", "
                 "\"nan\" (float(x) reads both forms). PSNR \"inf\" means the frame equals the baseline frame.")
#: Bits per scalar of the baseline's weights, by --dtype (for the effective-bits figure).
DTYPE_BITS = {"bf16": 16, "bfloat16": 16, "fp16": 16, "float16": 16, "fp32": 32, "float32": 32}


def _f(x) -> float:
    return float("nan") if x is None else float(x)


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    with np.errstate(invalid="ignore"):
        return float(np.mean(vals))


def _versions() -> dict:
    import diffusers
    import torch

    try:
        from importlib.metadata import version

        hq = version("hyperquant-diffusers")
    except Exception:
        hq = None
    return {"hyperquant_diffusers": hq, "diffusers": diffusers.__version__, "torch": torch.__version__}


def build_results(shards: list[dict], configs: list[EvalConfig], prompts: list[dict], settings: dict,
                  lpips_json: dict, *, seeds: list[int], num_processes: int) -> dict:
    """``results.json`` content from the shard records of all processes (see :func:`runner.run_shard`)."""
    videos = [v for s in shards for v in s["videos"]]
    comps = [c for s in shards for c in s["comparisons"]]
    info: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for s in shards:
        for name, msg in s.get("failures", {}).items():
            failures.setdefault(name, msg)
    for s in shards:
        for name, i in s["config_info"].items():
            info.setdefault(name, i)
    order = {p["id"]: k for k, p in enumerate(prompts)}
    videos.sort(key=lambda v: ([c.name for c in configs].index(v["config"]), order.get(v["prompt_id"], 0), v["seed"]))
    comps.sort(key=lambda v: ([c.name for c in configs].index(v["config"]), order.get(v["prompt_id"], 0), v["seed"]))

    for c in comps:
        psnr = np.array([_f(x) for x in c["psnr_db"]])
        c["psnr_mean_db"] = M.json_number(np.mean(psnr))
        c["psnr_min_db"] = M.json_number(np.min(psnr))
        c["psnr_max_db"] = M.json_number(np.max(psnr))
        lp = c.get("lpips")
        c["lpips_mean"] = None if lp is None else M.json_number(np.mean([_f(x) for x in lp]))
        c["lpips_max"] = None if lp is None else M.json_number(np.max([_f(x) for x in lp]))

    baseline = configs[0]
    base_bits = DTYPE_BITS.get(settings.get("dtype", "bf16"), 16)
    base_bytes = _quantized_bytes(info.get(baseline.name))
    config_rows = []
    for cfg in configs:
        i = info.get(cfg.name) or {}
        vids = [v for v in videos if v["config"] == cfg.name]
        qbytes = _quantized_bytes(i) if i else None
        comp = (base_bytes / qbytes) if (base_bytes and qbytes) else None
        sps = [float(np.mean(v["seconds_per_step"])) for v in vids if v.get("seconds_per_step")]
        peaks = [v["peak_memory_bytes"] for v in vids if v.get("peak_memory_bytes") is not None]
        config_rows.append({
            "name": cfg.name, "is_baseline": cfg.is_baseline, "weight_kwargs": dict(cfg.weight_kwargs),
            "kv_kwargs": dict(cfg.kv_kwargs),
            "bits_per_scalar_nominal": float(cfg.bits_per_scalar) if cfg.quantizes_weights else float(base_bits),
            "component_bytes": i.get("component_bytes"),
            "quantized_components": list(COMPONENTS_TO_QUANTIZE),
            "quantized_components_bytes": qbytes,
            "compression_vs_baseline": M.json_number(comp) if comp is not None else None,
            "bits_per_scalar_effective": M.json_number(base_bits / comp) if comp else None,
            "quantized_linears": _linear_stats(i.get("quant_stats")),
            "load_seconds": i.get("load_seconds"),
            "seconds_per_step_mean": _mean(sps),
            "seconds_total_mean": _mean([v.get("seconds_total") for v in vids]),
            "peak_memory_bytes": max(peaks) if peaks else None,
            "peak_memory_kind": vids[0].get("peak_memory_kind") if vids else None,
            "num_videos": len(vids),
            "error": failures.get(cfg.name),
        })

    aggregate = {}
    comps = [c for c in comps if c["config"] not in failures]  # a config that failed on any rank is left out
    for cfg in configs[1:]:
        rows = [c for c in comps if c["config"] == cfg.name]
        if not rows:
            continue
        curves = _per_frame_curves([[_f(x) for x in c["psnr_db"]] for c in rows])
        lp_means = [_f(c["lpips_mean"]) for c in rows if c["lpips_mean"] is not None]
        aggregate[cfg.name] = {
            "psnr_mean_db": M.json_number(np.mean([_f(c["psnr_mean_db"]) for c in rows])),
            "psnr_min_db": M.json_number(np.min([_f(c["psnr_min_db"]) for c in rows])),
            "lpips_mean": M.json_number(np.mean(lp_means)) if lp_means else None,
            "per_frame_psnr_db": {k: [M.json_number(x) for x in v] for k, v in curves.items()},
            "num_videos": len(rows),
        }

    noise: dict[tuple, set] = {}
    for v in videos:
        noise.setdefault((v["prompt_id"], v["seed"]), set()).add(v.get("initial_noise_sha256"))
    same = None
    if noise and all(None not in s for s in noise.values()):
        same = all(len(s) == 1 for s in noise.values())

    embedded = bool(settings.get("embedded"))
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(),
        "model": {"id": settings.get("model_id"), "embedded_default": embedded, "random_weights": embedded,
                  "note": EMBEDDED_NOTE if embedded else None},
        "settings": {**settings, "seeds": list(seeds), "num_processes": int(num_processes)},
        "number_format": NUMBER_FORMAT,
        "lpips": lpips_json,
        "prompts": [{"id": p["id"], "text": p["text"]} for p in prompts],
        "configs": config_rows,
        "videos": [{k: v.get(k) for k in ("config", "prompt_id", "seed", "video_file", "frames_file",
                                          "seconds_per_step", "seconds_total", "peak_memory_bytes",
                                          "peak_memory_kind", "initial_noise_sha256")} for v in videos],
        "comparisons": comps,
        "aggregate": aggregate,
        "same_initial_noise": same,
        "failures": failures,
        "run": {"generated": sum(s.get("counts", {}).get("generated", 0) for s in shards),
                "resumed": sum(s.get("counts", {}).get("resumed", 0) for s in shards)},
    }


def _linear_stats(qs: dict | None) -> dict | None:
    """Totals over the quantized linears of all components: stored (compressed) and resident bits per scalar."""
    if not qs:
        return None
    tot = {k: sum(int(v[k]) for v in qs.values()) for k in
           ("lattice_linears", "quantized_params", "stored_bytes", "resident_bytes", "dense_bf16_bytes")}
    p = tot["quantized_params"]
    tot["bits_per_scalar_stored"] = 8.0 * tot["stored_bytes"] / p
    tot["bits_per_scalar_resident"] = 8.0 * tot["resident_bytes"] / p
    tot["compression_stored_vs_bf16"] = tot["dense_bf16_bytes"] / tot["stored_bytes"]
    kept = [v["fused_lora_kept"] for v in qs.values() if v.get("fused_lora_kept")]
    tot["fused_lora_kept"] = ({"layers": sum(k["layers"] for k in kept), "min": min(k["min"] for k in kept)}
                              if kept else None)
    tot["per_component"] = qs
    return tot


def _quantized_bytes(info: dict | None) -> int | None:
    if not info or not info.get("component_bytes"):
        return None
    cb = info["component_bytes"]
    present = [cb[n] for n in COMPONENTS_TO_QUANTIZE if n in cb]
    return int(sum(present)) if present else None


def _per_frame_curves(rows: list[list[float]]) -> dict:
    """mean/min/max over videos of per-frame PSNR (all videos have the same frame count, checked earlier)."""
    arr = np.array(rows, dtype=np.float64)  # (videos, F)
    with np.errstate(invalid="ignore"):
        return {"mean": arr.mean(axis=0).tolist(), "min": arr.min(axis=0).tolist(), "max": arr.max(axis=0).tolist()}


def is_finite_number(x) -> bool:
    return x is not None and math.isfinite(float(x))
