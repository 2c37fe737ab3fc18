"""Activation Functions that keep a 1-bit step mask or a few-bit derivative code for backward.

Two families, one autograd Function:

* **Step derivatives** (ReLU, ReLU6/Hardtanh, LeakyReLU, Hardsigmoid): ``f'`` takes two values,
  so a 1-bit mask of the exact input (8 per byte) is lossless: the input gradient equals torch's
  bit for bit at any bit width, including torch's convention at the kinks (``relu'(0) = 0``,
  ``hardtanh'`` is 0 at both limits, NaN inputs pass the gradient where torch does).
* **Smooth derivatives** (SiLU, GELU, Sigmoid, Tanh, Hardswish, Mish, ELU, Softplus, ...): the
  Few-bit backward codes of ``fewbit.py``, ``b = clamp(spec.bits, 1, 8)`` bits per element;
  ``mix_bits`` / ``mix_prob`` / rounding / bucket fields do not apply to derivative codes and are
  ignored. The codes index the *exact* input, so the derivative error is the table's
  approximation error only (never the bias a quantized input would add).

With ``spec`` None or disabled (bits 32) the Function keeps what torch keeps (the input, or the
output where torch's derivative uses it) and calls torch's own backward kernel, so outputs and
gradients equal the torch module's exactly. Storage ``on_backward`` keeps the exact input and
builds the mask or codes at the start of backward (same gradients as ``packed``; an ablation).

NaN: masks reproduce torch's NaN behaviour exactly. A few-bit code cannot say *where* a NaN was
(all ``2**b`` codes are taken), so when any element has an input at which torch's derivative is
NaN (NaN for SiLU, GELU, Sigmoid, ...; +-inf for SiLU, GELU, Mish), the Function also keeps one
byte saying so and the *whole* input gradient of that call is NaN: the NaN propagates (AMP's
GradScaler sees it) rather than being hidden. Inputs where torch's derivative is finite get the
level of their interval (e.g. +-inf in Sigmoid get the outermost level, not exactly 0).

Double backward raises (``once_differentiable``): only codes of the input are kept.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import runtime
from ..quant import QuantSpec
from ..quant.packing import pack_codes, unpack_codes
from ..quant.spec import Rounding, Storage
from .base import QFunction, records_grad
from .fewbit import (
    MAX_BITS,
    decode_derivative,
    decode_derivative_unbiased,
    encode_derivative,
    encode_derivative_unbiased,
    private_autograd,
)
from .saved import load_saved, save_for_backward

aten = torch.ops.aten

Forward = Callable[[torch.Tensor, bool], torch.Tensor]
ExactBackward = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Activation:
    """One activation: its exact forward and backward, and how its derivative is coded.

    Args:
        name: short name for reprs and errors.
        forward: ``(x, inplace) -> y``, exactly the original module's computation.
        exact_backward: ``(grad, saved, inplace) -> grad_in``: torch's own derivative from the
            tensor torch keeps (``saved`` is the output where ``saves_output`` says so).
        saves_output: whether torch keeps the output (not the input) out of place ...
        saves_output_inplace: ... and in place.
        step: ``(x, inplace) -> bool mask`` for step derivatives: ``f'`` is determined by it.
        step_backward: ``(grad, mask) -> grad_in``, equal to ``exact_backward`` bit for bit.
        table: the ``fewbit`` derivative table for smooth derivatives (when ``step`` is None).
        params: the table's parameters (ELU ``alpha``; Softplus ``beta, threshold``).
    """

    name: str
    forward: Forward
    exact_backward: ExactBackward
    saves_output: bool = False
    saves_output_inplace: bool = False
    step: Callable[[torch.Tensor, bool], torch.Tensor] | None = None
    step_backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    table: str | None = None
    params: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if (self.step is None) == (self.table is None):
            raise ValueError(f"activation {self.name!r} needs exactly one of step and table")
        if self.step is not None and self.step_backward is None:
            raise ValueError(f"activation {self.name!r}: step needs step_backward")

    def keeps_output(self, inplace: bool) -> bool:
        """Whether torch's backward reads the output (else the input) in this mode."""
        return self.saves_output_inplace if inplace else self.saves_output


