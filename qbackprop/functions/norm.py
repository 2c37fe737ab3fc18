"""BatchNorm as an autograd Function that saves the normalized activation x̂, compressed.

Saving x̂ = (x - mean) * invstd instead of the raw input x is what makes low-bit BatchNorm
backward work: x̂ has unit variance in every channel, so one bucket scale fits all of its
channels, while raw conv outputs differ by orders of magnitude between channels and BN's
backward multiplies their quantization error by invstd (see docs/design-notes.md).
"""

from __future__ import annotations

import torch

from ..quant import QuantSpec
from .base import QFunction, records_grad
from .saved import load_saved, save_for_backward
from .shared import scaled_bits

NORMALIZED_MAX_BITS = 8


def normalized_spec(spec: QuantSpec | None) -> QuantSpec | None:
    """The spec a normalization layer keeps its x̂ under: ``2·b`` bits, at most 8 (never fewer
    than ``spec`` asks for).

    Why x̂ needs more bits than other activations: the backward's per-channel reductions
    ``mean(g·x̂)`` and ``mean(g)`` are small differences (the exact input gradient is
    orthogonal to 1 and x̂), and an error δ in x̂ enters them as ``mean(g·δ)``, then returns as
    ``x̂·mean(g·δ)`` at full size in the input gradient, along the very direction in which the
    producing conv's weight gradient is largest (docs/design-notes.md, "Normalization layers").
    """
    if spec is None or not spec.enabled:
        return spec
    return scaled_bits(spec, 2, NORMALIZED_MAX_BITS)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over an (N, C, *spatial) tensor."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def _reduce_dims(ndim: int) -> list[int]:
    return [0, *range(2, ndim)]


def batch_norm_backward_from_xhat(
    grad: torch.Tensor,
    xhat: torch.Tensor,
    weight: torch.Tensor | None,
    invstd: torch.Tensor,
    training: bool,
    needs: tuple[bool, bool, bool],
):
    """Gradients of BatchNorm from the normalized input x̂ (exact when x̂ is exact).

    Args:
        grad: gradient of the output.
        xhat: normalized input (possibly dequantized).
        weight: affine scale or None.
        invstd: per-channel 1/sqrt(var + eps) used in forward.
        training: batch statistics (True) or running statistics (False) were used.
        needs: whether the input, weight and bias gradients are needed.

    Returns:
        ``(grad_input, grad_weight, grad_bias)``, each None when not needed.
    """
    ndim = grad.dim()
    dims = _reduce_dims(ndim)
    g = grad.float()
    x = xhat.float()
    sum_g = g.sum(dims) if (needs[2] or (training and needs[0])) else None
    sum_gx = (g * x).sum(dims) if (needs[1] or (training and needs[0])) else None
    grad_input = None
    if needs[0]:
        scale = invstd.float() if weight is None else weight.float() * invstd.float()
        scale = _channel_view(scale, ndim)
        if training:
            count = grad.numel() // grad.shape[1]
            mean_g = _channel_view(sum_g / count, ndim)
            mean_gx = _channel_view(sum_gx / count, ndim)
            grad_input = (g - mean_g - x * mean_gx).mul_(scale)
        else:
            grad_input = g * scale
        grad_input = grad_input.to(grad.dtype)
    grad_weight = sum_gx.to(weight.dtype) if needs[1] and weight is not None else None
    grad_bias = sum_g.to(weight.dtype) if needs[2] and weight is not None else None
    return grad_input, grad_weight, grad_bias


class BatchNormFunction(QFunction):
    """``F.batch_norm`` whose backward reads a compressed x̂ (or the exact input at 32 bits)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        spec: QuantSpec | None,
        sources: list | None,
    ) -> torch.Tensor:
        # aten's own kernel: identical output and identical running-statistics update to torch.
        out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
        ctx.training, ctx.eps = training, eps
        ctx.exact_input = spec is None or not spec.enabled
        if training:
            mean, invstd = save_mean, save_invstd
        else:
            mean, invstd = running_mean, torch.rsqrt(running_var.float() + eps)
        if ctx.exact_input:
            # Keep what torch keeps, so 32-bit backward is torch's own kernel. Training-mode
            # backward does not read the running statistics, which later forwards update in place.
            running = (None, None) if training else (running_mean, running_var)
            save_for_backward(ctx, [(x, None)], exact=[weight, *running, save_mean, save_invstd])
            return out
        ndim = x.dim()
        xhat = (x.float() - _channel_view(mean.float(), ndim)) * _channel_view(invstd, ndim)
        saved = save_for_backward(ctx, [(xhat.to(x.dtype), spec)], exact=[weight, invstd])
        if sources is not None:
            sources.extend(saved)  # the caller tags the output (see functions/shared.py)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (saved,), exact = load_saved(ctx)
        needs = tuple(ctx.needs_input_grad[:3])
        if ctx.exact_input:
            weight, running_mean, running_var, save_mean, save_invstd = exact
            grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad.contiguous(memory_format=_memory_format(saved)),
                saved,
                weight,
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                ctx.training,
                ctx.eps,
                list(needs),
            )
        else:
            weight, invstd = exact
            grad_input, grad_weight, grad_bias = batch_norm_backward_from_xhat(
                grad, saved, weight, invstd, ctx.training, needs
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    spec: QuantSpec | None,
    *,
    sources: list | None = None,
) -> torch.Tensor:
    """Drop-in for ``F.batch_norm`` (same argument order) with a compressed saved x̂.

    ``sources``, when given, receives the ``Recipe`` of the saved x̂ (nothing at 32 bits or when
    no gradient is recorded), from which a caller can tag the output for sharing.
    """
    if x.numel() == 0 or not records_grad(x, weight, bias):
        # Nothing will be saved: torch's own op (eval speed, running stats updated the same).
        return torch.nn.functional.batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum, eps
        )
    return BatchNormFunction.apply(
        x, weight, bias, running_mean, running_var, training, momentum, eps, spec, sources
    )
