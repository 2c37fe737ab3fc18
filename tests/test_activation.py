"""Activation drop-ins: exact at 32 bits, lossless step masks, few-bit derivative codes.

Gradient-error bounds of the few-bit codes are the figures measured by
``test_fewbit_gradient_error`` itself (deterministic seeds; relative L2 error of the input
gradient against torch's exact one, grad_out ~ N(0, 1)) with a 10% margin for other CPU kernels:

    relative error  N(0, 1.5^2) at 2, 3, 4, 8 bits    BN-like at 2, 3, 4, 8 bits
    silu        0.133  0.064  0.032  0.004     0.156  0.075  0.041  0.005
    gelu        0.115  0.064  0.034  0.006     0.138  0.080  0.041  0.007
    gelu_tanh   0.115  0.064  0.034  0.006     0.138  0.080  0.041  0.007
    sigmoid     0.147  0.076  0.040  0.003     0.144  0.079  0.044  0.003
    tanh        0.221  0.113  0.057  0.008     0.202  0.104  0.055  0.007
    hardswish   0.201  0.126  0.058  0.004     0.230  0.140  0.066  0.005
    mish        0.115  0.056  0.030  0.005     0.140  0.068  0.039  0.006
    elu         0.071  0.033  0.016  0.004     0.093  0.043  0.021  0.005
    softplus    0.122  0.062  0.031  0.003     0.144  0.073  0.037  0.004
    quick_gelu  0.107  0.055  0.030  0.006     0.129  0.068  0.037  0.007
    hard_mish   0.179  0.071  0.032  0.007     0.216  0.086  0.039  0.009

Against storing a b-bit stochastic copy of the input (SiLU, BN-like; f' of the copy is biased):
2 bits 0.156 vs 0.726, 3 bits 0.075 vs 0.390, 4 bits 0.041 vs 0.197, 8 bits 0.006 vs 0.012, so a
2-bit code beats a 4-bit copy (``test_fewbit_beats_the_derivative_of_a_quantized_input``).
"""

import copy
import itertools
import math

import pytest
import torch
from timm.layers import BatchNormAct2d
from timm.layers import activations as timm_act
from timm.layers import activations_me as timm_me
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

import qbackprop.layers.activation as qlayers
from qbackprop.functions import activation as qact
from qbackprop.functions import fewbit
from qbackprop.layers.registry import find_swap, plan_alone
from qbackprop.quant import QuantSpec
from qbackprop.quant.packing import unpack_codes

FP = QuantSpec(bits=32)
NAN, INF = math.nan, math.inf
# Every kink of the step activations below, both signed zeros, tiny and infinite values.
SPECIAL = [-6.0, -3.0, -2.0, -1.0, -0.0, 0.0, 1.0, 2.0, 3.0, 6.0, -1e-30, 1e-30, INF, -INF]


def quantize(module: nn.Module, spec: QuantSpec | None) -> nn.Module:
    """Convert one module as surgery does (registry contract): swap its class, set qspec."""
    module = copy.deepcopy(module)
    swap = find_swap(type(module))
    assert swap is not None and swap.family == "activation", type(module)
    assert swap.check is None or swap.check(module) is None
    original = type(module)
    module.__class__ = type("Q" + original.__name__, (swap.mixin, original), {})
    module.qplan = plan_alone(module, spec)
    return module


def run(module: nn.Module, x0: torch.Tensor, grad: torch.Tensor | None = None):
    """Output and input gradient of ``module`` on a copy of ``x0`` (through a non-leaf, so
    in-place modules are legal)."""
    x = x0.detach().clone().requires_grad_(True)
    y = module(x * 1)
    y.backward(torch.ones_like(y) if grad is None else grad)
    return y.detach(), x.grad


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-equal values (torch.equal; NaN where the other has NaN), same dtype and strides."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(0.0, 7.0, -7.0), b.nan_to_num(0.0, 7.0, -7.0))


