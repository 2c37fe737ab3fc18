"""Drop-in mixins for timm's squeeze-excite modules: the ``x * gate`` multiply saves x compressed.

Only the final multiply goes through our Function; the child convs, activations and gate are
modules of their own that surgery converts (or not) separately.
"""

from __future__ import annotations

import torch
from timm.layers.squeeze_excite import SEModule
from timm.models._efficientnet_blocks import SqueezeExcite

from ..functions.elementwise import quantized_mul
from ..functions.shared import leaf_bits
from ..quant import QuantSpec
from .conv import forward_override_check
from .plan import LayerPlan, PlanContext
from .registry import QuantizedModule, register_swap


class _GateProducer(QuantizedModule):
    """The ``x * gate`` output is rebuilt by its consumer (``shared.product``) when the plan
    says it feeds one."""

    producer = True

    def make_plan(
        self, name: str, spec: QuantSpec | None, share: bool, ctx: PlanContext
    ) -> LayerPlan:
        feeds: tuple[str, ...] = ()
        if share and spec is not None and spec.enabled:
            feeds = tuple(
                c
                for c in ctx.structure.consumers.get(name, ())
                if (s := ctx.specs.get(c)) is not None
                and s.enabled
                and leaf_bits(spec) >= leaf_bits(s)
            )
        note = f"output rebuilt by {', '.join(feeds)}" if feeds else ""
        return LayerPlan(name, spec, share, spec, spec, feeds, note)


@register_swap(SqueezeExcite, "elementwise", check=forward_override_check(SqueezeExcite))
class QuantizedSqueezeExcite(_GateProducer):
    """Mixin for ``timm.models._efficientnet_blocks.SqueezeExcite`` (EfficientNet / MobileNet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return quantized_mul(x, self.gate(x_se), spec=self.qspec, producer=self)


@register_swap(SEModule, "elementwise", check=forward_override_check(SEModule))
class QuantizedSEModule(_GateProducer):
    """Mixin for ``timm.layers.squeeze_excite.SEModule`` (ResNet / RegNet style SE)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            # timm's experimental path; amax saves x itself, left to the fallback hooks.
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return quantized_mul(x, self.gate(x_se), spec=self.qspec, producer=self)
