"""Report figures (matplotlib, Agg, PNG): per-frame PSNR curves, per-prompt LPIPS bars, sample-frame strips.

All figures are drawn from ``results.json`` content and the stored frames; none computes a metric itself,
except the error maps, which are pictures (|quantized - baseline|, averaged over RGB, times :data:`ERROR_GAIN`).
"""

from __future__ import annotations

import math

import numpy as np

#: Error maps show |quantized - baseline| (8-bit levels, mean over RGB) times a gain, clipped to 255. The gain is
#: one power of two for the whole report (comparable strips), chosen by :func:`choose_gain`, at most MAX_GAIN.
ERROR_GAIN = 8
MAX_GAIN = 256
#: Strips show at most this many frames per video, evenly spaced (first and last included).
STRIP_FRAMES = 4
#: Frames smaller than this (short side, pixels) are enlarged by nearest-neighbour in the strips.
STRIP_MIN_SIDE = 128
DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def psnr_curves(results: dict, path: str) -> str:
    """Per-frame PSNR, mean over (prompt, seed) with a min-max band, one line per configuration."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=DPI)
    notes = []
    for k, (name, agg) in enumerate(results["aggregate"].items()):
        curves = {key: np.array([_num(v) for v in vals]) for key, vals in agg["per_frame_psnr_db"].items()}
        x = np.arange(1, len(curves["mean"]) + 1)
        color = f"C{k}"
        if np.all(np.isinf(curves["mean"])):
            notes.append(f"{name}: identical to baseline (PSNR ∞), not drawn")
            continue
        finite = lambda a: np.where(np.isfinite(a), a, np.nan)  # noqa: E731  (∞ frames are gaps)
        ax.fill_between(x, finite(curves["min"]), finite(curves["max"]), color=color, alpha=0.18, linewidth=0)
        ax.plot(x, finite(curves["mean"]), color=color, marker="o", markersize=3, label=f"{name} (mean, band = min–max)")
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR vs baseline [dB]")
    n = len(results["comparisons"]) // max(1, len(results["aggregate"]))
    ax.set_title(f"Per-frame PSNR against {results['configs'][0]['name']}, over {n} video(s)", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    if notes:
        ax.text(0.01, 0.02, "\n".join(notes), transform=ax.transAxes, fontsize=8, va="bottom")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def lpips_bars(results: dict, path: str) -> str | None:
    """Mean LPIPS per prompt (grouped by configuration); ``None`` when LPIPS is unavailable."""
    if not results["lpips"]["available"]:
        return None
    plt = _plt()
    names = list(results["aggregate"])
    keys = [(p["id"], s) for p in results["prompts"] for s in results["settings"]["seeds"]]
    table = {(c["config"], c["prompt_id"], c["seed"]): _num(c["lpips_mean"]) for c in results["comparisons"]}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(keys) + 2), 3.4), dpi=DPI)
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        vals = [table.get((name, pid, s), np.nan) for pid, s in keys]
        ax.bar(np.arange(len(keys)) + (k - (len(names) - 1) / 2) * width, vals, width, label=name, color=f"C{k}")
    ax.set_xticks(np.arange(len(keys)))
    multi_seed = len(results["settings"]["seeds"]) > 1
    ax.set_xticklabels([pid.split("-")[0] + (f" s{s}" if multi_seed else "") for pid, s in keys], fontsize=8)
    ax.set_ylabel("mean LPIPS (lower is closer)")
    ax.set_title("Per-prompt LPIPS against the baseline", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_indices(num_frames: int, count: int = STRIP_FRAMES) -> list[int]:
    """Evenly spaced frame indices, first and last included."""
    if num_frames <= count:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)})


def choose_gain(pairs) -> int:
    """Largest power of two (1..MAX_GAIN) that keeps the 99th percentile of |test - ref| (mean over RGB) of all
    ``(ref, test)`` frame pairs at or below 80% of full scale — so small errors are visible and large ones
    saturate only in their top 1%."""
    p99 = 0.0
    for ref, test in pairs:
        err = np.abs(test.astype(np.float32) - ref.astype(np.float32)).mean(axis=-1)
        p99 = max(p99, float(np.percentile(err, 99)))
    if p99 <= 0:
        return ERROR_GAIN
    return int(min(MAX_GAIN, max(1, 2 ** math.floor(math.log2(0.8 * 255.0 / p99)))))


def error_map(ref: np.ndarray, test: np.ndarray, gain: int = ERROR_GAIN) -> np.ndarray:
    """``float (H, W)`` in [0, 1]: mean over RGB of |test - ref| in 8-bit levels, times ``gain``, over 255."""
    err = np.abs(test.astype(np.float32) - ref.astype(np.float32)).mean(axis=-1)
    return np.clip(err * gain / 255.0, 0.0, 1.0)


def strip(baseline: np.ndarray, tests: list[tuple[str, np.ndarray]], path: str, title: str,
          baseline_name: str = "bf16", gain: int = ERROR_GAIN) -> str:
    """One PNG: a row of baseline frames, then per configuration a row of its frames and a row of error maps."""
    plt = _plt()
    idx = sample_indices(baseline.shape[0])
    rows = [(f"{baseline_name}\n(baseline)", [baseline[i] for i in idx], False)]
    for name, frames in tests:
        rows.append((name, [frames[i] for i in idx], False))
        rows.append((f"|{name} − base|\n×{gain}", [error_map(baseline[i], frames[i], gain) for i in idx], True))
    h, w = baseline.shape[1:3]
    scale = max(1, math.ceil(STRIP_MIN_SIDE / min(h, w)))
    cell_w, cell_h = w * scale / DPI, h * scale / DPI
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(1.3 + cell_w * len(idx) * 1.05, 0.45 + cell_h * len(rows) * 1.08),
                             dpi=DPI, squeeze=False)
    for r, (label, images, is_err) in enumerate(rows):
        for c, img in enumerate(images):
            ax = axes[r][c]
            if is_err:
                ax.imshow(img, cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {idx[c] + 1}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