STEP_MODULES = {
    "relu": lambda: nn.ReLU(),
    "relu_": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(),
    "relu6_": lambda: nn.ReLU6(inplace=True),
    "leaky": lambda: nn.LeakyReLU(0.1),
    "leaky_": lambda: nn.LeakyReLU(0.1, inplace=True),
    "leaky_neg": lambda: nn.LeakyReLU(-0.3),
    "hardtanh": lambda: nn.Hardtanh(-1.0, 3.0),
    "hardtanh_": lambda: nn.Hardtanh(-2.0, 2.0, inplace=True),
    "hardsigmoid": lambda: nn.Hardsigmoid(),
    "hardsigmoid_": lambda: nn.Hardsigmoid(inplace=True),
    "timm_hard_sigmoid": lambda: timm_act.HardSigmoid(),
    "timm_hard_sigmoid_": lambda: timm_act.HardSigmoid(inplace=True),
    "timm_hard_sigmoid_me": lambda: timm_me.HardSigmoidMe(),
}
SMOOTH_MODULES = {
    "silu": lambda: nn.SiLU(),
    "silu_": lambda: nn.SiLU(inplace=True),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU("tanh"),
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
    "hardswish": lambda: nn.Hardswish(),
    "hardswish_": lambda: nn.Hardswish(inplace=True),
    "mish": lambda: nn.Mish(),
    "mish_": lambda: nn.Mish(inplace=True),
    "elu": lambda: nn.ELU(0.7),
    "elu_": lambda: nn.ELU(0.7, inplace=True),
    "softplus": lambda: nn.Softplus(2.0, 5.0),
    "timm_swish": lambda: timm_act.Swish(),
    "timm_swish_": lambda: timm_act.Swish(inplace=True),
    "timm_mish": lambda: timm_act.Mish(),
    "timm_sigmoid_": lambda: timm_act.Sigmoid(inplace=True),
    "timm_tanh_": lambda: timm_act.Tanh(inplace=True),
    "timm_hard_swish": lambda: timm_act.HardSwish(),
    "timm_hard_swish_": lambda: timm_act.HardSwish(inplace=True),
    "timm_hard_mish_": lambda: timm_act.HardMish(inplace=True),
    "timm_gelu": lambda: timm_act.GELU(),
    "timm_gelu_tanh": lambda: timm_act.GELUTanh(),
    "timm_quick_gelu": lambda: timm_act.QuickGELU(),
    "timm_swish_me": lambda: timm_me.SwishMe(),
    "timm_mish_me": lambda: timm_me.MishMe(),
    "timm_hard_swish_me": lambda: timm_me.HardSwishMe(),
    "timm_hard_mish_me": lambda: timm_me.HardMishMe(),
}
ALL_MODULES = {**STEP_MODULES, **SMOOTH_MODULES}


def special_input(dtype: torch.dtype, nan: bool = False) -> torch.Tensor:
    values = SPECIAL + ([NAN] if nan else [])
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(4, 50, generator=gen).view(-1) * 3, torch.tensor(values)]).to(
        dtype
    )


# ---- registry and module behaviour -----------------------------------------------------------


def test_registry_maps_torch_and_timm_activations():
    expected = {
        nn.ReLU: qlayers.QuantReLU,
        nn.ReLU6: qlayers.QuantReLU6,  # most specific entry, not Hardtanh's
        nn.Hardtanh: qlayers.QuantHardtanh,
        nn.LeakyReLU: qlayers.QuantLeakyReLU,
        nn.SiLU: qlayers.QuantSiLU,
        nn.GELU: qlayers.QuantGELU,
        nn.Sigmoid: qlayers.QuantSigmoid,
        timm_act.Sigmoid: qlayers.QuantSigmoid,
        timm_act.Tanh: qlayers.QuantTanh,
        nn.Mish: qlayers.QuantMish,
    }
    for source, mixin in expected.items():
        assert find_swap(source).mixin is mixin
    for factory in ALL_MODULES.values():
        assert find_swap(type(factory())).family == "activation"

    class Custom(nn.ReLU):  # redefines the computation: must not be converted silently
        def forward(self, input):
            return input * 2

    assert "overrides forward" in find_swap(Custom).check(Custom())


def test_converted_module_is_still_the_original_and_reports_its_spec():
    module = quantize(nn.LeakyReLU(0.2, inplace=True), QuantSpec(bits=4))
    assert isinstance(module, nn.LeakyReLU) and module.negative_slope == 0.2
    assert "negative_slope=0.2" in repr(module) and "qbackprop=4b" in repr(module)
    module.negative_slope = 0.5  # attributes are read at every forward
    x = torch.tensor([-2.0, 1.0], requires_grad=True)
    module(x * 1).sum().backward()
    assert x.grad.tolist() == [0.5, 1.0]


@pytest.mark.parametrize(
    "dtype, spec",
    [(torch.float32, None), (torch.float32, FP), (torch.bfloat16, FP), (torch.float16, FP)],
    ids=["fp32-none", "fp32-bits32", "bf16-bits32", "fp16-bits32"],
)
@pytest.mark.parametrize("name", list(ALL_MODULES))
def test_exact_at_32_bits(name, dtype, spec):
    torch_module = ALL_MODULES[name]()
    x = special_input(dtype)
    grad = torch.linspace(-2, 2, x.numel()).to(dtype)
    y_ref, g_ref = run(torch_module, x, grad)
    y, g = run(quantize(torch_module, spec), x, grad)
    assert_identical(y, y_ref)
    assert_identical(g, g_ref)


