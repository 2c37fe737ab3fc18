"""Drop-in mixin for nn.Linear: forward through ``quantized_linear`` (compressed saved input)."""

from __future__ import annotations

import torch
from timm.layers.linear import Linear as TimmLinear
from torch import nn

from ..functions.linear import quantized_linear
from ..functions.shared import watcher
from ..quant import QuantSpec
from .conv import forward_override_check
from .plan import LayerPlan, PlanContext
from .registry import QuantizedModule, register_swap

# A Linear fed one vector per sample (a classifier after pooling, ViT's head on the class
# token) sums its weight gradient over the batch alone, not over tokens or pixels: the
# compression error does not average out (vit_tiny on the digits at the 2-bit preset: the head
# alone gave a variance ratio of 0.93, at 8 bits 0.0009), while its input is a few KiB.
PER_SAMPLE_MIN_BITS = 8


def per_sample_spec(spec: QuantSpec | None) -> QuantSpec | None:
    """How a Linear fed one vector per sample keeps its input: ``spec`` at >= 8 bits."""
    if spec is None or not spec.enabled or spec.bits >= PER_SAMPLE_MIN_BITS:
        return spec
    return spec.replace(bits=PER_SAMPLE_MIN_BITS, mix_bits=None, mix_prob=None)


@register_swap(TimmLinear, "linear", check=forward_override_check(TimmLinear))
@register_swap(nn.Linear, "linear", check=forward_override_check(nn.Linear))
class QuantizedLinear(QuantizedModule):
    """Mixin for ``nn.Linear`` (any number of leading dims): saves a compressed input.

    Also for timm's ``timm.layers.Linear`` (MobileNetV3 / EfficientNet classifiers), whose
    forward outside TorchScript is ``F.linear(input, self.weight, self.bias)``. A layer whose
    input in the planning forward was one vector per sample (2-D) keeps it at >= 8 bits.
    """

    def make_plan(
        self, name: str, spec: QuantSpec | None, share: bool, ctx: PlanContext
    ) -> LayerPlan:
        if name not in ctx.structure.per_sample:
            return LayerPlan(name, spec, share, spec, spec)
        saves = per_sample_spec(spec)
        note = ""
        if saves is not spec and saves is not None and saves.enabled:
            note = f"input at {saves.bits}b (one vector per sample)"
        return LayerPlan(name, spec, share, saves, saves, (), note)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        planner = watcher()
        if planner is not None and input.dim() <= 2:
            planner.per_sample(self)
        return quantized_linear(input, self.weight, self.bias, spec=self.qplan.saves)
