"""Drop-in MaxPool2d: saves the argmax's in-window position (4 bits for 3x3), lossless."""

from __future__ import annotations

import torch
from torch import nn

from ..functions.pool import quantized_max_pool2d
from .registry import QuantizedModule, register_swap


def _check(module: nn.Module) -> str | None:
    if module.return_indices:
        return "return_indices=True: the caller wants torch's int64 indices"
    return None


@register_swap(nn.MaxPool2d, "pool", check=_check)
class QuantizedMaxPool2d(QuantizedModule):
    """``nn.MaxPool2d`` whose backward reads a packed window position instead of int64 indices.

    The position is stored exactly, whatever ``qspec`` says: gradients equal torch's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_max_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode
        )
