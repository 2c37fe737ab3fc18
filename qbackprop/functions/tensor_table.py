"""A side table keyed on live tensor objects: what qbackprop knows about a tensor in a forward.

Knowledge about a tensor (that a qbackprop Function already keeps it, how to rebuild it from a
producer's codes) lives here, never as an attribute written onto the tensor, and never keyed
on a storage address, which the allocator hands to a new tensor once the old one is freed.
An entry lives exactly as long as its tensor: a weak reference removes it when the tensor
object is freed, so a later tensor can never read an earlier one's entry.
"""

from __future__ import annotations

import weakref
from typing import Generic, TypeVar

import torch

V = TypeVar("V")


class TensorTable(Generic[V]):
    """``tensor -> value`` by object identity, weakly held on the tensor side."""

    __slots__ = ("_entries", "__weakref__")

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, V]] = {}

    def __setitem__(self, t: torch.Tensor, value: V) -> None:
        key = id(t)
        table = weakref.ref(self)

        def drop(ref: weakref.ref, key: int = key) -> None:
            owner = table()
            # Only this tensor's own entry: a new tensor may already hold the id.
            if owner is not None and owner._entries.get(key, (None,))[0] is ref:
                del owner._entries[key]

        self._entries[key] = (weakref.ref(t, drop), value)

    def get(self, t: torch.Tensor, default: V | None = None) -> V | None:
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t:
            return default
        return entry[1]

    def __contains__(self, t: torch.Tensor) -> bool:
        entry = self._entries.get(id(t))
        return entry is not None and entry[0]() is t

    def __len__(self) -> int:
        return len(self._entries)
