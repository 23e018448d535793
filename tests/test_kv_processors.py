"""KV-compression processors and the text K/V cache on tiny LTX-2 / LTX-Video transformers (random weights)."""

import pytest
import torch
from diffusers import LTX2VideoTransformer3DModel, LTXVideoTransformer3DModel

from hyperquant_diffusers.kv import disable_kv_compression, enable_kv_compression, kv_cache_stats


pytestmark = pytest.mark.usefixtures("one_torch_thread")


B, F, H, W, L, A = 2, 2, 4, 4, 8, 5


def _ltx2(**over):
    torch.manual_seed(0)
    kw = dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, cross_attention_dim=64,
              audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=4, audio_attention_head_dim=16,
              audio_cross_attention_dim=64, num_layers=2, caption_channels=32, rope_double_precision=False,
              rope_type="split")
    kw.update(over)
    return LTX2VideoTransformer3DModel(**kw).eval()


def _ltx2_inputs(seed=1, t=500.0, text=None, **extra):
    g = torch.Generator().manual_seed(seed)
    d = dict(hidden_states=torch.randn(B, F * H * W, 4, generator=g),
             audio_hidden_states=torch.randn(B, A, 4, generator=g),
             encoder_hidden_states=torch.randn(B, L, 32, generator=g),
             audio_encoder_hidden_states=torch.randn(B, L, 32, generator=g),
             encoder_attention_mask=torch.tensor([[1] * L, [1] * (L - 3) + [0] * 3]),
             timestep=torch.full((B,), t), num_frames=F, height=H, width=W, audio_num_frames=A, fps=25.0,
             return_dict=False)
    if text is not None:
        d["encoder_hidden_states"], d["audio_encoder_hidden_states"] = text
    d.update(extra)
    return d


def _ltx():
    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=16,
                                      cross_attention_dim=64, num_layers=2, caption_channels=32).eval()


def _ltx_inputs(seed=1, t=500.0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, F * H * W, 8, generator=g),
                encoder_hidden_states=torch.randn(B, L, 32, generator=g),
                encoder_attention_mask=torch.tensor([[1] * L, [1] * (L - 2) + [0] * 2]),
                timestep=torch.full((B,), t), num_frames=F, height=H, width=W, return_dict=False)


def _run(m, inp):
    with torch.no_grad():
        return m(**inp)


def _maxdiff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


LTX2_VARIANTS = {
    "default": ({}, {}),
    # gated attention, static prompt modulation (KV-cacheable LTX-2.5 style), perturbed attention with STG
    "gated_mod_stg": (dict(gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True,
                           use_prompt_adaln_single=False, perturbed_attn=True),
                      dict(spatio_temporal_guidance_blocks=[1], perturbation_mask=torch.tensor([1.0, 0.0]))),
}


@pytest.mark.parametrize("variant", list(LTX2_VARIANTS))
def test_ltx2_processors_equal_diffusers_when_quantization_off(variant):
    over, extra = LTX2_VARIANTS[variant]
    m = _ltx2(**over)
    inp = _ltx2_inputs(**extra)
    ref = _run(m, inp)
    originals = {n: type(mod.processor) for n, mod in m.named_modules() if hasattr(mod, "processor")}
    h = enable_kv_compression(m, kv_bits=None, cache_text_kv=True)
    assert h.stats()["attention_layers"] == {"self": 4, "text": 4, "cross": 4}
    first = _run(m, inp)
    second = _run(m, _ltx2_inputs(t=500.0, **extra))  # same prompt: text K/V come from the cache
    assert _maxdiff(ref, first) < 1e-5 and _maxdiff(ref, second) < 1e-5
    st = kv_cache_stats(m)
    # 2 distinct prompt rows per stream x 2 streams; 4 text layers x 2 rows computed once, reused on the 2nd call
    assert st["entries"] == 4 and st["computed"] == 8 and st["reused"] == 8
    assert st["kv_bytes"] == st["kv_bf16_bytes"] * 2  # float32 model, stored exactly
    disable_kv_compression(m)
    assert {n: type(mod.processor) for n, mod in m.named_modules() if hasattr(mod, "processor")} == originals
    assert _maxdiff(ref, _run(m, inp)) == 0.0


