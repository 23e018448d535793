"""Public entry points: :func:`enable_kv_compression`, :func:`disable_kv_compression`, :func:`kv_cache_stats`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import cache as _cache
from .processors import HQKVLTX2AttnProcessor, HQKVLTXAttnProcessor, _KVCore
from .quantizer import CACHE_FORMATS, KVQuantConfig

#: LTX-2 block attention name -> (role, text stream)
_LTX2_ROLES = {
    "attn1": ("self", None), "audio_attn1": ("self", None),
    "attn2": ("text", "video"), "audio_attn2": ("text", "audio"),
    "audio_to_video_attn": ("cross", None), "video_to_audio_attn": ("cross", None),
}
_LTX_ROLES = {"attn1": ("self", None), "attn2": ("text", "video")}
_HANDLE_ATTR = "_hq_kv_handle"


def _family(model: torch.nn.Module) -> str:
    from diffusers import LTX2VideoTransformer3DModel, LTXVideoTransformer3DModel

    if isinstance(model, LTX2VideoTransformer3DModel):
        return "ltx2"
    if isinstance(model, LTXVideoTransformer3DModel):
        return "ltx"
    raise ValueError(
        f"KV compression supports LTX2VideoTransformer3DModel and LTXVideoTransformer3DModel (a pipeline's "
        f"`.transformer`), got {type(model).__name__}")


def _text_side_timestep_dependent(model) -> bool:
    """LTX-2.3-style prompt AdaLN: the text K/V are modulated by a sigma-dependent scale/shift in every block."""
    return bool(getattr(model, "prompt_modulation", False)) and bool(model.config.get("use_prompt_adaln_single", True))


def _refusal(model) -> str:
    return (
        "cannot cache the text cross-attention K/V of this LTX-2 transformer: its prompt K/V modulation is "
        "timestep-dependent (cross_attn_mod/audio_cross_attn_mod with use_prompt_adaln_single=True), so the K/V "
        "change at every denoising step. Use cache_text_kv=False (K/V are then quantized on the fly), or a "
        "checkpoint with use_prompt_adaln_single=False.")


@dataclass
class KVCompressionHandle:
    """What :func:`enable_kv_compression` installed. ``stats()`` reports the text cache's memory; ``reset()``
    empties it (e.g. after changing weights); ``processors``: attention module name -> processor."""

    model: torch.nn.Module
    config: KVQuantConfig | None
    cache_text_kv: bool
    hook: _cache.KVCompressionHook | None
    processors: dict = field(default_factory=dict)
    originals: dict = field(default_factory=dict)

    def stats(self) -> dict:
        """Text-cache memory (see :meth:`TextKVStore.stats`) plus the settings: ``kv_bits``, ``lattice``,
        ``bias_correction``, ``cache_text_kv``, ``quantized_layers`` (attention modules by role)."""
        out = self.hook.store.stats() if self.hook is not None else _cache.TextKVStore().stats()
        roles = {}
        for p in self.processors.values():
            roles[p.core.role] = roles.get(p.core.role, 0) + 1
        out.update(kv_bits=None if self.config is None else self.config.bits,
                   lattice=None if self.config is None else self.config.lattice,
                   bias_correction=None if self.config is None else self.config.method,
                   cache_text_kv=self.cache_text_kv, attention_layers=roles,
                   cache_format=next(iter(self.processors.values())).core.cache_format if self.processors else None)
        return out

    def reset(self) -> None:
        if self.hook is not None:
            self.hook.reset_state(self.model)
        for p in self.processors.values():
            p.core.calls = 0


def enable_kv_compression(model: torch.nn.Module, kv_bits: float | None = 4.0, lattice: str = "E8",
                          bias_correction: str = "dither", cache_text_kv: bool = True,
                          tile_size: int | None = None, seed: int = 0,
                          cache_format: str = "rice") -> KVCompressionHandle:
    """Compress the attention K/V of an LTX-Video or LTX-2 transformer (e.g. ``pipe.transformer``).

    Self-attention (and LTX-2's audio<->video) K/V are quantized on the fly at ``kv_bits`` bits per value
    (lattice ``lattice``, RHT along the head dimension with tile ``tile_size`` (default: the head dimension),
    a float16 step per token and head, ``bias_correction`` in {"dither", "qjl", "none"}). With ``cache_text_kv``
    the text cross-attention K/V are computed once per prompt, stored compressed and reused at every step and for
    every batch row / CFG branch with the same prompt embeddings; otherwise they are quantized on the fly too.
    ``kv_bits=None`` turns quantization off (the cache then holds exact K/V). ``cache_format``: how the cache holds
    the lattice codes: "rice" (entropy coded: about ``kv_bits`` per value, side information included, decoded at
    every use) or "int8" (the same codes as int8: same output, ~8 bits per value, decoded by a cast).

    Works whatever the projections are (``nn.Linear`` or quantized linear layers). Raises ``ValueError`` for an
    unsupported model, bad settings, a model already compressed, or a timestep-dependent text side with
    ``cache_text_kv=True``. Undo with :func:`disable_kv_compression`.
    """
    family = _family(model)
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise ValueError("KV compression is already enabled on this model; call disable_kv_compression(model) first")
    if bias_correction not in ("dither", "qjl", "none"):
        raise ValueError(f"bias_correction must be one of ('dither', 'qjl', 'none'), got {bias_correction!r}")
    cfg = None if kv_bits is None else KVQuantConfig(bits=kv_bits, lattice=lattice, method=bias_correction,
                                                     tile_size=tile_size, seed=seed)
    if cache_format not in CACHE_FORMATS:
        raise ValueError(f"cache_format must be one of {CACHE_FORMATS}, got {cache_format!r}")
    if cache_text_kv and family == "ltx2" and _text_side_timestep_dependent(model):
        raise ValueError(_refusal(model))

    hook = None
    text_attns = []   # filled below: the attention layers whose text K/V the cache holds
    if cache_text_kv:
        streams = {"encoder_hidden_states": "video"}
        check = None
        if family == "ltx2":
            streams["audio_encoder_hidden_states"] = "audio"

            def check(m):
                if _text_side_timestep_dependent(m):
                    raise ValueError(_refusal(m))
        hook = _cache.KVCompressionHook(streams, check, sources=lambda m: _cache.text_kv_sources(text_attns))

    roles = _LTX2_ROLES if family == "ltx2" else _LTX_ROLES
    proc_cls = HQKVLTX2AttnProcessor if family == "ltx2" else HQKVLTXAttnProcessor
    handle = KVCompressionHandle(model, cfg, bool(cache_text_kv), hook)
    index = 0
    # Build every processor before touching the model, so a bad setting leaves it unchanged.
    plan = []
    for bi, block in enumerate(model.transformer_blocks):
        for attr, (role, stream) in roles.items():
            attn = getattr(block, attr, None)
            if attn is None:
                continue
            core = _KVCore(role, index, attn.head_dim if hasattr(attn, "head_dim") else attn.inner_dim // attn.heads,
                           cfg, hook=hook, stream=stream, cache=bool(cache_text_kv), cache_format=cache_format,
                           attn=attn)
            plan.append((f"transformer_blocks.{bi}.{attr}", attn, proc_cls(core, attn.processor)))
            if role == "text":
                text_attns.append(attn)
            index += 1
    for name, attn, proc in plan:
        handle.originals[name] = attn.processor
        handle.processors[name] = proc
        attn.set_processor(proc)
    if hook is not None:
        _cache.register(model, hook)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def disable_kv_compression(model: torch.nn.Module) -> None:
    """Restore the original attention processors and remove the cache hook (its memory is freed)."""
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError("KV compression is not enabled on this model")
    for name, proc in handle.originals.items():
        model.get_submodule(name).set_processor(proc)
    if handle.hook is not None:
        handle.hook.reset_state(model)
        _cache.unregister(model)
    setattr(model, _HANDLE_ATTR, None)


def get_kv_compression(model: torch.nn.Module) -> KVCompressionHandle | None:
    """The handle of an enabled model, or ``None``."""
    return getattr(model, _HANDLE_ATTR, None)


def kv_cache_stats(model: torch.nn.Module) -> dict:
    """``get_kv_compression(model).stats()``; ``ValueError`` if KV compression is not enabled."""
    handle = get_kv_compression(model)
    if handle is None:
        raise ValueError("KV compression is not enabled on this model")
    return handle.stats()
