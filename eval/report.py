"""Write the report folder: ``results.json`` (all numbers), figures, ``index.html`` and ``README.md``.

HTML and Markdown show the same tables and figures; every number is read from ``results.json`` content.
"""

from __future__ import annotations

import html
import os

from . import figures
from .lora import lora_text
from .metrics import LPIPS_MIN_SIDE
from .store import write_json_atomic
from .video import load_frames_npy


def _num(x) -> float | None:
    return None if x is None else float(x)


def fmt_db(x) -> str:
    v = _num(x)
    if v is None:
        return "–"
    if v == float("inf"):
        return "∞ (identical)"
    return f"{v:.2f}"


def fmt_lpips(x) -> str:
    v = _num(x)
    return "–" if v is None else f"{v:.4f}"


def fmt_bytes(x) -> str:
    if x is None:
        return "–"
    x = float(x)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024


def fmt_num(x, spec=".2f", suffix="") -> str:
    v = _num(x)
    return "–" if v is None else f"{v:{spec}}{suffix}"


def summary_rows(results: dict) -> list[list[str]]:
    """Per-configuration table: header row first."""
    rows = [["config", "bits/scalar nominal", "quantized linears", "bits/scalar stored", "linears compression vs bf16",
             "transformer + text enc. compression vs baseline (baseline bytes ÷ bytes)", "mean PSNR [dB]", "min PSNR [dB]", "mean LPIPS", "s/step",
             "peak memory"]]
    for c in results["configs"]:
        agg = results["aggregate"].get(c["name"], {})
        ql = c.get("quantized_linears") or {}
        if c.get("error"):
            rows.append([c["name"], fmt_num(c["bits_per_scalar_nominal"], "g")] + ["FAILED (see above)"] + ["–"] * 8)
            continue
        rows.append([c["name"] + (" (baseline)" if c["is_baseline"] else ""),
                     fmt_num(c["bits_per_scalar_nominal"], "g"),
                     str(ql["lattice_linears"]) if ql else "0",
                     fmt_num(ql.get("bits_per_scalar_stored"), ".2f"),
                     fmt_num(ql.get("compression_stored_vs_bf16"), ".2f", "×"),
                     fmt_num(c["compression_vs_baseline"], ".2f", "×"),
                     fmt_db(agg.get("psnr_mean_db")) if agg else "ref", fmt_db(agg.get("psnr_min_db")) if agg else "ref",
                     fmt_lpips(agg.get("lpips_mean")) if agg else "ref",
                     fmt_num(c["seconds_per_step_mean"], ".3f"), fmt_bytes(c["peak_memory_bytes"])])
    return rows


def prompt_rows(results: dict) -> list[list[str]]:
    """Per-prompt table: prompt, seed, config, mean/min PSNR, mean LPIPS."""
    text = {p["id"]: p["text"] for p in results["prompts"]}
    rows = [["prompt", "seed", "config", "mean PSNR [dB]", "min PSNR [dB]", "mean LPIPS"]]
    for c in results["comparisons"]:
        rows.append([f"{c['prompt_id'].split('-')[0]}: {text.get(c['prompt_id'], '')}", str(c["seed"]), c["config"],
                     fmt_db(c["psnr_mean_db"]), fmt_db(c["psnr_min_db"]), fmt_lpips(c["lpips_mean"])])
    return rows


def notes(results: dict) -> list[str]:
    """Plain-language notes (model, LPIPS, noise) shown at the top of both reports."""
    out = []
    for name, msg in results.get("failures", {}).items():
        out.append(f"FAILED: configuration {name} could not load or run and is left out: {msg}")
    if results["model"]["random_weights"]:
        out.append("RANDOM WEIGHTS. " + results["model"]["note"])
    lp = results["lpips"]
    if lp["available"]:
        src = lp["backbone_source"]
        if not lp["reference_backbone"]:
            out.append(f"LPIPS uses an INJECTED, NON-REFERENCE AlexNet trunk ({src}); its numbers are not LPIPS.")
        else:
            out.append(f"LPIPS: AlexNet v0.1, trunk from {src}.")
        if lp.get("upsample_factor", 1) > 1:
            out.append(f"Frames are smaller than {LPIPS_MIN_SIDE} px: enlarged ×{lp['upsample_factor']} "
                       "(nearest) before LPIPS so AlexNet's five layers fit.")
    else:
        out.append(f"LPIPS not computed: {lp['unavailable_reason']}")
    for c in results["configs"]:
        kept = (c.get("quantized_linears") or {}).get("fused_lora_kept")
        if not kept:
            continue
        text = (f"{c['name']}: the fused LoRA's re-quantized codes keep at least {100 * kept['min']:.0f}% of its "
                f"weight change ({kept['layers']} layers).")
        if kept["min"] < 0.5:
            text = ("WARNING: " + text + " Where that is small the LoRA's change is below the codec's error at this "
                    "rate and rounded away: this configuration measures the model without most of the LoRA; "
                    "run without --fuse-lora to keep it.")
        out.append(text)
    same = results["same_initial_noise"]
    if same is True:
        out.append("Every configuration started from the same initial noise (checked: SHA-256 of the first "
                   "transformer input matches across configurations for each prompt and seed).")
    elif same is False:
        out.append("WARNING: initial noise differed between configurations for some prompt/seed "
                   "(SHA-256 of the first transformer input); PSNR then measures more than quantization.")
    return out