def test_ltx_processors_equal_diffusers_when_quantization_off():
    m = _ltx()
    inp = _ltx_inputs()
    ref = _run(m, inp)
    h = enable_kv_compression(m, kv_bits=None)
    assert h.stats()["attention_layers"] == {"self": 2, "text": 2}
    assert _maxdiff(ref, _run(m, inp)) < 1e-5
    assert _maxdiff(ref, _run(m, inp)) < 1e-5
    assert kv_cache_stats(m)["reused"] == 2 * 2
    disable_kv_compression(m)


@pytest.mark.parametrize("method", ["dither", "qjl"])
def test_ltx2_cached_text_kv_equals_uncached_compressed(method):
    m = _ltx2()
    outs = {}
    for cache in (False, True):
        h = enable_kv_compression(m, kv_bits=6.0 if method == "qjl" else 4.0, bias_correction=method,
                                  cache_text_kv=cache)
        outs[cache] = [_run(m, _ltx2_inputs(t=t)) for t in (900.0, 500.0, 100.0)]
        if cache:
            st = h.stats()
            assert st["computed"] == 8 and st["reused"] == 16
        disable_kv_compression(m)
    for a, b in zip(outs[False], outs[True]):
        assert _maxdiff(a, b) < 1e-5
    ref = _run(m, _ltx2_inputs(t=100.0))
    err = float((outs[True][2][0] - ref[0]).square().mean() / ref[0].square().mean())
    assert 0 < err < 0.05, err  # compressed, but still the same computation


@pytest.mark.parametrize("fmt", ["rice", "int8"])
def test_ltx_cached_equals_uncached_and_memory_is_reported(fmt):
    m = _ltx()
    outs = {}
    for cache in (False, True):
        enable_kv_compression(m, kv_bits=4.0, cache_text_kv=cache, cache_format=fmt)
        outs[cache] = [_run(m, _ltx_inputs(t=t)) for t in (800.0, 200.0)]
        if cache:
            st = kv_cache_stats(m)
        disable_kv_compression(m)
    for a, b in zip(outs[False], outs[True]):
        assert _maxdiff(a, b) < 1e-5
    # 2 rows x 2 layers x (K, V) of L x 64 values: bf16 bytes = 2 * 2 * 2 * 8 * 64 * 2
    assert st["kv_bf16_bytes"] == 2 * 2 * 2 * L * 64 * 2
    # rice: ~4 bits a value + per-tensor overhead at this tiny size; int8: 8 bits + an int8 step per 16 values
    assert st["kv_bytes"] < st["kv_bf16_bytes"] / (2 if fmt == "rice" else 1.7)
    assert st["reference_bytes"] == 2 * L * 32 * 4  # one float32 copy of each prompt row


def test_cache_follows_prompt_changes_and_shares_equal_rows():
    m = _ltx2()

    def sequence(cache):
        """prompt A; prompt B; a CFG-style batch whose two rows are B's first row; the same tensor changed in
        place. Self-attention draws its dither per call, so both runs make the same calls in the same order."""
        enable_kv_compression(m, kv_bits=4.0, cache_text_kv=cache)
        text_b = _ltx2_inputs(seed=7)
        ehs = text_b["encoder_hidden_states"][:1].repeat(2, 1, 1)
        aehs = text_b["audio_encoder_hidden_states"][:1].repeat(2, 1, 1)
        same = _ltx2_inputs(seed=7, text=(ehs, aehs))
        outs, stats = [], []
        for inp in (_ltx2_inputs(seed=1), text_b, same, None):
            if inp is None:
                ehs.mul_(2.0)  # the very tensor passed before, changed in place (tensor version counter)
                inp = same
            outs.append(_run(m, inp))
            stats.append(kv_cache_stats(m))
        disable_kv_compression(m)
        return outs, stats

    cached, st = sequence(True)
    fresh, _ = sequence(False)
    for a, b in zip(cached, fresh):
        assert _maxdiff(a, b) < 1e-5
    assert st[0]["entries"] == 4 and st[0]["computed"] == 8
    # new prompt: old entries dropped
    assert st[1]["entries"] == 4 and st[1]["computed"] == 16
    # equal rows share one entry per stream; row 0 of B already cached -> nothing computed
    assert st[2]["entries"] == 2 and st[2]["layer_kv_pairs"] == 4 and st[2]["computed"] == 16
    # the in-place change of the video prompt makes a new video entry (audio unchanged)
    assert st[3]["entries"] == 2 and st[3]["computed"] == 18


