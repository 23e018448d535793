"""``hyperquant-generate``: one video from a (HyperQuant-quantized) pipeline, with a progress bar.

    hyperquant-generate --prompt "a robot dancing in the city" --out robot.mp4          # embedded tiny model
    hyperquant-generate --model PATH_OR_ID --prompt "..." --bits 4 --lattice E8 --kv-bits 4 \\
        --frames 49 --steps 30 --seed 0 --out video.mp4

Without ``--bits`` (and without ``--config``) the pipeline runs unquantized in ``--dtype``. The same ``--seed``
gives the same initial noise whatever the quantization, so videos are directly comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .configs import GRAMMAR, ConfigNameError, parse_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hyperquant-generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=GRAMMAR)
    p.add_argument("--model", help="diffusers pipeline folder or hub id; default: the embedded tiny LTX-2 "
                                   "pipeline (random weights)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--config", help="a config name (e.g. w4-e8+kv4); instead of --bits/--lattice/--kv-bits")
    p.add_argument("--bits", type=float, help="weight bits per scalar (1..8); omit for unquantized weights")
    p.add_argument("--lattice", default="E8", help="Z, A2, D4 or E8 (default E8)")
    p.add_argument("--kv-bits", type=float, help="quantize attention K/V at this rate (needs hyperquant_diffusers.kv)")
    p.add_argument("--quant-kwargs", help="JSON object of extra HyperQuantConfig kwargs (e.g. '{\"tile_size\": 64}')")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--max-sequence-length", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--pipeline-kwargs", help="JSON object passed to the pipeline call verbatim")
    p.add_argument("--out", default="video.mp4", help=".mp4 (GIF fallback without ffmpeg) or .gif")
    p.add_argument("--save-frames", action="store_true", help="also save the uint8 frames as <out>.npy")
    p.add_argument("--cache-dir", help="where the embedded model is built")
    p.add_argument("--lora", help="a LoRA to load (.safetensors file, folder holding one, or hub id)")
    p.add_argument("--lora-scale", type=float, help="the LoRA's weight (default 1.0; needs --lora)")
    p.add_argument("--fuse-lora", action="store_true",
                   help="fuse the LoRA into the weights (fuse_lora: re-quantized lattice codes on a HyperQuant "
                        "config) instead of running it beside them; needs --lora")
    p.add_argument("--compile", action="store_true",
                   help="compile the transformer with torch.compile (its repeated blocks; Inductor); the first step "
                        "includes the compile time")
    return p


def config_name(args) -> str:
    """The config name these flags mean (validated by :func:`configs.parse_config`)."""
    if args.config:
        if args.bits is not None or args.kv_bits is not None:
            raise ValueError("give either --config or --bits/--kv-bits, not both")
        return args.config
    name = "bf16" if args.bits is None else f"w{args.bits:g}-{args.lattice.lower()}"
    if args.kv_bits is not None:
        name += f"+kv{args.kv_bits:g}"
    return name


def main(argv=None) -> int:
    from .pipeline import (EMBEDDED_EXTRA, EMBEDDED_QUANT_KWARGS, EMBEDDED_SETTINGS, MODEL_SETTINGS,
                           BackendUnavailableError,
                           component_bytes, default_model_path, generate, load_pipeline, quant_stats, torch_dtype)
    from .video import save_frames_npy, write_video

    args = build_parser().parse_args(argv)
    try:
        config = parse_config(config_name(args))
        if os.path.splitext(args.out)[1].lower() not in (".mp4", ".gif"):
            raise ValueError(f"--out {args.out!r}: use a .mp4 or .gif file name")
        from .cli import _json_object, lora_setting

        lora = lora_setting(args)
        extra = _json_object("--pipeline-kwargs", args.pipeline_kwargs, {})
        qkw = _json_object("--quant-kwargs", args.quant_kwargs, EMBEDDED_QUANT_KWARGS if args.model is None else {})
        torch_dtype(args.dtype)
    except (ConfigNameError, ValueError, FileNotFoundError) as exc:
        print(f"hyperquant-generate: error: {exc}", file=sys.stderr)
        return 2
    import torch

    embedded = args.model is None
    d = EMBEDDED_SETTINGS if embedded else MODEL_SETTINGS
    pick = lambda v, k: d[k] if v is None else v  # noqa: E731
    if embedded:
        extra = {**EMBEDDED_EXTRA, **extra}
        print("note: no --model given: using the embedded tiny LTX-2 pipeline with RANDOM weights "
              "(noise-like output; for trying the tool, not for quality)", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = default_model_path(args.cache_dir) if embedded else args.model
        pipe = load_pipeline(model, config, dtype=args.dtype, device=device, quant_overrides=qkw,
                             compile=args.compile, lora=lora)
        res = generate(pipe, progress=True, prompt=args.prompt, seed=args.seed, frames=pick(args.frames, "frames"),
                       height=pick(args.height, "height"), width=pick(args.width, "width"),
                       steps=pick(args.steps, "steps"), guidance_scale=pick(args.guidance_scale, "guidance_scale"),
                       negative_prompt=args.negative_prompt,
                       max_sequence_length=pick(args.max_sequence_length, "max_sequence_length"),
                       frame_rate=args.fps, extra=extra)
    except (FileNotFoundError, BackendUnavailableError) as exc:
        print(f"hyperquant-generate: error: {exc}", file=sys.stderr)
        return 2
    written = write_video(args.out, res.frames, fps=args.fps)
    if args.save_frames:
        save_frames_npy(os.path.splitext(written)[0] + ".npy", res.frames)
    steps = res.seconds_per_step
    summary = {"video": written, "config": config.name, "lora": lora, "frames": list(res.frames.shape),
               "seconds_per_step": (sum(steps) / len(steps)) if steps else None, "seconds_total": res.seconds_total,
               "peak_memory_bytes": res.peak_memory_bytes, "peak_memory_kind": res.peak_memory_kind,
               "component_bytes": component_bytes(pipe), "quantized_linears": quant_stats(pipe)}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
