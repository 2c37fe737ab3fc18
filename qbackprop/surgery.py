"""Model surgery: convert_model / revert_model / conversion_report."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from . import allocator, layers  # noqa: F401  (importing registers every drop-in layer)
from .config import QuantConfig, as_quant_config
from .errors import ConfigError
from .functions.fallback import FallbackScope, fallback_spec
from .layers.plan import LayerPlan
from .layers.registry import QuantizedModule, Swap, find_swap, original_class, quantized_class
from .planner import ConversionRow, ModelPlan, plan_model, replan

__all__ = [
    "ConversionRow",
    "ModelPlan",
    "conversion_report",
    "convert_model",
    "converted_config",
    "model_plan",
    "original_type",
    "replan",
    "revert_model",
    "sharing_summary",
    "temporarily_unconverted",
]


def original_type(module: nn.Module) -> type[nn.Module]:
    """The module's type before conversion (its own type if it was never converted)."""
    return original_class(module)


def _why_not(module: nn.Module, swap: Swap) -> str:
    source = original_type(module)
    # A subclass that overrides forward does something we do not reproduce: leave it alone.
    if source is not swap.source and source.forward is not swap.source.forward:
        return f"{source.__name__} overrides forward(); not converted"
    return swap.check(module) or "" if swap.check else ""


def _swap_in(module: nn.Module, swap: Swap) -> None:
    module.__class__ = quantized_class(swap.mixin, original_type(module))


def _swap_out(module: nn.Module) -> None:
    if isinstance(module, QuantizedModule):
        module.__class__ = original_type(module)
        module.__dict__.pop("qplan", None)


def _plan(
    model: nn.Module, cfg: QuantConfig, filter_fn
) -> list[tuple[nn.Module, Swap, ConversionRow]]:
    plan = []
    for name, module in model.named_modules():
        swap = find_swap(original_type(module))
        if swap is None:
            continue
        spec = cfg.spec_for(name, swap.family)
        reason = _why_not(module, swap)
        if not reason and filter_fn is not None and not filter_fn(module, name):
            reason = "excluded by filter_fn"
        if not reason and spec is None:
            reason = "disabled by a rule (enabled: false)"
        row = ConversionRow(
            name or "<root>", original_type(module).__name__, swap.family, spec, not reason, reason
        )
        plan.append((module, swap, row))
    return plan


def convert_model(
    model: nn.Module,
    cfg: QuantConfig | dict | str | Path,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    example_input: torch.Tensor | tuple | None = None,
    tune_allocator: bool | None = None,
) -> nn.Module:
    """Swap supported layers for drop-ins that save compressed activations; returns the model.

    Conversion is in place: every swapped module keeps its object, Parameters, buffers and
    ``state_dict`` keys (its class becomes a subclass of the original). Converting an already
    converted model applies the new config.

    Args:
        model: any ``nn.Module`` (timm, torchvision or plain torch).
        cfg: a ``QuantConfig``, the ``quant:`` section as a dict, a YAML path, or a preset name
            such as ``"2bit-stochastic"``.
        filter_fn: optional ``(module, qualified_name) -> bool``; False leaves a module alone.
        example_input: a batch (or tuple of inputs) for the planning forward that decides
            which BatchNorm outputs are shared with their consumers (``planner.py``);
            by default a batch of 2 built from the model's first layer (32 px images, or the
            timm model's own input size if that fails).
        tune_allocator: fix glibc's mmap threshold so that freed activations go back to the
            OS at once and the process's resident memory follows the bytes really held
            (``allocator.tune_host_allocator``: a process-wide setting, skipped off glibc and
            when the user set glibc's own ``MALLOC_*`` variables). None takes the config's
            ``tune_allocator`` (true by default); False leaves the allocator alone.

    Returns:
        The same model object, converted.

    Raises:
        ConfigError: a rule matches no module (unless ``allow_unmatched``); the model is left
            unchanged.
    """
    cfg = as_quant_config(cfg)
    plan = _plan(model, cfg, filter_fn)
    unmatched = cfg.unmatched_rules(
        (row.name if row.name != "<root>" else "", row.family) for _, _, row in plan
    )
    if unmatched:
        raise ConfigError(unmatched)
    if not any(row.converted for _, _, row in plan):
        found = ", ".join(sorted({row.module_type for _, _, row in plan})) or "none"
        warnings.warn(
            f"convert_model: nothing to convert in {type(model).__name__} "
            f"(convertible modules found: {found}); only the fallback hooks apply",
            stacklevel=2,
        )
    for module, swap, row in plan:
        if row.converted:
            _swap_in(module, swap)
        else:
            _swap_out(module)
    scope = _set_fallback(model, cfg)
    specs = {row.name: row.spec for _, _, row in plan if row.converted}
    # Also builds every table the layers use (derivative codes), so no step pays for it.
    structure, how = plan_model(model, specs, cfg.share, example_input)
    if not specs:
        how = ""
    rows = tuple(
        dataclasses.replace(row, keeps=module.saves(), feeds=module.qplan.feeds)
        if row.converted
        else row
        for module, _, row in plan
    )
    model.qbackprop_plan = ModelPlan(cfg, rows, structure, how, scope)
    tune = cfg.tune_allocator if tune_allocator is None else tune_allocator
    if tune:
        # Large short-lived blocks go back to the OS at once, so the process's resident
        # memory follows the live bytes (allocator.py).
        allocator.tune_host_allocator()
    return model