def test_cache_contexts_share_entries():
    m = _ltx2()
    inp = _ltx2_inputs()
    enable_kv_compression(m, kv_bits=4.0)
    with m.cache_context("cond_uncond"):
        _run(m, inp)
    pos = dict(inp, hidden_states=inp["hidden_states"][1:], audio_hidden_states=inp["audio_hidden_states"][1:],
               encoder_hidden_states=inp["encoder_hidden_states"][1:].clone(),
               audio_encoder_hidden_states=inp["audio_encoder_hidden_states"][1:].clone(),
               encoder_attention_mask=inp["encoder_attention_mask"][1:], timestep=inp["timestep"][1:])
    with m.cache_context("uncond_stg"):
        _run(m, pos)
    st = kv_cache_stats(m)
    assert st["entries"] == 4 and st["computed"] == 8  # the positive row's K/V reused by the second context
    m._diffusers_hook.reset_stateful_hooks()
    assert kv_cache_stats(m)["entries"] == 0
    disable_kv_compression(m)


def test_timestep_dependent_text_side_is_refused():
    m = _ltx2(cross_attn_mod=True, audio_cross_attn_mod=True, use_prompt_adaln_single=True)
    with pytest.raises(ValueError, match="timestep-dependent"):
        enable_kv_compression(m, kv_bits=4.0, cache_text_kv=True)
    assert not any(type(p).__name__.startswith("HQKV") for p in m.attn_processors.values())
    # on-the-fly quantization is fine there
    inp = _ltx2_inputs(sigma=torch.full((B,), 0.5))
    ref = _run(m, inp)
    enable_kv_compression(m, kv_bits=8.0, cache_text_kv=False)
    out = _run(m, inp)
    assert 0 < float((out[0] - ref[0]).square().mean() / ref[0].square().mean()) < 1e-3
    disable_kv_compression(m)


def test_bad_use_is_named():
    m = _ltx2()
    with pytest.raises(ValueError, match="supports LTX2VideoTransformer3DModel"):
        enable_kv_compression(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="bias_correction must be one of"):
        enable_kv_compression(m, bias_correction="sign")
    with pytest.raises(ValueError, match="not a multiple of the E8"):
        enable_kv_compression(_ltx2(attention_head_dim=12, audio_attention_head_dim=12))
    with pytest.raises(ValueError, match="cache_format must be one of"):
        enable_kv_compression(m, cache_format="zip")
    with pytest.raises(ValueError, match="not enabled"):
        disable_kv_compression(m)
    enable_kv_compression(m)
    with pytest.raises(ValueError, match="already enabled"):
        enable_kv_compression(m)
    disable_kv_compression(m)


def test_works_on_quantized_linears():
    from hyperquant_diffusers import HyperQuantConfig
    from hyperquant_diffusers.nn.lattice_linear import LatticeLinear
    from hyperquant_diffusers.quantizers.core import quantize_linears

    m = _ltx2()
    quantize_linears(m, HyperQuantConfig(bits=6.0, tile_size=16, min_weight_numel=1,
                                         modules_to_convert=["attn1.to_", "attn2.to_"]), progress=False)
    assert isinstance(m.transformer_blocks[0].attn2.to_k, LatticeLinear)
    inp = _ltx2_inputs()
    ref = _run(m, inp)
    enable_kv_compression(m, kv_bits=None, tile_size=128)  # a weight tile passed through means "whole head"
    assert _maxdiff(ref, _run(m, inp)) < 1e-5
    disable_kv_compression(m)
    enable_kv_compression(m, kv_bits=6.0, tile_size=128)
    _, b = _run(m, inp), _run(m, inp)
    assert float((b[0] - ref[0]).square().mean() / ref[0].square().mean()) < 1e-2
    disable_kv_compression(m)
