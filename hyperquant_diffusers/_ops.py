"""The ``hyperquant`` operator namespace, and the tables through which its ops find their Python objects.

Custom ops keep HyperQuant's Python-side work (Triton launches, caches, Rice streams) opaque to ``torch.compile``.
An op cannot take a Python object, so each object that an op serves (a ``LatticeLinear`` layer, a K/V
compression core) gets a number: a one-element CPU int64 tensor that the graph passes as an ordinary input. It is
a tensor and not a constant, so the graph of one transformer block serves every block, and a copy of it (as
``torch.library.opcheck`` makes) still names the same object.
"""

from __future__ import annotations

import itertools
import weakref

import torch

#: the one library object of the namespace (a namespace can be defined once per process); ops add to it
LIB = torch.library.Library("hyperquant", "DEF")
_NEXT_ID = itertools.count(1)   # shared by every table: an id never names two objects


class ObjectIds:
    """Live objects of one kind by number (weakly held: the table never keeps an object alive)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._objects: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def register(self, obj) -> torch.Tensor:
        """Enter ``obj``; returns its ``op_id``, a CPU int64 tensor of shape (1,)."""
        n = next(_NEXT_ID)
        self._objects[n] = obj
        return torch.tensor([n], dtype=torch.int64, device="cpu")   # explicit: not meta under init_empty_weights

    def lookup(self, op_id: torch.Tensor, op_name: str):
        """The live object numbered ``op_id``; errors name ``op_name`` and the problem."""
        if op_id.numel() != 1 or op_id.dtype != torch.int64:
            raise ValueError(f"{op_name}: op_id must be a one-element int64 tensor, got {op_id.dtype} "
                             f"{tuple(op_id.shape)}")
        n = int(op_id)
        obj = self._objects.get(n)
        if obj is None:
            raise RuntimeError(f"{op_name}: no live {self.kind} has op_id {n}; the op takes the op_id of a live "
                               f"{self.kind}")
        return obj