def settings_text(results: dict) -> str:
    s = results["settings"]
    return (f"model {s['model_id']}; {s['frames']} frames at {s['height']}×{s['width']}, {s['steps']} steps, "
            f"guidance {s['guidance_scale'] if s['guidance_scale'] is not None else 'pipeline default'}, "
            f"dtype {s['dtype']}, device {s['device']}, seeds {s['seeds']}, {s['num_processes']} process(es)"
            + (f"; HyperQuantConfig extras for every quantized config: {s['quant_kwargs']}" if s.get("quant_kwargs") else "")
            + (f"; {lora_text(s['lora'])}" if s.get("lora") else ""))


def _memory_kind(results: dict) -> str:
    kinds = {c["peak_memory_kind"] for c in results["configs"] if c["peak_memory_kind"]}
    text = {"cuda_max_allocated": "torch.cuda.max_memory_allocated during generation",
            "cpu_process_rss_sampled": "CPU: the process's resident memory, sampled every 20 ms during generation"}
    return "; ".join(text.get(k, k) for k in sorted(kinds)) or "not measured"


def _html_table(rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows[1:])
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _md_table(rows: list[list[str]]) -> str:
    esc = lambda v: v.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:16px 24px;color:#1d1d1f;line-height:1.45}
h1{font-size:1.5em;margin:.2em 0} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#555;font-size:.9em}
.warn{background:#fff4d6;border:1px solid #e6b800;border-radius:6px;padding:8px 12px;margin:10px 0;font-size:.92em}
.fail{background:#fde8e8;border:1px solid #d33;border-radius:6px;padding:8px 12px;margin:10px 0;font-size:.92em}
.note{background:#f3f6fa;border:1px solid #cdd8e4;border-radius:6px;padding:8px 12px;margin:10px 0;font-size:.92em}
table{border-collapse:collapse;font-size:.88em;margin:8px 0} th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f5f5f7} td:first-child,th:first-child{text-align:left} table.summary td:first-child{white-space:nowrap} tbody tr:nth-child(even){background:#fafafa}
img{max-width:100%;height:auto;image-rendering:pixelated} .fig{margin:8px 0}
.prompt{margin:14px 0 22px} .videos{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.videos figure{margin:0;text-align:center;font-size:.8em} video{width:160px;image-rendering:pixelated;background:#000}
code{background:#f1f1f1;padding:1px 4px;border-radius:3px}
"""


def write_report(out: str, results: dict, log=print) -> dict:
    """Write results.json, figures, index.html and README.md under ``out``; returns paths written."""
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    write_json_atomic(os.path.join(out, "results.json"), results)
    paths = {"results": "results.json"}
    paths["psnr_curves"] = os.path.relpath(
        figures.psnr_curves(results, os.path.join(out, "figures", "psnr_per_frame.png")), out) if results["aggregate"] else None
    lp = figures.lpips_bars(results, os.path.join(out, "figures", "lpips_per_prompt.png")) if results["comparisons"] else None
    paths["lpips_bars"] = os.path.relpath(lp, out) if lp else None
    base = results["configs"][0]["name"]
    vid = {(v["config"], v["prompt_id"], v["seed"]): v for v in results["videos"]}
    strips = []
    text = {p["id"]: p["text"] for p in results["prompts"]}
    loaded = []
    for p in results["prompts"]:
        for seed in results["settings"]["seeds"]:
            b = vid.get((base, p["id"], seed))
            if b is None:
                continue
            ref = load_frames_npy(os.path.join(out, b["frames_file"]))
            tests = [(c["name"], load_frames_npy(os.path.join(out, vid[(c["name"], p["id"], seed)]["frames_file"])))
                     for c in results["configs"][1:] if (c["name"], p["id"], seed) in vid]
            loaded.append((p, seed, ref, tests))
    gain = figures.choose_gain((ref[i], t[i]) for _, _, ref, tests in loaded for _, t in tests
                               for i in figures.sample_indices(ref.shape[0]))
    for p, seed, ref, tests in loaded:
        png = figures.strip(ref, tests, os.path.join(out, "figures", f"strip-{p['id']}-s{seed}.png"),
                            title=f"{p['id'].split('-')[0]} seed {seed}: {text[p['id']]}", baseline_name=base, gain=gain)
        strips.append({"prompt_id": p["id"], "seed": seed, "png": os.path.relpath(png, out),
                       "videos": [(name, vid[(name, p["id"], seed)]["video_file"])
                                  for name in [base] + [t[0] for t in tests]]})
    paths["strips"] = strips
    paths["error_gain"] = gain
    _write_html(out, results, paths)
    _write_md(out, results, paths)
    return paths


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_html(out: str, results: dict, paths: dict) -> None:
    e = html.escape
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>HyperQuant evaluation</title>"
             f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head><body>",
             "<h1>HyperQuant evaluation</h1>",
             f"<div class=meta>{e(settings_text(results))}; created {e(results['created_utc'])}; "
             f"<a href='results.json'>results.json</a> holds every number.</div>"]
    for n in notes(results):
        cls = ("fail" if n.startswith("FAILED") else
               "warn" if n.startswith(("RANDOM", "WARNING", "LPIPS not", "LPIPS uses an INJECTED")) else "note")
        parts.append(f"<div class={cls}>{e(n)}</div>")
    parts += ["<h2>Configurations</h2>", _html_table(summary_rows(results), "summary"),
              "<p class=meta><i>bits/scalar stored</i> and <i>linears compression</i>: the quantized linear layers' "
              "compressed tensors (Rice stream and side information) against their bf16 weights. <i>Compression "
              "vs baseline</i>: the baseline's bytes ÷ this configuration's bytes (1.10× means 10% smaller), the whole "
              "transformer + text encoder as loaded (layers left in float included; int8 "
              "residency keeps decoded codes in memory). Peak memory: the largest over this configuration's videos "
              f"({e(_memory_kind(results))}).</p>",
              "<h2>Per prompt</h2>", _html_table(prompt_rows(results), "prompts")]
    parts.append("<h2>Per-frame PSNR</h2>")
    if paths["psnr_curves"]:
        parts.append(f"<div class=fig><img src='{e(paths['psnr_curves'])}' alt='per-frame PSNR curves'></div>")
    parts.append("<h2>Per-prompt LPIPS</h2>")
    if paths["lpips_bars"]:
        parts.append(f"<div class=fig><img src='{e(paths['lpips_bars'])}' alt='per-prompt LPIPS bars'></div>")
    else:
        parts.append(f"<div class=warn>No LPIPS bars: {e(results['lpips']['unavailable_reason'] or 'no comparisons')}</div>")
    parts.append(f"<h2>Sample frames</h2><p class=meta>Rows: baseline, then for each configuration its frames and "
                 f"the error map |quantized − baseline| (mean over RGB, ×{paths['error_gain']}, inferno colour map; "
                 f"white = {255 / paths['error_gain']:.3g} or more 8-bit levels; one gain for the whole report).</p>")
    text = {p["id"]: p["text"] for p in results["prompts"]}
    for s in paths["strips"]:
        parts.append(f"<div class=prompt><h3>{e(s['prompt_id'].split('-')[0])} · seed {s['seed']} · "
                     f"“{e(text[s['prompt_id']])}”</h3><img src='{e(s['png'])}' alt='sample frames'>"
                     "<div class=videos>")
        for name, f in s["videos"]:
            if f.endswith(".mp4"):
                parts.append(f"<figure><video src='{e(f)}' controls loop muted playsinline></video>"
                             f"<figcaption>{e(name)}</figcaption></figure>")
            else:
                parts.append(f"<figure><img src='{e(f)}' width=160 alt='{e(name)}'><figcaption>{e(name)}</figcaption></figure>")
        parts.append("</div></div>")
    parts.append(f"<h2>Notes</h2><p class=meta>{e(results['number_format'])}</p></body></html>")
    _write_text(os.path.join(out, "index.html"), "\n".join(parts))


def _write_md(out: str, results: dict, paths: dict) -> None:
    lines = ["# HyperQuant evaluation", "", settings_text(results) + ". Every number is in `results.json`.", ""]
    for n in notes(results):
        lines += [("> **" + n.split(".")[0] + ".**" + ".".join(n.split(".")[1:])) if n.startswith("RANDOM") else "> " + n, ""]
    lines += ["## Configurations", "", _md_table(summary_rows(results)), "",
              "bits/scalar stored and linears compression: the quantized linears' compressed tensors against bf16. "
              "Compression vs baseline: the baseline's bytes ÷ this configuration's bytes, the whole transformer + text encoder as loaded (1.10× means 10% smaller). Peak memory: " + _memory_kind(results) + ".",
              "", "## Per prompt", "", _md_table(prompt_rows(results)), "", "## Per-frame PSNR", ""]
    if paths["psnr_curves"]:
        lines += [f"![per-frame PSNR]({paths['psnr_curves']})", ""]
    lines += ["## Per-prompt LPIPS", ""]
    lines += [f"![per-prompt LPIPS]({paths['lpips_bars']})" if paths["lpips_bars"]
              else f"No LPIPS: {results['lpips']['unavailable_reason']}", ""]
    lines += ["## Sample frames", "",
              f"Baseline, then per configuration its frames and |quantized − baseline| ×{paths['error_gain']} "
              "(mean over RGB; one gain for the whole report).", ""]
    text = {p["id"]: p["text"] for p in results["prompts"]}
    for s in paths["strips"]:
        vids = ", ".join(f"[{name}]({f})" for name, f in s["videos"])
        lines += [f"### {s['prompt_id'].split('-')[0]} · seed {s['seed']}: {text[s['prompt_id']]}", "",
                  f"![sample frames]({s['png']})", "", f"Videos: {vids}", ""]
    lines += ["## Number format", "", results["number_format"], ""]
    _write_text(os.path.join(out, "README.md"), "\n".join(lines))
