"""Weights waiting to be quantized in same-shape groups, one codec call per group.

Both the on-load quantizer (``quantizers.core.OnLoadQuantizer``) and batched LoRA merges (``nn.lora``) hold weights
here until a group is full, then quantize it with ``kernels.quantize.quantize_many``. The buffer only decides
*when* a group is due; what a group becomes is the caller's business.
"""

from __future__ import annotations

from typing import Any, Hashable

#: the buffers together may hold this many groups' worth of values before the largest is quantized early: a model
#: loads (or merges) its layers in module order, which mixes several weight shapes (LTX-2 has ~8 per block)
MAX_BUFFERED_GROUPS = 4


class GroupBuffer:
    """Items in groups keyed by anything hashable (the caller's "same codec call" key), each item counted by its
    number of float values.

    :meth:`add` returns the groups that became due, removed from the buffer, as ``[(key, [item, ...]), ...]``: the
    item's own group once it holds ``group_size`` items, then, while the groups together hold more than
    ``max_values`` values, the largest group. :meth:`pop_all` empties the buffer; :attr:`high_water` is the most
    values ever held at once.
    """

    def __init__(self, max_values: int):
        self.max_values = int(max_values)
        self._groups: dict[Hashable, list[tuple[Any, int]]] = {}
        self.values = 0
        self.high_water = 0

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def add(self, key: Hashable, item: Any, numel: int, group_size: int) -> list[tuple[Hashable, list]]:
        group = self._groups.setdefault(key, [])
        group.append((item, int(numel)))
        self.values += int(numel)
        self.high_water = max(self.high_water, self.values)
        due = []
        if len(group) >= max(1, int(group_size)):
            due.append(self._pop(key))
        while self.values > self.max_values and self._groups:
            due.append(self._pop(max(self._groups, key=lambda k: sum(n for _, n in self._groups[k]))))
        return due

    def pop_all(self) -> list[tuple[Hashable, list]]:
        return [self._pop(k) for k in list(self._groups)]

    def _pop(self, key: Hashable) -> tuple[Hashable, list]:
        group = self._groups.pop(key)
        self.values -= sum(n for _, n in group)
        return key, [item for item, _ in group]