def _set_fallback(model: nn.Module, cfg: QuantConfig | None) -> FallbackScope | None:
    old = model_plan(model)
    if old is not None and old.fallback is not None:
        old.fallback.remove()
    if cfg is not None and cfg.fallback and cfg.default.enabled:
        return FallbackScope(model, fallback_spec(cfg.default), cfg.fallback_min_numel)
    return None


def revert_model(model: nn.Module) -> nn.Module:
    """Undo ``convert_model``: plain torch/timm modules again, same Parameters; returns it."""
    for module in model.modules():
        _swap_out(module)
    _set_fallback(model, None)
    model.__dict__.pop("qbackprop_plan", None)
    return model


def model_plan(model: nn.Module) -> ModelPlan | None:
    """The plan of the last ``convert_model`` (None if ``model`` was never converted)."""
    plan = model.__dict__.get("qbackprop_plan")
    return plan if isinstance(plan, ModelPlan) else None


def layer_plans(model: nn.Module) -> dict[str, LayerPlan]:
    """Every converted layer's frozen plan, by qualified name."""
    return {
        (n or "<root>"): m.qplan for n, m in model.named_modules() if isinstance(m, QuantizedModule)
    }


@contextlib.contextmanager
def temporarily_unconverted(model: nn.Module) -> Iterator[None]:
    """Within the block every converted layer runs as its original module, fallback off."""
    swapped = [(m, type(m)) for m in model.modules() if isinstance(m, QuantizedModule)]
    plan = model_plan(model)
    scope = plan.fallback if plan is not None else None
    for module, _ in swapped:
        module.__class__ = original_type(module)
    if scope is not None:
        scope.enabled = False
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls
        if scope is not None:
            scope.enabled = True


def conversion_report(model: nn.Module) -> list[ConversionRow]:
    """One row per convertible module of the last ``convert_model``: converted, or why not."""
    plan = model_plan(model)
    return list(plan.rows) if plan is not None else []


def sharing_summary(model: nn.Module) -> str:
    """How the sharing plan of the last ``convert_model`` was made ("" when none was needed)."""
    plan = model_plan(model)
    return plan.how if plan is not None else ""


def converted_config(model: nn.Module) -> QuantConfig | None:
    """The config a model was last converted with (None if it is not converted)."""
    plan = model_plan(model)
    return plan.config if plan is not None else None


def has_converted_layers(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedModule) for m in model.modules())
