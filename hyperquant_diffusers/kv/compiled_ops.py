"""The K/V compression processors under ``torch.compile``: the compression steps as opaque custom ops.

Why: the processors' K/V work is Python that Dynamo cannot trace (a per-call seed counter, numba, the text-K/V
cache's prompt bookkeeping). Under compilation :class:`~.processors._Base` emits these ops instead, and the
projections, norms, RoPE and attention around them compile as usual, ``fullgraph=True`` included. Each op finds its
:class:`~.processors._KVCore` through the core's ``op_id`` (:class:`hyperquant_diffusers._ops.ObjectIds`):

* ``hyperquant::kv_quantize(key, value, op_id) -> (key, value)``: self / cross attention K and V, (B, S, H, D),
  quantized and reconstructed with the core's next per-call seed (the same seeds as eager, call for call);
* ``hyperquant::kv_text(encoder_hidden_states, op_id, k_features, v_features) -> (key, value)``: the text K (after
  ``norm_k``) and V, (B, L, k_features / v_features), through the core's cache, projecting the rows it lacks with
  the attention module's own layers (run eagerly inside the op).
"""

from __future__ import annotations

import contextlib

import torch

from .._ops import LIB, ObjectIds

CORES = ObjectIds("K/V compression core")


def _core(op_id: torch.Tensor, op: str):
    return CORES.lookup(op_id, f"hyperquant::{op}")


def kv_quantize(key: torch.Tensor, value: torch.Tensor, op_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    core = _core(op_id, "kv_quantize")
    if core.kq is None:
        raise ValueError("hyperquant::kv_quantize: this core quantizes nothing (kv_bits=None); do not call the op")
    return core.quantize_now(key, value)


def _kv_quantize_fake(key, value, op_id):
    return torch.empty_like(key), torch.empty_like(value)


def _no_sharing(x: torch.Tensor):
    # the projections below run eagerly on a tensor compiled code may reuse: keep LatticeLinear's activation
    # sharing (keyed on tensor identity and version) out of it
    if not x.is_cuda:
        return contextlib.nullcontext()
    try:
        from hyperquant_diffusers.kernels.dispatch import no_activation_sharing
    except ImportError:
        return contextlib.nullcontext()
    return no_activation_sharing()


def kv_text(encoder_hidden_states: torch.Tensor, op_id: torch.Tensor, k_features: int,
            v_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    core = _core(op_id, "kv_text")
    attn = core.attn() if core.attn is not None else None
    if attn is None:
        raise RuntimeError("hyperquant::kv_text: the core's attention module is gone (or was never set)")

    def project(x):
        return attn.norm_k(attn.to_k(x)), attn.to_v(x)

    with _no_sharing(encoder_hidden_states):
        k, v = core.text_kv(project, encoder_hidden_states)
    if k.shape[-1] != k_features or v.shape[-1] != v_features:
        raise ValueError(f"hyperquant::kv_text: K/V have {k.shape[-1]}/{v.shape[-1]} features, the call says "
                         f"{k_features}/{v_features}")
    return k, v


def _kv_text_fake(encoder_hidden_states, op_id, k_features, v_features):
    lead = encoder_hidden_states.shape[:-1]
    return (encoder_hidden_states.new_empty((*lead, k_features)),
            encoder_hidden_states.new_empty((*lead, v_features)))


# No autograd kernels: the K/V compression is an inference feature (the processors run under no_grad pipelines)
LIB.define("kv_quantize(Tensor key, Tensor value, Tensor op_id) -> (Tensor, Tensor)")
LIB.impl("kv_quantize", kv_quantize, "CompositeExplicitAutograd")
torch.library.register_fake("hyperquant::kv_quantize", _kv_quantize_fake, lib=LIB)
LIB.define("kv_text(Tensor encoder_hidden_states, Tensor op_id, int k_features, int v_features) -> (Tensor, Tensor)")
LIB.impl("kv_text", kv_text, "CompositeExplicitAutograd")
torch.library.register_fake("hyperquant::kv_text", _kv_text_fake, lib=LIB)

