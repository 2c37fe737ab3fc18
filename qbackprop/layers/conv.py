"""Drop-in mixins for nn.Conv1d/2d/3d and timm's Conv2dSame: forward through ``quantized_conv``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..functions.conv import quantized_conv, subsampled_spec
from ..quant import QuantSpec
from .plan import LayerPlan, PlanContext
from .registry import QuantizedModule, register_swap


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def forward_override_check(
    source: type[nn.Module], methods: Sequence[str] = ("forward",)
) -> Callable[[nn.Module], str | None]:
    """A registry ``check``: refuse subclasses of ``source`` that redefine its computation.

    A mixin reproduces ``source.forward`` only; a subclass that overrides ``forward`` (timm's
    ``StdConv2d``, Brevitas' ``QuantConv2d``, LoRA wrappers, ...) would silently lose its own
    computation, so it stays unconverted unless it has its own registry entry (which
    ``find_swap`` then finds first in MRO order).

    Args:
        source: the registered module type.
        methods: the methods whose override changes the computation.
    """

    def check(module: nn.Module) -> str | None:
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            return "lazy module with uninitialized parameters: run one forward first"
        for cls in type(module).__mro__:
            if cls is source:
                return None
            if issubclass(cls, QuantizedModule):
                continue  # our own mixin, or the class made by conversion
            overridden = [m for m in methods if m in vars(cls)]
            if overridden:
                return (
                    f"{_qualname(cls)} overrides {', '.join(overridden)} of "
                    f"{_qualname(source)}; its computation is not reproduced"
                )
        return None

    return check


_CONV_METHODS = ("forward", "_conv_forward")


@register_swap(nn.Conv3d, "conv", check=forward_override_check(nn.Conv3d, _CONV_METHODS))
@register_swap(nn.Conv2d, "conv", check=forward_override_check(nn.Conv2d, _CONV_METHODS))
@register_swap(nn.Conv1d, "conv", check=forward_override_check(nn.Conv1d, _CONV_METHODS))
class QuantizedConv(QuantizedModule):
    """Mixin for ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: saves a compressed input.

    Same computation as ``_ConvNd._conv_forward``: a non-zeros ``padding_mode`` pads with
    ``F.pad`` first and convolves with zero padding; ``'same'`` / ``'valid'`` work as in torch.
    """

    def make_plan(
        self, name: str, spec: QuantSpec | None, share: bool, ctx: PlanContext
    ) -> LayerPlan:
        strided = any(st > 1 for st in self.stride) and all(k == 1 for k in self.kernel_size)
        note = ""
        unpadded = not isinstance(self.padding, str) and not any(self.padding)
        if spec is not None and strided and unpadded:
            note = f"subsampled input at {subsampled_spec(spec, self.stride).bits}b"
        return LayerPlan(name, spec, share, spec, spec, (), note)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return quantized_conv(
            input,
            self.weight,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            spec=self.qspec,
        )


@register_swap(Conv2dSame, "conv", check=forward_override_check(Conv2dSame, _CONV_METHODS))
class QuantizedConv2dSame(QuantizedModule):
    """Mixin for timm's ``Conv2dSame``: TF-style dynamic 'SAME' padding, then the conv.

    As timm's ``conv2d_same``: ``pad_same`` (asymmetric zeros from the input size) outside the
    Function, so the saved copy is the padded input, then a conv with padding 0.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return quantized_conv(
            x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups, spec=self.qspec
        )
