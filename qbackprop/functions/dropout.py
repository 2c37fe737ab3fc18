"""Dropout whose backward keeps a 1-bit packed mask instead of torch's byte (or float) mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..quant.packing import pack_codes, unpack_codes
from .autocast import autocast_disabled
from .base import QFunction, records_grad
from .saved import load_saved, save_for_backward


class DropoutFunction(QFunction):
    """``x · keep / (1 − p)`` with ``keep ~ Bernoulli(1 − p)`` drawn here; ``keep`` is saved
    packed at 1 bit per element. Backward: ``dx = δ · keep / (1 − p)``, exactly as torch's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.rand_like(x) >= p
        out = x * keep / (1.0 - p)
        save_for_backward(ctx, [], exact=[pack_codes(keep.reshape(-1), 1)])
        ctx.meta = (x.shape, p)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, p = ctx.meta
        with autocast_disabled(grad.device.type):
            _, (packed,) = load_saved(ctx)
            keep = unpack_codes(packed, 1, math.prod(shape), grad.dtype).view(shape)
            return grad * keep / (1.0 - p), None


def quantized_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)`` whose saved mask takes 1 bit per element.

    Eval, ``p == 0``, no gradient and empty tensors run torch's own op (which saves nothing);
    ``p == 1`` too (torch returns zeros).
    """
    if not training or p <= 0.0 or p >= 1.0 or x.numel() == 0:
        return F.dropout(x, p, training)
    if not records_grad(x):
        return F.dropout(x, p, training)
    return DropoutFunction.apply(x, p)
