"""Drop-in LayerNorm / timm LayerNorm2d / GroupNorm layers saving a compressed x̂."""

from __future__ import annotations

import torch
from timm.layers import GroupNorm as TimmGroupNorm
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerNorm2d as TimmLayerNorm2d
from torch import nn

from ..functions import shared
from ..functions.layer_norm import group_norm, layer_norm
from ..functions.norm import normalized_spec
from .registry import QuantizedModule, register_swap


class _NormSaves(QuantizedModule):
    def saves(self) -> str:
        note = f"x̂ at {normalized_spec(self.qspec).bits}b"
        if self.qshare and shared.feeds_converted(self):
            return f"{note}, shared with its consumer"
        return note


@register_swap(TimmLayerNorm, "norm")
@register_swap(nn.LayerNorm, "norm")
class QuantizedLayerNorm(_NormSaves):
    """LayerNorm over the trailing ``normalized_shape`` (torch's and timm's, whose forward is
    the same ``F.layer_norm`` unless timm's optional fast-norm kernels are switched on).

    Its output (a transformer block's ``norm1`` → ``qkv``, ``norm2`` → ``fc1``) is shared with
    the converted layer that consumes it, as a BatchNorm's is: that layer rebuilds its input
    from the x̂ kept here (2·b bits) instead of keeping a b-bit copy of its own.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        spec = self.qspec
        sources = [] if self.qshare and spec is not None and spec.enabled else None
        out = layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, spec, sources
        )
        if sources and sources[0] is not None:
            ready = shared.feeds_converted(self)
            promise = shared.leaf_bits(normalized_spec(spec))
            params = (self.weight, self.bias)
            recipe = shared.affine(
                sources[0], params, out.dtype, ready, self, promise, trailing=True
            )
            shared.tag(out, recipe)
        return out


@register_swap(TimmLayerNorm2d, "norm")
class QuantizedLayerNorm2d(_NormSaves):
    """timm's LayerNorm2d: LayerNorm over the channels of an NCHW tensor (ConvNeXt stem and
    downsampling). The permutes are views; x̂ is kept in the channels-last order it is
    computed in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.qspec)
        return x.permute(0, 3, 1, 2)


@register_swap(TimmGroupNorm, "norm")
@register_swap(nn.GroupNorm, "norm")
class QuantizedGroupNorm(_NormSaves):
    """GroupNorm (torch's and timm's), any number of spatial dims."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.qspec)
