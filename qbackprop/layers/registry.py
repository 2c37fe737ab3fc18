"""Type registry for model surgery: which drop-in mixin replaces which module type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..quant import QuantSpec
from .plan import LayerPlan, PlanContext, Structure


class QuantizedModule:
    """Mixin of every drop-in layer.

    A converted module keeps its object, Parameters, buffers, hooks and ``state_dict`` keys: its
    class is swapped for ``type("Q" + Original.__name__, (Mixin, Original), {})``, so it still *is*
    an instance of the original type and ``revert`` only swaps the class back. The mixin
    overrides ``forward`` (same signature as the original) and reads its frozen plan,
    ``self.qplan`` (``layers/plan.py``), written once by the planner at conversion.
    """

    family: str = ""
    # Producers (normalizations, the squeeze-excite multiply) are planned before the layers
    # whose plans depend on theirs (an activation between a shared producer and its consumer).
    producer: bool = False
    qplan: LayerPlan = LayerPlan("", None)

    @property
    def qspec(self) -> QuantSpec | None:
        """The config's spec for this layer (``qplan.spec``)."""
        return self.qplan.spec

    @property
    def qshare(self) -> bool:
        """Whether the config lets this layer's output be shared (``qplan.share``)."""
        return self.qplan.share

    def make_plan(
        self, name: str, spec: QuantSpec | None, share: bool, ctx: PlanContext
    ) -> LayerPlan:
        """This layer's plan under ``spec`` (called by the planner, never in forward)."""
        return LayerPlan(name, spec, share, spec, spec)

    def saves(self) -> str:
        """What this layer keeps when it differs from ``qspec`` (e.g. x̂ at wider bits)."""
        return self.qplan.note

    def __reduce_ex__(self, protocol: int):
        # The generated class (mixin + original) has no importable name: pickle, deepcopy and
        # torch.save rebuild it from the two classes, which do.
        mixin, original = type(self).__bases__[:2]
        return _rebuild, (mixin, original), self.__getstate__()

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        spec = self.qspec.short() if self.qspec is not None else "off"
        note = self.saves() if self.qspec is not None and self.qspec.enabled else ""
        spec = f"{spec} ({note})" if note else spec
        return f"{base}, qbackprop={spec}" if base else f"qbackprop={spec}"


def original_class(module: nn.Module) -> type[nn.Module]:
    """The module's type before conversion (its own type if it was never converted)."""
    if isinstance(module, QuantizedModule):
        return type(module).__bases__[1]  # Q<Original>(mixin, original)
    return type(module)


_CLASSES: dict[tuple[type, type], type] = {}


def quantized_class(mixin: type[QuantizedModule], original: type[nn.Module]) -> type:
    """The converted class of ``original`` modules: ``Q<Original>(mixin, original)``, made once."""
    key = (mixin, original)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Q{original.__name__}", (mixin, original), {})
    return _CLASSES[key]


def _rebuild(mixin: type[QuantizedModule], original: type[nn.Module]) -> nn.Module:
    cls = quantized_class(mixin, original)
    return cls.__new__(cls)


@dataclass(frozen=True)
class Swap:
    """One registry entry: modules of type ``source`` get ``mixin``.

    Args:
        source: the original module type.
        mixin: a ``QuantizedModule`` subclass overriding ``forward``.
        family: one of ``config.FAMILIES`` (``conv``, ``linear``, ..., ``attention``,
            ``dropout``), as ``type:`` rules name it.
        check: optional ``module -> reason`` that returns why a module cannot be converted
            (e.g. an unsupported option), or None when it can.
    """

    source: type[nn.Module]
    mixin: type[QuantizedModule]
    family: str
    check: Callable[[nn.Module], str | None] | None = None


_REGISTRY: dict[type[nn.Module], Swap] = {}


def register_swap(
    source: type[nn.Module], family: str, check: Callable[[nn.Module], str | None] | None = None
) -> Callable[[type[QuantizedModule]], type[QuantizedModule]]:
    """Class decorator: register ``mixin`` as the drop-in for ``source`` modules."""

    def decorate(mixin: type[QuantizedModule]) -> type[QuantizedModule]:
        mixin.family = family
        _REGISTRY[source] = Swap(source, mixin, family, check)
        return mixin

    return decorate


def find_swap(module_type: type[nn.Module]) -> Swap | None:
    """The entry for the most specific registered base of ``module_type`` (MRO order).

    timm's ``BatchNormAct2d`` *is a* ``BatchNorm2d``: walking the MRO finds its own entry first.
    """
    for base in module_type.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    return None


def registered_types() -> list[type[nn.Module]]:
    return list(_REGISTRY)


def plan_alone(module: QuantizedModule, spec: QuantSpec | None, name: str = "") -> LayerPlan:
    """The plan of ``module`` converted on its own (nothing shared): for a module converted
    by hand, outside ``convert_model``."""
    return module.make_plan(name, spec, False, PlanContext(Structure(), {name: spec}, {}))
