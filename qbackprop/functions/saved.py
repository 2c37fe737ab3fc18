"""How our autograd Functions keep an activation for backward: packed, raw, or quantized late.

Every tensor a Function keeps goes through ``ctx.save_for_backward`` (never a bare ``ctx``
attribute), so the bytes autograd holds can be measured by saved-tensor hooks, and any user
hook (CPU offload, ...) sees them. Tensors that are already compressed, or that a layer chose
to keep at full precision, are *marked* so the fallback hook does not compress them again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import runtime
from ..quant import CompressedTensor, QuantSpec, compress
from ..quant.spec import Storage
from .shared import Leaf, Recipe, identity, leaf_bits, usable_recipe
from .tensor_table import TensorTable

# Tensors a qbackprop Function keeps as they are (or already compressed), for as long as each
# lives: a side table, so nothing is written onto a user's tensors.
_HANDLED: TensorTable[bool] = TensorTable()


def mark_handled(*tensors: torch.Tensor | None) -> None:
    """Mark tensors that a qbackprop Function keeps as they are: the fallback skips them.

    (Not in a traced graph, where the fallback hooks are off: see ``runtime.py``.)"""
    if runtime.tracing():
        return
    for t in tensors:
        if t is not None:
            _HANDLED[t] = True


def is_handled(t: torch.Tensor) -> bool:
    return t in _HANDLED


class _Slot:
    """What one saved activation needs besides its tensors: how to rebuild it in backward."""

    __slots__ = ("kind", "shell", "count", "spec", "recipe")

    def __init__(
        self, kind: str, shell: CompressedTensor | None, count: int, spec, recipe=None
    ) -> None:
        self.kind, self.shell, self.count, self.spec = kind, shell, count, spec
        self.recipe = recipe


def save_for_backward(
    ctx,
    activations: Sequence[tuple[torch.Tensor | None, QuantSpec | None]],
    exact: Sequence[torch.Tensor | None] = (),
) -> list[Recipe | None]:
    """Save activations (each compressed by its spec) and exact tensors on ``ctx``.

    Args:
        ctx: the autograd Function context.
        activations: ``(tensor, spec)`` pairs. ``spec`` None or disabled keeps the tensor at
            full precision; storage ``packed`` keeps only the compressed copy; ``on_backward``
            keeps the full tensor and quantizes it when backward starts (an ablation).
        exact: tensors kept as they are (per-channel statistics, small gates, parameters).

    An activation that carries a usable ``Recipe`` (see ``shared.py``: e.g. a BatchNorm output)
    is not compressed again: the producer's packed tensors are saved once more (same storage,
    no new bytes) and the activation is rebuilt from them in backward.

    ``load_saved(ctx)`` in backward returns ``(activations, exact)`` in the same order.

    Returns:
        For each activation, a ``Recipe`` that rebuilds it from what was saved (None for a
        missing activation or storage ``on_backward``), for a producer to tag its output with.
    """
    slots: list[_Slot | None] = []
    tensors: list[torch.Tensor | None] = []
    sources: list[Recipe | None] = []
    for x, spec in activations:
        if x is None:
            slots.append(None)
            sources.append(None)
            continue
        if spec is None or not spec.enabled or not x.is_floating_point():
            mark_handled(x)
            slots.append(_Slot("raw", None, 1, spec))
            tensors.append(x)
            shares = runtime.shares()
            sources.append(_source(Leaf(None, (x,), 32.0), x.dtype) if shares else None)
        elif spec.storage == Storage.ON_BACKWARD:
            mark_handled(x)
            slots.append(_Slot("late", None, 1, spec))
            tensors.append(x)
            sources.append(None)
        elif (recipe := usable_recipe(x, spec)) is not None:
            held = recipe.tensors()
            mark_handled(*held)
            slots.append(_Slot("recipe", None, len(held), spec, recipe.stub()))
            tensors.extend(held)
            sources.append(recipe)
        else:
            ct = compress(x, spec)
            # The shell keeps shapes and counts; its tensors live only in autograd's slots.
            held = ct.take_tensors()
            mark_handled(*held)
            slots.append(_Slot("packed", ct, len(held), spec))
            tensors.extend(held)
            # (Nothing is shared in a traced graph: no recipe to build there.)
            leaf = Leaf(ct, tuple(held), leaf_bits(spec))
            sources.append(_source(leaf, x.dtype) if runtime.shares() else None)
    mark_handled(*exact)
    ctx.qbackprop_slots = slots
    ctx.qbackprop_num_exact = len(exact)
    ctx.save_for_backward(*tensors, *exact)
    return sources


def _source(leaf: Leaf, dtype: torch.dtype) -> Recipe:
    return Recipe((leaf,), (), identity, True, None, dtype)


def load_saved(ctx) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Inverse of ``save_for_backward``: dequantized activations and the exact tensors."""
    saved = list(ctx.saved_tensors)
    num_exact = ctx.qbackprop_num_exact
    exact = saved[len(saved) - num_exact :] if num_exact else []
    stored = iter(saved[: len(saved) - num_exact])
    out: list[torch.Tensor | None] = []
    for slot in ctx.qbackprop_slots:
        if slot is None:
            out.append(None)
        elif slot.kind == "raw":
            out.append(next(stored))
        elif slot.kind == "late":
            out.append(compress(next(stored), slot.spec).decompress())
        elif slot.kind == "recipe":
            out.append(slot.recipe.rebuild([next(stored) for _ in range(slot.count)]))
        else:
            # The shell is read, never changed: backward may run again (retain_graph=True),
            # and a traced backward may not mutate objects made in forward.
            out.append(slot.shell.decompress_from([next(stored) for _ in range(slot.count)]))
    return out, exact
