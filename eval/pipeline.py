"""Load a (quantized) video pipeline and generate one video with timing, memory and an initial-noise fingerprint.

* :func:`default_model_path` builds the embedded default — the tiny LTX-2 pipeline with RANDOM weights from
  :func:`hyperquant_diffusers.testing.tiny.build_tiny_ltx2_pipeline` — once into a cache folder (offline).
* :func:`load_pipeline` loads any diffusers video pipeline; quantized configurations go through
  ``diffusers.PipelineQuantizationConfig(quant_backend="hyperquant", quant_kwargs=..., components_to_quantize=...)``.
* :func:`generate` runs it with a CPU ``torch.Generator`` seeded with ``seed`` so that every configuration starts
  from the same initial noise (the SHA-256 of the first transformer input is recorded to prove it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import gc
import hashlib
import inspect
import os
import shutil
import tempfile
import threading
import time

import numpy as np

from .configs import EvalConfig
from .video import to_uint8_frames

#: Components HyperQuant quantizes (the issue: transformer and text encoder).
COMPONENTS_TO_QUANTIZE = ("transformer", "text_encoder")
#: Bumped when the embedded default changes, so a stale cached copy is not reused.
EMBEDDED_VERSION = 1
EMBEDDED_MODEL_ID = f"embedded:tiny-ltx2-random-v{EMBEDDED_VERSION}"
EMBEDDED_NOTE = ("The embedded default model is a tiny LTX-2 pipeline (2 transformer blocks, inner dim 64, tiny "
                 "Gemma-3 text encoder) with RANDOM weights, built offline. Its videos are noise-like patterns, not "
                 "real content: the numbers show that the harness and the quantization path work end to end, "
                 "not the quality HyperQuant gives on a trained LTX-2 checkpoint. Pass --model for real results.")
#: Generation settings of the embedded default (small enough for a few minutes on 2 CPU cores).
EMBEDDED_SETTINGS = {"frames": 9, "height": 32, "width": 32, "steps": 2, "guidance_scale": 1.0,
                     "max_sequence_length": 16, "frame_rate": 24.0}
#: HyperQuantConfig kwargs of the embedded default. Its attention heads are 16 wide, so K/V need an RHT tile of
#: 16 (the backend's default, 128, cannot rotate them); with tile 16 every 64-wide linear would qualify, and
#: quantizing ~70 layers takes minutes on a loaded 2-core CPU, so only layers with >= 16384 weights (the
#: feed-forward projections) are quantized, which keeps the first command to a few minutes.
EMBEDDED_QUANT_KWARGS = {"tile_size": 16, "min_weight_numel": 16384}
#: Pipeline-call extras for the embedded default: no spatio-temporal / modality guidance, so one transformer
#: pass per step (3x faster on CPU); a user's --pipeline-kwargs override these.
EMBEDDED_EXTRA = {"stg_scale": 0.0, "audio_stg_scale": 0.0, "modality_scale": 1.0, "audio_modality_scale": 1.0}
#: Defaults for a user model (LTX-2 sizes from the issue).
MODEL_SETTINGS = {"frames": 49, "height": 512, "width": 768, "steps": 30, "guidance_scale": None,
                  "max_sequence_length": None, "frame_rate": 24.0}


class BackendUnavailableError(RuntimeError):
    """A configuration needs a part of hyperquant_diffusers that is not importable here."""


def default_cache_dir() -> str:
    base = os.environ.get("HYPERQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hyperquant_diffusers")
    return base


def default_model_path(cache_dir: str | None = None) -> str:
    """Path of the embedded tiny LTX-2 pipeline, built (offline, random weights) on first use.

    Built into a temporary sibling folder and renamed into place, so a crash never leaves half a model; two
    processes racing both build and one rename wins.
    """
    root = cache_dir or default_cache_dir()
    path = os.path.join(root, f"tiny-ltx2-random-v{EMBEDDED_VERSION}")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    from hyperquant_diffusers.testing.tiny import build_tiny_ltx2_pipeline

    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-ltx2-", dir=root)
    try:
        build_tiny_ltx2_pipeline(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race; its copy is complete (it renamed a finished folder)
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def torch_dtype(name: str):
    import torch

    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"--dtype {name!r}: choose one of {sorted(table)}")
    return table[name]


def kv_available() -> bool:
    """Whether the K/V compression of issue 5 (``hyperquant_diffusers.kv.enable_kv_compression``) is importable."""
    try:
        from hyperquant_diffusers.kv import enable_kv_compression  # noqa: F401
    except ImportError:
        return False
    return True


def quantization_config(config: EvalConfig, components=COMPONENTS_TO_QUANTIZE, overrides: dict | None = None):
    """The ``PipelineQuantizationConfig`` for ``config`` (``None`` for the baseline); ``overrides`` are extra
    ``HyperQuantConfig`` kwargs applied to every quantized configuration (e.g. ``tile_size``)."""
    if config.is_baseline:
        return None
    try:
        import hyperquant_diffusers

        hyperquant_diffusers.HyperQuantConfig  # noqa: B018  (registers the "hyperquant" backend on import)
    except (ImportError, AttributeError) as exc:
        import hyperquant_diffusers

        hint = ("; hyperquant_diffusers was imported as a namespace package, without running its __init__ (a stale "
                "editable install: run `pip install -e .` again in the repository)"
                if getattr(hyperquant_diffusers, "__file__", None) is None else "")
        raise BackendUnavailableError(
            f"config {config.name!r} needs the HyperQuant diffusers backend (hyperquant_diffusers.HyperQuantConfig), "
            f"which is not importable here: {exc}{hint}") from exc
    if config.uses_kv and not kv_available():
        raise BackendUnavailableError(
            f"config {config.name!r} needs hyperquant_diffusers.kv.enable_kv_compression (K/V quantization), "
            "which is not importable here")
    from diffusers import PipelineQuantizationConfig

    kwargs = {**dict(overrides or {}), **dict(config.quant_kwargs)}
    return PipelineQuantizationConfig(quant_backend="hyperquant", quant_kwargs=kwargs,
                                      components_to_quantize=list(components))


def compile_transformer(pipe, *, fullgraph: bool = True) -> None:
    """Compile ``pipe.transformer`` in place with ``torch.compile`` (Inductor): its repeated blocks
    (``compile_repeated_blocks``, one compiled block serves them all) when the model declares them, else the whole
    module. HyperQuant layers and the K/V compression steps enter the graph as one op each
    (``hyperquant_diffusers.nn.compiled_op``, ``hyperquant_diffusers.kv.compiled_ops``), so ``fullgraph=True``
    holds for every configuration. Compilation happens on the first transformer call."""
    tr = getattr(pipe, "transformer", None)
    if tr is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer to compile")
    if getattr(tr, "_repeated_blocks", None):
        tr.compile_repeated_blocks(fullgraph=fullgraph)
    else:
        tr.compile(fullgraph=fullgraph)


def load_pipeline(model: str, config: EvalConfig, *, dtype: str = "bf16", device: str = "cpu",
                  quant_overrides: dict | None = None, compile: bool = False, lora: dict | None = None):
    """Load ``model`` (folder or hub id) with ``config``'s quantization; returns the pipeline on ``device``, with
    ``lora`` (:func:`.lora.describe_lora`) loaded when given, its transformer compiled
    (:func:`compile_transformer`) when ``compile``.

    On CUDA the weights load straight onto the GPU (``device_map="cuda"`` after selecting ``device``), so the
    backend quantizes there instead of on the CPU; if diffusers refuses that map for this pipeline, it loads on
    the CPU and moves (slower quantization, same result) and says so on stderr.
    """
    import sys

    import torch
    from diffusers import DiffusionPipeline

    qc = quantization_config(config, overrides=quant_overrides)
    kwargs = {"dtype": torch_dtype(dtype)}
    if qc is not None:
        kwargs["quantization_config"] = qc
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise FileNotFoundError(f"--model {model!r}: folder has no model_index.json (not a diffusers pipeline)")
    pipe = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))
        try:
            pipe = DiffusionPipeline.from_pretrained(model, device_map="cuda", **kwargs)
        except (ValueError, NotImplementedError, TypeError) as exc:
            print(f"note: loading {model} with device_map='cuda' failed ({type(exc).__name__}: {exc}); loading on "
                  "the CPU and moving it", file=sys.stderr)
    if pipe is None:
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    pipe.to(device)
    if lora is not None:
        from .lora import apply_lora

        apply_lora(pipe, lora)
    if compile:
        compile_transformer(pipe)
    return pipe


def component_bytes(pipe) -> dict:
    """Bytes held by each nn.Module component (``get_memory_footprint()`` where the model defines it, else
    parameters + buffers), plus, for components holding HyperQuant ``LatticeLinear`` layers, ``quant_stats``."""
    import torch

    out = {}
    for name, comp in getattr(pipe, "components", {}).items():
        if not isinstance(comp, torch.nn.Module):
            continue
        if hasattr(comp, "get_memory_footprint"):
            out[name] = int(comp.get_memory_footprint())
        else:
            out[name] = int(sum(t.nelement() * t.element_size() for t in list(comp.parameters()) + list(comp.buffers())))
    return out


def quant_stats(pipe) -> dict:
    """Per component with quantized linears: ``{"lattice_linears", "quantized_params", "stored_bytes",
    "resident_bytes", "dense_bf16_bytes", "fused_lora_kept"}``. ``stored_bytes``: the compressed checkpoint
    tensors (Rice stream + side information, bias excluded), from the layer's buffer shapes (no re-encoding); ``resident_bytes``: what the
    layers hold in memory now (int8 residency keeps decoded codes); ``dense_bf16_bytes``: 2 bytes per weight;
    ``fused_lora_kept``: for a component with a fused LoRA (``--fuse-lora``), ``{"layers", "min", "median"}`` of
    the fraction of the adapter's weight change its re-quantized codes keep
    (:func:`hyperquant_diffusers.nn.lora.fused_lora_retained`), else None."""
    import torch

    try:
        from hyperquant_diffusers.nn.lattice_linear import LatticeLinear, compressed_shapes
        from hyperquant_diffusers.nn.lora import fused_lora_retained
    except ImportError:
        return {}
    out = {}
    for name, comp in getattr(pipe, "components", {}).items():
        if not isinstance(comp, torch.nn.Module):
            continue
        n = qparams = stored = resident = 0
        for mod in comp.modules():
            if not isinstance(mod, LatticeLinear):
                continue
            n += 1
            qparams += mod.in_features * mod.out_features
            shapes = compressed_shapes(mod.out_features, mod.in_features, mod.lattice, mod.block_values, mod.n_words)
            stored += sum(int(np.prod(shape)) * torch.empty((), dtype=dt).element_size() for shape, dt in shapes.values())
            resident += mod.resident_nbytes()
        if n:
            kept = sorted(fused_lora_retained(comp).values())
            out[name] = {"lattice_linears": n, "quantized_params": qparams, "stored_bytes": stored,
                         "resident_bytes": resident, "dense_bf16_bytes": 2 * qparams,
                         "fused_lora_kept": {"layers": len(kept), "min": kept[0], "median": float(np.median(kept))}
                         if kept else None}
    return out


class _RssSampler:
    """Peak resident set size of this process while a block runs, sampled every ``interval`` seconds (Linux)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