@pytest.mark.parametrize(
    "bits, storage", [(1, "packed"), (3, "packed"), (8, "packed"), (3, "on_backward")]
)
@pytest.mark.parametrize("name", list(STEP_MODULES))
def test_step_masks_are_lossless_at_every_bit_width(name, bits, storage):
    torch_module = STEP_MODULES[name]()
    x = special_input(torch.float32, nan=True)  # NaN too: the mask keeps torch's NaN rule
    grad = torch.linspace(-2, 2, x.numel())
    y_ref, g_ref = run(torch_module, x, grad)
    y, g = run(quantize(torch_module, QuantSpec(bits=bits, storage=storage)), x, grad)
    assert_identical(y, y_ref)
    assert_identical(g, g_ref)


def test_step_derivatives_follow_torch_at_the_kinks():
    spec = QuantSpec(bits=2)
    cases = [  # module, inputs, derivative torch returns there
        (nn.ReLU(), [-1.0, -0.0, 0.0, 1e-30, NAN], [0, 0, 0, 1, 1]),
        (nn.ReLU6(), [0.0, 6.0, 5.999, INF, NAN], [0, 0, 1, 0, 1]),
        (nn.Hardtanh(-1.0, 3.0), [-1.0, -0.999, 3.0, NAN], [0, 1, 0, 1]),
        (nn.LeakyReLU(0.25), [-1.0, 0.0, 1e-30, NAN], [0.25, 0.25, 1, 0.25]),
        (nn.Hardsigmoid(), [-3.0, -2.999, 3.0, NAN], [0, 1 / 6, 0, 0]),
    ]
    for module, inputs, slopes in cases:
        _, g = run(quantize(module, spec), torch.tensor(inputs))
        torch.testing.assert_close(g, torch.tensor(slopes, dtype=torch.float32))


# ---- few-bit gradient error ------------------------------------------------------------------

