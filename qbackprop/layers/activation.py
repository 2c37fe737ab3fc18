"""Drop-in activation layers: torch's and timm's activation modules backed by ``ActivationFn``.

Each mixin only says which ``Activation`` its module computes (from the module's own attributes,
so a changed ``negative_slope`` or ``inplace`` is honoured) and calls ``quantized_activation``.
timm's own classes are registered when timm is installed; their exact (bits 32) backward reruns
timm's forward under autograd, so even their boundary conventions (``clamp`` vs ``hardtanh``) are
reproduced bit for bit.
"""

from __future__ import annotations

import functools

import torch
from timm.layers import activations as timm_act
from timm.layers import activations_me as timm_me
from torch import nn

from ..functions import activation as act
from ..functions import shared
from ..functions.activation import Activation, quantized_activation, recomputed_backward
from ..quant import QuantSpec
from .conv import forward_override_check
from .plan import LayerPlan, PlanContext
from .registry import QuantizedModule, register_swap


def _register(source: type[nn.Module]):
    """``register_swap`` for the activation family, refusing subclasses that redefine forward."""
    return register_swap(source, "activation", check=forward_override_check(source))


class _ActivationMixin(QuantizedModule):
    """Common forward: the module's ``Activation`` applied through ``quantized_activation``."""

    def activation(self) -> Activation:
        """The ``Activation`` this module computes, from its current attributes."""
        raise NotImplementedError

    def make_plan(
        self, name: str, spec: QuantSpec | None, share: bool, ctx: PlanContext
    ) -> LayerPlan:
        producer = ctx.producers.get(ctx.structure.activation_of.get(name, ""))
        smooth = self.activation().step is None
        if not (smooth and producer is not None and producer.shared_output):
            return LayerPlan(name, spec, share, spec, spec)
        if spec is None or not spec.enabled:
            return LayerPlan(name, spec, share, spec, spec)
        # Between a shared producer and its consumer: a wider code (see shared.widen).
        wide = spec.replace(bits=shared.code_bits(spec.bits))
        note = f"derivative code at {wide.bits}b (between {producer.name} and its consumer)"
        return LayerPlan(name, spec, share, wide, spec, (), note)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fn = self.activation()
        recipe = shared.recipe_of(input)  # read before an in-place activation changes it
        plan = self.qplan
        spec = plan.spec
        if recipe is not None and fn.step is None:
            shared.note_smooth_activation(recipe)
            if recipe.ready:
                spec = plan.saves
        # Modules without an ``inplace`` attribute (GELU, Softplus, timm's dummies) never are.
        out = quantized_activation(input, fn, spec, getattr(self, "inplace", False))
        if recipe is not None:  # a BatchNorm output: the activation of it is rebuildable too
            shared.tag(out, recipe.then(functools.partial(fn.forward, inplace=False), out.dtype))
        return out


@_register(nn.ReLU)
class QuantReLU(_ActivationMixin):
    """nn.ReLU: a lossless 1-bit mask."""

    def activation(self) -> Activation:
        return act.relu()


@_register(nn.Hardtanh)
class QuantHardtanh(_ActivationMixin):
    """nn.Hardtanh: a lossless 1-bit mask (inside the limits or not)."""

    def activation(self) -> Activation:
        return act.hardtanh(float(self.min_val), float(self.max_val))


# ReLU6 *is a* Hardtanh(0, 6); its own entry keeps the mapping explicit in reports.
@_register(nn.ReLU6)
class QuantReLU6(QuantHardtanh):
    """nn.ReLU6 (a Hardtanh(0, 6)): a lossless 1-bit mask."""


@_register(nn.LeakyReLU)
class QuantLeakyReLU(_ActivationMixin):
    """nn.LeakyReLU: a lossless 1-bit sign mask."""

    def activation(self) -> Activation:
        return act.leaky_relu(float(self.negative_slope))


@_register(nn.Hardsigmoid)
class QuantHardsigmoid(_ActivationMixin):
    """nn.Hardsigmoid: a lossless 1-bit mask of (-3, 3)."""

    def activation(self) -> Activation:
        return act.hardsigmoid()


@_register(nn.SiLU)
class QuantSiLU(_ActivationMixin):
    """nn.SiLU: few-bit derivative codes."""

    def activation(self) -> Activation:
        return act.silu()


@_register(nn.GELU)
class QuantGELU(_ActivationMixin):
    """nn.GELU (erf or tanh): few-bit derivative codes."""

    def activation(self) -> Activation:
        return act.gelu(self.approximate)


@_register(nn.Sigmoid)
class QuantSigmoid(_ActivationMixin):
    """nn.Sigmoid and timm Sigmoid: few-bit derivative codes."""

    def activation(self) -> Activation:
        return act.sigmoid()


@_register(nn.Tanh)
class QuantTanh(_ActivationMixin):
    """nn.Tanh and timm Tanh: few-bit derivative codes."""

    def activation(self) -> Activation:
        return act.tanh()


@_register(nn.Hardswish)
class QuantHardswish(_ActivationMixin):
    """nn.Hardswish: few-bit derivative codes."""

    def activation(self) -> Activation:
        return act.hardswish()


@_register(nn.Mish)
class QuantMish(_ActivationMixin):
    """nn.Mish: few-bit derivative codes."""

    def activation(self) -> Activation:
        return act.mish()


@_register(nn.ELU)
class QuantELU(_ActivationMixin):
    """nn.ELU: few-bit derivative codes (one table per alpha)."""

    def activation(self) -> Activation:
        return act.elu(float(self.alpha))


