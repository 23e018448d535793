"""Attention processors for LTX-Video (``LTXAttention``) and LTX-2 (``LTX2Attention``) with K/V compression.

They compute exactly what diffusers' ``LTXVideoAttnProcessor`` / ``LTX2AudioVideoAttnProcessor`` /
``LTX2PerturbedAttnProcessor`` compute (same projections, norms, RoPE, gating, perturbation, attention backend),
except for the keys and values:

* role ``"self"`` (video / audio self-attention) and ``"cross"`` (LTX-2's audio->video and video->audio
  attentions): K and V, after norm and RoPE, are quantized on the fly at ``kv_bits`` (one draw of dither / QJL
  per call) and reconstructed before attention;
* role ``"text"`` (prompt cross-attention): K (after ``norm_k``, before any RoPE) and V are projected once per
  unique prompt row, stored compressed in the model hook's :class:`~.cache.TextKVStore`, and reused; with
  ``cache=False`` they are quantized on the fly instead, with the same seeds, so both give the same output.

With ``cfg=None`` nothing is quantized (the text cache then holds the K/V losslessly).
"""

from __future__ import annotations

import sys
import weakref

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as _ltx_rope
from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

from .compiled_ops import CORES
from .quantizer import KVQuantConfig, KVQuantizer, fused_text_kernel

ROLES = ("self", "cross", "text")
_MASK = 0x7FFF_FFFF_FFFF_FFFF


def _in_inductor_graph_run(device: torch.device) -> bool:
    """Whether this thread is inside a call of ``torch.compile``'s CUDA-graph trees (``mode="reduce-overhead"``) on
    ``device``: their warm-up and recording calls run on the tree manager's own stream (their replays run no Python
    at all). A warm-up is not a capture, so ``is_current_stream_capturing`` misses it, and what it allocates lands in
    the graphs' memory pool: caching K/V there would fail later with Inductor's "not tracked" error instead of ours."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")   # never imported: no graph tree exists
    if trees is None:
        return False
    try:
        manager = trees.get_manager(device.index, create_if_none_exists=False)
    except Exception:   # a private API: if it changes, the capture check below still holds for the recording call
        return False
    return manager is not None and torch.cuda.current_stream(device) == manager.stream


def _refuse_capture(t: torch.Tensor) -> None:
    """Raise a RuntimeError when a CUDA graph is being captured on ``t``'s device, or torch.compile's CUDA graphs
    are being warmed up there. A graph replays kernels without this Python: the per-call dither seeds would stop
    advancing and the text-K/V cache would keep serving the prompt it held at capture time, so a replay could
    silently use another prompt's K/V."""
    if t.is_cuda and (torch.cuda.is_current_stream_capturing() or _in_inductor_graph_run(t.device)):
        raise RuntimeError(
            "HyperQuant K/V compression cannot run inside a CUDA graph capture (torch.compile with "
            "mode=\"reduce-overhead\" or \"max-autotune\", torch.cuda.graph): a replay would freeze its per-call "
            "dither seeds and its text-K/V cache, which is kept on the host. Compile with the default mode, or "
            "disable_kv_compression() before capturing (after this error inside torch.compile's CUDA graphs, call "
            "torch._dynamo.reset() and compile again); quantized weights (LatticeLinear) do support CUDA graphs")


