"""Linear (any leading dims) whose forward is torch's and whose saved input is compressed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import QuantSpec
from .autocast import autocast_disabled, autocast_inputs
from .base import QFunction, records_grad
from .saved import load_saved, save_for_backward


def _column_major(t: torch.Tensor) -> bool:
    """ATen's test in mm_mat1/mm_mat2_backward for a column-major 2-D operand."""
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) == t.shape[0]


class LinearFunction(QFunction):
    """``F.linear`` that saves its input compressed by ``spec``.

    Backward on the flattened ``(M, in)`` input: ``dx = δ W``, ``dW = δᵀ x̃``, ``db = Σ δ``,
    with the same ``mm`` calls (operand order and transposes) that torch's ``AddmmBackward`` /
    ``MmBackward`` make, so at ``spec`` None or 32 bits the gradients equal torch's bit for bit
    (for a strided input that ``F.linear`` does not fold, e.g. a transposed 3-d view, torch sums
    ``dW`` through ``bmm`` and the last bits may differ).
    """

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: QuantSpec | None,
    ) -> torch.Tensor:
        out = F.linear(input, weight, bias)
        need_input, need_weight = ctx.needs_input_grad[:2]
        save_for_backward(
            ctx,
            [(input if need_weight else None, spec)],
            exact=[weight if need_input else None],
        )
        ctx.input_shape = input.shape
        # Which mm formula torch's backward picks depends on the operands' layouts.
        ctx.input_column_major = _column_major(input)
        ctx.weight_t_column_major = _column_major(weight.t())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with autocast_disabled(grad.device.type):
            (x,), (w,) = load_saved(ctx)
            g = grad.reshape(-1, grad.shape[-1])
            grad_input = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                # Column-major input: torch computes (W^T δ^T)^T, otherwise δ W.
                col = ctx.input_column_major
                grad_input = w.t().mm(g.t()).t() if col else g.mm(w)
                grad_input = grad_input.reshape(ctx.input_shape)
            if ctx.needs_input_grad[1]:
                x = x.reshape(-1, ctx.input_shape[-1])
                # Row-major W (W^T column-major): torch computes δ^T x̃, otherwise (x̃^T δ)^T.
                col = ctx.weight_t_column_major
                grad_weight = g.t().mm(x) if col else x.t().mm(g).t()
            if ctx.needs_input_grad[2]:
                grad_bias = g.sum(0)
        return grad_input, grad_weight, grad_bias, None


def quantized_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    spec: QuantSpec | None = None,
) -> torch.Tensor:
    """``F.linear`` whose activation saved for backward is compressed by ``spec``.

    Args:
        input: ``(*, in_features)``, including 1-d ``(in_features,)``.
        weight: ``(out_features, in_features)``.
        bias: optional ``(out_features,)``.
        spec: how the saved input is compressed; None or 32 bits keeps it exact.

    Returns:
        ``(*, out_features)``, identical to torch's (autocast included).
    """
    if not records_grad(input, weight, bias):
        return F.linear(input, weight, bias)  # nothing is saved: torch's op is the answer
    return _linear_with_saved(input, weight, bias, spec)


def _linear_with_saved(input, weight, bias, spec):
    device_type = input.device.type
    input, weight, bias = autocast_inputs(device_type, input, weight, bias)
    with autocast_disabled(device_type):
        return LinearFunction.apply(input, weight, bias, spec)
