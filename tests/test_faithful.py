"""The fixes behind faithful gradients: wider normalization x̂, data inputs kept, a safe fallback."""

import copy

import pytest
import torch
from torch import nn

import qbackprop as qb
from qbackprop.functions.fallback import fallback_spec
from qbackprop.functions.norm import batch_norm, normalized_spec


def _smooth_images(n=16, c=3, size=16, seed=0):
    # Strongly correlated neighbouring pixels, as in real images: the stem conv's patches.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g).cumsum(2).cumsum(3) / size


def _conv_weight_grad(conv, x, upstream, norm):
    conv.weight.grad = None
    y = norm(conv(x))
    (y * upstream).sum().backward()
    return conv.weight.grad.clone()


def test_normalized_xhat_bits_follow_the_spec():
    assert normalized_spec(qb.QuantSpec(bits=2)).bits == 4
    assert normalized_spec(qb.QuantSpec(bits=4)).bits == 8
    assert normalized_spec(qb.QuantSpec(bits=8)).bits == 8
    assert normalized_spec(qb.QuantSpec(bits=12)).bits == 12
    mixed = normalized_spec(qb.QuantSpec(bits=2, mix_bits=4, mix_prob=0.5))
    assert (mixed.bits, mixed.mix_bits) == (4, 8)
    assert normalized_spec(None) is None


def test_stem_conv_weight_gradient_with_wider_xhat():
    # conv -> BN on smooth images: an error δ in x̂ enters BN's backward as x̂·mean(g·δ), along
    # the direction in which the conv's weight gradient is largest. x̂ at b bits (the old path)
    # wrecks the conv weight gradient; at 2·b bits (the drop-in) it stays close.
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    x = _smooth_images()
    upstream = torch.randn(16, 8, 16, 16)
    exact = _conv_weight_grad(conv, x, upstream, bn)
    spec = qb.QuantSpec(bits=4, rounding="nearest")

    def old(t):
        return batch_norm(t, None, None, bn.weight, bn.bias, True, 0.1, bn.eps, spec)

    new_bn = qb.convert_model(copy.deepcopy(bn), {"default": spec.to_dict()})
    rel = lambda g: ((g - exact).norm() / exact.norm()).item()  # noqa: E731
    old_err = rel(_conv_weight_grad(conv, x, upstream, old))
    new_err = rel(_conv_weight_grad(conv, x, upstream, new_bn))
    assert old_err > 4 * new_err
    assert new_err < 0.05


def test_model_input_is_kept_exact_by_the_stem_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    ref = copy.deepcopy(model)
    qb.convert_model(model, {"default": {"bits": 2}, "fallback": False, "layers": [
        {"match": "*", "type": ["batchnorm", "activation"], "enabled": False}]})  # fmt: skip
    x = _smooth_images()
    ref(x).square().sum().backward()
    model(x).square().sum().backward()
    # Only the conv is converted and its input is data: its weight gradient is torch's.
    assert torch.allclose(model[0].weight.grad, ref[0].weight.grad, rtol=1e-5, atol=1e-6)
    # An activation input (it has autograd history) is compressed as before.
    h = x.clone().requires_grad_() * 1.0
    model.zero_grad()
    model(h).square().sum().backward()
    assert not torch.allclose(model[0].weight.grad, ref[0].weight.grad, rtol=1e-3)


class _Sine(nn.Module):
    def forward(self, x):
        return torch.sin(x * 1.0)  # saves its input: no drop-in, so the fallback compresses it


def test_fallback_never_goes_below_8_bits():
    assert fallback_spec(qb.QuantSpec(bits=2)).bits == 8
    assert fallback_spec(qb.QuantSpec(bits=2, mix_bits=4, mix_prob=0.5)).mix_bits is None
    assert fallback_spec(qb.QuantSpec(bits=16)).bits == 16
    model = qb.convert_model(nn.Sequential(_Sine()), {"default": {"bits": 2}})
    x = torch.randn(8, 4096, requires_grad=True)
    report = qb.measure_saved_activations(model, x)
    # x * 1.0 saved by sin at 8 bits, buckets of 512: 32 / (8 + 48/512) = 3.95x
    assert 3.9 < report.ratio < 4.0
    assert report.fallback_fraction == 1.0


def test_fallback_gradient_stays_close_at_the_2_bit_preset():
    torch.manual_seed(0)
    ref = nn.Sequential(_Sine())
    model = qb.convert_model(copy.deepcopy(ref), "2bit-stochastic")
    x = torch.randn(8, 4096) * 3
    g = torch.randn(8, 4096)
    grads = []
    for m in (ref, model):
        xi = x.clone().requires_grad_()
        m(xi).backward(g)
        grads.append(xi.grad)
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()) < 0.05


def test_fallback_fraction_is_zero_when_everything_has_a_drop_in():
    model = qb.convert_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU()), "2bit-stochastic")
    report = qb.measure_saved_activations(model, torch.randn(4, 64, requires_grad=True) * 1.0)
    assert report.fallback_fraction == 0.0


def test_strided_1x1_conv_keeps_only_the_positions_it_reads():
    torch.manual_seed(0)
    ref = nn.Conv2d(8, 16, 1, stride=2, bias=True)
    conv = qb.convert_model(copy.deepcopy(ref), {"default": {"bits": 2}})
    h = torch.randn(4, 8, 9, 9).relu().requires_grad_()  # odd size: positions 0, 2, .., 8
    x = h * 1.0
    report = qb.measure_saved_activations(conv, x)
    kept = 4 * 8 * 5 * 5
    # 2 bits x stride 2 x stride 2 = 8 bits on a quarter of the elements.
    assert report.stored_bytes == pytest.approx(kept * (8 + 48 / 512) / 8, rel=0.05)
    g = torch.randn(4, 16, 5, 5)
    grads = []
    for m in (ref, conv):
        m.zero_grad()
        xi = x.detach().clone().requires_grad_()
        m(xi).backward(g)
        grads.append((xi.grad, m.weight.grad, m.bias.grad))
    (dx1, dw1, db1), (dx2, dw2, db2) = grads
    assert torch.equal(dx1, dx2)  # the input gradient needs only the weight
    assert torch.allclose(db1, db2, atol=1e-5)
    assert ((dw2 - dw1).norm() / dw1.norm()) < 0.01  # 8-bit codes of the kept positions


def test_strided_1x1_conv_is_exact_at_32_bits():
    ref = nn.Conv2d(8, 16, 1, stride=2)
    conv = qb.convert_model(copy.deepcopy(ref), {"default": {"bits": 32}})
    x = torch.randn(2, 8, 8, 8)
    for m in (ref, conv):
        m(x.requires_grad_()).square().sum().backward()
    assert torch.equal(ref.weight.grad, conv.weight.grad)


def test_print_shows_what_norms_and_strided_convs_keep():
    model = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.BatchNorm2d(8), nn.LayerNorm(3))
    qb.convert_model(model, "2bit-stochastic")
    text = repr(model)
    assert "subsampled input at 8b" in text
    assert text.count("x̂ at 4b") == 2
