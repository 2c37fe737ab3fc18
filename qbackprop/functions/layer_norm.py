"""LayerNorm and GroupNorm as autograd Functions that save the normalized x̂, compressed.

Same reasoning as BatchNorm (``norm.py``): x̂ has zero mean and unit variance in every
normalization group, so one bucket scale fits, and the backward needs only x̂, the per-group
``rstd`` and the affine weight:

    dx = rstd · (gw − mean(gw) − x̂ · mean(gw · x̂)),   gw = g · w,   dw = Σ g · x̂,   db = Σ g

with the means over one normalization group (a token's features for LayerNorm, a sample's
channel group for GroupNorm). Those groups are small (a ConvNeXt token has 40-320 features),
so the reductions average the error of x̂ over few elements: x̂ is kept at
``normalized_spec`` (2·b bits, at most 8). Through the generic fallback, torch's own op would
keep the raw input instead, whose token means and channel scales make one bucket range far too
wide (ConvNeXt at 8 bits: variance ratio 27-74). At 32 bits the exact input is kept and
torch's own backward kernels run, so gradients are bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..quant import QuantSpec
from .autocast import autocast_dtype
from .base import QFunction, records_grad
from .norm import normalized_spec
from .saved import load_saved, save_for_backward


def _affine_grads(g, xhat, lead_dims, needs, affine_shape, dtype):
    # needs_input_grad is False for an absent weight or bias.
    grad_weight = grad_bias = None
    if needs[1]:
        grad_weight = (g * xhat).sum(lead_dims).reshape(affine_shape).to(dtype)
    if needs[2]:
        grad_bias = g.sum(lead_dims).reshape(affine_shape).to(dtype)
    return grad_weight, grad_bias


def _input_grad(g, xhat, w_view, rstd, dims):
    gw = g if w_view is None else g * w_view
    mean_gw = gw.mean(dims, keepdim=True)
    mean_gwx = (gw * xhat).mean(dims, keepdim=True)
    return (gw - mean_gw - xhat * mean_gwx) * rstd


class LayerNormFunction(QFunction):
    """``F.layer_norm`` over the last ``len(normalized_shape)`` dims, saving a compressed x̂."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, spec, sources):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.normalized_shape = list(normalized_shape)
        ctx.param_dtype = _param_dtype(weight, bias, x)
        ctx.exact_input = spec is None or not spec.enabled
        if ctx.exact_input:
            save_for_backward(ctx, [(x, None)], exact=[weight, bias, mean, rstd])
            return out
        xhat = ((x.float() - mean.float()) * rstd.float()).to(x.dtype)
        saved = save_for_backward(ctx, [(xhat, spec)], exact=[weight, rstd])
        if sources is not None:
            sources.extend(saved)  # the caller tags the output (see functions/shared.py)
        return out

    @staticmethod
    def backward(ctx, grad):
        (saved,), exact = load_saved(ctx)
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 2, 3))
        if ctx.exact_input:
            weight, bias, mean, rstd = exact
            grads = torch.ops.aten.native_layer_norm_backward(
                grad, saved, ctx.normalized_shape, mean, rstd, weight, bias, list(needs)
            )
            return grads[0], None, grads[1], grads[2], None, None, None
        weight, rstd = exact
        k = len(ctx.normalized_shape)
        dims = list(range(grad.dim() - k, grad.dim()))
        lead = list(range(grad.dim() - k))
        g, xhat = grad.float(), saved.float()
        grad_input = None
        if needs[0]:
            w_view = None if weight is None else weight.float()
            grad_input = _input_grad(g, xhat, w_view, rstd.float(), dims).to(grad.dtype)
        grad_weight, grad_bias = _affine_grads(
            g, xhat, lead, needs, ctx.normalized_shape, ctx.param_dtype
        )
        return grad_input, None, grad_weight, grad_bias, None, None, None


