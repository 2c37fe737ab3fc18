"""Drop-ins for LayerScale (compressed input for dgamma) and Dropout (1-bit mask).

timm's ``DropPath`` needs none: it saves one scalar per sample, which the fallback keeps.
"""

from __future__ import annotations

import torch
from timm.layers import LayerScale as TimmLayerScale
from timm.layers import LayerScale2d as TimmLayerScale2d
from torch import nn

from ..functions.dropout import quantized_dropout
from ..functions.elementwise import quantized_scale
from .conv import forward_override_check
from .registry import QuantizedModule, register_swap


@register_swap(TimmLayerScale, "elementwise", check=forward_override_check(TimmLayerScale))
class QuantizedLayerScale(QuantizedModule):
    """timm's LayerScale (channels last); out of place even when ``inplace=True``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_scale(x, self.gamma, spec=self.qspec)


@register_swap(TimmLayerScale2d, "elementwise", check=forward_override_check(TimmLayerScale2d))
class QuantizedLayerScale2d(QuantizedModule):
    """timm's LayerScale2d (NCHW)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_scale(x, self.gamma.view(1, -1, 1, 1), spec=self.qspec)


@register_swap(nn.Dropout, "dropout", check=forward_override_check(nn.Dropout))
class QuantizedDropout(QuantizedModule):
    """``nn.Dropout``: same distribution as torch's, mask kept at 1 bit (not the spec's)."""

    def saves(self) -> str:
        return "1-bit mask" if self.training and 0.0 < self.p < 1.0 else ""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # torch's in-place dropout saves its mask as the fallback sees it
            return super().forward(input)
        return quantized_dropout(input, self.p, self.training)
