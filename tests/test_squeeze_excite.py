"""The squeeze-excite multiply and timm's SE modules: exact at 32 bits, x saved compressed."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers.squeeze_excite import SEModule
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from qbackprop.functions.elementwise import gate_spec, quantized_mul
from qbackprop.layers.registry import find_swap, plan_alone
from qbackprop.layers.squeeze_excite import QuantizedSEModule, QuantizedSqueezeExcite
from qbackprop.quant import QuantSpec, compress

FP32 = QuantSpec(bits=32)
NEAREST8 = QuantSpec(bits=8, rounding="nearest")
STOCH2 = QuantSpec(bits=2, rounding="stochastic", bucket_size=512)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: on a loaded 2-core box, each parallel region waits ~10 ms for a peer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def convert(module: nn.Module, spec: QuantSpec | None) -> nn.Module:
    """Convert one module by hand, as surgery will: swap its class for Q<Orig>(Mixin, Orig)."""
    swap = find_swap(type(module))
    assert swap is not None and (swap.check is None or swap.check(module) is None)
    module.__class__ = type("Q" + type(module).__name__, (swap.mixin, type(module)), {})
    module.qplan = plan_alone(module, spec)
    return module


def run(module: nn.Module, x: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return out, x.grad, [p.grad for p in module.parameters()]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


SE_CASES = {
    "efficientnet_se": lambda: SqueezeExcite(16, rd_ratio=0.25, act_layer=nn.SiLU),
    "se_module": lambda: SEModule(16, rd_ratio=0.25),
    "se_module_bn_maxpool": lambda: SEModule(
        16, rd_ratio=0.25, add_maxpool=True, norm_layer=nn.BatchNorm2d
    ),
}


@pytest.mark.parametrize("convert_children", [False, True])
@pytest.mark.parametrize("case", list(SE_CASES))
@pytest.mark.parametrize("channels_last", [False, True])
def test_se_equals_timm_at_32_bits(case, convert_children, channels_last):
    torch.manual_seed(0)
    module = SE_CASES[case]()
    x = torch.randn(4, 16, 7, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    q = convert(copy.deepcopy(module), FP32)
    if convert_children:
        for child in q.modules():
            if type(child) in (nn.Conv2d, nn.Linear):
                convert(child, FP32)
    out_ref, gx_ref, gp_ref = run(module, x)
    out, gx, gp = run(q, x)
    assert torch.equal(out, out_ref) and torch.equal(gx, gx_ref)
    for a, b in zip(gp, gp_ref, strict=True):
        assert torch.equal(a, b)


def test_registry_entries():
    assert find_swap(SqueezeExcite).mixin is QuantizedSqueezeExcite
    assert find_swap(SEModule).mixin is QuantizedSEModule
    assert find_swap(SqueezeExcite).family == "elementwise"

    class MySE(SqueezeExcite):
        def forward(self, x):
            return x

    reason = find_swap(MySE).check(MySE(8))
    assert reason and "overrides forward" in reason
    assert "qbackprop=2b stochastic" in repr(convert(SqueezeExcite(8), STOCH2))


def _mul_twin(x: torch.Tensor, gate: torch.Tensor, spec):
    """Grads of ``x * gate`` through torch and through quantized_mul, for one upstream grad."""
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    gs = [gate.detach().clone().requires_grad_() for _ in range(2)]
    out_ref = xs[0] * gs[0]
    out = quantized_mul(xs[1], gs[1], spec=spec)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out.backward(grad)
    return (out_ref, xs[0].grad, gs[0].grad), (out, xs[1].grad, gs[1].grad)


@pytest.mark.parametrize(
    "x_shape,gate_shape,gate_dtype",
    [
        ((4, 8, 5, 5), (4, 8, 1, 1), torch.float32),
        ((4, 8, 5, 5), (8, 1, 1), torch.float32),
        ((4, 8, 5, 5), (1, 8, 1, 1), torch.bfloat16),  # type promotion: grads cast back
        ((6, 10), (6, 10), torch.float32),  # no broadcast at all
    ],
)
def test_mul_equals_torch_at_32_bits(x_shape, gate_shape, gate_dtype):
    torch.manual_seed(0)
    x, gate = torch.randn(x_shape), torch.rand(gate_shape).to(gate_dtype)
    ref, ours = _mul_twin(x, gate, FP32)
    for a, b in zip(ref, ours, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_mul_8bit_dx_and_dgate_close():
    torch.manual_seed(0)
    x, gate = torch.randn(4, 32, 8, 8), torch.rand(4, 32, 1, 1)
    (out_ref, gx_ref, gg_ref), (out, gx, gg) = _mul_twin(x, gate, NEAREST8)
    assert torch.equal(out, out_ref)
    # dx reads the gate kept at 8 bits (the spec's width, as it is >= 4): < 0.2% error.
    assert cosine(gx, gx_ref) >= 0.99999
    assert not torch.equal(gg, gg_ref) and cosine(gg, gg_ref) >= 0.999


def test_mul_2bit_stochastic_dgate_is_unbiased():
    torch.manual_seed(0)
    x, gate = torch.randn(4, 16, 8, 8), torch.rand(4, 16, 1, 1).requires_grad_()
    grad = torch.randn(4, 16, 8, 8)
    exact = (grad * x).sum((2, 3), keepdim=True)
    draws = []
    for _ in range(64):
        g = gate.detach().requires_grad_()
        quantized_mul(x, g, spec=STOCH2).backward(grad)
        draws.append(g.grad)
    draws = torch.stack(draws)
    per_draw = ((draws - exact) ** 2).sum(dim=(1, 2, 3, 4)).mean()
    assert per_draw > 0
    for n in (16, 64):  # E||mean_n - g||^2 = per_draw / n when unbiased
        assert ((draws[:n].mean(0) - exact) ** 2).sum() <= 2 * per_draw / n


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def test_se_saved_bytes():
    torch.manual_seed(0)
    module = SqueezeExcite(64, rd_ratio=0.25, act_layer=nn.SiLU)
    x = torch.randn(16, 64, 32, 32, requires_grad=True)
    torch_bytes = _saved_bytes(module, x)
    q = convert(copy.deepcopy(module), STOCH2)
    q_bytes = _saved_bytes(q, x)
    # torch keeps x (for dgate) and the small gate; we keep x packed and the gate at 4 bits
    # (the sigmoid keeps its derivative code, the conv_reduce input and small conv tensors).
    small = torch_bytes - x.nbytes
    assert 0 < small < x.nbytes / 100
    packed_x = compress(x.detach(), STOCH2).nbytes
    assert packed_x < q_bytes < packed_x * 1.05
    assert torch_bytes / q_bytes >= 14.0  # 14.7x measured; x alone: 15.3x


def test_mul_keeps_no_x_when_gate_needs_no_grad():
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    gate = torch.rand(2, 8, 1, 1)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = quantized_mul(x, gate, spec=STOCH2)
    # Only the gate's packed 4-bit copy: nothing of x's size.
    assert (
        sum(t.numel() * t.element_size() for t in saved) == compress(gate, gate_spec(STOCH2)).nbytes
    )
    out.sum().backward()
    step = (gate.max() - gate.min()) / 15  # 4-bit stochastic gate: error below one step
    assert ((x.grad - gate.expand_as(x)).abs() < step * 1.01).all()


def test_mul_double_backward_raises():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    gate = torch.rand(2, 3, 1, 1, requires_grad=True)
    loss = quantized_mul(x, gate, spec=FP32).sum()
    # dgate = sum(x) depends on x: torch would differentiate it again; we refuse, loudly.
    with pytest.raises(RuntimeError, match="double backward .* GateMultiplyFunction"):
        torch.autograd.grad(loss, gate, create_graph=True)


def test_mul_no_grad_is_plain():
    x, gate = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 1, 1)
    with torch.no_grad():
        out = quantized_mul(x, gate, spec=STOCH2)
    assert out.grad_fn is None and torch.equal(out, x * gate)


@pytest.mark.parametrize("case", ["efficientnet_se", "se_module"])
def test_torch_compile_with_inplace_silu_after_converted_conv(case):
    """A converted conv is a graph break; an in-place SiLU right after it used to crash backward."""
    torch.manual_seed(0)
    if case == "efficientnet_se":
        module = SqueezeExcite(16, rd_ratio=0.25, act_layer=nn.SiLU)  # act1 = SiLU(inplace=True)
    else:
        module = SEModule(16, rd_ratio=0.25, act_layer=nn.SiLU)
    q = convert(copy.deepcopy(module), FP32)
    for child in list(q.modules()):
        if type(child) is nn.Conv2d:
            convert(child, FP32)
    x = torch.randn(2, 16, 5, 5)
    out_ref, gx_ref, gp_ref = run(module, x)
    torch._dynamo.reset()
    out, gx, gp = run(torch.compile(q, backend="aot_eager"), x)
    assert torch.equal(out, out_ref) and torch.equal(gx, gx_ref)
    for a, b in zip(gp, gp_ref, strict=True):
        assert torch.equal(a, b)
