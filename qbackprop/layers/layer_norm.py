"""Drop-in LayerNorm / timm LayerNorm2d / GroupNorm layers saving a compressed x̂."""

from __future__ import annotations

import torch
from timm.layers import GroupNorm as TimmGroupNorm
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerNorm2d as TimmLayerNorm2d
from torch import nn

from .. import runtime
from ..functions import shared
from ..functions.layer_norm import group_norm, layer_norm
from ..functions.norm import normalized_spec
from ..functions.shared import leaf_bits
from ..quant import QuantSpec
from .norm import shared_norm_plan
from .plan import LayerPlan, PlanContext
from .registry import QuantizedModule, register_swap


class _NormSaves(QuantizedModule):
    def make_plan(
        self, name: str, spec: QuantSpec | None, share: bool, ctx: PlanContext
    ) -> LayerPlan:
        xhat = normalized_spec(spec)
        note = f"x̂ at {xhat.bits}b" if xhat is not None and xhat.enabled else ""
        return LayerPlan(name, spec, share, xhat, xhat, (), note)


@register_swap(TimmLayerNorm, "norm")
@register_swap(nn.LayerNorm, "norm")
class QuantizedLayerNorm(QuantizedModule):
    """LayerNorm over the trailing ``normalized_shape`` (torch's and timm's, whose forward is
    the same ``F.layer_norm`` unless timm's optional fast-norm kernels are switched on).

    Its output (a transformer block's ``norm1`` → ``qkv``, ``norm2`` → ``fc1``) is shared with
    the converted layer that consumes it, as a BatchNorm's is: that layer rebuilds its input
    from the x̂ kept here (2·b bits) instead of keeping a b-bit copy of its own.
    """

    producer = True

    def make_plan(
        self, name: str, spec: QuantSpec | None, share: bool, ctx: PlanContext
    ) -> LayerPlan:
        xhat = normalized_spec(spec)
        promise = leaf_bits(xhat) if xhat is not None and xhat.enabled else 0.0
        return shared_norm_plan(name, spec, share, ctx, promise, xhat)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        plan = self.qplan
        spec = plan.spec
        tags = plan.share and spec is not None and spec.enabled and runtime.shares()
        sources = [] if tags else None
        out = layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, spec, sources
        )
        if sources and sources[0] is not None and (plan.feeds or shared.watcher()):
            promise = leaf_bits(normalized_spec(spec))
            params = (self.weight, self.bias)
            recipe = shared.affine(
                sources[0], params, out.dtype, plan.shared_output, self, promise, trailing=True
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