class GroupNormFunction(QFunction):
    """``F.group_norm`` of an ``(N, C, *spatial)`` input, saving a compressed x̂."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, spec):
        n, c = x.shape[0], x.shape[1]
        hw = x.numel() // max(n * c, 1)
        out, mean, rstd = torch.ops.aten.native_group_norm(
            x, weight, bias, n, c, hw, num_groups, eps
        )
        ctx.dims = (n, c, hw, num_groups)
        ctx.param_dtype = _param_dtype(weight, bias, x)
        ctx.exact_input = spec is None or not spec.enabled
        if ctx.exact_input:
            save_for_backward(ctx, [(x, None)], exact=[weight, mean, rstd])
            return out
        grouped = x.float().reshape(n, num_groups, -1)
        xhat = (grouped - mean.float().unsqueeze(-1)) * rstd.float().unsqueeze(-1)
        save_for_backward(ctx, [(xhat.reshape(x.shape).to(x.dtype), spec)], exact=[weight, rstd])
        return out

    @staticmethod
    def backward(ctx, grad):
        (saved,), exact = load_saved(ctx)
        n, c, hw, groups = ctx.dims
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 2, 3))
        if ctx.exact_input:
            weight, mean, rstd = exact
            grads = torch.ops.aten.native_group_norm_backward(
                grad.contiguous(), saved, mean, rstd, weight, n, c, hw, groups, list(needs)
            )
            return grads[0], None, grads[1], grads[2], None, None
        weight, rstd = exact
        # (N, G, C/G, HW): the reductions run over dims 2 and 3, the affine is per channel.
        g = grad.float().reshape(n, groups, c // groups, hw)
        xhat = saved.float().reshape(n, groups, c // groups, hw)
        grad_input = None
        if needs[0]:
            w_view = None if weight is None else weight.float().view(1, groups, c // groups, 1)
            rstd4 = rstd.float().view(n, groups, 1, 1)
            grad_input = _input_grad(g, xhat, w_view, rstd4, [2, 3])
            grad_input = grad_input.reshape(grad.shape).to(grad.dtype)
        grad_weight, grad_bias = _affine_grads(g, xhat, [0, 3], needs, (c,), ctx.param_dtype)
        return grad_input, None, grad_weight, grad_bias, None, None


def _param_dtype(weight, bias, x) -> torch.dtype:
    return next((t.dtype for t in (weight, bias) if t is not None), x.dtype)


def _autocast_fp32(*tensors):
    # CUDA autocast runs layer_norm / group_norm in fp32 (its "fp32 ops" list), CPU autocast
    # leaves their dtype alone; a Function is invisible to autocast, so cast as it would.
    device = tensors[0].device.type
    if device != "cuda" or autocast_dtype(device) is None:
        return tensors
    low = (torch.float16, torch.bfloat16)
    return tuple(t.float() if t is not None and t.dtype in low else t for t in tensors)


def layer_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    spec: QuantSpec | None,
    sources: list | None = None,
) -> torch.Tensor:
    """Drop-in for ``F.layer_norm`` whose saved x̂ is compressed (at ``normalized_spec(spec)``).

    ``sources``, when given, receives the recipe of the saved x̂ (for the caller to tag the
    output with, see ``functions/shared.py``); it stays empty when nothing is compressed.
    """
    if x.numel() == 0 or not records_grad(x, weight, bias):
        return torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)
    x, weight, bias = _autocast_fp32(x, weight, bias)
    spec = normalized_spec(spec)
    return LayerNormFunction.apply(x, tuple(normalized_shape), weight, bias, eps, spec, sources)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    spec: QuantSpec | None,
) -> torch.Tensor:
    """Drop-in for ``F.group_norm`` whose saved x̂ is compressed (at ``normalized_spec(spec)``)."""
    if x.numel() == 0 or x.dim() < 2 or not records_grad(x, weight, bias):
        return torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    x, weight, bias = _autocast_fp32(x, weight, bias)
    spec = normalized_spec(spec)
    return GroupNormFunction.apply(x, num_groups, weight, bias, eps, spec)
