"""Model surgery: convert_model / revert_model / conversion_report."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import allocator, layers  # noqa: F401  (importing registers every drop-in layer)
from .config import QuantConfig, as_quant_config
from .errors import ConfigError
from .functions import shared
from .functions.fallback import FallbackScope, fallback_spec
from .layers.registry import QuantizedModule, Swap, find_swap, quantized_class
from .quant import QuantSpec
from .sharing_plan import plan_sharing

_ORIGINAL = "_qbackprop_original_class"
_SCOPE = "_qbackprop_fallback"
_REPORT = "_qbackprop_report"
_CONFIG = "_qbackprop_config"
_SHARING = "_qbackprop_sharing"


@dataclass(frozen=True)
class ConversionRow:
    """One row of ``conversion_report``: what happened to one module."""

    name: str
    module_type: str
    family: str
    spec: QuantSpec | None
    converted: bool
    reason: str = ""
    keeps: str = ""  # what the layer really keeps when it differs from spec (the plan)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.module_type,
            "family": self.family,
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "plan": self.spec.short() if self.converted and self.spec is not None else "",
            "keeps": self.keeps,
            "converted": self.converted,
            "reason": self.reason,
        }


def original_type(module: nn.Module) -> type[nn.Module]:
    """The module's type before conversion (its own type if it was never converted)."""
    return getattr(module, _ORIGINAL, type(module))


def _why_not(module: nn.Module, swap: Swap) -> str:
    source = original_type(module)
    # A subclass that overrides forward does something we do not reproduce: leave it alone.
    if source is not swap.source and source.forward is not swap.source.forward:
        return f"{source.__name__} overrides forward(); not converted"
    return swap.check(module) or "" if swap.check else ""


def _swap_in(module: nn.Module, swap: Swap, spec: QuantSpec, share: bool) -> None:
    source = original_type(module)
    module.__class__ = quantized_class(swap.mixin, source)
    setattr(module, _ORIGINAL, source)
    module.qspec = spec
    module.qshare = share
    shared.forget(module)  # a new config learns again which outputs feed converted layers


def _swap_out(module: nn.Module) -> None:
    if isinstance(module, QuantizedModule):
        module.__class__ = original_type(module)
        module.__dict__.pop(_ORIGINAL, None)
        module.__dict__.pop("qspec", None)
        module.__dict__.pop("qshare", None)
        shared.forget(module)


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
            which BatchNorm outputs are shared with their consumers (``sharing_plan.py``);
            by default a batch of 2 built from the model's first layer (32 px images, or the
            timm model's own input size if that fails).

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
            _swap_in(module, swap, row.spec, cfg.share)
        else:
            _swap_out(module)
    _set_fallback(model, cfg)
    sharing = ""
    if any(row.converted for _, _, row in plan):
        # Also builds every table the layers use (derivative codes), so no step pays for it.
        _, sharing = plan_sharing(model, example_input)
    rows = [
        dataclasses.replace(row, keeps=module.saves() if row.converted else "")
        for module, _, row in plan
    ]
    setattr(model, _REPORT, rows)
    setattr(model, _CONFIG, cfg)
    setattr(model, _SHARING, sharing)
    # Large short-lived blocks go back to the OS at once, so the process's resident memory
    # follows the live bytes (see allocator.py; QBACKPROP_TUNE_MALLOC=0 opts out).
    allocator.tune_host_allocator()
    return model


def _set_fallback(model: nn.Module, cfg: QuantConfig | None) -> None:
    scope = getattr(model, _SCOPE, None)
    if scope is not None:
        scope.remove()
        delattr(model, _SCOPE)
    if cfg is not None and cfg.fallback and cfg.default.enabled:
        spec = fallback_spec(cfg.default)
        setattr(model, _SCOPE, FallbackScope(model, spec, cfg.fallback_min_numel))


def revert_model(model: nn.Module) -> nn.Module:
    """Undo ``convert_model``: plain torch/timm modules again, same Parameters; returns it."""
    for module in model.modules():
        _swap_out(module)
    _set_fallback(model, None)
    for attr in (_REPORT, _CONFIG, _SHARING):
        model.__dict__.pop(attr, None)
    return model


@contextlib.contextmanager
def temporarily_unconverted(model: nn.Module) -> Iterator[None]:
    """Within the block every converted layer runs as its original module, fallback off."""
    swapped = [(m, type(m)) for m in model.modules() if isinstance(m, QuantizedModule)]
    scope = getattr(model, _SCOPE, None)
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
    return list(getattr(model, _REPORT, []))


def sharing_summary(model: nn.Module) -> str:
    """How the sharing plan of the last ``convert_model`` was made ("" when none was needed)."""
    return getattr(model, _SHARING, "")


def converted_config(model: nn.Module) -> QuantConfig | None:
    """The config a model was last converted with (None if it is not converted)."""
    return getattr(model, _CONFIG, None)


def has_converted_layers(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedModule) for m in model.modules())
