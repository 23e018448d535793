"""``LatticeLinear`` under ``torch.compile``: each quantized layer is one opaque custom op in the graph.

Why an op: the layer's forward is Python that Dynamo cannot trace (Triton launches through a kernel cache, a
side-stream decode prefetch, numba on the CPU path, per-layer caches). Traced as is, every layer broke the graph,
and the per-layer state made Dynamo recompile for every block until it gave up. Under ``torch.compile``
:meth:`LatticeLinear.forward` emits ``torch.ops.hyperquant.lattice_linear(x, op_id, out_features, mma, state)`` instead; the
op runs the layer's eager forward at run time, and everything around it (norms, RoPE, attention, elementwise math)
compiles as usual, ``fullgraph=True`` included.

How the op finds its layer: every LatticeLinear holds a one-element CPU int64 tensor, ``op_id``, its number in a
table of live layers (:class:`hyperquant_diffusers._ops.ObjectIds`). It is a plain attribute, not a buffer: device
moves, dtype casts and ``to_empty`` leave it alone, and ``copy.deepcopy`` or unpickling gives the copy a number of
its own. Passing the number as a tensor, not as a constant, keeps the graph the same for every block of a model, so
regional compilation (diffusers' ``compile_repeated_blocks``) compiles one block and reuses it for all of them.

The op also takes the layer's MMA type and its resident tensors (codes and scales, or the Rice stream's index and
scales; signs; bias), which it does not read from the arguments: they make the graph depend on them. Dynamo guards
on the MMA string and passes a module's buffers as graph inputs marked static, so an MMA or residency switch
recompiles, and with CUDA graphs (``mode="reduce-overhead"``) a layer whose tensors moved or were replaced makes
Inductor record its graphs again, instead of replaying kernels of the old MMA or kernels that read old addresses.

One behaviour differs from eager: compiled code reuses activation buffers without bumping their version counters,
so the eager sharing of one activation quantization between layers fed the same tensor (to_q / to_k / to_v) would
not be safe there. Under ``torch.compile`` each layer quantizes its own activation (same result, one more pass).
"""

from __future__ import annotations

import torch

from .._ops import LIB, ObjectIds

OP_NAME = "hyperquant::lattice_linear"
LAYERS = ObjectIds("LatticeLinear")


def register(layer) -> torch.Tensor:
    """Enter ``layer`` in the table; returns its ``op_id`` (called by ``LatticeLinear.__init__`` and
    ``__setstate__``: deepcopy and unpickling)."""
    return LAYERS.register(layer)


def layer_of(op_id: torch.Tensor):
    """The live LatticeLinear numbered ``op_id`` (a one-element int64 tensor)."""
    return LAYERS.lookup(op_id, OP_NAME)


def lattice_linear(x: torch.Tensor, op_id: torch.Tensor, out_features: int, mma: str,
                   state: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The eager forward of the LatticeLinear numbered ``op_id``: x (..., in_features) -> (..., out_features) in
    x's dtype, without sharing activation quantizations between layers (see the module docstring). This is the
    kernel of ``torch.ops.hyperquant.lattice_linear``; it returns a new tensor, never a view of ``x``.
    ``mma``: the layer's MMA type when the graph was traced, and ``state``: its resident tensors
    (:meth:`LatticeLinear.resident_tensors`). The kernel reads both through the layer; they are arguments so that
    the graph depends on them (see the module docstring). A layer whose MMA no longer matches is an error."""
    layer = layer_of(op_id)
    if layer.out_features != out_features:
        raise ValueError(f"{OP_NAME}: layer {int(op_id)} has {layer.out_features} outputs, the call says "
                         f"{out_features}")
    if layer.mma != mma:
        raise ValueError(f"{OP_NAME}: layer {int(op_id)} computes with mma={layer.mma!r}, the call says {mma!r}")
    return layer.eager_forward(x, share_activation=False)


def _lattice_linear_fake(x: torch.Tensor, op_id: torch.Tensor, out_features: int, mma: str,
                         state: list[torch.Tensor] | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


# Registered through torch.library.Library, not the torch.library.custom_op decorator: the decorator's Python
# wrapper (autograd redispatch, aliasing check) cost 7.3 us per call against 2.5 us this way (a kernel that only
# allocates its output, this project's 2-core CI machine, torch 2.13, 2026-12-02), and a compiled LTX-2 step makes
# 1344 such calls: ~6 ms of host time per step, where the compressed modes are close to host-bound. No autograd
# kernel: LatticeLinear.forward keeps inputs that need a gradient out of the op.
LIB.define("lattice_linear(Tensor x, Tensor op_id, int out_features, str mma, Tensor[] state) -> Tensor")
LIB.impl("lattice_linear", lattice_linear, "CompositeExplicitAutograd")
torch.library.register_fake(OP_NAME, _lattice_linear_fake, lib=LIB)
