"""KV compression inside the tiny offline LTX-2 / LTX-Video pipelines (real denoising loop, CFG batch)."""

import numpy as np
import pytest

from hyperquant_diffusers.kv import disable_kv_compression, enable_kv_compression, kv_cache_stats
from hyperquant_diffusers.testing import run_tiny_pipeline

STEPS = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _psnr(a, b):
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def _run(pipe, **kv):
    if kv:
        enable_kv_compression(pipe.transformer, **kv)
    try:
        frames = run_tiny_pipeline(pipe, steps=STEPS, guidance_scale=4.0)
        stats = kv_cache_stats(pipe.transformer) if kv else None
    finally:
        if kv:
            disable_kv_compression(pipe.transformer)
    return frames, stats


def test_ltx2_pipeline_cache_equals_uncached_and_quality_falls_with_bits(tiny_ltx2_path):
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline.from_pretrained(tiny_ltx2_path)
    ref, _ = _run(pipe)
    cached, st = _run(pipe, kv_bits=6.0)
    uncached, _ = _run(pipe, kv_bits=6.0, cache_text_kv=False)
    # same quantized K/V whether cached or recomputed each step
    assert np.abs(cached - uncached).max() < 1e-5
    # CFG batch [negative, positive] x (video, audio) streams = 4 entries; 2 blocks x 2 text attentions x 2 rows
    # projected once. Each step also runs the STG and modality-guidance passes ("uncond_stg", "uncond_modality"
    # cache contexts) on the positive row alone: they reuse its entries. Uses per step 2 x 2 x (2 + 1 + 1) = 16.
    # (The pipeline empties the cache at the end of the generation: its peak is what the generation held.)
    assert st["entries"] == 0 and st["peak"]["entries"] == 4
    assert st["computed"] == 8 and st["reused"] == 16 * STEPS - 8
    assert st["peak"]["kv_bytes"] < st["peak"]["kv_bf16_bytes"] / 2
    psnr = {6.0: _psnr(ref, cached)}
    for bits in (4.0, 3.0):
        psnr[bits] = _psnr(ref, _run(pipe, kv_bits=bits)[0])
    # measured (2 steps): about 45 / 34 / 25 dB
    assert psnr[6.0] > 38.0, psnr
    assert psnr[6.0] > psnr[4.0] + 4.0 and psnr[4.0] > psnr[3.0] + 4.0, psnr
    # disabling leaves the pipeline as it was
    assert np.array_equal(ref, _run(pipe)[0])


def test_ltx_pipeline_cache_equals_uncached(tiny_ltx_path):
    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(tiny_ltx_path)
    ref, _ = _run(pipe)
    cached, st = _run(pipe, kv_bits=6.0)
    uncached, _ = _run(pipe, kv_bits=6.0, cache_text_kv=False)
    assert np.abs(cached - uncached).max() < 1e-5
    assert st["peak"]["entries"] == 2 and st["computed"] == 4 and st["reused"] == 4 * (STEPS - 1)
    assert _psnr(ref, cached) > 38.0