@dataclass
class GenerationResult:
    """One generated video. ``frames``: uint8 (F, H, W, 3). Times in seconds, memory in bytes."""

    frames: np.ndarray
    seconds_per_step: list = field(default_factory=list)
    seconds_total: float = 0.0
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = ""
    initial_noise_sha256: str | None = None


def call_kwargs(pipe, *, prompt: str, seed: int, frames: int, height: int, width: int, steps: int,
                guidance_scale: float | None = None, negative_prompt: str | None = "",
                max_sequence_length: int | None = None, frame_rate: float | None = None,
                extra: dict | None = None) -> dict:
    """Keyword arguments for ``pipe(...)``: only those its ``__call__`` accepts (LTX-2 and LTX-Video differ),
    plus ``extra`` verbatim (the user asked for them; a wrong name errors in the pipeline, as it should)."""
    import torch

    params = inspect.signature(type(pipe).__call__).parameters
    kw = {"prompt": prompt, "negative_prompt": negative_prompt, "num_frames": frames, "height": height,
          "width": width, "num_inference_steps": steps, "guidance_scale": guidance_scale,
          "max_sequence_length": max_sequence_length, "frame_rate": frame_rate, "output_type": "np"}
    kw = {k: v for k, v in kw.items() if v is not None and k in params}
    # A CPU generator: the same noise on every device and for every configuration.
    kw["generator"] = torch.Generator(device="cpu").manual_seed(int(seed))
    kw.update(extra or {})
    return kw