def recomputed_backward(forward: Forward) -> ExactBackward:
    """An exact backward for a composite forward (timm's ``x * sigmoid(x)``, ...).

    Reruns ``forward`` on the saved input under autograd, so the gradient is the one autograd
    computes for the original module, bit for bit.
    """

    def backward(grad: torch.Tensor, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        with private_autograd():
            leaf = x.detach().requires_grad_(True)
            # An in-place forward may not modify a leaf; the clone's backward is the identity.
            y = forward(leaf.clone() if inplace else leaf, inplace)
            (grad_in,) = torch.autograd.grad(y, leaf, grad)
        return grad_in

    return backward


# ---- step derivatives: the bit a mask needs, and torch's gradient from it ----------------------


def _pass_where(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, grad, 0)


def _constant(fn):
    """Cached, and a constant for torch.compile: Dynamo calls it at trace time instead of
    tracing the construction of an ``Activation`` in every layer (minutes on a large model)."""
    return torch.compiler.assume_constant_result(functools.cache(fn))


@_constant
def relu() -> Activation:
    """``nn.ReLU``: torch keeps the output; ``relu'(0) = 0``, NaN passes the gradient."""
    return Activation(
        "relu",
        forward=lambda x, inplace: torch.relu_(x) if inplace else torch.relu(x),
        exact_backward=lambda g, out, inplace: aten.threshold_backward(g, out, 0),
        saves_output=True,
        saves_output_inplace=True,
        # threshold_backward zeroes where ``out <= 0``; the negation keeps NaN passing.
        step=lambda x, inplace: ~(x <= 0),
        step_backward=_pass_where,
    )


@_constant
def hardtanh(min_val: float = -1.0, max_val: float = 1.0) -> Activation:
    """``nn.Hardtanh`` / ``nn.ReLU6``: derivative 1 strictly inside, 0 at and beyond the limits."""
    return Activation(
        f"hardtanh({min_val:g}, {max_val:g})",
        forward=lambda x, inplace: F.hardtanh(x, min_val, max_val, inplace),
        exact_backward=lambda g, s, inplace: aten.hardtanh_backward(g, s, min_val, max_val),
        saves_output_inplace=True,
        step=lambda x, inplace: ~((x <= min_val) | (x >= max_val)),
        step_backward=_pass_where,
    )


@_constant
def leaky_relu(negative_slope: float = 0.01) -> Activation:
    """``nn.LeakyReLU``: derivative 1 where ``x > 0``, ``negative_slope`` elsewhere (and NaN)."""

    def step_backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # torch's kernel on a stand-in input (1 where x > 0, else 0): identical rounding of
        # grad * negative_slope in every dtype.
        return aten.leaky_relu_backward(grad, mask.to(grad.dtype), negative_slope, False)

    return Activation(
        f"leaky_relu({negative_slope:g})",
        forward=lambda x, inplace: F.leaky_relu(x, negative_slope, inplace),
        exact_backward=lambda g, s, inplace: aten.leaky_relu_backward(
            g, s, negative_slope, inplace
        ),
        saves_output_inplace=True,
        step=lambda x, inplace: x > 0,
        step_backward=step_backward,
    )


@_constant
def hardsigmoid() -> Activation:
    """``nn.Hardsigmoid``: derivative 1/6 strictly inside (-3, 3), else 0 (NaN too)."""

    def step_backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Stand-in input 0 inside, 3 outside: torch's kernel does the grad / 6 rounding.
        return aten.hardsigmoid_backward(grad, (~mask).to(grad.dtype) * 3)

    return Activation(
        "hardsigmoid",
        forward=lambda x, inplace: F.hardsigmoid(x, inplace),
        exact_backward=lambda g, x, inplace: aten.hardsigmoid_backward(g, x),
        step=lambda x, inplace: (x > -3) & (x < 3),
        step_backward=step_backward,
    )


# ---- smooth derivatives: few-bit codes --------------------------------------------------------


@_constant
def silu() -> Activation:
    """``nn.SiLU`` (swish)."""
    return Activation(
        "silu",
        forward=lambda x, inplace: F.silu(x, inplace),
        exact_backward=lambda g, x, inplace: aten.silu_backward(g, x),
        table="silu",
    )


@_constant
def gelu(approximate: str = "none") -> Activation:
    """``nn.GELU`` with ``approximate`` ``"none"`` (erf) or ``"tanh"``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"GELU approximate={approximate!r}; expected 'none' or 'tanh'")
    return Activation(
        "gelu" if approximate == "none" else "gelu_tanh",
        forward=lambda x, inplace: F.gelu(x, approximate=approximate),
        exact_backward=lambda g, x, inplace: aten.gelu_backward(g, x, approximate=approximate),
        table="gelu" if approximate == "none" else "gelu_tanh",
    )


@_constant
def sigmoid() -> Activation:
    """``nn.Sigmoid`` (torch keeps the output)."""
    return Activation(
        "sigmoid",
        forward=lambda x, inplace: x.sigmoid_() if inplace else torch.sigmoid(x),
        exact_backward=lambda g, out, inplace: aten.sigmoid_backward(g, out),
        saves_output=True,
        saves_output_inplace=True,
        table="sigmoid",
    )


@_constant
def tanh() -> Activation:
    """``nn.Tanh`` (torch keeps the output)."""
    return Activation(
        "tanh",
        forward=lambda x, inplace: x.tanh_() if inplace else torch.tanh(x),
        exact_backward=lambda g, out, inplace: aten.tanh_backward(g, out),
        saves_output=True,
        saves_output_inplace=True,
        table="tanh",
    )


@_constant
def hardswish() -> Activation:
    """``nn.Hardswish``."""
    return Activation(
        "hardswish",
        forward=lambda x, inplace: F.hardswish(x, inplace),
        exact_backward=lambda g, x, inplace: aten.hardswish_backward(g, x),
        table="hardswish",
    )


@_constant
def mish() -> Activation:
    """``nn.Mish``."""
    return Activation(
        "mish",
        forward=lambda x, inplace: F.mish(x, inplace),
        exact_backward=lambda g, x, inplace: aten.mish_backward(g, x),
        table="mish",
    )


@_constant
def elu(alpha: float = 1.0) -> Activation:
    """``nn.ELU``: torch keeps the input out of place and the output in place."""
    return Activation(
        f"elu({alpha:g})",
        forward=lambda x, inplace: F.elu(x, alpha, inplace),
        exact_backward=lambda g, s, inplace: aten.elu_backward(g, alpha, 1, 1, inplace, s),
        saves_output_inplace=True,
        table="elu",
        params=(float(alpha),),
    )


@_constant
def softplus(beta: float = 1.0, threshold: float = 20.0) -> Activation:
    """``nn.Softplus``."""
    return Activation(
        f"softplus({beta:g}, {threshold:g})",
        forward=lambda x, inplace: F.softplus(x, beta, threshold),
        exact_backward=lambda g, x, inplace: aten.softplus_backward(g, x, beta, threshold),
        table="softplus",
        params=(float(beta), float(threshold)),
    )


# ---- the Function -------------------------------------------------------------------------------

_EXACT, _STEP, _CODES = "exact", "step", "codes"
_SPECIAL = (math.nan, math.inf, -math.inf)


_NAN_INPUTS: dict = {}


def _nan_derivative_inputs(act: Activation) -> tuple[float, ...]:
    """Which of NaN, +inf, -inf give a NaN derivative in torch (probed once per activation,
    eagerly: under torch.compile an activation not probed yet counts all three)."""
    known = _NAN_INPUTS.get(act)
    if known is not None:
        return known
    if not runtime.prepares():
        return _SPECIAL
    probe = torch.tensor(_SPECIAL)
    with torch.no_grad():
        saved = act.forward(probe.clone(), False) if act.saves_output else probe
        grad = act.exact_backward(torch.ones_like(probe), saved, False)
    found = tuple(v for v, d in zip(_SPECIAL, grad.isnan().tolist(), strict=True) if d)
    _NAN_INPUTS[act] = found
    return found


def _nan_flag(x: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
    """0-dim bool: does ``x`` hold any of ``values``? (Stays on the device: no sync.)"""
    if len(values) == len(_SPECIAL):
        return torch.isfinite(x).logical_not().any()
    flag = x.new_zeros((), dtype=torch.bool)
    for v in values:
        flag = flag | (x.isnan() if math.isnan(v) else x == v).any()
    return flag


def _memory_order(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """``x`` permuted so that logical order is memory order (channels_last -> NHWC), and the
    permutation. Codes are packed in memory order, so decoding gives a tensor with ``x``'s
    strides and no transposing copy on either side."""
    if x.dim() > 1 and not x.is_contiguous():
        perm = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
        permuted = x.permute(perm)
        if permuted.is_contiguous():
            return permuted, perm
    return x, None


def _encode(ctx, act: Activation, x: torch.Tensor, inplace: bool) -> list[torch.Tensor]:
    """The packed mask or codes of ``x`` (plus the NaN flag where it can matter)."""
    ordered, perm = _memory_order(x)
    ctx.layout = (ordered.shape, perm)
    if act.step is not None:
        return [pack_codes(act.step(ordered, inplace).reshape(-1), 1)]
    if ctx.unbiased:
        packed = encode_derivative_unbiased(_slope(act, ordered), act.table, ctx.bits, act.params)
    else:
        packed = encode_derivative(ordered, act.table, ctx.bits, act.params)
    values = _nan_derivative_inputs(act)
    return [packed, _nan_flag(x, values)] if values else [packed]


def _slope(act: Activation, x: torch.Tensor) -> torch.Tensor:
    """The exact ``f'(x)`` in fp32, from torch's own backward kernel (no graph is kept)."""
    x = x.detach().float()
    saved = act.forward(x, False) if act.keeps_output(False) else x
    with torch.no_grad():  # a broadcast 1 as the output gradient: no tensor of ones is filled
        return act.exact_backward(x.new_ones(()).expand_as(x), saved, False)


def _decode(ctx, act: Activation, grad: torch.Tensor, stored: list[torch.Tensor]) -> torch.Tensor:
    shape, perm = ctx.layout
    n = shape.numel()
    if act.step is not None:
        mask = _restore(unpack_codes(stored[0], 1, n, torch.bool), shape, perm)
        return act.step_backward(grad, mask)
    decode = decode_derivative_unbiased if ctx.unbiased else decode_derivative
    slope = _restore(decode(stored[0], n, act.table, ctx.bits, act.params), shape, perm)
    # fp32 levels times a half-precision grad compute in fp32 (promotion), rounded once.
    grad_in = (grad * slope).to(grad.dtype)
    if len(stored) > 1:
        grad_in = torch.where(stored[1], math.nan, grad_in)
    return grad_in


def _restore(flat: torch.Tensor, shape: torch.Size, perm: tuple[int, ...] | None) -> torch.Tensor:
    out = flat.view(shape)
    if perm is None:
        return out
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return out.permute(inverse)


class ActivationFn(QFunction):
    """Forward exactly as torch; keep what ``spec`` asks for (exact tensor, mask, or codes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, act: Activation, spec, inplace: bool) -> torch.Tensor:
        ctx.act, ctx.inplace = act, inplace
        if spec is None or not spec.enabled:
            ctx.mode = _EXACT
            original = x.clone() if inplace and not act.keeps_output(inplace) else x
            y = act.forward(x, inplace)
            save_for_backward(ctx, [], exact=[y if act.keeps_output(inplace) else original])
        else:
            ctx.mode = _STEP if act.step is not None else _CODES
            ctx.bits = min(spec.bits, MAX_BITS)
            # Stochastic specs get unbiased derivative codes (f'(x) rounded stochastically between
            # fixed levels); nearest specs the deterministic optimal fit (lower error, biased).
            ctx.unbiased = spec.rounding == Rounding.STOCHASTIC
            ctx.late = spec.storage == Storage.ON_BACKWARD
            # Either way, taken before an in-place forward overwrites x.
            kept = [x.clone() if inplace else x] if ctx.late else _encode(ctx, act, x, inplace)
            y = act.forward(x, inplace)
            save_for_backward(ctx, [], exact=kept)
        if inplace:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _, stored = load_saved(ctx)
        act = ctx.act
        if ctx.mode == _EXACT:
            return act.exact_backward(grad, stored[0], ctx.inplace), None, None, None
        if ctx.late:
            stored = _encode(ctx, act, stored[0], ctx.inplace)
        return _decode(ctx, act, grad, stored), None, None, None


def quantized_activation(
    x: torch.Tensor, act: Activation, spec: QuantSpec | None, inplace: bool = False
) -> torch.Tensor:
    """Apply ``act`` to ``x``, keeping only a mask or few-bit code of ``x`` for backward.

    Args:
        x: input of any float dtype, shape and memory format.
        act: an ``Activation`` (``relu()``, ``silu()``, ``leaky_relu(0.1)``, ...).
        spec: the layer's ``QuantSpec``; None or disabled keeps what torch keeps (exact).
        inplace: modify ``x`` and return it, as torch's ``inplace=True`` does.

    Returns:
        Exactly the tensor the torch activation returns (same values, dtype, memory format).
    """
    if not records_grad(x):
        return act.forward(x, inplace)  # nothing to save: plain torch, eval-speed
    # Under torch.compile out of place (Dynamo cannot trace mark_dirty); Inductor reuses the
    # buffer anyway where the input is dead.
    return ActivationFn.apply(x, act, spec, inplace and runtime.in_place_allowed())