@_register(nn.Softplus)
class QuantSoftplus(_ActivationMixin):
    """nn.Softplus: few-bit derivative codes (one table per beta, threshold)."""

    def activation(self) -> Activation:
        return act.softplus(float(self.beta), float(self.threshold))


# ---- timm's own activation modules ------------------------------------------------------------


def _timm_hard_sigmoid_step(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    # timm computes relu6(x + 3) / 6. Out of place relu6 is hardtanh: 0 at both limits and NaN
    # passes the gradient; in place clamp_'s backward (ClampBackward1, from the result) is also 0
    # at the limits but stops NaN. Same rounding of x + 3 as timm's.
    shifted = x + 3
    if inplace:
        return (shifted > 0) & (shifted < 6)
    return ~((shifted <= 0) | (shifted >= 6))


def _divided_by_six(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, grad / 6, 0)  # DivBackward (grad / 6), then the clamp's mask


def _me_hard_sigmoid_backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grad * (mask.to(grad.dtype) / 6.0)  # timm's hard_sigmoid_bwd: ones * mask / 6


@functools.cache
def timm_activations() -> dict[str, Activation]:
    """``Activation`` descriptors of timm's composite activations, by timm function name."""

    def smooth(name: str, forward, table: str, autograd_forward=None) -> Activation:
        return Activation(
            name,
            forward=forward,
            exact_backward=recomputed_backward(autograd_forward or forward),
            table=table,
        )

    def no_inplace(fn):
        return lambda x, inplace: fn(x)

    return {
        "swish": smooth("timm_swish", timm_act.swish, "silu"),
        "mish": smooth("timm_mish", no_inplace(timm_act.mish), "mish"),
        "hard_swish": smooth("timm_hard_swish", timm_act.hard_swish, "hardswish"),
        "hard_mish": smooth("timm_hard_mish", timm_act.hard_mish, "hard_mish"),
        "quick_gelu": smooth("timm_quick_gelu", no_inplace(timm_act.quick_gelu), "quick_gelu"),
        "hard_sigmoid": Activation(
            "timm_hard_sigmoid",
            forward=timm_act.hard_sigmoid,
            exact_backward=recomputed_backward(timm_act.hard_sigmoid),
            step=_timm_hard_sigmoid_step,
            step_backward=_divided_by_six,
        ),
        # activations_me: forward is timm's *_fwd, exact backward goes through timm's Function.
        "swish_me": smooth(
            "timm_swish_me", no_inplace(timm_me.swish_fwd), "silu", no_inplace(timm_me.swish_me)
        ),
        "mish_me": smooth(
            "timm_mish_me", no_inplace(timm_me.mish_fwd), "mish", no_inplace(timm_me.mish_me)
        ),
        "hard_swish_me": smooth(
            "timm_hard_swish_me",
            no_inplace(timm_me.hard_swish_fwd),
            "hardswish",
            no_inplace(timm_me.hard_swish_me),
        ),
        "hard_mish_me": smooth(
            "timm_hard_mish_me",
            no_inplace(timm_me.hard_mish_fwd),
            "hard_mish",
            no_inplace(timm_me.hard_mish_me),
        ),
        "hard_sigmoid_me": Activation(
            "timm_hard_sigmoid_me",
            forward=no_inplace(timm_me.hard_sigmoid_fwd),
            exact_backward=recomputed_backward(no_inplace(timm_me.hard_sigmoid_me)),
            step=lambda x, inplace: (x >= -3.0) & (x <= 3.0),
            step_backward=_me_hard_sigmoid_backward,
        ),
    }


class _TimmActivationMixin(_ActivationMixin):
    """A timm composite activation; exact backward by rerunning timm's forward."""

    timm_name: str = ""

    def activation(self) -> Activation:
        return timm_activations()[self.timm_name]


def _timm_mixin(source: type[nn.Module], name: str) -> None:
    # A module-level class with its own importable name (``QuantTimmSwish``, ...): pickle,
    # deepcopy and torch.save find a converted module's mixin by it.
    cls_name = f"QuantTimm{source.__name__}"
    cls = type(cls_name, (_TimmActivationMixin,), {"timm_name": name, "__module__": __name__})
    cls.__qualname__ = cls_name
    cls.__doc__ = f"timm's {source.__name__}; exact backward by rerunning timm's forward."
    globals()[cls_name] = _register(source)(cls)


# Sigmoid, Tanh, GELU and GELUTanh compute exactly what torch's modules do.
_register(timm_act.Sigmoid)(QuantSigmoid)
_register(timm_act.Tanh)(QuantTanh)


@_register(timm_act.GELU)
class QuantTimmGELU(_ActivationMixin):
    """timm GELU (erf): few-bit derivative codes."""

    def activation(self) -> Activation:
        return act.gelu("none")


@_register(timm_act.GELUTanh)
class QuantTimmGELUTanh(_ActivationMixin):
    """timm GELUTanh: few-bit derivative codes."""

    def activation(self) -> Activation:
        return act.gelu("tanh")


for _source, _name in (
    (timm_act.Swish, "swish"),
    (timm_act.Mish, "mish"),
    (timm_act.HardSwish, "hard_swish"),
    (timm_act.HardSigmoid, "hard_sigmoid"),
    (timm_act.HardMish, "hard_mish"),
    (timm_act.QuickGELU, "quick_gelu"),
    (timm_me.SwishMe, "swish_me"),
    (timm_me.MishMe, "mish_me"),
    (timm_me.HardSwishMe, "hard_swish_me"),
    (timm_me.HardSigmoidMe, "hard_sigmoid_me"),
    (timm_me.HardMishMe, "hard_mish_me"),
):
    _timm_mixin(_source, _name)
