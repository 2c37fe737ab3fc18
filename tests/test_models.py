"""Model zoo: converted timm models are exact at 32 bits and train at 2 bits (finite grads)."""

import copy
import warnings

import pytest
import timm
import torch

import qbackprop as qb
from qbackprop.layers.registry import QuantizedModule

ZOO = [
    ("efficientnetv2_rw_t", 32),
    ("tf_efficientnetv2_b0", 32),
    ("resnet18", 32),
    ("mobilenetv3_small_100", 32),
    ("convnext_atto", 32),
    ("regnetx_002", 32),
]
TEST_MODELS = [
    "test_efficientnet",
    "test_resnet",
    "test_convnext",
    "test_byobnet",
    "test_efficientnet_gn",
    "test_vit",
    "test_nfnet",
]


def _model(name):
    torch.manual_seed(0)
    kwargs = {} if name.startswith("test_") else {"drop_rate": 0.0, "drop_path_rate": 0.0}
    return timm.create_model(name, pretrained=False, num_classes=7, **kwargs)


def _input(model, size=None):
    cfg = model.pretrained_cfg
    size = size or cfg.get("input_size", (3, 32, 32))[-1]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _grads(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _check_exact(name, size=None):
    ref = _model(name)
    conv = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qb.convert_model(conv, {"default": {"bits": 32}})
    assert any(isinstance(m, QuantizedModule) for m in conv.modules())
    x = _input(ref, size)
    out_ref, g_ref = _grads(ref, x)
    out_conv, g_conv = _grads(conv, x)
    torch.testing.assert_close(out_conv, out_ref, atol=1e-5, rtol=0)
    assert g_ref.keys() == g_conv.keys()
    for key in g_ref:
        torch.testing.assert_close(g_conv[key], g_ref[key], atol=1e-5, rtol=0, msg=key)
    plain = _model(name)
    plain.load_state_dict(conv.state_dict())  # checkpoints load into the unconverted model
    conv.load_state_dict(ref.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("name, size", ZOO)
def test_zoo_exact_at_32_bits(name, size):
    _check_exact(name, size)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_timm_test_models_exact_at_32_bits(name):
    _check_exact(name)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_convnext", "test_vit"])
@pytest.mark.parametrize("spec", ["2bit-stochastic", "4bit-nearest", "2/4-mix"])
def test_timm_test_models_train_compressed(name, spec):
    model = _model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qb.convert_model(model, spec)
    x = _input(model)
    _, grads = _grads(model, x)
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(grads) == set(params)
    for key, g in grads.items():
        assert torch.isfinite(g).all(), key
