"""Frames in, files out: normalize pipeline output to uint8 frames, write mp4 (imageio-ffmpeg) or GIF, and
save/load raw frames as ``.npy``. Every write goes to a temporary file first and is renamed into place."""

from __future__ import annotations

import os
import tempfile

import numpy as np


def to_uint8_frames(video) -> np.ndarray:
    """Pipeline output for ONE video -> ``uint8 (F, H, W, 3)``.

    Accepts a torch tensor or numpy array shaped ``(F, H, W, C)`` or ``(F, C, H, W)`` (C = 3, or 1 -> gray
    repeated), float in [0, 1] or uint8, or a list of PIL images. Floats are clipped to [0, 1] and rounded.
    """
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("to_uint8_frames: empty frame list")
        video = np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in video])
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    arr = np.asarray(video)
    if arr.ndim != 4:
        raise ValueError(f"to_uint8_frames: expected 4 dims (frames, H, W, C) or (frames, C, H, W), got {arr.shape}")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[1] in (1, 3, 4):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    elif arr.shape[-1] != 3:
        raise ValueError(f"to_uint8_frames: cannot find a channel axis of size 1/3/4 in shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0)
    return np.ascontiguousarray(np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8))


def _tmp_path(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    stem, ext = os.path.splitext(base)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=d)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; reports are meant to be served and shared
    return tmp


def save_frames_npy(path: str, frames: np.ndarray) -> None:
    """Atomically save ``uint8 (F, H, W, 3)`` frames."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, frames, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_frames_npy(path: str) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: expected uint8 (frames, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p (what players understand) needs even width and height: replicate the last row/column."""
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def write_video(path: str, frames: np.ndarray, fps: float = 24.0) -> str:
    """Write ``uint8 (F, H, W, 3)`` frames; returns the path written.

    ``.mp4``: H.264 through imageio-ffmpeg's bundled ffmpeg; if that fails (no ffmpeg), falls back to a GIF next
    to it (same stem, ``.gif``). ``.gif``: written with imageio's pillow plugin.
    """
    import imageio.v2 as imageio

    ext = os.path.splitext(path)[1].lower()
    if ext not in (".mp4", ".gif"):
        raise ValueError(f"write_video: {path!r}: use a .mp4 or .gif file name")
    if ext == ".mp4":
        tmp = _tmp_path(path)
        try:
            writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                        pixelformat="yuv420p", macro_block_size=1, quality=8,
                                        ffmpeg_log_level="error")
            with writer:
                for frame in _pad_even(frames):
                    writer.append_data(frame)
            os.replace(tmp, path)
            return path
        except Exception:  # no usable ffmpeg: fall back to GIF, which needs nothing beyond pillow
            path = os.path.splitext(path)[0] + ".gif"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    tmp = _tmp_path(path)
    try:
        imageio.mimsave(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
