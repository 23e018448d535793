"""Per-frame video metrics against a baseline: MSE, PSNR (scikit-image) and LPIPS (the ``lpips`` package).

Frames are ``uint8`` arrays of shape ``(F, H, W, 3)`` (see :func:`hyperquant_diffusers.eval.video.to_uint8_frames`).
PSNR is in dB with ``data_range=255``; identical frames have PSNR ``inf`` (MSE 0), which JSON cannot hold: see
:func:`json_number` for the representation used in ``results.json``.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio

#: Frames are 8-bit: the PSNR peak value.
DATA_RANGE = 255.0
#: AlexNet needs at least this many pixels on the short side for its five LPIPS layers; smaller frames are
#: upsampled (nearest, integer factor) before LPIPS, and the report says so.
LPIPS_MIN_SIDE = 64


class FramesMismatchError(ValueError):
    """Baseline and test videos that cannot be compared frame by frame."""


def check_same_shape(ref: np.ndarray, test: np.ndarray, what: str = "videos") -> None:
    """Raise :class:`FramesMismatchError` unless both are uint8 ``(F, H, W, 3)`` of equal shape."""
    for name, arr in (("baseline", ref), ("test", test)):
        if not isinstance(arr, np.ndarray) or arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise FramesMismatchError(
                f"{what}: {name} must be a uint8 array (frames, height, width, 3), got "
                f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}")
    if ref.shape != test.shape:
        raise FramesMismatchError(
            f"{what}: baseline has shape {ref.shape} (frames, H, W, C) but test has {test.shape}; "
            "both must come from the same --frames/--height/--width")


def per_frame_mse(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """``float64 (F,)`` mean squared error per frame, in (8-bit level)^2."""
    check_same_shape(ref, test)
    return np.array([mean_squared_error(r, t) for r, t in zip(ref, test)], dtype=np.float64)


def per_frame_psnr(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """``float64 (F,)`` PSNR in dB per frame via ``skimage.metrics.peak_signal_noise_ratio`` (data_range 255).

    A frame identical to its baseline gets ``inf`` (skimage would warn about the division by zero; we skip it).
    """
    check_same_shape(ref, test)
    out = np.empty(ref.shape[0], dtype=np.float64)
    for i, (r, t) in enumerate(zip(ref, test)):
        out[i] = math.inf if np.array_equal(r, t) else peak_signal_noise_ratio(r, t, data_range=DATA_RANGE)
    return out


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of an MSE in (8-bit level)^2; ``inf`` for 0."""
    return math.inf if mse <= 0 else 10.0 * math.log10(DATA_RANGE ** 2 / mse)


def to_lpips_tensor(frames: np.ndarray):
    """uint8 ``(N, H, W, 3)`` -> float32 torch ``(N, 3, H', W')`` in [-1, 1] (lpips' input convention).

    ``H', W'`` = ``H, W`` times the smallest integer factor that makes the short side >= :data:`LPIPS_MIN_SIDE`.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    factor = lpips_upsample_factor(frames.shape[1], frames.shape[2])
    if factor > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
    return x


def lpips_upsample_factor(height: int, width: int) -> int:
    """Integer nearest-neighbour upsampling factor applied before LPIPS (1 when the frame is large enough)."""
    return max(1, math.ceil(LPIPS_MIN_SIDE / max(1, min(height, width))))


def per_frame_lpips(model, ref: np.ndarray, test: np.ndarray, batch: int = 8, device: str = "cpu") -> np.ndarray:
    """``float64 (F,)`` LPIPS distance per frame; ``model`` is an ``lpips.LPIPS`` (see :mod:`.lpips_backbone`)."""
    import torch

    check_same_shape(ref, test)
    out = np.empty(ref.shape[0], dtype=np.float64)
    with torch.no_grad():
        for s in range(0, ref.shape[0], batch):
            a = to_lpips_tensor(ref[s:s + batch]).to(device)
            b = to_lpips_tensor(test[s:s + batch]).to(device)
            out[s:s + batch] = model(a, b).reshape(-1).double().cpu().numpy()
    # Identical inputs give exactly zero feature differences; keep that exact (no -0.0 / rounding noise).
    for i in range(ref.shape[0]):
        if np.array_equal(ref[i], test[i]):
            out[i] = 0.0
    return out


def summarize(values: np.ndarray) -> dict:
    """mean / min / max of per-frame values (``inf`` propagates into mean and max as it should)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("summarize: no values")
    with np.errstate(invalid="ignore"):
        return {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}


def json_number(x: float):
    """A float as ``results.json`` stores it: finite floats as numbers; ``inf``/``-inf``/``nan`` as the strings
    ``"inf"``/``"-inf"``/``"nan"`` (strict JSON has no Infinity; ``float(value)`` reads both forms back)."""
    if x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def from_json_number(x) -> float:
    """Inverse of :func:`json_number`."""
    return float(x)


def format_db(x: float, digits: int = 2) -> str:
    """Human text for a PSNR: ``"∞ (identical)"`` for inf."""
    x = float(x)
    return "∞ (identical)" if math.isinf(x) and x > 0 else f"{x:.{digits}f}"
