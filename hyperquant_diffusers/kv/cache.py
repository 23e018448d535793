"""The text K/V cache: which prompt rows a denoiser call carries, and their compressed per-layer K/V.

A model-level :class:`KVCompressionHook` (a stateful ``diffusers.hooks.ModelHook``) looks at the prompt
embeddings of every transformer call *before* any projection, and maps each batch row to a cache entry: rows
equal (``torch.equal``) to a stored row reuse its entry — across denoising steps, across CFG branches and across
``cache_context`` names (LTX-2's STG / modality-guidance passes reuse the positive prompt's entry) — and a row
seen for the first time gets a new entry. When a call brings new rows, entries no longer referenced by the latest
call of any cache context are dropped: a changed prompt invalidates the old one. A change to what projects the
text K/V (a LoRA loaded, unloaded, re-weighted or switched off on ``to_k`` / ``to_v``, a weight edited in place)
empties the cache at the next call (:func:`text_kv_sources`), so a LoRA scale changed mid-generation (a step
callback) reaches the text K/V at the next step.

The attention processors (:mod:`.processors`) then ask :meth:`KVCompressionHook.current_ids` for the entries
of the running call and keep one (K, V) pair per entry and attention layer in :class:`TextKVStore`.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager

HOOK_NAME = "hyperquant_kv_compression"

#: why a compiled graph cannot contain the row identification (Dynamo shows it with ``fullgraph=True``)
_NOT_TRACEABLE = ("HyperQuant's text-K/V cache identifies the prompt rows on the host (torch.equal) at every "
                  "transformer call, which a graph cannot contain; with cache_text_kv=True compile the transformer's "
                  "blocks (transformer.compile_repeated_blocks(fullgraph=True)) or the whole transformer without "
                  "fullgraph=True")


def _run_eagerly(fn):
    """``fn`` always runs eagerly: under ``torch.compile`` it is a graph break, and with ``fullgraph=True``
    Dynamo's error carries :data:`_NOT_TRACEABLE`."""
    try:
        return torch.compiler.disable(fn, reason=_NOT_TRACEABLE)
    except TypeError:   # an older torch without the reason argument: the same graph break, Dynamo's own wording
        return torch.compiler.disable(fn)


class _Entry:
    """One unique prompt row of one stream: ``raw`` (a private copy of the row, (L, C), for equality tests) and
    ``kv``: attention-layer key -> (K, V), each a :class:`~.quantizer.CompressedKV` or a plain tensor (L, H, D)
    when quantization is off."""

    __slots__ = ("stream", "raw", "kv")

    def __init__(self, stream: str, raw: torch.Tensor):
        self.stream = stream
        self.raw = raw
        self.kv: dict[str, tuple] = {}


def _nbytes(t) -> int:
    if t is None:
        return 0
    if torch.is_tensor(t):
        return t.numel() * t.element_size()
    return int(t.nbytes)


def _numel(t) -> int:
    return t.numel() if torch.is_tensor(t) else int(t.numel)


class TextKVStore:
    """Every cached text K/V pair, shared by all cache contexts. Counters: ``computed`` (layer K/V pairs projected
    and stored), ``reused`` (layer K/V pairs served from the cache); ``peak``: the :meth:`stats` memory figures
    when the cache was largest (pipelines empty the cache at the end of a generation through
    ``reset_stateful_hooks``, so the peak is what a generation held)."""

    def __init__(self):
        self.entries: dict[int, _Entry] = {}
        self._next = 0
        self.computed = 0
        self.reused = 0
        self.peak = self._memory()

    def clear(self) -> None:
        self.entries.clear()

    def add_pair(self, eid: int, key: str, k, v) -> None:
        """Store layer ``key``'s (K, V) for entry ``eid`` and update the peak."""
        self.entries[eid].kv[key] = (k, v)
        self.computed += 1
        cur = self._memory()  # O(pairs): a few hundred per generation at most
        if cur["total_bytes"] > self.peak["total_bytes"]:
            self.peak = cur

    def find_or_add(self, stream: str, row: torch.Tensor) -> int:
        for eid, e in self.entries.items():
            if (e.stream == stream and e.raw.shape == row.shape and e.raw.dtype == row.dtype
                    and e.raw.device == row.device and torch.equal(e.raw, row)):
                return eid
        eid = self._next
        self._next += 1
        self.entries[eid] = _Entry(stream, row.detach().clone())
        return eid

    def keep_only(self, keep: set[int]) -> None:
        for eid in [e for e in self.entries if e not in keep]:
            del self.entries[eid]

    def stats(self) -> dict:
        """Memory held now, in bytes: ``kv_bytes`` (stored K/V, side information included), ``kv_bf16_bytes`` (the
        same K/V in bfloat16), ``reference_bytes`` (copies of the prompt rows kept to detect a changed prompt);
        ``computed`` / ``reused`` counters; ``peak``: the same memory figures at the largest point so far."""
        out = self._memory()
        out.update(computed=self.computed, reused=self.reused, peak=dict(self.peak))
        return out

    def _memory(self) -> dict:
        kv = ref = numel = pairs = 0
        for e in self.entries.values():
            ref += _nbytes(e.raw)
            for k, v in e.kv.values():
                kv += _nbytes(k) + _nbytes(v)
                numel += _numel(k) + _numel(v)
                pairs += 1
        return {
            "entries": len(self.entries),
            "layer_kv_pairs": pairs,
            "kv_bytes": kv,
            "kv_bf16_bytes": 2 * numel,
            "compression_vs_bf16": (2 * numel / kv) if kv else None,
            "bits_per_value": (8.0 * kv / numel) if numel else None,
            "reference_bytes": ref,
            "total_bytes": kv + ref,
        }