class _KVCore:
    """The K/V handling shared by both processors. ``index``: the layer's position (fixes its seeds)."""

    def __init__(self, role: str, index: int, head_dim: int, cfg: KVQuantConfig | None, hook=None,
                 stream: str | None = None, cache: bool = False, cache_format: str = "rice", attn=None):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role, self.index, self.head_dim, self.cfg = role, int(index), int(head_dim), cfg
        self.hook, self.stream, self.cache, self.cache_format = hook, stream, bool(cache), cache_format
        self.key = f"{index}"
        base = (cfg.seed if cfg is not None else 0) * 1_000_003 + 7919 * self.index
        self.base = base
        self.kq = KVQuantizer(cfg, head_dim, seed=base) if cfg is not None else None
        self.vq = KVQuantizer(cfg, head_dim, seed=base + 1) if cfg is not None else None
        self.calls = 0
        # how the compiled ops find this core and, for the text K/V, its attention module (compiled_ops)
        self.op_id = CORES.register(self)
        self.attn = weakref.ref(attn) if attn is not None else None

    def __setstate__(self, state):
        # copy.deepcopy / unpickling: a copy is a core of its own for the compiled ops (its own seed counter)
        self.__dict__.update(state)
        self.op_id = CORES.register(self)

    # on-the-fly (self / cross attention): (B, S, H, D) in, same out
    def quantize_now(self, key: torch.Tensor, value: torch.Tensor):
        if self.kq is None:
            return key, value
        _refuse_capture(key)
        c = self.calls
        self.calls += 1
        seed = (self.base * 1_000_033 + 2 * c + 17) & _MASK
        return self.kq.fake_quantize(key, seed), self.vq.fake_quantize(value, (seed + 1) & _MASK)

    def _text_seed(self, which: int) -> int:
        # fixed per layer: the cached and the on-the-fly text paths draw the same dither / QJL projection
        return (self.base * 1_000_037 + 101 + which) & _MASK

    def _pack(self, x: torch.Tensor, which: int):
        """One prompt row's K or V (L, H*D) -> what the cache holds."""
        q = self.kq if which == 0 else self.vq
        if q is None:
            return x.detach()
        return q.compress(x.detach().unflatten(-1, (-1, self.head_dim)), self._text_seed(which), self.cache_format,
                          fused=fused_text_kernel())

    @staticmethod
    def _unpack(p) -> torch.Tensor:
        return p if torch.is_tensor(p) else p.dequantize().flatten(-2)

    def _text_now(self, k: torch.Tensor, v: torch.Tensor):
        if self.kq is None:
            return k, v
        hd = self.head_dim
        # what the cache's entries decode to (the same path, the same dither): caching the text K/V changes nothing
        fused = fused_text_kernel()
        ks = [self.kq.fake_quantize_as_cached(k[b].unflatten(-1, (-1, hd)), self._text_seed(0), fused).flatten(-2)
              for b in range(k.shape[0])]
        vs = [self.vq.fake_quantize_as_cached(v[b].unflatten(-1, (-1, hd)), self._text_seed(1), fused).flatten(-2)
              for b in range(v.shape[0])]
        return torch.stack(ks), torch.stack(vs)

    def text_kv(self, project, encoder_hidden_states: torch.Tensor):
        """Text K (post ``norm_k``) and V, (B, L, H*D). ``project(rows)`` computes them for a subset of rows."""
        if self.kq is not None or self.cache:
            _refuse_capture(encoder_hidden_states)
        ids = self.hook.current_ids(self.stream) if (self.cache and self.hook is not None) else None
        b = encoder_hidden_states.shape[0]
        if ids is None or len(ids) != b:
            return self._text_now(*project(encoder_hidden_states))
        store = self.hook.store
        uniq = list(dict.fromkeys(ids))
        missing = [e for e in uniq if self.key not in store.entries[e].kv]
        if missing:
            rows = [ids.index(e) for e in missing]
            k, v = project(encoder_hidden_states[rows])
            for j, e in enumerate(missing):
                store.add_pair(e, self.key, self._pack(k[j], 0), self._pack(v[j], 1))
        store.reused += len(uniq) - len(missing)
        dec = {e: tuple(self._unpack(p) for p in store.entries[e].kv[self.key]) for e in uniq}
        k = torch.stack([dec[e][0] for e in ids])
        v = torch.stack([dec[e][1] for e in ids])
        return k, v


def _prepare_mask(attn, hidden_states, encoder_hidden_states, attention_mask):
    """diffusers' LTX mask preparation: (batch, heads, query, key) additive mask, or None."""
    if attention_mask is None:
        return None
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
    attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    return attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])


