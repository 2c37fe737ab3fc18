"""The planner: every converted layer's frozen plan, made once at conversion.

What a layer keeps can depend on its neighbours: a BatchNorm (or LayerNorm, or squeeze-excite
multiply) whose output feeds a converted layer keeps one wider copy that serves both
(``functions/shared.py``). Which outputs feed which layers depends only on the model's
structure, so ``convert_model`` finds it by running the converted model once in training
mode on an example batch while the planner *watches* (``shared.watched``): a consumer reports
the producer whose output it would rebuild, a smooth activation the producer it follows, a
Linear whether it is fed one vector per sample. From that ``Structure`` and the config's specs
the planner makes every ``LayerPlan`` at once and commits them only when the forward
succeeded; until then each layer holds the plan of keeping its own copy. Every later forward
only reads the plans, so the first training step keeps exactly the bytes every later step
keeps, and ``conversion_report`` / ``print(model)`` / ``qbackprop convert`` show them.

The planning forward leaves no trace: buffers (BatchNorm statistics), train/eval modes and
the RNG state are restored, hooks removed, and nothing is kept for a backward.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .functions import shared
from .functions.fallback import FallbackScope
from .layers.plan import LayerPlan, PlanContext, Structure
from .layers.registry import QuantizedModule
from .preserved import preserved_state
from .quant import QuantSpec

# CNNs share the same way at any resolution: plan on small images first (fast at conversion);
# models that need their own input size (ViT) are retried at it.
PLANNING_IMAGE_SIZE = 32
PLANNING_BATCH = 2  # BatchNorm in training mode needs more than one value per channel

# What a forward on a guessed input may raise when the guess is wrong (a shape the model does
# not take); anything else is a real error and propagates.
_WRONG_INPUT = (RuntimeError, ValueError, TypeError, AssertionError, IndexError)


@dataclass(frozen=True)
class ConversionRow:
    """One row of ``conversion_report``: what happened to one module, and its plan."""

    name: str
    module_type: str
    family: str
    spec: QuantSpec | None
    converted: bool
    reason: str = ""
    keeps: str = ""  # what the layer really keeps when it differs from spec (the plan)
    feeds: tuple[str, ...] = ()  # the layers that rebuild its output from what it keeps

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.module_type,
            "family": self.family,
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "plan": self.spec.short() if self.converted and self.spec is not None else "",
            "keeps": self.keeps,
            "feeds": list(self.feeds),
            "converted": self.converted,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ModelPlan:
    """The plan of a converted model, kept on its root as ``model.qbackprop_plan``.

    Args:
        config: the config it was converted with.
        rows: one row per convertible module (converted or why not), with its plan.
        structure: what the planning forward saw (empty when it could not run).
        how: how the sharing plan was made, in words.
        fallback: the fallback hooks on the root (None when off); runtime, not plan data.
    """

    config: QuantConfig
    rows: tuple[ConversionRow, ...]
    structure: Structure
    how: str
    fallback: FallbackScope | None = field(default=None, compare=False, repr=False)


def converted_layers(model: nn.Module) -> dict[str, QuantizedModule]:
    """The converted modules of ``model`` by report name (``<root>`` for the model itself)."""
    return {
        (name or "<root>"): m for name, m in model.named_modules() if isinstance(m, QuantizedModule)
    }


def make_plans(
    layers: Mapping[str, QuantizedModule],
    specs: Mapping[str, QuantSpec | None],
    share: bool,
    structure: Structure,
) -> dict[str, LayerPlan]:
    """Every layer's plan under ``specs``: producers first, then the layers that read theirs."""
    empty = PlanContext(structure, specs, {})
    producers = {
        n: m.make_plan(n, specs.get(n), share, empty) for n, m in layers.items() if m.producer
    }
    ctx = PlanContext(structure, specs, producers)
    rest = {
        n: m.make_plan(n, specs.get(n), share, ctx) for n, m in layers.items() if not m.producer
    }
    return {n: producers.get(n) or rest[n] for n in layers}


def commit(layers: Mapping[str, QuantizedModule], plans: Mapping[str, LayerPlan]) -> None:
    """Write the plans onto their modules, all at once (nothing can fail in between)."""
    for name, module in layers.items():
        module.qplan = plans[name]