def text_kv_sources(attns) -> tuple:
    """What the cached text K/V of attention modules ``attns`` depend on besides the prompt, as
    ``(tensors, versions, switches)``: every parameter and buffer of ``to_k``, ``to_v`` and ``norm_k`` (the tensor
    objects, compared by identity, and their in-place version counters), and peft's adapter switches on them
    (scales, active, disabled and merged adapters), which change a projection without touching a tensor."""
    tensors, versions, switches = [], [], []
    for attn in attns:
        for part in (attn.to_k, attn.to_v, getattr(attn, "norm_k", None)):
            if part is None:
                continue
            for m in part.modules():
                for t in (*m._parameters.values(), *m._buffers.values()):
                    if t is not None:
                        tensors.append(t)
                        versions.append(t._version)
                scaling = getattr(m, "scaling", None)
                if isinstance(scaling, dict):   # a peft tuner layer
                    switches.append((tuple(sorted(scaling.items())), bool(getattr(m, "disable_adapters", False)),
                                     tuple(getattr(m, "active_adapters", ())),
                                     tuple(getattr(m, "merged_adapters", ()))))
    return tuple(tensors), tuple(versions), tuple(switches)


def _same_sources(a: tuple, b: tuple) -> bool:
    return (len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0], strict=True))
            and a[1] == b[1] and a[2] == b[2])


class _CallState(BaseState):
    """Per cache context: the prompt tensors of its latest call and their entry ids, per stream."""

    def __init__(self):
        self.last: dict[str, tuple] = {}

    def reset(self):
        self.last.clear()


class KVCompressionHook(ModelHook):
    """Model-level hook: identifies the prompt rows of each call (see module docstring) and holds the cache.

    ``streams``: forward argument name -> stream name (LTX-Video: ``{"encoder_hidden_states": "video"}``; LTX-2
    adds ``{"audio_encoder_hidden_states": "audio"}``). ``check``: called with the model before every forward;
    raises if caching has become invalid (e.g. the text side turned timestep-dependent). ``sources``: called with
    the model before every forward, returns :func:`text_kv_sources` of the cached attention layers; when it
    changes, every entry is dropped.
    """

    _is_stateful = True

    def __init__(self, streams: dict[str, str], check=None, sources=None):
        super().__init__()
        self.streams = dict(streams)
        self.check = check
        self.sources = sources
        self._sources_seen = None
        self.store = TextKVStore()
        self.state_manager = StateManager(_CallState)
        self._active: dict[str, list[int]] | None = None
        self._sig = None

    def _find(self, module, args, kwargs, name):
        if name in kwargs:
            return kwargs[name]
        if self._sig is None:
            self._sig = inspect.signature(self.fn_ref.original_forward)
        try:
            bound = self._sig.bind_partial(*args, **kwargs)
        except TypeError:
            return None
        return bound.arguments.get(name)

    @_run_eagerly
    def _identify(self, state: _CallState, stream: str, x: torch.Tensor) -> list[int]:
        last = state.last.get(stream)
        # Fast path: the very tensor of the previous call, unmodified since (pipelines build the prompt embeddings
        # once per generation). ``last`` keeps a reference, so the object cannot be freed and its id reused.
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        ids = [self.store.find_or_add(stream, x[b]) for b in range(x.shape[0])]
        state.last[stream] = (x, x._version, ids)
        keep = set()
        for st in self.state_manager._state_cache.values():
            for _, _, i in st.last.values():
                keep.update(i)
        self.store.keep_only(keep)
        return ids

    @_run_eagerly
    def _drop_all_if_sources_changed(self, module: torch.nn.Module) -> None:
        now = self.sources(module)
        if self._sources_seen is not None and not _same_sources(now, self._sources_seen):
            self.store.clear()
            for st in self.state_manager._state_cache.values():
                st.reset()   # the contexts stay (a pipeline may be inside one); their rows are forgotten
        self._sources_seen = now

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.check is not None:
            self.check(module)
        if self.sources is not None:
            self._drop_all_if_sources_changed(module)
        if self.state_manager._context is None:
            self.state_manager.set_context(CacheContext(name="inference"))
        state = self.state_manager.get_state()
        active = {}
        for arg, stream in self.streams.items():
            x = self._find(module, args, kwargs, arg)
            if torch.is_tensor(x) and x.dim() == 3:
                active[stream] = self._identify(state, stream, x)
        prev, self._active = self._active, active
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self._active = prev

    def current_ids(self, stream: str) -> list[int] | None:
        """Entry ids of the batch rows of the running call's ``stream``; ``None`` outside a model call."""
        if self._active is None:
            return None
        return self._active.get(stream)

    def reset_state(self, module: torch.nn.Module):
        self.state_manager.reset()
        self.store.clear()
        self._sources_seen = None
        return module


def register(model: torch.nn.Module, hook: KVCompressionHook) -> None:
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)


def unregister(model: torch.nn.Module) -> None:
    if hasattr(model, "_diffusers_hook"):
        model._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)


def get_hook(model: torch.nn.Module) -> KVCompressionHook | None:
    reg = getattr(model, "_diffusers_hook", None)
    return None if reg is None else reg.get_hook(HOOK_NAME)
