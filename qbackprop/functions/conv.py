"""Conv1d/2d/3d whose forward is torch's and whose saved input is a compressed copy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import runtime
from ..quant import QuantSpec
from . import shared
from .autocast import autocast_disabled, autocast_inputs
from .base import QFunction, records_grad
from .saved import load_saved, save_for_backward

_PLAIN_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SUBSAMPLED_MAX_BITS = 8


class _TensorMeta:
    """Shape, strides, dtype and device of a tensor backward does not keep but must describe."""

    __slots__ = ("shape", "stride", "dtype", "device")

    def __init__(self, t: torch.Tensor) -> None:
        self.shape, self.stride = t.shape, t.stride()
        self.dtype, self.device = t.dtype, t.device

    def placeholder(self) -> torch.Tensor:
        # convolution_backward reads only the metadata of an input whose gradient partner is
        # not requested (x for dx, W for dW); an uninitialised tensor with the same strides
        # keeps its algorithm choice (memory format) identical to torch's.
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)


class ConvFunction(QFunction):
    """``torch.convolution`` (not transposed) that saves its input compressed by ``spec``.

    Forward is torch's kernel; backward is ``aten.convolution_backward`` with the dequantized
    input, so ``dW = conv_backward(δ, x̃)`` while ``dx`` (which needs only ``W``) is exact. At
    ``spec`` None or 32 bits the input is kept as it is and every gradient equals torch's.
    The input is kept only when the weight needs a gradient, the weight only when the input
    does.
    """

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        spec: QuantSpec | None,
    ) -> torch.Tensor:
        output_padding = (0,) * len(stride)
        out = torch.convolution(
            input, weight, bias, stride, padding, dilation, False, output_padding, groups
        )
        need_input, need_weight = ctx.needs_input_grad[:2]
        ctx.subsampled = need_weight and _subsamples(input, weight, stride, padding, spec)
        saved = input
        if ctx.subsampled:
            # A strided 1x1 conv reads only every stride-th position: keep just those, at the
            # bits the skipped positions would have cost (see ``subsampled_spec``).
            index = (slice(None), slice(None), *(slice(None, None, st) for st in stride))
            saved, spec = input[index], subsampled_spec(spec, stride)
        save_for_backward(
            ctx,
            [(saved if need_weight else None, spec)],
            exact=[weight if need_input else None],
        )
        ctx.input_meta, ctx.weight_meta = _TensorMeta(input), _TensorMeta(weight)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with autocast_disabled(grad.device.type):
            (x,), (w,) = load_saved(ctx)
            x = ctx.input_meta.placeholder() if x is None else x
            w = ctx.weight_meta.placeholder() if w is None else w
            stride, padding, dilation, groups = ctx.conv_args
            needs = ctx.needs_input_grad
            mask = [needs[0], needs[1], ctx.bias_sizes is not None and needs[2]]
            if ctx.subsampled:
                return _subsampled_backward(ctx, grad, x, w, mask)
            grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad,
                x,
                w,
                ctx.bias_sizes,
                stride,
                padding,
                dilation,
                False,
                [0] * len(stride),
                groups,
                mask,
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _subsamples(input, weight, stride, padding, spec) -> bool:
    """Whether only the positions a strided 1x1 conv reads are saved (a ResNet/RegNet
    downsample shortcut): never at full precision (gradients stay bit-identical to torch's)
    nor for an input another layer's codes already hold (sharing stores nothing at all)."""
    return (
        spec is not None
        and spec.enabled
        and all(k == 1 for k in weight.shape[2:])
        and all(p == 0 for p in padding)
        and any(st > 1 for st in stride)
        and shared.recipe_of(input) is None
    )


def subsampled_spec(spec: QuantSpec, stride: Sequence[int]) -> QuantSpec:
    """The spec of a strided 1x1 conv's subsampled input: the bytes of the positions it does
    not read are spent on bits (stride 2 in 2-d: 4x fewer elements, so ``4·b`` bits, at most 8).

    Measured on resnet18 (digits, 4-bit nearest): the downsample convs' weight gradients held
    98 % of the remaining variance ratio; their input is the non-negative residual stream and
    their output goes straight to a BatchNorm, so their exact gradient is small against any
    copy's noise.
    """
    return shared.scaled_bits(spec, math.prod(stride), SUBSAMPLED_MAX_BITS)


def _subsampled_backward(ctx, grad, x_sub, w, mask):
    stride, padding, dilation, groups = ctx.conv_args
    ones = [1] * len(stride)
    grad_input = grad_weight = grad_bias = None
    if mask[1] or mask[2]:
        # The same sums as the strided conv's: a stride-1 1x1 conv over the kept positions.
        _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x_sub, w, ctx.bias_sizes, ones, padding, ones, False, [0] * len(stride),
            groups, [False, mask[1], mask[2]],
        )  # fmt: skip
    if mask[0]:
        grad_input, _, _ = torch.ops.aten.convolution_backward(
            grad, ctx.input_meta.placeholder(), w, None, stride, padding, dilation, False,
            [0] * len(stride), groups, [True, False, False],
        )  # fmt: skip
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _ntuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"{name} must be an int or {n} ints for a {n}-d conv, got {value}")
    return value


