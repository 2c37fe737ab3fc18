"""The ``model:`` section of a config: which timm / torchvision model to build, validated."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError

MODEL_KEYS = ("name", "num_classes", "input_size", "kwargs")
TORCHVISION_PREFIX = "tv:"


@dataclass(frozen=True)
class ModelSpec:
    """A model to build: a timm name, or ``tv:NAME`` for torchvision; always random init.

    Args:
        name: e.g. ``efficientnetv2_rw_t`` or ``tv:resnet18``.
        num_classes: classifier outputs.
        input_size: ``(C, H, W)`` of one sample.
        kwargs: extra keyword arguments for the model constructor (e.g. ``drop_rate``).
    """

    name: str = "efficientnetv2_rw_t"
    num_classes: int = 10
    input_size: tuple[int, int, int] = (3, 32, 32)
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The model, randomly initialised (nothing is downloaded)."""
        if self.name.startswith(TORCHVISION_PREFIX):
            import torchvision

            return torchvision.models.get_model(
                self.name[len(TORCHVISION_PREFIX) :],
                weights=None,
                num_classes=self.num_classes,
                **self.kwargs,
            )
        import timm

        return timm.create_model(
            self.name, pretrained=False, num_classes=self.num_classes, **dict(self.kwargs)
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
        }
        if self.kwargs:
            out["kwargs"] = dict(self.kwargs)
        return out


def _known_models(name: str) -> list[str]:
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        return [TORCHVISION_PREFIX + n for n in torchvision.models.list_models()]
    import timm

    return timm.list_models()


def _name_errors(name: Any, loc: str) -> list[str]:
    if not isinstance(name, str) or not name:
        return [f"{loc}.name={name!r} is not allowed; expected a timm model name or tv:NAME"]
    known = _known_models(name)
    if name in known:
        return []
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    return [f"{loc}.name={name!r} is not a known model{hint}"]


def model_spec_from_dict(raw: Any, source: str = "<dict>") -> ModelSpec:
    """Validate the ``model:`` section; raises ConfigError listing every problem."""
    loc = f"{source}: model"
    if raw is None:
        return ModelSpec()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{loc}={raw!r} is not allowed; expected a mapping with {MODEL_KEYS}")
    problems = []
    for key in raw:
        if key not in MODEL_KEYS:
            close = difflib.get_close_matches(str(key), MODEL_KEYS, n=1)
            hint = (
                f'; did you mean "{close[0]}"?' if close else f"; allowed: {', '.join(MODEL_KEYS)}"
            )
            problems.append(f"{loc}.{key}: unknown key{hint}")
    values = {**ModelSpec().to_dict(), **raw}
    problems += _name_errors(values["name"], loc)
    classes = values["num_classes"]
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        problems.append(f"{loc}.num_classes={classes!r} is not allowed; expected an int >= 1")
    problems += input_size_errors(values["input_size"], f"{loc}.input_size")
    kwargs = values.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        problems.append(f"{loc}.kwargs={kwargs!r} is not allowed; expected a mapping")
    if problems:
        raise ConfigError(problems)
    return ModelSpec(values["name"], classes, tuple(values["input_size"]), dict(kwargs))


def input_size_errors(size: Any, loc: str) -> list[str]:
    ok = (
        isinstance(size, (list, tuple))
        and len(size) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    )
    return [] if ok else [f"{loc}={size!r} is not allowed; expected [C, H, W], three ints >= 1"]
