"""On-disk store of generated videos, so re-running an evaluation resumes instead of regenerating.

Layout under the output folder::

    videos/<config>/<prompt_id>-s<seed>.npy    uint8 (F, H, W, 3) frames (the numbers metrics are computed from)
    videos/<config>/<prompt_id>-s<seed>.mp4    the same frames as a video (GIF when ffmpeg is unavailable)
    videos/<config>/<prompt_id>-s<seed>.json   metadata; written LAST, so its presence marks a finished video

A stored video is reused only if its ``fingerprint`` (model, configuration, prompt, seed and every generation
setting) equals the requested one; otherwise it is regenerated and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

import numpy as np

from .video import load_frames_npy, save_frames_npy, write_video

STORE_VERSION = 1


def prompt_id(index: int, text: str) -> str:
    """A stable, file-name-safe id: position, a slug of the first words, and 8 hex of the text's SHA-1."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:32].rstrip("-") or "prompt"
    return f"p{index:02d}-{slug}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def write_json_atomic(path: str, obj) -> None:
    """Write JSON through a temp file + rename (never a half-written file). Rejects NaN/Infinity (strict JSON)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, allow_nan=False, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_sha256(path: str) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(payload: dict) -> str:
    """SHA-256 of the canonical JSON of ``payload`` (what must match for a stored video to be reused)."""
    blob = json.dumps({"store_version": STORE_VERSION, **payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class VideoStore:
    """Finished videos under ``root/videos``; see the module docstring."""

    def __init__(self, root: str, fps: float = 24.0):
        self.root, self.fps = root, fps

    def stem(self, config: str, pid: str, seed: int) -> str:
        return os.path.join(self.root, "videos", config, f"{pid}-s{seed}")

    def load(self, config: str, pid: str, seed: int, fp: str):
        """``(frames, meta)`` of a finished video with fingerprint ``fp``, else ``None``."""
        stem = self.stem(config, pid, seed)
        if not (os.path.isfile(stem + ".json") and os.path.isfile(stem + ".npy")):
            return None
        try:
            meta = read_json(stem + ".json")
        except (OSError, ValueError):
            return None
        if meta.get("fingerprint") != fp:
            return None
        frames = load_frames_npy(stem + ".npy")
        if list(frames.shape) != meta.get("frames_shape"):
            return None
        return frames, meta

    def save(self, config: str, pid: str, seed: int, fp: str, frames: np.ndarray, meta: dict) -> dict:
        """Store frames, video, then the metadata (the completion marker). Returns the metadata written."""
        stem = self.stem(config, pid, seed)
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        if os.path.exists(stem + ".json"):  # about to overwrite a stale video: unmark it first
            os.unlink(stem + ".json")
        save_frames_npy(stem + ".npy", frames)
        video_path = write_video(stem + ".mp4", frames, fps=self.fps)
        meta = {**meta, "fingerprint": fp, "frames_shape": list(frames.shape),
                "frames_file": os.path.relpath(stem + ".npy", self.root),
                "video_file": os.path.relpath(video_path, self.root)}
        write_json_atomic(stem + ".json", meta)
        return meta