def _string_padding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding: str,
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Numeric padding for ``'valid'`` / ``'same'``, padding ``input`` where 'same' is odd."""
    n = len(stride)
    if padding == "valid":
        return input, (0,) * n
    if padding != "same":
        raise ValueError(f"padding={padding!r} is not allowed; expected 'valid', 'same' or ints")
    if any(s != 1 for s in stride):
        raise ValueError("padding='same' is not supported for strided convolutions")
    # As ATen's _convolution_mode: total = d*(k-1), left = total // 2; an odd total puts the
    # extra zero on the right, through a constant pad outside the Function (it saves nothing).
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
    left = tuple(t // 2 for t in total)
    extra = [t - 2 * lt for t, lt in zip(total, left, strict=True)]
    if any(extra):
        pad_nd: list[int] = []
        for e in reversed(extra):  # F.pad lists the last dim first
            pad_nd += [0, e]
        input = F.pad(input, pad_nd)
    return input, left


def is_data(x: torch.Tensor) -> bool:
    """A tensor with no autograd history that needs no gradient is data (the model's input
    batch), not an activation: the caller holds it anyway, so keeping a reference costs no
    bytes, where a compressed copy would add bytes and error. The stem conv's weight gradient,
    whose input patches are strongly correlated, is among the most sensitive in a CNN."""
    if not runtime.knows_history():
        # Dynamo cannot read grad_fn; inside a model every activation requires grad.
        return not x.requires_grad
    return x.grad_fn is None and not x.requires_grad


def quantized_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    spec: QuantSpec | None = None,
) -> torch.Tensor:
    """``F.conv{1,2,3}d`` whose activation saved for backward is compressed by ``spec``.

    Same arguments and output as torch's functional conv (the dimension follows
    ``weight.dim() - 2``; unbatched input, ``'same'`` / ``'valid'`` padding and autocast
    behave as in torch). Padding modes other than zeros are the caller's ``F.pad``, as in
    ``nn.Conv2d._conv_forward``.

    Args:
        input: ``(N, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``.
        weight: ``(C_out, C_in / groups, *kernel)``.
        bias: optional ``(C_out,)``.
        stride: int or one int per spatial dim.
        padding: int, ints, ``'valid'`` or ``'same'`` (zeros).
        dilation: int or one int per spatial dim.
        groups: number of channel groups.
        spec: how the saved input is compressed; None or 32 bits keeps it exact.

    Returns:
        The convolution output, identical to torch's.
    """
    nd = weight.dim() - 2
    if nd not in _PLAIN_CONV:
        raise ValueError(f"expected a 1-d, 2-d or 3-d conv weight, got shape {tuple(weight.shape)}")
    if not records_grad(input, weight, bias):
        # Nothing will be saved: torch's own op (and autocast dispatch) is the exact answer.
        return _PLAIN_CONV[nd](input, weight, bias, stride, padding, dilation, groups)
    return _conv_with_saved(input, weight, bias, stride, padding, dilation, groups, spec)


def _conv_with_saved(input, weight, bias, stride, padding, dilation, groups, spec):
    nd = weight.dim() - 2
    unbatched = input.dim() == nd + 1
    if unbatched:
        input = input.unsqueeze(0)
    stride = _ntuple(stride, nd, "stride")
    dilation = _ntuple(dilation, nd, "dilation")
    device_type = input.device.type
    if is_data(input):
        spec = None
    input, weight, bias = autocast_inputs(device_type, input, weight, bias)
    if isinstance(padding, str):
        input, padding = _string_padding(input, weight, padding, stride, dilation)
    else:
        padding = _ntuple(padding, nd, "padding")
    with autocast_disabled(device_type):
        out = ConvFunction.apply(input, weight, bias, stride, padding, dilation, groups, spec)
    return out.squeeze(0) if unbatched else out
