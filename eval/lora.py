"""A LoRA for every configuration of an evaluation (``--lora``): identify it, and load it into a pipeline.

The same LoRA goes into the bf16 baseline and into each quantized configuration, so PSNR / LPIPS measure what
quantization does to the LoRA'd model. On a HyperQuant pipeline peft wraps each quantized layer and runs the
adapter beside it; with ``--fuse-lora`` every pipeline fuses it (``fuse_lora``: into the bf16 weights of the
baseline, into re-quantized lattice codes of a HyperQuant pipeline), so the metrics measure the fused model
(docs/backend.md, Limits).
"""

from __future__ import annotations

import math
import os

from .store import file_sha256

#: adapter name the harness gives the LoRA in every pipeline
ADAPTER_NAME = "eval_lora"


def describe_lora(source: str, scale: float = 1.0, fuse: bool = False) -> dict:
    """``{"source", "weight_name", "scale", "sha256"}`` for ``--lora SOURCE --lora-scale SCALE``, plus
    ``"fuse": True`` with ``--fuse-lora`` (absent otherwise, so unfused runs keep their video fingerprints).

    ``source``: a ``.safetensors`` file, a folder holding exactly one, or a hub id (``sha256`` None: the hub's
    files are not read here). A local LoRA's SHA-256 identifies it, so stored videos are reused only for the same
    LoRA bytes. Raises FileNotFoundError for a local path that does not exist or holds no single LoRA file, and
    ValueError for a scale that is not finite.
    """
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"--lora-scale must be a finite number, got {scale}")
    looks_local = os.path.exists(source) or source.endswith(".safetensors") or source.startswith((".", "/", "~"))
    extra = {"fuse": True} if fuse else {}
    if not looks_local:
        return {"source": source, "weight_name": None, "scale": scale, "sha256": None, **extra}
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"--lora {source!r}: the folder holds {len(files)} .safetensors files "
                                    f"({', '.join(files) or 'none'}); give the LoRA file itself")
        folder, weight_name = path, files[0]
    elif os.path.isfile(path):
        folder, weight_name = os.path.dirname(path), os.path.basename(path)
    else:
        raise FileNotFoundError(f"--lora {source!r}: no such file or folder")
    return {"source": folder, "weight_name": weight_name, "scale": scale,
            "sha256": file_sha256(os.path.join(folder, weight_name)), **extra}


def apply_lora(pipe, lora: dict) -> None:
    """Load ``lora`` (from :func:`describe_lora`) into ``pipe`` at its scale, and fuse it when it says so. Raises
    ValueError for a pipeline without LoRA support."""
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"--lora: {type(pipe).__name__} does not load LoRAs (no load_lora_weights)")
    kwargs = {"adapter_name": ADAPTER_NAME}
    if lora.get("weight_name"):
        kwargs["weight_name"] = lora["weight_name"]
    pipe.load_lora_weights(lora["source"], **kwargs)
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[lora["scale"]])
    if lora.get("fuse"):
        pipe.fuse_lora(adapter_names=[ADAPTER_NAME])   # the adapter's scale is in its layers' scaling already


def lora_text(lora: dict | None) -> str:
    """One line for reports: where the LoRA came from and at what scale."""
    if not lora:
        return ""
    src = os.path.join(lora["source"], lora["weight_name"]) if lora.get("weight_name") else lora["source"]
    digest = f", sha256 {lora['sha256'][:12]}" if lora.get("sha256") else ""
    fused = ", fused into the weights" if lora.get("fuse") else ""
    return f"LoRA {src} at scale {lora['scale']:g}{digest}{fused} (in every configuration, the baseline too)"
