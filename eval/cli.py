"""``hyperquant-eval``: per-prompt, per-frame PSNR/LPIPS of quantized configurations against the bf16 baseline.

    hyperquant-eval --out report/                                   # embedded tiny model (random weights), offline
    hyperquant-eval --model PATH_OR_ID --prompts samples/prompts.txt --configs bf16,w4-e8,w4-e8+kv4 --out report/
    accelerate launch --multi_gpu --num_processes 8 -m hyperquant_diffusers.eval.cli --model ... --out report/
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m hyperquant_diffusers.eval.cli --out report/   # CPU processes

Several processes split the (prompt, seed) jobs with accelerate's PartialState and rank 0 merges the report; the
output folder must be shared. (`accelerate launch --cpu` starts ONE process; use torchrun for several on CPU.)

Re-running with the same arguments resumes: finished videos are reused (see :mod:`.store`), only the report is
rebuilt. Exit status 2 with a one-line message for bad input (unknown config, missing prompt file, ...); 1 when a
configuration failed to load or run (the report is still written, with the failure at the top).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .configs import GRAMMAR, ConfigNameError, parse_config_list
from .metrics import FramesMismatchError, lpips_upsample_factor

DEFAULT_CONFIGS = "bf16,w4-e8,w6-e8"
DEFAULT_CONFIGS_WITH_KV = DEFAULT_CONFIGS + ",w4-e8+kv4"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hyperquant-eval", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=GRAMMAR)
    p.add_argument("--model", help="diffusers pipeline folder or hub id; default: the embedded tiny LTX-2 pipeline "
                                   "(random weights, built offline)")
    p.add_argument("--prompts", help="prompt file, one per line ('#' comments); default samples/prompts.txt")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); instead of --prompts")
    p.add_argument("--configs", help=f"comma-separated config names; default {DEFAULT_CONFIGS} "
                                     f"(+ w4-e8+kv4 when hyperquant_diffusers.kv is available)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--out", default="report", help="output folder (default ./report)")
    p.add_argument("--frames", type=int, help="frames per video (embedded default 9, else 49)")
    p.add_argument("--height", type=int, help="embedded default 32, else 512")
    p.add_argument("--width", type=int, help="embedded default 32, else 768")
    p.add_argument("--steps", type=int, help="denoising steps (embedded default 2, else 30)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale (default: embedded 1.0, else the pipeline's)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument("--max-sequence-length", type=int, help="text tokens (embedded default 16, else the pipeline's)")
    p.add_argument("--fps", type=float, default=24.0, help="frame rate of the videos (default 24)")
    p.add_argument("--dtype", default="bf16", help="baseline / activation dtype: bf16 (default), fp16, fp32")
    p.add_argument("--device", help="default: this process's accelerate device (cuda:N or cpu)")
    p.add_argument("--quant-kwargs", help="JSON object of extra HyperQuantConfig kwargs for every quantized config, "
                                          "e.g. '{\"tile_size\": 64}'; default {} (embedded model: "
                                          "{\"tile_size\": 16, \"min_weight_numel\": 16384})")
    p.add_argument("--no-resume", action="store_true", help="regenerate every video even if a finished one is stored")
    p.add_argument("--pipeline-kwargs", help="JSON object passed to the pipeline call verbatim")
    p.add_argument("--lpips-backbone", default="auto",
                   help="'auto' (torch hub cache, else one download try), 'off', or a path to torchvision's "
                        "alexnet-owt-7be5be79.pth")
    p.add_argument("--cache-dir", help="where the embedded model is built (default ~/.cache/hyperquant_diffusers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar / per-video log lines")
    p.add_argument("--lora", help="a LoRA (.safetensors file, folder holding one, or hub id) loaded into every "
                                  "configuration, the bf16 baseline too, so the metrics show what quantization does "
                                  "to the LoRA'd model")
    p.add_argument("--lora-scale", type=float, help="the LoRA's weight (default 1.0; needs --lora)")
    p.add_argument("--fuse-lora", action="store_true",
                   help="fuse the LoRA into every configuration's weights (fuse_lora: re-quantized lattice codes on "
                        "HyperQuant configs) instead of running it beside them; needs --lora")
    p.add_argument("--compile", action="store_true",
                   help="compile each pipeline's transformer with torch.compile (its repeated blocks; Inductor). The "
                        "first video of each config includes the compile time in its first step")
    return p


def _fail(msg: str) -> int:
    print(f"hyperquant-eval: error: {msg}", file=sys.stderr)
    return 2


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def _json_object(flag: str, text: str | None, default: dict) -> dict:
    if text is None:
        return dict(default)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{flag} must be a JSON object")
    return obj


def lora_setting(args) -> dict | None:
    """``--lora`` / ``--lora-scale`` / ``--fuse-lora`` as the settings' ``lora`` entry (None without ``--lora``)."""
    from .lora import describe_lora

    if args.lora is None:
        for flag, given in (("--lora-scale", args.lora_scale is not None), ("--fuse-lora", args.fuse_lora)):
            if given:
                raise ValueError(f"{flag} needs --lora")
        return None
    return describe_lora(args.lora, 1.0 if args.lora_scale is None else args.lora_scale, fuse=args.fuse_lora)