def generate(pipe, *, progress: bool = False, **settings) -> GenerationResult:
    """Generate one video; ``settings`` as in :func:`call_kwargs`. Records per-step seconds (from the first
    transformer call to each step's end), peak memory and the SHA-256 of the first transformer input latents."""
    import torch

    kw = call_kwargs(pipe, **settings)
    cuda = torch.cuda.is_available() and any(
        getattr(p, "is_cuda", False) for p in getattr(pipe, "transformer", torch.nn.Linear(1, 1)).parameters())
    marks: list[float] = []
    noise: dict = {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def pre_hook(module, args, kwargs):
        if "t0" not in noise:
            sync()
            noise["t0"] = time.perf_counter()
            x = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(x, torch.Tensor):
                noise["sha"] = hashlib.sha256(x.detach().float().cpu().numpy().tobytes()).hexdigest()

    def on_step_end(_pipe, step, timestep, callback_kwargs):
        sync()
        marks.append(time.perf_counter())
        return {}

    params = inspect.signature(type(pipe).__call__).parameters
    if "callback_on_step_end" in params:
        kw["callback_on_step_end"] = on_step_end
        if "callback_on_step_end_tensor_inputs" in params:
            kw["callback_on_step_end_tensor_inputs"] = []
    handle = pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True) if hasattr(pipe, "transformer") else None
    pipe.set_progress_bar_config(disable=not progress)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    try:
        with torch.no_grad(), _RssSampler() as rss:
            out = pipe(**kw)
        sync()
    finally:
        if handle is not None:
            handle.remove()
    t_end = time.perf_counter()
    video = out.frames[0] if not isinstance(out, tuple) else out[0][0]
    frames = to_uint8_frames(video)
    steps_s = []
    if marks and "t0" in noise:
        edges = [noise["t0"]] + marks
        steps_s = [b - a for a, b in zip(edges[:-1], edges[1:])]
    if cuda:
        peak, kind = int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    else:
        peak, kind = int(rss.peak), "cpu_process_rss_sampled"
    return GenerationResult(frames=frames, seconds_per_step=steps_s, seconds_total=t_end - t_start,
                            peak_memory_bytes=peak, peak_memory_kind=kind, initial_noise_sha256=noise.get("sha"))


def free_memory() -> None:
    """Give a dropped pipeline's memory back before the next configuration loads (caller deletes its refs)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
