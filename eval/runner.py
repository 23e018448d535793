"""Evaluate one shard of (prompt, seed) jobs: generate the baseline and every configuration (resuming finished
videos), then compute per-frame metrics of each configuration against the baseline.

The model side is behind a small backend interface (:class:`PipelineBackend` for diffusers pipelines) so that
the harness logic — resume, metrics, shard files — is the same whatever produces the frames.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import os
import time

import numpy as np

from . import metrics as M
from .configs import EvalConfig
from .pipeline import GenerationResult
from .store import VideoStore, fingerprint, read_json, write_json_atomic


@dataclass
class Settings:
    """Everything that determines a generated video besides the configuration, prompt and seed."""

    model_id: str
    embedded: bool
    frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float | None = None
    negative_prompt: str | None = ""
    max_sequence_length: int | None = None
    frame_rate: float | None = 24.0
    dtype: str = "bf16"
    device: str = "cpu"
    quant_kwargs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    #: the transformer compiled with torch.compile (frames can differ from eager by float rounding)
    compile: bool = False
    #: a LoRA loaded into every configuration (:func:`.lora.describe_lora`), or None
    lora: dict | None = None

    def generation_kwargs(self) -> dict:
        return {"frames": self.frames, "height": self.height, "width": self.width, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt,
                "max_sequence_length": self.max_sequence_length, "frame_rate": self.frame_rate,
                "extra": dict(self.extra)}

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Job:
    """One (prompt, seed) pair. ``pid`` is :func:`store.prompt_id`."""

    pid: str
    prompt: str
    seed: int


class PipelineBackend:
    """Generates with diffusers pipelines loaded from ``model_path`` (see :mod:`.pipeline`)."""

    def __init__(self, model_path: str, settings: Settings):
        self.model_path, self.settings = model_path, settings

    def load(self, config: EvalConfig):
        from .pipeline import component_bytes, load_pipeline, quant_stats

        t = time.perf_counter()
        pipe = load_pipeline(self.model_path, config, dtype=self.settings.dtype, device=self.settings.device,
                             quant_overrides=self.settings.quant_kwargs, compile=self.settings.compile,
                             lora=self.settings.lora)
        info = {"load_seconds": time.perf_counter() - t, "component_bytes": component_bytes(pipe),
                "quant_stats": quant_stats(pipe)}
        return pipe, info

    def generate(self, handle, job: Job) -> GenerationResult:
        from .pipeline import generate

        return generate(handle, prompt=job.prompt, seed=job.seed, **self.settings.generation_kwargs())

    def unload(self, handle) -> None:
        from .pipeline import free_memory

        del handle
        free_memory()


def settings_fingerprint_payload(settings: Settings) -> dict:
    """Settings as they identify a video: the device TYPE only (cuda:0 and cuda:3 give the same frames, so a
    resumed run on another number of GPUs reuses videos); ``compile`` and ``lora`` only when set (videos stored
    before those options existed keep their fingerprints)."""
    payload = settings.to_json()
    payload["device"] = str(payload["device"]).split(":")[0]
    for key in ("compile", "lora"):
        if not payload.get(key):
            payload.pop(key, None)
    return payload


def video_fingerprint(settings: Settings, config: EvalConfig, job: Job) -> str:
    return fingerprint({"settings": settings_fingerprint_payload(settings), "config": config.to_json(),
                        "prompt": job.prompt, "seed": job.seed})


def config_info_path(out: str, config: EvalConfig) -> str:
    return os.path.join(out, "videos", config.name, "_config.json")


def run_shard(out: str, jobs: list[Job], configs: list[EvalConfig], backend, settings: Settings, lpips_info=None,
              progress=None, log=print, resume: bool = True) -> dict:
    """Generate (or resume) every configuration for ``jobs`` and measure them against ``configs[0]`` (the
    baseline). Returns the shard record (see :func:`report.build_results` for how shards become results.json).

    ``progress``: optional callable(n) advanced once per finished video.
    A non-baseline configuration that raises while loading or generating is recorded in ``failures``
    (name -> "ExceptionType: message") and left out; a failing baseline raises.
    """
    if not configs or not configs[0].is_baseline:
        raise ValueError("run_shard: configs[0] must be the bf16 baseline")
    store = VideoStore(out, fps=settings.frame_rate or 24.0)
    frames: dict[tuple[str, str, int], np.ndarray] = {}
    videos: list[dict] = []
    config_info: dict[str, dict] = {}
    counts = {"generated": 0, "resumed": 0}
    failures: dict[str, str] = {}
    for config in configs:
        todo = []
        for job in jobs:
            fp = video_fingerprint(settings, config, job)
            hit = store.load(config.name, job.pid, job.seed, fp) if resume else None
            if hit is None:
                todo.append((job, fp))
            else:
                frames[(config.name, job.pid, job.seed)] = hit[0]
                videos.append(hit[1])
                counts["resumed"] += 1
                if progress:
                    progress(1)
        info_file = config_info_path(out, config)
        cfg_fp = fingerprint({"settings": settings_fingerprint_payload(settings), "config": config.to_json()})
        info = read_json(info_file) if (resume and os.path.isfile(info_file)) else None
        if info is not None and info.get("fingerprint") != cfg_fp:
            info = None
        try:
            if todo or (info is None and jobs):
                handle, load_info = backend.load(config)
                try:
                    info = {**load_info, "fingerprint": cfg_fp, "config": config.to_json()}
                    write_json_atomic(info_file, info)
                    for job, fp in todo:
                        log(f"[{config.name}] generating {job.pid} seed {job.seed}")
                        res = backend.generate(handle, job)
                        expect = (settings.frames, settings.height, settings.width, 3)
                        if res.frames.shape != expect:
                            log(f"[{config.name}] note: pipeline returned frames {res.frames.shape}, requested {expect}")
                        meta = {"config": config.name, "prompt_id": job.pid, "prompt": job.prompt, "seed": job.seed,
                                "seconds_per_step": res.seconds_per_step, "seconds_total": res.seconds_total,
                                "peak_memory_bytes": res.peak_memory_bytes, "peak_memory_kind": res.peak_memory_kind,
                                "initial_noise_sha256": res.initial_noise_sha256}
                        meta = store.save(config.name, job.pid, job.seed, fp, res.frames, meta)
                        frames[(config.name, job.pid, job.seed)] = res.frames
                        videos.append(meta)
                        counts["generated"] += 1
                        if progress:
                            progress(1)
                finally:
                    backend.unload(handle)
                    handle = None
        except Exception as exc:  # one configuration that cannot load/run must not sink the whole evaluation
            if config.is_baseline:
                raise
            failures[config.name] = f"{type(exc).__name__}: {exc}"
            log(f"[{config.name}] FAILED, left out of the report's numbers: {failures[config.name]}")
            for key in [k for k in frames if k[0] == config.name]:
                del frames[key]
            videos[:] = [v for v in videos if v["config"] != config.name]
            continue
        if info is not None:
            config_info[config.name] = info
    baseline = configs[0].name
    comparisons = []
    for config in configs[1:]:
        if config.name in failures:
            continue
        for job in jobs:
            ref = frames[(baseline, job.pid, job.seed)]
            test = frames[(config.name, job.pid, job.seed)]
            M.check_same_shape(ref, test, what=f"{config.name} vs {baseline} on {job.pid} seed {job.seed}")
            psnr = M.per_frame_psnr(ref, test)
            mse = M.per_frame_mse(ref, test)
            lp = (M.per_frame_lpips(lpips_info.model, ref, test) if lpips_info is not None and lpips_info.available
                  else None)
            comparisons.append({
                "config": config.name, "prompt_id": job.pid, "seed": job.seed, "num_frames": int(ref.shape[0]),
                "psnr_db": [M.json_number(v) for v in psnr], "mse": [M.json_number(v) for v in mse],
                "lpips": None if lp is None else [M.json_number(v) for v in lp],
                "psnr_video_db": M.json_number(M.psnr_from_mse(float(np.mean(mse)))),
            })
    return {"videos": videos, "config_info": config_info, "comparisons": comparisons, "counts": counts,
            "failures": failures}