# Measured by this test (see the module docstring); the bound is 1.1x these plus 1e-4.
MEASURED_FIGURES = {
    # name: {bits: (N(0, 1.5^2), BN-like)}
    "silu": {2: (0.1328, 0.1556), 3: (0.0638, 0.0753), 4: (0.0322, 0.0409), 8: (0.0045, 0.0055)},
    "gelu": {2: (0.1149, 0.1378), 3: (0.0642, 0.0795), 4: (0.0336, 0.0409), 8: (0.0058, 0.0071)},
    "gelu_tanh": {
        2: (0.1150, 0.1379),
        3: (0.0642, 0.0796),
        4: (0.0336, 0.0410),
        8: (0.0058, 0.0071),
    },
    "sigmoid": {2: (0.1467, 0.1444), 3: (0.0759, 0.0791), 4: (0.0401, 0.0444), 8: (0.0034, 0.0033)},
    "tanh": {2: (0.2212, 0.2023), 3: (0.1128, 0.1042), 4: (0.0568, 0.0546), 8: (0.0076, 0.0074)},
    "hardswish": {
        2: (0.2012, 0.2304),
        3: (0.1256, 0.1403),
        4: (0.0581, 0.0658),
        8: (0.0045, 0.0051),
    },
    "mish": {2: (0.1151, 0.1403), 3: (0.0555, 0.0683), 4: (0.0303, 0.0391), 8: (0.0049, 0.0059)},
    "elu": {2: (0.0707, 0.0926), 3: (0.0333, 0.0429), 4: (0.0163, 0.0209), 8: (0.0040, 0.0049)},
    "softplus": {
        2: (0.1221, 0.1443),
        3: (0.0620, 0.0735),
        4: (0.0312, 0.0371),
        8: (0.0030, 0.0035),
    },
    "quick_gelu": {
        2: (0.1075, 0.1286),
        3: (0.0550, 0.0681),
        4: (0.0302, 0.0370),
        8: (0.0058, 0.0071),
    },
    "hard_mish": {
        2: (0.1789, 0.2163),
        3: (0.0713, 0.0855),
        4: (0.0315, 0.0389),
        8: (0.0073, 0.0088),
    },
}
ERROR_MODULES = {
    "silu": lambda: nn.SiLU(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU("tanh"),
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
    "hardswish": lambda: nn.Hardswish(),
    "mish": lambda: nn.Mish(),
    "elu": lambda: nn.ELU(),
    "softplus": lambda: nn.Softplus(),
    "quick_gelu": lambda: timm_act.QuickGELU(),
    "hard_mish": lambda: timm_act.HardMish(),
}


def error_inputs() -> dict[str, torch.Tensor]:
    """N(0, 1.5^2), and BN outputs with learned-looking per-channel scale and shift (gamma
    log-uniform in [0.3, 3], beta ~ N(-0.5, 1)), channels_last like a conv net's."""
    gen = torch.Generator().manual_seed(0)
    shape = (8, 32, 8, 8)
    normal = 1.5 * torch.randn(shape, generator=gen)
    gamma = torch.empty(1, 32, 1, 1).uniform_(math.log(0.3), math.log(3.0), generator=gen).exp()
    beta = torch.randn(1, 32, 1, 1, generator=gen) - 0.5
    bn = (torch.randn(shape, generator=gen) * gamma + beta).contiguous(
        memory_format=torch.channels_last
    )
    return {"normal": normal, "bn": bn}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", list(ERROR_MODULES))
def test_fewbit_gradient_error(name):
    inputs = error_inputs()
    torch_module = ERROR_MODULES[name]()
    figures = {}
    for dist, x in inputs.items():
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        y_ref, g_ref = run(torch_module, x, grad)
        errors = []
        for bits in (2, 3, 4, 8):
            spec = QuantSpec(bits=bits, rounding="nearest")  # the deterministic optimal fit
            y, g = run(quantize(torch_module, spec), x, grad)
            assert_identical(y, y_ref)  # the forward never changes
            errors.append(relative_error(g, g_ref))
        figures[dist] = errors
        assert errors == sorted(errors, reverse=True), (dist, errors)  # more bits, less error
    bounds = MEASURED_FIGURES[name]
    for i, bits in enumerate((2, 3, 4, 8)):
        for j, dist in enumerate(("normal", "bn")):
            assert figures[dist][i] <= 1.1 * bounds[bits][j] + 1e-4, (name, bits, dist, figures)


def stochastic_copy(x: torch.Tensor, bits: int, bucket: int = 512) -> torch.Tensor:
    """A b-bit unbiased stochastic-rounding copy of ``x`` (min-max per bucket), as in method.md."""
    gen = torch.Generator().manual_seed(2)
    rows = x.reshape(-1, bucket)
    low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    step = (high - low) / (2**bits - 1)
    u = (rows - low) / step
    q = (u.floor() + (torch.rand(u.shape, generator=gen) < u - u.floor())).clamp(0, 2**bits - 1)
    return (q * step + low).view_as(x)


def test_fewbit_beats_the_derivative_of_a_quantized_input():
    # Why codes of f' instead of a low-bit input copy: f' of a quantized input is biased.
    x = error_inputs()["bn"]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    _, exact = run(nn.SiLU(), x, grad)
    errors = {}
    for bits in (2, 4):
        spec = QuantSpec(bits=bits, rounding="nearest")
        _, fewbit_grad = run(quantize(nn.SiLU(), spec), x, grad)
        naive = torch.ops.aten.silu_backward(grad, stochastic_copy(x, bits))
        errors[bits] = (relative_error(fewbit_grad, exact), relative_error(naive, exact))
        assert errors[bits][0] * 3 < errors[bits][1], errors
    assert errors[2][0] < errors[4][1]  # 2-bit codes beat even a 4-bit input copy


# ---- memory ----------------------------------------------------------------------------------


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every tensor autograd keeps for ``module``'s backward (saved-tensor hooks)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total


@pytest.mark.parametrize("bits", range(1, 9))
def test_saved_bytes_are_the_packed_codes(bits):
    x = torch.randn(32, 64, 16, 16)
    n = x.numel()
    codes = math.ceil(n * bits / 8)
    # SiLU: the codes plus one byte saying whether an input had a NaN derivative.
    assert saved_bytes(quantize(nn.SiLU(), QuantSpec(bits=bits)), x) == codes + 1
    assert saved_bytes(quantize(nn.Hardswish(), QuantSpec(bits=bits)), x) == codes  # never NaN
    assert saved_bytes(quantize(nn.ReLU(), QuantSpec(bits=bits)), x) == math.ceil(n / 8)


def test_saved_bytes_of_exact_ablation_and_wide_specs():
    x = torch.randn(8, 16, 8, 8)
    n = x.numel()
    assert saved_bytes(nn.SiLU(), x) == 4 * n
    assert saved_bytes(quantize(nn.SiLU(), FP), x) == 4 * n
    assert saved_bytes(quantize(nn.SiLU(), None), x) == 4 * n
    assert saved_bytes(quantize(nn.SiLU(), QuantSpec(bits=4, storage="on_backward")), x) == 4 * n
    assert saved_bytes(quantize(nn.SiLU(), QuantSpec(bits=16)), x) == n + 1  # clamped to 8
    mixed = QuantSpec(bits=2, mix_bits=4, mix_prob=0.5)  # mix fields do not apply to codes
    assert saved_bytes(quantize(nn.SiLU(), mixed), x) == n // 4 + 1
    assert saved_bytes(quantize(nn.ReLU(), FP), x) == 4 * n  # torch keeps relu's output


def test_on_backward_gives_the_packed_gradients():
    x = error_inputs()["bn"]
    for module in (nn.SiLU(), nn.Sigmoid(), nn.ReLU6()):
        nearest = QuantSpec(bits=3, rounding="nearest")  # deterministic codes: equal gradients
        packed = run(quantize(module, nearest), x)[1]
        late = run(quantize(module, nearest.replace(storage="on_backward")), x)[1]
        assert torch.equal(packed, late)


# ---- in place --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", [FP, QuantSpec(bits=3, rounding="nearest")], ids=["bits32", "bits3"]
)
@pytest.mark.parametrize(
    "factory", [lambda: nn.SiLU(True), lambda: nn.ReLU(True), lambda: nn.ELU(0.5, True)]
)
def test_inplace_modifies_and_returns_its_input(factory, spec):
    x0 = torch.randn(4, 8, 5, 5)
    ref_in = x0.clone().requires_grad_(True)
    ref_z = ref_in * 1
    ref_y = factory()(ref_z)
    ref_y.backward(torch.ones_like(ref_y))

    x = x0.clone().requires_grad_(True)
    z = x * 1
    version = z._version
    y = quantize(factory(), spec)(z)
    assert y is z and z._version > version
    assert torch.equal(z, ref_z)
    y.backward(torch.ones_like(y))
    if spec.enabled and not isinstance(factory(), nn.ReLU):
        assert relative_error(x.grad, ref_in.grad) < 0.1  # codes come from the input, not y
    else:
        assert torch.equal(x.grad, ref_in.grad)


