"""Drop-in mixin for nn.Linear: forward through ``quantized_linear`` (compressed saved input)."""

from __future__ import annotations

import torch
from timm.layers.linear import Linear as TimmLinear
from torch import nn

from ..functions.linear import quantized_linear
from .conv import forward_override_check
from .registry import QuantizedModule, register_swap


@register_swap(TimmLinear, "linear", check=forward_override_check(TimmLinear))
@register_swap(nn.Linear, "linear", check=forward_override_check(nn.Linear))
class QuantizedLinear(QuantizedModule):
    """Mixin for ``nn.Linear`` (any number of leading dims): saves a compressed input.

    Also for timm's ``timm.layers.Linear`` (MobileNetV3 / EfficientNet classifiers), whose
    forward outside TorchScript is ``F.linear(input, self.weight, self.bias)``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return quantized_linear(input, self.weight, self.bias, spec=self.qspec)
