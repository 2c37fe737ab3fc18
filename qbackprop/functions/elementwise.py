"""The squeeze-excite multiply ``x * gate``: ``x`` saved compressed, the gate at >= 4 bits."""

from __future__ import annotations

import torch

from ..quant import QuantSpec
from . import shared
from .autocast import autocast_disabled
from .base import QFunction, records_grad
from .saved import load_saved, save_for_backward

GATE_BITS = 4


def gate_spec(spec: QuantSpec | None) -> QuantSpec | None:
    """How the gate is kept: at least 4 bits, rounded like ``spec`` (unbiased if stochastic).

    The gate is small next to ``x`` on large planes, but on the 1x1 / 2x2 planes of late
    stages at CIFAR resolution it is as large as ``x``; kept at fp32 it would dominate those
    blocks' memory. Its error enters every element of dx, so it never gets fewer than 4 bits.
    """
    if spec is None or not spec.enabled or spec.bits >= GATE_BITS:
        return spec
    return spec.replace(bits=GATE_BITS, mix_bits=None, mix_prob=None)


class GateMultiplyFunction(QFunction):
    """``x * gate`` with broadcasting; keeps ``x`` compressed by ``spec``, ``gate`` at >= 4 bits.

    Backward: ``dx = δ·gate`` (exact: it does not read ``x``) and ``dgate = Σ δ·x̃`` over the
    broadcast dims, reduced and cast as torch's ``MulBackward`` + autograd engine do, so at
    ``spec`` None or 32 bits both equal torch's. Meant for a small gate, e.g. ``(N, C, 1, 1)``
    against ``(N, C, H, W)``: the gate is kept at >= 4 bits (see ``gate_spec``).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, gate: torch.Tensor, spec: QuantSpec | None, sources: list | None
    ) -> torch.Tensor:
        out = x * gate
        need_x, need_gate = ctx.needs_input_grad[:2]
        # dgate reads x, dx reads the gate: keep each only when its partner needs a gradient.
        saved = [(x if need_gate else None, spec), (gate if need_x else None, gate_spec(spec))]
        kept = save_for_backward(ctx, saved)
        if sources is not None:
            sources.extend(kept)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.gate_meta = (gate.shape, gate.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with autocast_disabled(grad.device.type):
            (x, gate), _ = load_saved(ctx)
            grad_x = grad_gate = None
            if ctx.needs_input_grad[0]:
                shape, dtype = ctx.x_meta
                grad_x = (grad * gate).sum_to_size(shape).to(dtype)
            if ctx.needs_input_grad[1]:
                shape, dtype = ctx.gate_meta
                grad_gate = (grad * x).sum_to_size(shape).to(dtype)
        return grad_x, grad_gate, None, None


def quantized_mul(
    x: torch.Tensor,
    gate: torch.Tensor,
    *,
    spec: QuantSpec | None = None,
    producer: torch.nn.Module | None = None,
) -> torch.Tensor:
    """``x * gate`` (broadcasting) whose saved ``x`` is compressed by ``spec``.

    Args:
        x: the large operand, e.g. an ``(N, C, H, W)`` feature map.
        gate: the small operand, e.g. the ``(N, C, 1, 1)`` squeeze-excite gate; kept exact.
        spec: how the saved ``x`` is compressed; None or 32 bits keeps it exact.
        producer: the converted module computing it, when its plan lets its output be shared:
            the product is tagged with a ``Recipe`` (``shared.py``) so that a converted layer
            consuming it rebuilds it from the saved ``x`` and gate instead of storing it again
            (ready when the module's plan says it feeds one).

    Returns:
        ``x * gate``, identical to torch's.
    """
    if not records_grad(x, gate):
        return x * gate
    return _mul_with_saved(x, gate, spec, producer)


def _mul_with_saved(
    x: torch.Tensor, gate: torch.Tensor, spec: QuantSpec | None, producer
) -> torch.Tensor:
    plan = producer.qplan if producer is not None else None
    tags = plan is not None and plan.share and (plan.feeds or shared.watcher() is not None)
    sources: list | None = [] if tags and spec is not None and spec.enabled else None
    with autocast_disabled(x.device.type):
        out = GateMultiplyFunction.apply(x, gate, spec, sources)
    if sources and all(s is not None for s in sources):
        ready = plan.shared_output
        shared.tag(out, shared.product(sources[0], sources[1], out.dtype, ready, producer))
    return out


class ScaleFunction(QFunction):
    """``x * gamma`` for a learned per-channel ``gamma`` (LayerScale): ``x`` saved compressed,
    ``gamma`` (a Parameter, already held by the model) exactly.

    Backward: ``dx = δ·gamma`` (exact), ``dgamma = Σ δ·x̃`` over the broadcast dims; at ``spec``
    None or 32 bits both equal torch's ``MulBackward``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, spec: QuantSpec | None):
        out = x * gamma
        need_x, need_gamma = ctx.needs_input_grad[:2]
        save_for_backward(
            ctx, [(x if need_gamma else None, spec)], exact=[gamma if need_x else None]
        )
        ctx.meta = (x.shape, x.dtype, gamma.shape, gamma.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_shape, x_dtype, gamma_shape, gamma_dtype = ctx.meta
        with autocast_disabled(grad.device.type):
            (x,), (gamma,) = load_saved(ctx)
            grad_x = grad_gamma = None
            if ctx.needs_input_grad[0]:
                grad_x = (grad * gamma).sum_to_size(x_shape).to(x_dtype)
            if ctx.needs_input_grad[1]:
                grad_gamma = (grad * x).sum_to_size(gamma_shape).to(gamma_dtype)
        return grad_x, grad_gamma, None


def quantized_scale(
    x: torch.Tensor, gamma: torch.Tensor, *, spec: QuantSpec | None = None
) -> torch.Tensor:
    """``x * gamma`` (LayerScale) whose saved ``x`` is compressed by ``spec``.

    Args:
        x: the activation, channels broadcast against ``gamma``.
        gamma: the learned scale, e.g. ``(C,)`` or ``(1, C, 1, 1)``; kept exact.
        spec: how the saved ``x`` is compressed; None or 32 bits keeps it exact.
    """
    if not records_grad(x, gamma):
        return x * gamma
    with autocast_disabled(x.device.type):
        return ScaleFunction.apply(x, gamma, spec)