class _Watch:
    """The planner's ``shared.Watcher``: records what the planning forward shares, by name."""

    def __init__(self, layers: Mapping[str, QuantizedModule]) -> None:
        self.names = {id(m): n for n, m in layers.items()}
        self.running: list[str] = []
        self.consumers: dict[str, list[str]] = {}
        self.smooth: set[str] = set()
        self.activation_of: dict[str, str] = {}
        self.per_samples: set[str] = set()

    def attach(self, layers: Mapping[str, QuantizedModule]) -> list:
        handles = []
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(self._push(name)))
            handles.append(module.register_forward_hook(self._pop, always_call=True))
        return handles

    def _push(self, name: str):
        def hook(module, args) -> None:
            self.running.append(name)

        return hook

    def _pop(self, module, args, output) -> None:
        self.running.pop()

    def consumer_of(self, producer: nn.Module) -> None:
        source = self.names.get(id(producer))
        consumer = self.running[-1] if self.running else None
        if source is None or consumer is None or consumer == source:
            return
        found = self.consumers.setdefault(source, [])
        if consumer not in found:
            found.append(consumer)

    def smooth_after(self, producer: nn.Module) -> None:
        source = self.names.get(id(producer))
        if source is not None and self.running:
            self.smooth.add(source)
            self.activation_of[self.running[-1]] = source

    def per_sample(self, layer: nn.Module) -> None:
        name = self.names.get(id(layer))
        if name is not None:
            self.per_samples.add(name)

    def structure(self) -> Structure:
        return Structure(
            consumers={k: tuple(v) for k, v in self.consumers.items()},
            smooth=frozenset(self.smooth),
            activation_of=dict(self.activation_of),
            per_sample=frozenset(self.per_samples),
        )


def _first(model: nn.Module, types: tuple[type, ...]) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, types)), None)


def example_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Candidate planning batches for ``model``, smallest first (empty when unknown)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    shapes = []
    conv = _first(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if conv is not None:
        dims = conv.weight.dim() - 2
        shapes.append((conv.in_channels, *[PLANNING_IMAGE_SIZE] * dims))
        # A ViT / Swin built for another size says so (timm's patch_embed, torchvision's ViT).
        fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
        fixed = fixed or getattr(model, "image_size", None)
        if isinstance(fixed, int):
            fixed = (fixed,) * dims
        if fixed is not None and len(fixed) == dims:
            shapes.append((conv.in_channels, *fixed))
        if size is not None and len(size) == dims + 1:
            shapes.append(tuple(size))
    else:
        linear = _first(model, (nn.Linear,))
        if linear is not None:
            shapes.append((linear.in_features,))
    return [torch.randn(PLANNING_BATCH, *s, device=device, dtype=dtype) for s in shapes]


def _watched_forward(model: nn.Module, layers, args: tuple) -> Structure:
    watch = _Watch(layers)
    handles = watch.attach(layers)
    try:
        with torch.enable_grad(), shared.watched(watch):
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return watch.structure()


def plan_model(
    model: nn.Module,
    specs: Mapping[str, QuantSpec | None],
    share: bool,
    example: torch.Tensor | tuple | None = None,
) -> tuple[Structure, str]:
    """Plan and commit every converted layer of ``model``; returns the structure seen and
    how the plan was made (for the report).

    Until the planning forward has succeeded every layer holds the plan of keeping its own
    copy; a failed forward leaves exactly that, with a warning. A user's ``example`` that
    fails raises its error.
    """
    layers = converted_layers(model)
    commit(layers, make_plans(layers, specs, share, Structure()))
    candidates = [example] if example is not None else example_inputs(model)
    if not candidates:
        return Structure(), "no example input (pass example_input=): each layer keeps its own copy"
    errors = []
    with preserved_state(model):
        model.train()
        for batch in candidates:
            args = batch if isinstance(batch, tuple) else (batch,)
            try:
                structure = _watched_forward(model, layers, args)
            except _WRONG_INPUT as err:
                if example is not None:
                    raise
                errors.append(f"{type(err).__name__}: {err}")
                continue
            plans = make_plans(layers, specs, share, structure)
            commit(layers, plans)
            # Once more with the plan in force: tables of the widths it chose (a wider
            # derivative code after a shared BatchNorm) are built now, not in the first step.
            with torch.enable_grad():
                model(*args)
            shape = "x".join(str(d) for d in args[0].shape) if args else "()"
            return structure, f"planned on an example batch of {shape}"
    reason = errors[-1].splitlines()[0][:200] if errors else "unknown"
    warnings.warn(
        f"convert_model: the sharing plan's forward failed ({reason}); each layer keeps its "
        "own copy (pass example_input= to convert_model to plan sharing)",
        stacklevel=3,
    )
    return Structure(), f"not planned ({reason})"


def replan(model: nn.Module, specs: Mapping[str, QuantSpec | None]) -> ModelPlan:
    """New plans for ``model``'s converted layers under other specs (by report name; a layer
    not named keeps its spec), derived from the structure conversion saw: no forward.

    ``tune`` probes one layer at a time this way. Returns the model's new ``ModelPlan``.
    """
    old: ModelPlan = model.qbackprop_plan
    layers = converted_layers(model)
    merged = {n: specs.get(n, m.qspec) if n in specs else m.qspec for n, m in layers.items()}
    plans = make_plans(layers, merged, old.config.share, old.structure)
    commit(layers, plans)
    rows = tuple(
        dataclasses.replace(r, spec=plans[r.name].spec, keeps=layers[r.name].saves(),
                            feeds=plans[r.name].feeds)
        if r.name in plans else r
        for r in old.rows
    )  # fmt: skip
    new = dataclasses.replace(old, rows=rows)
    model.qbackprop_plan = new
    return new