@pytest.mark.parametrize("spec", [None, QuantSpec(bits=4)], ids=["exact", "bits4"])
def test_inplace_on_a_view(spec):
    grads = []
    for module in (nn.SiLU(inplace=True), quantize(nn.SiLU(inplace=True), spec)):
        base = torch.linspace(-3, 3, 24).view(4, 6).requires_grad_(True)
        z = base * 1
        module(z[:, :3])  # autograd rebases the view's history, as for torch's silu_
        z.square().sum().backward()
        grads.append(base.grad)
    assert torch.equal(grads[1][:, 3:], grads[0][:, 3:])
    if spec is None:
        assert torch.equal(grads[1], grads[0])
    else:
        assert relative_error(grads[1], grads[0]) < 0.1


def test_inplace_on_a_leaf_or_a_saved_tensor_fails_like_torch():
    module = quantize(nn.SiLU(inplace=True), QuantSpec(bits=2))
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        module(leaf)
    # torch.sigmoid keeps its output; overwriting it must be caught at backward, as in torch.
    x = torch.randn(3, requires_grad=True)
    y = module(torch.sigmoid(x))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


class _ScaleKeepingInput(torch.autograd.Function):
    """A custom Function that keeps its input (not its output), as a conv or BN does."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2 + x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (2 + 2 * x)


@pytest.mark.parametrize("spec", [FP, QuantSpec(bits=4)], ids=["bits32", "bits4"])
def test_inplace_after_conv_and_custom_function(spec):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    reference = nn.Sequential(conv, nn.SiLU(inplace=True))
    converted = nn.Sequential(copy.deepcopy(conv), quantize(nn.SiLU(inplace=True), spec))
    x = torch.randn(2, 4, 7, 7)
    for model in (reference, converted):
        model(x).square().sum().backward()
    gw, gw_ref = converted[0].weight.grad, reference[0].weight.grad
    if spec.enabled:
        assert relative_error(gw, gw_ref) < 0.05
    else:
        assert torch.equal(gw, gw_ref)

    x = torch.randn(2, 3, 4, requires_grad=True)
    silu = quantize(nn.SiLU(inplace=True), spec)
    silu(_ScaleKeepingInput.apply(x)).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.silu(_ScaleKeepingInput.apply(ref)).sum().backward()
    if spec.enabled:
        assert relative_error(x.grad, ref.grad) < 0.1
    else:
        assert torch.equal(x.grad, ref.grad)


@pytest.mark.parametrize("spec", [FP, QuantSpec(bits=4)], ids=["bits32", "bits4"])
def test_timm_batchnorm_act_and_squeeze_excite(spec):
    # BatchNormAct2d applies SiLU(inplace=True) to the BN output; SqueezeExcite applies an
    # in-place SiLU to a conv output and a Sigmoid gate.
    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # a bias before BN has a ~0 gradient
        BatchNormAct2d(8, act_layer=nn.SiLU),
        SqueezeExcite(8, rd_ratio=0.5, act_layer=nn.SiLU),
    )
    assert block[1].act.inplace and block[2].act1.inplace
    converted = copy.deepcopy(block)
    converted[1].act = quantize(converted[1].act, spec)
    converted[2].act1 = quantize(converted[2].act1, spec)
    converted[2].gate = quantize(converted[2].gate, spec)
    x = torch.randn(4, 3, 6, 6)
    outputs = [model(x) for model in (block, converted)]
    assert torch.equal(outputs[0], outputs[1])
    for out in outputs:
        out.square().sum().backward()
    for (name, p), q in zip(block.named_parameters(), converted.parameters(), strict=True):
        if spec.enabled:
            assert relative_error(q.grad, p.grad) < 0.1, name
        else:
            assert torch.equal(q.grad, p.grad), name


# ---- autograd edge cases -------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, QuantSpec(bits=2)], ids=["exact", "bits2"])
@pytest.mark.parametrize("factory", [nn.SiLU, nn.ReLU])
def test_double_backward_raises(factory, spec):
    x = torch.randn(5, requires_grad=True)
    y = quantize(factory(), spec)(x)
    v = torch.randn(5, requires_grad=True)
    # Refused at once, naming the Function (not silently dropping the second-order term).
    with pytest.raises(RuntimeError, match="double backward.*ActivationFn"):
        torch.autograd.grad(y, x, v, create_graph=True)


def test_backward_twice_with_retain_graph():
    module = quantize(nn.SiLU(), QuantSpec(bits=3))
    x = torch.randn(10, requires_grad=True)
    y = module(x)
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()
    assert torch.equal(x.grad, 2 * first)


def test_no_grad_and_inputs_without_grad_save_nothing():
    module = quantize(nn.SiLU(), QuantSpec(bits=2))
    x = torch.randn(6)
    with torch.no_grad():
        y = module(x.requires_grad_(True))
    assert y.grad_fn is None and torch.equal(y, torch.nn.functional.silu(x))
    y = module(torch.randn(6))
    assert y.grad_fn is None


# ---- dtypes, shapes, layouts, NaN ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("factory", [nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish])
def test_low_and_high_precision_inputs(factory, dtype):
    x = error_inputs()["normal"][:4].to(dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y_ref, g_ref = run(factory(), x, grad)
    y, g = run(quantize(factory(), QuantSpec(bits=4)), x, grad)
    assert_identical(y, y_ref)
    assert g.dtype == dtype
    assert relative_error(g, g_ref) < 0.12  # one draw of unbiased 4-bit codes (stochastic spec)


@pytest.mark.parametrize(
    "spec",
    [
        None,
        QuantSpec(bits=3, rounding="nearest"),
        QuantSpec(bits=3, rounding="nearest", storage="on_backward"),
    ],
)
@pytest.mark.parametrize("factory", [nn.SiLU, nn.ReLU, lambda: nn.Hardswish(True)])
def test_empty_channels_last_and_strided_inputs(factory, spec):
    empty_y, empty_g = run(quantize(factory(), spec), torch.empty(0, 3, 4))
    assert empty_y.shape == empty_g.shape == (0, 3, 4)

    x = torch.randn(2, 5, 3, 4)
    grad = torch.randn(2, 5, 3, 4)
    module = quantize(factory(), spec)
    y, g = run(module, x, grad)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y_cl, g_cl = run(module, x_cl, grad.contiguous(memory_format=torch.channels_last))
    y_ref, g_ref = run(factory(), x_cl, grad.contiguous(memory_format=torch.channels_last))
    assert_identical(y_cl, y_ref)  # output keeps the input's memory format
    assert g_cl.is_contiguous(memory_format=torch.channels_last)
    if spec is None:
        assert_identical(g_cl, g_ref)  # torch's kernels may round differently per layout
    else:
        assert torch.equal(g_cl, g)  # same codes in either layout: the same gradient

    x_t = x.transpose(1, 3)  # a strided view that no permutation makes dense
    _, g_t = run(module, x_t[:, ::2], grad.transpose(1, 3)[:, ::2])
    _, g_t_dense = run(module, x_t[:, ::2].contiguous(), grad.transpose(1, 3)[:, ::2])
    assert torch.equal(g_t, g_t_dense)


def test_nan_inputs():
    bits3 = QuantSpec(bits=3, rounding="nearest")
    x = torch.tensor([-1.0, 0.5, NAN, 2.0])
    # A code cannot say where the NaN was: the whole gradient is NaN (propagated, not hidden).
    _, g = run(quantize(nn.SiLU(), bits3), x)
    assert g.isnan().all()
    _, g = run(quantize(nn.SiLU(), bits3), torch.tensor([-1.0, 0.5, INF]))  # silu'(inf) is NaN
    assert g.isnan().all()
    _, g = run(quantize(nn.SiLU(), bits3), torch.tensor([-1.0, 0.5, 2.0]))
    assert g.isfinite().all()
    # Sigmoid'(+-inf) = 0 in torch: here finite, the outermost levels (0.05-0.06 at 3 bits).
    _, g = run(quantize(nn.Sigmoid(), bits3), torch.tensor([-INF, 0.0, INF]))
    _, levels = fewbit.derivative_table("sigmoid", 3)
    assert g[0] == levels[0] and g[2] == levels[-1] and g.isfinite().all()
    # hardswish'(NaN) = 1 in torch: NaN lands in the top interval, whose level is exactly 1
    # once 3 is a boundary (4 bits; see test_derivative_table_shapes_of_known_functions).
    _, g_ref = run(nn.Hardswish(), x)
    _, g = run(quantize(nn.Hardswish(), QuantSpec(bits=4, rounding="nearest")), x)
    assert g[2] == g_ref[2] == 1.0 and g.isfinite().all()
    # Unbiased codes round torch's own derivative: sigmoid'(+-inf) = 0 is a level, so exact.
    _, g = run(quantize(nn.Sigmoid(), QuantSpec(bits=3)), torch.tensor([-INF, 0.0, INF]))
    assert g[0] == 0 and g[2] == 0
    _, g = run(quantize(nn.SiLU(), QuantSpec(bits=3)), x)
    assert g.isnan().all()  # stochastic specs propagate NaN the same way


# ---- the dynamic programme -------------------------------------------------------------------


def _segments_error(values, weights, starts) -> float:
    bounds = [0, *starts, len(values)]
    total = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        w, v = weights[lo:hi], values[lo:hi]
        total += float((w * (v - (w * v).sum() / w.sum()) ** 2).sum())
    return total


def test_optimal_segments_matches_brute_force():
    gen = torch.Generator().manual_seed(5)
    for trial in range(12):
        n, k = 9, 1 + trial % 4
        values = torch.randn(n, generator=gen, dtype=torch.float64)
        weights = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
        starts, levels = fewbit.optimal_segments(values, weights, k)
        best = min(
            _segments_error(values, weights, list(c))
            for c in itertools.combinations(range(1, n), k - 1)
        )
        assert _segments_error(values, weights, starts.tolist()) == pytest.approx(best, abs=1e-9)
        assert levels.numel() == k


def _table_error(name, bits) -> float:
    grid = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    density = torch.exp(-0.5 * (grid / fewbit.WEIGHT_STD) ** 2)
    boundaries, levels = fewbit.derivative_table(name, bits)
    exact = fewbit.derivative(name, grid)
    approx = levels.double()[torch.bucketize(grid, boundaries.double())]
    return float((density * (approx - exact) ** 2).sum() / (density * exact**2).sum())


@pytest.mark.parametrize("name", fewbit.DERIVATIVE_NAMES)
def test_derivative_tables_are_sane(name):
    errors = []
    for bits in (1, 2, 3, 4, 6):
        boundaries, levels = fewbit.derivative_table(name, bits)
        k = 2**bits
        assert boundaries.shape == (k - 1,) and levels.shape == (k,)
        assert boundaries.dtype == levels.dtype == torch.float32
        assert torch.all(boundaries[1:] > boundaries[:-1])
        # Each level is a weighted mean of f' over its interval's grid cells: within their range.
        half = int(fewbit.GRID_HALF_WIDTH * fewbit.GRID_CELLS_PER_UNIT)
        centers = (
            torch.arange(-half, half, dtype=torch.float64) + 0.5
        ) / fewbit.GRID_CELLS_PER_UNIT
        slope = fewbit.derivative(name, centers)
        code = torch.bucketize(centers, boundaries.double())
        low = torch.full((k,), math.inf, dtype=torch.float64).scatter_reduce(0, code, slope, "amin")
        high = torch.full((k,), -math.inf, dtype=torch.float64).scatter_reduce(
            0, code, slope, "amax"
        )
        assert torch.all(low - 1e-6 <= levels) and torch.all(levels <= high + 1e-6)
        # Levels rise and fall where f' does: no more turns than f' itself has.
        grid = torch.linspace(-8, 8, 4001, dtype=torch.float64)
        assert _turns(levels.double()) <= _turns(fewbit.derivative(name, grid))
        errors.append(_table_error(name, bits))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3


def _turns(seq: torch.Tensor) -> int:
    """How often a sequence switches between rising and falling (flat steps ignored)."""
    steps = torch.sign(seq[1:] - seq[:-1])
    steps = steps[steps != 0]
    return int((steps[1:] != steps[:-1]).sum())


def test_derivative_table_shapes_of_known_functions():
    # Monotone f' (softplus' = sigmoid, elu' for alpha <= 1): increasing levels.
    for name in ("softplus", "elu"):
        _, levels = fewbit.derivative_table(name, 3)
        assert torch.all(levels[1:] >= levels[:-1])
    # Even, unimodal f' (sigmoid', tanh'): levels rise then fall, with the peak at the origin.
    # (The optimum is not symmetric: a boundary at 0 would split two equal halves, a wasted level.)
    for name in ("sigmoid", "tanh"):
        boundaries, levels = fewbit.derivative_table(name, 3)
        peak = int(levels.argmax())
        assert torch.all(levels[1 : peak + 1] > levels[:peak])
        assert torch.all(levels[peak + 1 :] < levels[peak:-1])
        assert int(torch.bucketize(torch.tensor(0.0), boundaries)) == peak
    # hardswish' jumps at -3 (0 to -0.5) and 3 (1.5 to 1): the jumps become exact boundaries,
    # the larger-weighted one from 3 bits on, both at 4 bits.
    boundaries, levels = fewbit.derivative_table("hardswish", 3)
    assert boundaries[0] == -3.0 and levels[0] == 0.0
    boundaries, levels = fewbit.derivative_table("hardswish", 4)
    assert boundaries[0] == -3.0 and boundaries[-1] == 3.0
    assert levels[0] == 0.0 and levels[-1] == 1.0
    # silu' dips below 0 left of the origin: the smallest level is negative, on the left.
    boundaries, levels = fewbit.derivative_table("silu", 2)
    assert levels.argmin() == 0 and levels[0] < 0 and levels[-1] > 1


def test_derivative_table_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1..8"):
        fewbit.derivative_table("silu", 9)
    with pytest.raises(ValueError, match="known"):
        fewbit.derivative_table("swishy", 2)
    with pytest.raises(ValueError, match="approximate"):
        qact.gelu("erf")


# ---- unbiased derivative codes (stochastic specs) --------------------------------------------


@pytest.mark.parametrize("name", ["silu", "gelu", "sigmoid", "tanh", "hardswish", "mish", "elu"])
def test_unbiased_codes_span_the_derivative(name):
    low, high = fewbit.derivative_range(name)
    wide = fewbit.derivative(name, torch.linspace(-40, 40, 100001, dtype=torch.float64))
    assert low == pytest.approx(float(wide.min()), abs=1e-4)
    assert high == pytest.approx(float(wide.max()), abs=1e-4)
    # Each derivative decodes to one of its two neighbouring levels, never further away.
    slope = fewbit.derivative(name, 3 * torch.randn(4096, dtype=torch.float64)).float()
    for bits in (1, 2, 3, 8):
        n = slope.numel()
        got = fewbit.decode_derivative_unbiased(
            fewbit.encode_derivative_unbiased(slope, name, bits), n, name, bits
        )
        step = (high - low) / (2**bits - 1)
        assert ((got - slope).abs() <= step * (1 + 1e-4)).all()
        assert got.min() >= low - 1e-6 and got.max() <= high + 1e-6


@pytest.mark.parametrize("factory", [nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Mish])
def test_stochastic_specs_give_unbiased_derivatives(factory):
    # The mean of many draws converges to the exact gradient (a deterministic code would not).
    x = error_inputs()["bn"][:2]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    _, exact = run(factory(), x, grad)
    module = quantize(factory(), QuantSpec(bits=2))
    torch.manual_seed(0)
    draws = torch.stack([run(module, x, grad)[1] for _ in range(400)])
    single = relative_error(draws[0], exact)
    assert 0.01 < single < 0.6  # noisy, as 2-bit codes are
    assert relative_error(draws.mean(0), exact) < single / 8  # ~ single / 20 if unbiased
    _, det = run(quantize(factory(), QuantSpec(bits=2, rounding="nearest")), x, grad)
    assert relative_error(det, exact) > 2 * relative_error(draws.mean(0), exact)


def test_unbiased_codes_cost_the_same_bytes():
    x = torch.randn(4, 8, 16, 16)
    stochastic = saved_bytes(quantize(nn.SiLU(), QuantSpec(bits=2)), x)
    nearest = saved_bytes(quantize(nn.SiLU(), QuantSpec(bits=2, rounding="nearest")), x)
    assert stochastic == nearest == x.numel() // 4 + 1  # codes + the NaN flag byte


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["silu", "hardswish", "sigmoid"])
def test_grid_lookup_codes_equal_bucketize(name, dtype):
    # encode_derivative looks intervals up on the table's grid instead of searching: the same
    # codes as torch.bucketize, also on and next to every boundary, at +-8, +-inf and NaN.
    grid = torch.arange(-300, 301, dtype=torch.float32) / 32
    specials = torch.tensor([math.inf, -math.inf, math.nan, 8.0, -8.0, 1e30, -1e30, 0.0, -0.0])
    for bits in (1, 2, 4, 8):
        boundaries, _ = fewbit.derivative_table(name, bits)
        up, down = torch.tensor(9.0), torch.tensor(-9.0)
        x = torch.cat([
            4 * torch.randn(5000, generator=torch.Generator().manual_seed(bits)),
            grid, grid + 1e-6, grid - 1e-6,
            boundaries, boundaries.nextafter(up), boundaries.nextafter(down), specials,
        ]).to(dtype)  # fmt: skip
        expected = torch.bucketize(x, boundaries, out_int32=True)
        got = unpack_codes(fewbit.encode_derivative(x, name, bits), bits, x.numel())
        assert torch.equal(got.to(torch.int32), expected)
