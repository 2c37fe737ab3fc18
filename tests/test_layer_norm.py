"""LayerNorm / LayerNorm2d / GroupNorm drop-ins: exact at 32 bits, faithful when compressed."""

import copy

import pytest
import torch
from timm.layers import LayerNorm2d
from torch import nn

import qbackprop as qb

CASES = [
    (lambda: nn.LayerNorm(16), (4, 5, 16)),
    (lambda: nn.LayerNorm((5, 16), elementwise_affine=True, bias=False), (4, 5, 16)),
    (lambda: nn.LayerNorm(16, elementwise_affine=False), (3, 16)),
    (lambda: LayerNorm2d(6), (4, 6, 5, 5)),
    (lambda: nn.GroupNorm(3, 6), (4, 6, 5, 5)),
    (lambda: nn.GroupNorm(2, 6, affine=False), (4, 6, 7)),
]


def _pair(make, spec):
    torch.manual_seed(0)
    ref = make()
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    return ref, qb.convert_model(copy.deepcopy(ref), spec)


def _grads(module, x, g):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(g)
    return y, [x.grad, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize("make, shape", CASES)
def test_exact_at_32_bits(make, shape):
    ref, conv = _pair(make, {"default": {"bits": 32}})
    assert all(isinstance(m, qb.surgery.QuantizedModule) for m in [conv])
    x, g = torch.randn(shape) * 3 + 1, torch.randn(shape)
    (y1, g1), (y2, g2) = _grads(ref, x, g), _grads(conv, x, g)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make, shape", CASES)
def test_backward_from_xhat_matches_torch(make, shape):
    # 8-bit x̂: forward identical, gradients within the quantization error.
    ref, conv = _pair(make, {"default": {"bits": 8, "rounding": "nearest"}})
    x, g = torch.randn(shape) * 3 + 1, torch.randn(shape)
    (y1, g1), (y2, g2) = _grads(ref, x, g), _grads(conv, x, g)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.999


def test_fallback_path_error_is_large_where_drop_in_is_not():
    # A token whose features have a large common offset: torch's op keeps the raw input, whose
    # bucket range is then set by the offset, and the LayerNorm backward amplifies that error.
    torch.manual_seed(0)
    ln = nn.LayerNorm(32)
    x = torch.randn(64, 32) * 0.01 + torch.randn(64, 1) * 10
    g = torch.randn(64, 32)
    _, exact = _grads(ln, x, g)
    spec = {"bits": 4, "rounding": "nearest"}
    fallback_only = qb.convert_model(
        copy.deepcopy(ln), {"default": spec, "layers": [{"match": "*", "enabled": False}],
                            "fallback_min_numel": 1}
    )  # fmt: skip
    drop_in = qb.convert_model(copy.deepcopy(ln), {"default": spec})
    err = lambda m: ((_grads(m, x, g)[1][0] - exact[0]).norm() / exact[0].norm()).item()  # noqa: E731
    assert err(fallback_only) > 0.5
    assert err(drop_in) < 0.02


def test_convnext_has_no_fallback_norms():
    import timm

    model = timm.create_model("convnext_atto", num_classes=10)
    qb.convert_model(model, "2bit-stochastic")
    norms = [r for r in qb.conversion_report(model) if "Norm" in r.module_type]
    assert len(norms) > 10 and all(r.converted for r in norms)
    assert {r.family for r in norms} == {"norm"}
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_autocast_runs_in_fp32_like_torch():
    ref, conv = _pair(lambda: nn.LayerNorm(16), {"default": {"bits": 4}})
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = ref(x), conv(x)
    assert y1.dtype == y2.dtype
    y2.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
