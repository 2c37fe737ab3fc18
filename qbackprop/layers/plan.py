"""The frozen per-layer plan: what one converted module keeps, decided once at conversion.

A converted module reads its ``LayerPlan`` (``module.qplan``) in every forward and never
writes it. The planner (``qbackprop/planner.py``) makes every plan of a model at once from the
config's specs and the ``Structure`` its planning forward saw, and commits them only when
planning succeeded; ``conversion_report``, ``print(model)`` and ``qbackprop convert`` show
them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..quant import QuantSpec


@dataclass(frozen=True)
class Structure:
    """What a planning forward saw of a model's dataflow between converted layers (by name).

    Depends on the model's structure only, not on bit widths, so plans for other specs (tune's
    per-layer probes) are derived from it without another forward.

    Args:
        consumers: producer -> converted layers that saved its output (or an activation of it).
        smooth: producers followed by a smooth activation (derivative codes) before a consumer.
        activation_of: activation -> the producer whose output it was applied to.
        per_sample: Linear layers fed one vector per sample (2-D input).
    """

    consumers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    smooth: frozenset[str] = frozenset()
    activation_of: Mapping[str, str] = field(default_factory=dict)
    per_sample: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LayerPlan:
    """One converted layer's plan.

    Args:
        name: the module's qualified name in the converted model.
        spec: the config's spec for it (None: kept at full precision).
        share: the config's ``share``: its output may be rebuilt by its consumers.
        saves: the spec of what it keeps eagerly (x̂ at 2·b or wider, a per-sample input at
            8 bits, a wider derivative code between a shared producer and its consumer).
        alone: what it keeps where nothing is shared (a traced graph, ``runtime.shares``).
        feeds: the converted layers that rebuild its output from what it keeps (its output is
            shared when this is not empty).
        note: what it keeps, in words, when that differs from ``spec`` (for the report).
    """

    name: str
    spec: QuantSpec | None
    share: bool = False
    saves: QuantSpec | None = None
    alone: QuantSpec | None = None
    feeds: tuple[str, ...] = ()
    note: str = ""

    @property
    def shared_output(self) -> bool:
        return bool(self.feeds)

    def saved_spec(self, shares: bool) -> QuantSpec | None:
        """What the layer keeps: ``saves`` eagerly, ``alone`` where nothing is shared."""
        return self.saves if shares else self.alone


@dataclass(frozen=True)
class PlanContext:
    """What a layer's ``make_plan`` may read: the model's structure, every layer's config spec,
    and the plans of the producers already made (producers are planned first)."""

    structure: Structure
    specs: Mapping[str, QuantSpec | None]
    producers: Mapping[str, LayerPlan]
