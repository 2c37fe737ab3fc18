"""MaxPool2d drop-in: packed in-window argmax, gradients identical to torch's, fewer bytes."""

import copy

import pytest
import torch
from torch import nn

import qbackprop as qb


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, ceil_mode",
    [(3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 1, True), (3, 2, 1, 2, False),
     ((3, 2), (2, 1), (1, 0), 1, True)],
)  # fmt: skip
@pytest.mark.parametrize("spec", ["2bit-stochastic", {"default": {"bits": 32}}])
def test_lossless_at_any_bit_width(kernel, stride, padding, dilation, ceil_mode, spec):
    ref = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    conv = qb.convert_model(copy.deepcopy(ref), spec)
    x = torch.randn(2, 3, 11, 13)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), conv(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(y1, y2)
    assert torch.equal(x1.grad, x2.grad)


def test_ties_and_channels_last_follow_torch():
    x = torch.zeros(2, 4, 8, 8).to(memory_format=torch.channels_last)  # every window is a tie
    ref, conv = nn.MaxPool2d(3, 2, 1), qb.convert_model(nn.MaxPool2d(3, 2, 1), "2bit-stochastic")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x1).sum().backward()
    conv(x2).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_keeps_four_bits_per_output_instead_of_int64():
    pool = qb.convert_model(nn.Sequential(nn.MaxPool2d(3, 2, 1)), {"default": {"bits": 2}})
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    report = qb.measure_saved_activations(pool, x)
    outputs = 8 * 16 * 16 * 16
    assert report.stored_bytes == outputs // 2  # 3x3 window: 4-bit positions
    assert report.fp32_bytes >= outputs * 8  # torch: int64 indices (+ the input)


def test_return_indices_is_left_alone():
    model = qb.convert_model(nn.Sequential(nn.MaxPool2d(2, return_indices=True)), "2bit-stochastic")
    assert type(model[0]) is nn.MaxPool2d
    assert "return_indices" in qb.conversion_report(model)[0].reason


def test_no_grad_and_unbatched_input():
    conv = qb.convert_model(nn.MaxPool2d(2), "2bit-stochastic")
    x = torch.randn(3, 8, 8)
    with torch.no_grad():
        assert torch.equal(conv(x), nn.functional.max_pool2d(x, 2))
    xr = x.clone().requires_grad_()
    conv(xr).sum().backward()
    ref = x.clone().requires_grad_()
    nn.functional.max_pool2d(ref, 2).sum().backward()
    assert torch.equal(xr.grad, ref.grad)
