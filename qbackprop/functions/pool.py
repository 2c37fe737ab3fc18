"""MaxPool2d whose saved argmax is the position inside the window, packed, not int64 indices.

torch keeps the pooled plane's argmax as int64 flat indices (8 bytes per output element, more
than the fp32 output itself) and the fallback cannot compress integers. The argmax always lies
inside its window, so ``kernel_h * kernel_w`` positions suffice: 4 bits for a 3x3 window.
Lossless: the input gradient equals torch's at every bit width.
"""

from __future__ import annotations

import math

import torch
from torch.nn.modules.utils import _pair

from ..quant.packing import pack_codes, unpack_codes
from .base import QFunction, records_grad
from .saved import load_saved, save_for_backward


def _window_origins(out_size: int, stride: int, padding: int, device) -> torch.Tensor:
    return torch.arange(out_size, device=device) * stride - padding


class MaxPool2dFunction(QFunction):
    """``F.max_pool2d`` that saves the argmax's in-window position, densely packed."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        out, indices = torch.nn.functional.max_pool2d(
            x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True
        )
        (kh, kw), (sh, sw) = _pair(kernel_size), _pair(stride or kernel_size)
        (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
        width = x.shape[-1]
        oh, ow = out.shape[-2:]
        row, col = indices // width, indices % width
        # Position of the argmax in its window: (row - origin) / dilation, exact integers.
        wr = (row - _window_origins(oh, sh, ph, x.device).view(-1, 1)) // dh
        wc = (col - _window_origins(ow, sw, pw, x.device).view(1, -1)) // dw
        bits = max(1, math.ceil(math.log2(kh * kw)))
        codes = pack_codes((wr * kw + wc).reshape(-1), bits)
        ctx.geometry = (x.shape, x.dtype, kw, sh, sw, ph, pw, dh, dw, bits, out.shape)
        ctx.pool_args = (kernel_size, stride, padding, dilation, ceil_mode)
        save_for_backward(ctx, [], exact=[codes])
        return out

    @staticmethod
    def backward(ctx, grad):
        _, (codes,) = load_saved(ctx)
        shape, dtype, kw, sh, sw, ph, pw, dh, dw, bits, out_shape = ctx.geometry
        oh, ow = out_shape[-2:]
        pos = unpack_codes(codes, bits, grad.numel(), torch.int64).view(out_shape)
        row = _window_origins(oh, sh, ph, grad.device).view(-1, 1) + (pos // kw) * dh
        col = _window_origins(ow, sw, pw, grad.device).view(1, -1) + (pos % kw) * dw
        indices = row * shape[-1] + col
        # torch's own kernel: only the shape of its `self` argument is read.
        template = torch.empty(shape, dtype=dtype, device=grad.device)
        grad_input = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.to(dtype), template, *_backward_args(ctx.pool_args), indices
        )
        return grad_input, None, None, None, None, None


def _backward_args(pool_args):
    kernel_size, stride, padding, dilation, ceil_mode = pool_args
    stride = stride or kernel_size
    return (
        list(_pair(kernel_size)),
        list(_pair(stride)),
        list(_pair(padding)),
        list(_pair(dilation)),
        ceil_mode,
    )


def quantized_max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """``F.max_pool2d`` (no ``return_indices``) keeping a packed in-window argmax for backward."""
    if not records_grad(x) or x.dim() not in (3, 4) or x.numel() == 0:
        return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    return MaxPool2dFunction.apply(x, kernel_size, stride, padding, dilation, ceil_mode)
