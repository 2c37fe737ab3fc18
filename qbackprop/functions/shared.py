"""Saved activations shared between layers: an output rebuilt from what its producer keeps.

A converted BatchNorm (or LayerNorm) keeps x̂ for its own backward; its output ``x̂·w + b`` (after the
activation of a ``BatchNormAct2d``, or of a following converted activation module) is exactly
what the next convolution, linear or squeeze-excite layer saves again. Instead, the output
tensor carries a ``Recipe``: the packed tensors autograd already keeps for the producer plus a
pure function that rebuilds the output from them. A consumer that finds a usable recipe on its
input saves the *same* packed tensors (same storage: no new bytes) and rebuilds its input in
backward. The squeeze-excite multiply ``x * gate`` tags its output the same way, so the
projection conv after it saves nothing.

Sharing turns two b-bit copies into one, and the producer spends those bytes on precision: a
BatchNorm whose output feeds a converted layer keeps x̂ at ``2·b`` bits, or, with a smooth
activation in between, x̂ and that activation's derivative code split the three copies' bytes
(``widen``, ``code_bits``: 3 + 3 bits at ``b = 2``). Which producers feed converted layers is
the *plan* (``layers/plan.py``), decided once by ``convert_model`` in a planning forward
(``qbackprop/planner.py``: while it watches, a consumer reports the producer of a recipe it
would use) and shown by ``conversion_report``; training steps never change it, so the first
step keeps exactly what every later step keeps.

Recipes travel in a side table keyed on the live output tensor (``tensor_table.py``), checked
against the tensor's version counter: an in-place change after tagging (``out += shortcut``),
a view, a cast or a dropout gives a tensor without a valid recipe, and the consumer keeps its
own copy as before. Nothing is written onto tensors or modules.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .. import runtime
from ..quant import CompressedTensor, QuantSpec
from .tensor_table import TensorTable

FULL_BITS = 32

Build = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Leaf:
    """One stored tensor: a compressed copy (``shell`` with its tensors taken) or a raw one."""

    shell: CompressedTensor | None
    tensors: tuple[torch.Tensor | None, ...]  # None in a stub
    bits: float  # expected code width (see leaf_bits)

    def load(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.shell is None:
            return tensors[0]
        # A private copy of the shell: producer and consumers put/take their tensors in turn.
        ct = copy.copy(self.shell).put_tensors(tensors)
        return ct.decompress()


@dataclass(frozen=True)
class Recipe:
    """How to rebuild a tensor from stored leaves and exact tensors (parameters).

    Args:
        leaves: the stored tensors, as autograd keeps them for the producer.
        exact: tensors kept as they are (affine parameters).
        build: ``(leaf values, exact) -> tensor``; pure torch, run in backward.
        ready: consumers may use it (False while the producer has not learned to widen).
        producer: the module to tell that its output feeds a converted layer.
        dtype: the rebuilt tensor's dtype.
        promise: for a recipe not ready yet, the expected bits per element the producer will
            keep once it has learned (a consumer finer than that does not ask for it).
    """

    leaves: tuple[Leaf, ...]
    exact: tuple[torch.Tensor, ...]
    build: Build
    ready: bool
    producer: torch.nn.Module | None
    dtype: torch.dtype
    promise: float | None = None

    @property
    def bits(self) -> float:
        return min((leaf.bits for leaf in self.leaves), default=float(FULL_BITS))

    def tensors(self) -> list[torch.Tensor]:
        """What a consumer passes to ``ctx.save_for_backward``: leaves' tensors, then exact."""
        return [t for leaf in self.leaves for t in leaf.tensors] + list(self.exact)

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> Recipe:
        """This recipe followed by a pure elementwise ``fn`` (an activation)."""
        build = self.build

        def chained(values: list[torch.Tensor], exact: list[torch.Tensor]) -> torch.Tensor:
            return fn(build(values, exact))

        return Recipe(
            self.leaves, self.exact, chained, self.ready, self.producer, dtype, self.promise
        )

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``tensors()``: the rebuilt tensor (in backward)."""
        it = iter(tensors)
        values = [leaf.load([next(it) for _ in leaf.tensors]) for leaf in self.leaves]
        exact = [next(it) for _ in self.exact]
        return self.build(values, exact).to(self.dtype)

    def stub(self) -> Recipe:
        """The recipe without references to tensors (kept in a consumer's ``ctx``): the tensors
        live only in autograd's saved-tensor slots and come back through ``rebuild``."""
        leaves = tuple(
            Leaf(leaf.shell, (None,) * len(leaf.tensors), leaf.bits) for leaf in self.leaves
        )
        exact = (None,) * len(self.exact)
        return Recipe(leaves, exact, self.build, self.ready, None, self.dtype)


def identity(values: list[torch.Tensor], exact: list[torch.Tensor]) -> torch.Tensor:
    return values[0]


def leaf_bits(spec: QuantSpec | None) -> float:
    """The expected code width of a tensor stored under ``spec`` (a two-bit mix averages)."""
    if spec is None or not spec.enabled:
        return float(FULL_BITS)
    if spec.mix_bits is not None and spec.mix_prob:
        return spec.bits + spec.mix_prob * (spec.mix_bits - spec.bits)
    return float(spec.bits)


def _wider(bits: int, smooth: bool) -> int:
    return min(bits + (-(-bits // 2) if smooth else bits), 16)


def widen(spec: QuantSpec, smooth: bool = False) -> QuantSpec:
    """The spec of a shared x̂: the bytes of the b-bit copy no longer made, spent on x̂.

    Without a smooth activation in between, x̂ takes them all (``2·b`` bits). With one, x̂ and
    the activation's derivative code share the three b-bit copies' bytes: x̂ ``b + ceil(b/2)``
    and the code ``b + floor(b/2)`` bits (3 + 3 at ``b = 2``; see ``code_bits``). At most 16.
    """
    changes = {}
    if spec.bits < 16:
        changes["bits"] = _wider(spec.bits, smooth)
    if spec.mix_bits is not None and spec.mix_bits < 16:
        changes["mix_bits"] = _wider(spec.mix_bits, smooth)
    return spec.replace(**changes) if changes else spec


def scaled_bits(spec: QuantSpec, factor: int, cap: int) -> QuantSpec:
    """``spec`` with ``bits`` (and ``mix_bits``) times ``factor``, at most ``cap``; widths
    already at or above ``cap`` are left as they are."""
    changes = {}
    if spec.bits < cap:
        changes["bits"] = min(spec.bits * factor, cap)
    if spec.mix_bits is not None and spec.mix_bits < cap:
        changes["mix_bits"] = min(spec.mix_bits * factor, cap)
    return spec.replace(**changes) if changes else spec


def code_bits(bits: int) -> int:
    """Derivative-code width of a smooth activation between a shared BatchNorm and its consumer."""
    return min(bits + bits // 2, 16)


class Watcher(Protocol):
    """What a planning forward reports to the planner (``qbackprop/planner.py``)."""

    def consumer_of(self, producer: torch.nn.Module) -> None:
        """The converted layer running now would rebuild ``producer``'s output."""

    def smooth_after(self, producer: torch.nn.Module) -> None:
        """The activation running now (a smooth one) was applied to ``producer``'s output."""

    def per_sample(self, layer: torch.nn.Module) -> None:
        """``layer`` (a Linear) was fed one vector per sample."""


_WATCHERS: list[Watcher] = []


@contextlib.contextmanager
def watched(watcher: Watcher) -> Iterator[None]:
    """Within the block, forwards report what they share to ``watcher`` (the planning
    forward); outside it nothing is reported and the plan is only read."""
    _WATCHERS.append(watcher)
    try:
        yield
    finally:
        _WATCHERS.remove(watcher)


def watcher() -> Watcher | None:
    """The planner watching this forward, if any."""
    return _WATCHERS[-1] if _WATCHERS else None


def note_smooth_activation(recipe: Recipe) -> None:
    """Called by a smooth activation on a tagged input: the planner learns its producer is
    followed by one."""
    w = watcher()
    if w is not None and recipe.producer is not None:
        w.smooth_after(recipe.producer)


# output tensor -> (its recipe, the tensor's version when tagged)
_RECIPES: TensorTable[tuple[Recipe, int]] = TensorTable()


def tag(t: torch.Tensor, recipe: Recipe | None) -> torch.Tensor:
    """Attach ``recipe`` to ``t`` (valid until ``t`` is changed in place); returns ``t``.

    Not in a traced graph (``runtime.shares``): there every consumer keeps its own copy."""
    if recipe is not None and runtime.shares():
        _RECIPES[t] = (recipe, t._version)
    return t


def recipe_of(t: torch.Tensor) -> Recipe | None:
    """The valid recipe of ``t``, or None (none attached, or ``t`` changed in place since)."""
    if not runtime.shares():
        return None
    entry = _RECIPES.get(t)
    if entry is None or entry[1] != t._version:
        return None
    return entry[0]


def usable_recipe(t: torch.Tensor, spec: QuantSpec) -> Recipe | None:
    """The recipe a consumer saving ``t`` under ``spec`` may use instead of compressing it.

    A recipe whose producer's plan does not share (not ``ready``) is not used; in the planning
    forward the consumer reports that producer to the planner when it would use it (the
    producer's ``promise`` of bits is at least what ``spec`` keeps). One coarser than ``spec``
    (fewer expected bits per element) is not used.
    """
    recipe = recipe_of(t)
    if recipe is None or recipe.dtype != t.dtype:
        return None
    if not recipe.ready:
        w = watcher()
        wanted = recipe.promise is None or recipe.promise >= leaf_bits(spec)
        if w is not None and recipe.producer is not None and wanted:
            w.consumer_of(recipe.producer)
        return None
    return recipe if recipe.bits >= leaf_bits(spec) else None


def affine(
    xhat: Recipe,
    params: tuple[torch.Tensor | None, ...],
    dtype: torch.dtype,
    ready: bool,
    producer: torch.nn.Module,
    promise: float | None = None,
    *,
    trailing: bool = False,
) -> Recipe:
    """The recipe of a normalization output ``x̂·w + b`` from x̂'s recipe: ``w``, ``b`` per
    channel (dim 1: BatchNorm) or, with ``trailing``, over the trailing dims (LayerNorm)."""
    inner = xhat.build

    def build(values: list[torch.Tensor], exact: list[torch.Tensor]) -> torch.Tensor:
        y = inner(values, []).float()
        shape = None if trailing else (1, -1, *([1] * (y.dim() - 2)))
        if exact:
            weight, bias = exact
            if weight is not None:
                y = y * (weight.float() if trailing else weight.float().view(shape))
            if bias is not None:
                y = y + (bias.float() if trailing else bias.float().view(shape))
        return y

    return Recipe(xhat.leaves, tuple(params), build, ready, producer, dtype, promise)


def product(
    a: Recipe, b: Recipe, dtype: torch.dtype, ready: bool, producer: torch.nn.Module
) -> Recipe:
    """The recipe of ``a * b`` (the squeeze-excite multiply), made by ``producer``."""
    na, ma = len(a.leaves), len(a.exact)

    def build(values: list[torch.Tensor], exact: list[torch.Tensor]) -> torch.Tensor:
        return a.build(values[:na], exact[:ma]) * b.build(values[na:], exact[ma:])

    promise = min(a.bits, b.bits)
    ready = ready and a.ready and b.ready
    return Recipe(a.leaves + b.leaves, a.exact + b.exact, build, ready, producer, dtype, promise)
