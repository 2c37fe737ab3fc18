"""The ``model:`` section of a config: which timm / torchvision model to build, validated."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .schema import Kind, from_mapping, int_list, integer, mapping, option, validate

TORCHVISION_PREFIX = "tv:"


def _known_models(name: Any) -> list[str]:
    if not isinstance(name, str):
        return []
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        return [TORCHVISION_PREFIX + n for n in torchvision.models.list_models()]
    import timm

    return timm.list_models()


def _close_models(name: Any) -> str:
    close = difflib.get_close_matches(str(name), _known_models(str(name)), n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"


@dataclass(frozen=True)
class ModelSpec:
    """A model to build: a timm name, or ``tv:NAME`` for torchvision; always random init. The
    fields are documented in the schema (``qbackprop schema model``, docs/config.md).

    Raises:
        ConfigError: naming each invalid field.
    """

    name: str = option(
        "efficientnetv2_rw_t",
        Kind(
            "a timm model name or tv:NAME",
            lambda v: v in _known_models(v),
            hint=_close_models,
            type_name="str",
        ),
        "a timm model name, or tv:NAME for torchvision (e.g. tv:resnet18)",
    )
    num_classes: int = option(10, integer(1), "classifier outputs; absent: the dataset's")
    input_size: tuple[int, int, int] = option(
        (3, 32, 32),
        int_list(3, 1, expected="[C, H, W], three ints >= 1"),
        "(C, H, W) of one sample; absent: (3, S, S), S = train.image_size",
    )
    kwargs: Mapping[str, Any] = option(
        kind=mapping(), factory=dict, doc="extra model-constructor arguments (e.g. drop_rate)"
    )

    def __post_init__(self) -> None:
        validate(self, "model")

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
        return {**out, "kwargs": dict(self.kwargs)} if self.kwargs else out


def model_spec_from_dict(raw: Any, source: str = "<dict>") -> ModelSpec:
    """Validate the ``model:`` section; raises ConfigError listing every problem."""
    return from_mapping(ModelSpec, raw, f"{source}: model")
