"""BatchNorm drop-ins: torch-identical forward and running statistics, faithful backward."""

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import qbackprop as qb

CASES = [
    (nn.BatchNorm2d, (8, 6, 5, 5)),
    (nn.BatchNorm1d, (8, 6)),
    (nn.BatchNorm1d, (8, 6, 7)),
    (nn.BatchNorm3d, (4, 6, 3, 3, 3)),
    (BatchNormAct2d, (8, 6, 5, 5)),
]


def _pair(cls, spec_dict, **kwargs):
    ref = cls(6, **kwargs)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    return ref, qb.convert_model(copy.deepcopy(ref), spec_dict)


def _step(ref, conv, shape, train, seed=0):
    ref.train(train)
    conv.train(train)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), conv(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    return (y1, x1.grad), (y2, x2.grad)


@pytest.mark.parametrize("cls, shape", CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("train", [True, False])
def test_exact_at_32_bits(cls, shape, momentum, train):
    ref, conv = _pair(cls, {"default": {"bits": 32}}, momentum=momentum)
    for seed in range(3):  # several steps: running statistics must follow torch's exactly
        (y1, gx1), (y2, gx2) = _step(ref, conv, shape, train, seed)
        assert torch.equal(y1, y2)
        assert torch.equal(gx1, gx2)
    assert torch.equal(ref.weight.grad, conv.weight.grad)
    assert torch.equal(ref.bias.grad, conv.bias.grad)
    for a, b in zip(ref.buffers(), conv.buffers(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls, shape", CASES)
@pytest.mark.parametrize("train", [True, False])
def test_forward_and_stats_exact_when_compressed(cls, shape, train):
    ref, conv = _pair(cls, {"default": {"bits": 2}}, momentum=None)
    for seed in range(2):
        (y1, _), (y2, _) = _step(ref, conv, shape, train, seed)
        assert torch.equal(y1, y2)  # forward is never approximated
    for a, b in zip(ref.buffers(), conv.buffers(), strict=True):
        assert torch.equal(a, b)


def test_eight_bit_gradients_close():
    ref, conv = _pair(nn.BatchNorm2d, {"default": {"bits": 8, "rounding": "nearest"}})
    (_, gx1), (_, gx2) = _step(ref, conv, (32, 6, 8, 8), True)
    cos = torch.nn.functional.cosine_similarity(gx1.flatten(), gx2.flatten(), dim=0)
    assert cos > 0.999
    wcos = torch.nn.functional.cosine_similarity(ref.weight.grad, conv.weight.grad, dim=0)
    assert wcos > 0.999


def test_eval_mode_input_grad_needs_no_activation():
    # Eval-mode BN is affine per channel: the input gradient is exact at any bit width.
    ref, conv = _pair(nn.BatchNorm2d, {"default": {"bits": 1}})
    (_, gx1), (_, gx2) = _step(ref, conv, (4, 6, 5, 5), False)
    torch.testing.assert_close(gx1, gx2)


def test_stochastic_weight_grad_is_unbiased():
    torch.manual_seed(0)
    ref, conv = _pair(nn.BatchNorm2d, {"default": {"bits": 2}})
    x = torch.randn(16, 6, 8, 8)
    g = torch.randn(16, 6, 8, 8)
    ref(x).backward(g)
    exact = ref.weight.grad.clone()
    draws = []
    for _ in range(64):
        conv.zero_grad()
        conv(x).backward(g)
        draws.append(conv.weight.grad.clone())
    draws = torch.stack(draws)
    single = (draws - exact).square().sum(1).mean().sqrt()  # RMS error of one draw
    mean_err = (draws.mean(0) - exact).norm()
    assert mean_err < single / 4  # error of the mean shrinks like 1/sqrt(draws): ~ single / 8


class _Double(nn.Module):
    def forward(self, x):
        return x * 2  # the BatchNorm input is then an activation, not the caller's tensor


def test_saves_compressed_xhat_not_input():
    bn = nn.BatchNorm2d(6)
    model = qb.convert_model(
        nn.Sequential(_Double(), bn), {"default": {"bits": 2}, "fallback": False}
    )
    x = torch.randn(32, 6, 16, 16, requires_grad=True)
    report = qb.measure_saved_activations(model, x)
    # torch keeps the BN input (and per-channel statistics); x itself is the caller's
    assert x.numel() * 4 <= report.fp32_bytes < x.numel() * 4 + 1024
    # x̂ kept at 2·b = 4 bits (normalized_spec), buckets of 512: 32 / (4 + 48/512) = 7.8x.
    assert 7.6 < report.ratio < 7.9


def test_caller_input_is_not_counted():
    conv = qb.convert_model(nn.Conv2d(3, 4, 3), {"default": {"bits": 2}})
    x = torch.randn(2, 3, 8, 8)  # data: kept by reference, the caller holds it anyway
    report = qb.measure_saved_activations(conv, x)
    assert report.fp32_bytes == 0 and report.stored_bytes == 0


def test_channels_last_and_bf16():
    ref, conv = _pair(nn.BatchNorm2d, {"default": {"bits": 8, "rounding": "nearest"}})
    x = torch.randn(8, 6, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    y = conv(x)
    y.sum().backward()
    assert x.grad.shape == x.shape
    xb = torch.randn(8, 6, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    conv.to(torch.bfloat16)
    conv(xb).square().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


def test_double_backward_raises():
    ref, conv = _pair(nn.BatchNorm2d, {"default": {"bits": 4}})
    x = torch.randn(4, 6, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward|differentiate twice"):
        (gx,) = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
        gx.sum().backward()


def test_extra_repr_shows_spec():
    _, conv = _pair(nn.BatchNorm2d, {"default": {"bits": 2}})
    assert "qbackprop=2b stochastic b512" in repr(conv)