def resolve_inputs(args) -> dict:
    """Validate everything that does not need a model (fast, before any loading). Raises ValueError & co."""
    from .pipeline import (EMBEDDED_EXTRA, EMBEDDED_MODEL_ID, EMBEDDED_QUANT_KWARGS, EMBEDDED_SETTINGS,
                           MODEL_SETTINGS, kv_available)
    from .prompts import read_prompts
    from .store import prompt_id

    if args.prompt and args.prompts:
        raise ValueError("give either --prompts FILE or --prompt TEXT, not both")
    if args.prompt:
        prompts = [{"id": prompt_id(i, t), "text": t} for i, t in enumerate(args.prompt)]
    else:
        prompts = read_prompts(args.prompts)
    configs_text = args.configs or (DEFAULT_CONFIGS_WITH_KV if kv_available() else DEFAULT_CONFIGS)
    configs = parse_config_list(configs_text)
    seeds = _parse_seeds(args.seeds)
    extra = _json_object("--pipeline-kwargs", args.pipeline_kwargs, {})
    embedded = args.model is None
    if embedded:
        extra = {**EMBEDDED_EXTRA, **extra}
    d = EMBEDDED_SETTINGS if embedded else MODEL_SETTINGS
    pick = lambda v, k: d[k] if v is None else v  # noqa: E731
    settings = dict(model_id=EMBEDDED_MODEL_ID if embedded else args.model, embedded=embedded,
                    frames=pick(args.frames, "frames"), height=pick(args.height, "height"),
                    width=pick(args.width, "width"), steps=pick(args.steps, "steps"),
                    guidance_scale=pick(args.guidance_scale, "guidance_scale"),
                    negative_prompt=args.negative_prompt,
                    max_sequence_length=pick(args.max_sequence_length, "max_sequence_length"),
                    frame_rate=args.fps, dtype=args.dtype, extra=extra, compile=bool(args.compile),
                    quant_kwargs=_json_object("--quant-kwargs", args.quant_kwargs,
                                              EMBEDDED_QUANT_KWARGS if embedded else {}))
    for k in ("frames", "height", "width", "steps"):
        if settings[k] < 1:
            raise ValueError(f"--{k} must be positive, got {settings[k]}")
    from .pipeline import torch_dtype

    torch_dtype(args.dtype)  # validates the name
    settings["lora"] = lora_setting(args)
    return {"prompts": prompts, "configs": configs, "seeds": seeds, "settings": settings}


