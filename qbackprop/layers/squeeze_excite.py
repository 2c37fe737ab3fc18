"""Drop-in mixins for timm's squeeze-excite modules: the ``x * gate`` multiply saves x compressed.

Only the final multiply goes through our Function; the child convs, activations and gate are
modules of their own that surgery converts (or not) separately.
"""

from __future__ import annotations

import torch
from timm.layers.squeeze_excite import SEModule
from timm.models._efficientnet_blocks import SqueezeExcite

from ..functions.elementwise import quantized_mul
from .conv import forward_override_check
from .registry import QuantizedModule, register_swap


@register_swap(SqueezeExcite, "elementwise", check=forward_override_check(SqueezeExcite))
class QuantizedSqueezeExcite(QuantizedModule):
    """Mixin for ``timm.models._efficientnet_blocks.SqueezeExcite`` (EfficientNet / MobileNet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return quantized_mul(x, self.gate(x_se), spec=self.qspec, share=self.qshare)


@register_swap(SEModule, "elementwise", check=forward_override_check(SEModule))
class QuantizedSEModule(QuantizedModule):
    """Mixin for ``timm.layers.squeeze_excite.SEModule`` (ResNet / RegNet style SE)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            # timm's experimental path; amax saves x itself, left to the fallback hooks.
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return quantized_mul(x, self.gate(x_se), spec=self.qspec, share=self.qshare)
