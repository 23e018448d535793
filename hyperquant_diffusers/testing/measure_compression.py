"""Measure what the backend stores for an LTX-2 transformer: tiny (really quantized) and full-size (analytic).

    python -m hyperquant_diffusers.testing.measure_compression [--tiny-path DIR] [--bits 4] [--sample-rows 512]

Full size: the default ``LTX2VideoTransformer3DModel()`` config (48 blocks, video 32x128 heads, audio 32x64) is
built on the meta device (no memory), the backend's policy selects the linears it would quantize (tile 128), and
each one's checkpoint bytes are computed from its shape plus the Rice-stream rate measured by quantizing a random
Gaussian sample layer (``--sample-rows`` x 4096) at the same bits. Resident bytes in int8 residency are exact from
shapes (int8 codes + float32 row scales + float32 signs).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from ..codec.constants import DEFAULT_BLOCK_VALUES, DEFAULT_TILE


def _stored_bytes(n: int, k: int, words_bps: float, block_values: int = DEFAULT_BLOCK_VALUES,
                  classes: int = 1) -> float:
    """Checkpoint bytes of one (n x k) LatticeLinear: signs k/8, scales 4n, ks, offsets, words."""
    nb = -(-n * k // block_values)
    return k / 8 + 4 * n + nb * classes + 4 * (nb + 1) + words_bps * n * k / 8


def full_size_ltx2(bits: float = 4.0, sample_rows: int = 512, tile: int = DEFAULT_TILE) -> dict:
    from accelerate import init_empty_weights
    from diffusers import LTX2VideoTransformer3DModel

    from ..codec import quantize
    from ..config import HyperQuantConfig
    from ..quantizers.policy import plan_conversion

    with init_empty_weights():
        model = LTX2VideoTransformer3DModel()
    cfg = HyperQuantConfig(bits=bits, tile_size=tile)
    convert, skipped = plan_conversion(model, cfg)
    total_params = sum(p.numel() for p in model.parameters())
    q_params = sum(m.in_features * m.out_features for m in convert.values())
    torch.manual_seed(0)
    q = quantize(torch.randn(sample_rows, 4096), bits=bits, tile_size=tile)
    words_bps = q.words.numel() * 32 / q.numel
    stored = sum(_stored_bytes(m.out_features, m.in_features, words_bps) for m in convert.values())
    resident_int8 = sum(m.out_features * m.in_features + 4 * m.out_features + 4 * m.in_features
                        for m in convert.values())
    skipped_params = sum(model.get_submodule(n).weight.numel() for n in skipped)
    other = (total_params - q_params) * 2  # everything not quantized stays bf16
    return {
        "model": "LTX2VideoTransformer3DModel() default (full-size) config", "bits": bits, "tile": tile,
        "total_params": total_params, "quantized_linears": len(convert), "skipped_linears": len(skipped),
        "quantized_params": q_params, "skipped_linear_params": skipped_params,
        "sample_words_bits_per_scalar": round(words_bps, 4),
        "sample_codec_bits_per_scalar": round(q.bits_per_scalar, 4),
        "bf16_bytes_quantized_linears": 2 * q_params, "checkpoint_bytes_quantized_linears": int(stored),
        "ratio_checkpoint_vs_bf16_linears": round(stored / (2 * q_params), 4),
        "int8_resident_bytes_linears": resident_int8,
        "bf16_model_bytes": 2 * total_params, "checkpoint_model_bytes": int(stored + other),
        "ratio_model_checkpoint_vs_bf16": round((stored + other) / (2 * total_params), 4),
        "int8_resident_model_bytes": int(resident_int8 + other),
    }


def tiny_ltx2(path: str | None = None, bits: float = 4.0, tile: int = 64) -> dict:
    from diffusers import LTX2VideoTransformer3DModel

    from ..config import HyperQuantConfig
    from ..nn import LatticeLinear, memory_footprint
    from .tiny import build_tiny_ltx2_pipeline

    path = path or build_tiny_ltx2_pipeline(tempfile.mkdtemp(prefix="tiny_ltx2_"))
    dense = LTX2VideoTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.bfloat16)
    tr = LTX2VideoTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.bfloat16,
                                                     quantization_config=HyperQuantConfig(bits=bits, tile_size=tile))
    qmods = [m for m in tr.modules() if isinstance(m, LatticeLinear)]
    stored = sum(m.stored_nbytes() for m in qmods)
    qparams = sum(m.in_features * m.out_features for m in qmods)
    mem = memory_footprint(tr)
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    return {
        "model": "tiny LTX-2 transformer (hyperquant_diffusers.testing.tiny)", "bits": bits, "tile": tile,
        "total_params": sum(p.numel() for p in dense.parameters()), "quantized_linears": len(qmods),
        "quantized_params": qparams, "bf16_bytes_quantized_linears": 2 * qparams,
        "checkpoint_bytes_quantized_linears": stored, "ratio_checkpoint_vs_bf16_linears": round(stored / (2 * qparams), 4),
        "int8_resident_bytes_linears": mem["lattice_bytes"], "bf16_model_bytes": dense_bytes,
        "int8_resident_model_bytes": mem["total_bytes"],
        "ratio_model_resident_vs_bf16": round(mem["total_bytes"] / dense_bytes, 4),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny-path", default=None)
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--sample-rows", type=int, default=512)
    a = ap.parse_args(argv)
    print(json.dumps({"tiny": tiny_ltx2(a.tiny_path, a.bits),
                      "full": full_size_ltx2(a.bits, a.sample_rows)}, indent=2))


if __name__ == "__main__":
    main()