def run(args, inputs: dict | None = None, backend_factory=None) -> dict:
    """The whole evaluation for this process; rank 0 returns the results dict (others an empty dict).

    ``backend_factory(model_path, settings)`` makes the frame generator (default :class:`runner.PipelineBackend`).
    """
    from accelerate import PartialState

    from . import distributed as D
    from .lpips_backbone import load_lpips
    from .pipeline import default_model_path
    from .report import write_report
    from .results import build_results
    from .runner import Job, PipelineBackend, Settings, run_shard
    from .store import fingerprint

    inputs = inputs or resolve_inputs(args)
    _quiet_libraries()
    state = PartialState(cpu=_use_cpu(args))
    rank, world = state.process_index, state.num_processes
    log = (lambda *a: None) if args.quiet else (lambda m: print(f"[rank {rank}] {m}" if world > 1 else m, flush=True))
    device = args.device or str(state.device)
    settings = Settings(device=device, **inputs["settings"])
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    # Rank 0 builds the embedded model / fetches LPIPS weights first; the others then find them ready.
    if rank == 0:
        model_path = default_model_path(args.cache_dir) if settings.embedded else args.model
        lp = load_lpips(args.lpips_backbone, allow_download=not _offline())
    state.wait_for_everyone()
    if rank != 0:
        model_path = default_model_path(args.cache_dir) if settings.embedded else args.model
        lp = load_lpips(args.lpips_backbone, allow_download=False)
    if not lp.available:
        log(f"LPIPS off: {lp.reason}")

    jobs_all = [Job(p["id"], p["text"], s) for p in inputs["prompts"] for s in inputs["seeds"]]
    run_fp = fingerprint({"settings": {k: v for k, v in settings.to_json().items()
                                       if k != "device" and not (k in ("compile", "lora") and not v)},
                          "configs": [c.name for c in inputs["configs"]],
                          "jobs": [(j.pid, j.seed) for j in jobs_all], "world": world})
    D.clear_own_shard(out, rank, world)
    state.wait_for_everyone()
    jobs = D.split_jobs(state, jobs_all)
    log(f"{len(jobs)} prompt/seed job(s) x {len(inputs['configs'])} config(s) on {device}")

    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs) * len(inputs["configs"]), desc=f"videos (rank {rank})" if world > 1 else "videos",
                   position=rank, leave=True)
    try:
        backend = (backend_factory or PipelineBackend)(model_path, settings)
        record = run_shard(out, jobs, inputs["configs"], backend, settings, lp, resume=not args.no_resume,
                           progress=bar.update if bar else None, log=(bar.write if bar else log))
    finally:
        if bar is not None:
            bar.close()
    D.write_shard(out, rank, world, run_fp, record)
    if rank != 0:
        return {}
    shards = D.wait_for_shards(out, world, run_fp, log=log)
    lp_json = {**lp.to_json(), "upsample_factor": lpips_upsample_factor(settings.height, settings.width)}
    results = build_results(shards, inputs["configs"], inputs["prompts"], settings.to_json(), lp_json,
                            seeds=inputs["seeds"], num_processes=world)
    write_report(out, results, log=log)
    log(f"report: {os.path.join(out, 'index.html')} ({results['run']['generated']} generated, "
        f"{results['run']['resumed']} resumed)")
    for name, msg in results["failures"].items():
        print(f"hyperquant-eval: configuration {name} FAILED and is left out of the report: {msg}", file=sys.stderr)
    return results


def _use_cpu(args) -> bool:
    """PartialState must be told about CPU runs (``accelerate launch --cpu`` sets ACCELERATE_USE_CPU, which
    PartialState itself does not read): then several processes talk over gloo instead of staying independent."""
    import torch

    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or (args.device or "").startswith("cpu") or not torch.cuda.is_available()


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HYPERQUANT_OFFLINE"))


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        dl.set_verbosity_error()
        dl.disable_progress_bar()
        tl.set_verbosity_error()
        tl.disable_progress_bar()
    except Exception:  # logging niceties only
        pass
    import warnings

    warnings.filterwarnings("ignore", message=".*torch_dtype.*")


def main(argv=None) -> int:
    from .pipeline import BackendUnavailableError

    args = build_parser().parse_args(argv)
    try:  # everything checkable without a model, before any loading
        inputs = resolve_inputs(args)
    except (ConfigNameError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    try:
        results = run(args, inputs)
    except (ConfigNameError, FileNotFoundError, FramesMismatchError, BackendUnavailableError) as exc:
        return _fail(str(exc))
    return 1 if results.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