class _Base:
    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: _KVCore, original=None):
        self.core = core
        self.original = original
        if original is not None:
            self._attention_backend = getattr(original, "_attention_backend", None)
            self._parallel_config = getattr(original, "_parallel_config", None)

    def _attend(self, query, key, value, attention_mask):
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)

    def _kv(self, attn, encoder_hidden_states, rope):
        """K, V as (B, S, H, D), ready for attention. ``rope(key) -> key`` or ``None``."""
        core = self.core
        # under torch.compile the K/V compression steps are opaque ops (compiled_ops); the rest is traced
        compiling = torch.compiler.is_compiling()
        if core.role == "text":
            if compiling:
                if core.attn is None or core.attn() is not attn:
                    raise RuntimeError("this K/V processor's core was built for another attention module; install "
                                       "processors with enable_kv_compression")
                key, value = torch.ops.hyperquant.kv_text(encoder_hidden_states, core.op_id, attn.to_k.out_features,
                                                          attn.to_v.out_features)
            else:
                def project(x):
                    return attn.norm_k(attn.to_k(x)), attn.to_v(x)

                key, value = core.text_kv(project, encoder_hidden_states)
            if rope is not None:
                key = rope(key)
            return key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(encoder_hidden_states))
        value = attn.to_v(encoder_hidden_states)
        if rope is not None:
            key = rope(key)
        key, value = key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))
        if compiling and core.kq is not None:
            return torch.ops.hyperquant.kv_quantize(key, value, core.op_id)
        return core.quantize_now(key, value)


class HQKVLTXAttnProcessor(_Base):
    """Drop-in for diffusers' ``LTXVideoAttnProcessor`` (LTX-Video) with K/V compression."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        attention_mask = _prepare_mask(attn, hidden_states, encoder_hidden_states, attention_mask)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.norm_q(attn.to_q(hidden_states))
        rope = None
        if image_rotary_emb is not None:
            query = _ltx_rope(query, image_rotary_emb)
            rope = lambda k: _ltx_rope(k, image_rotary_emb)  # noqa: E731
        key, value = self._kv(attn, encoder_hidden_states, rope)
        query = query.unflatten(2, (attn.heads, -1))
        out = self._attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class HQKVLTX2AttnProcessor(_Base):
    """Drop-in for diffusers' ``LTX2AudioVideoAttnProcessor`` and ``LTX2PerturbedAttnProcessor`` with K/V
    compression (the perturbed path's skipped-attention rows use the unquantized value projection, as there)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, query_rotary_emb=None, key_rotary_emb=None,
                 perturbation_mask: torch.Tensor | None = None, all_perturbed: bool | None = None) -> torch.Tensor:
        attention_mask = _prepare_mask(attn, hidden_states, encoder_hidden_states, attention_mask)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        if attn.to_gate_logits is not None:
            gate_logits = attn.to_gate_logits(hidden_states)
        if all_perturbed is None:
            all_perturbed = torch.all(perturbation_mask == 0) if perturbation_mask is not None else False

        if all_perturbed:
            hidden_states = attn.to_v(encoder_hidden_states)
        else:
            query = attn.norm_q(attn.to_q(hidden_states))
            rope = None
            if query_rotary_emb is not None:
                fn = apply_interleaved_rotary_emb if attn.rope_type == "interleaved" else apply_split_rotary_emb
                if attn.rope_type not in ("interleaved", "split"):
                    raise ValueError(f"unknown rope_type {attn.rope_type!r}")
                query = fn(query, query_rotary_emb)
                kr = key_rotary_emb if key_rotary_emb is not None else query_rotary_emb
                rope = lambda k: fn(k, kr)  # noqa: E731
            key, value = self._kv(attn, encoder_hidden_states, rope)
            query = query.unflatten(2, (attn.heads, -1))
            hidden_states = self._attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
            if perturbation_mask is not None:
                hidden_states = torch.lerp(attn.to_v(encoder_hidden_states), hidden_states, perturbation_mask)

        if attn.to_gate_logits is not None:
            hidden_states = hidden_states.unflatten(2, (attn.heads, -1))
            gates = 2.0 * torch.sigmoid(gate_logits)
            hidden_states = (hidden_states * gates.unsqueeze(-1)).flatten(2, 3)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
