"""Every registry entry pickles: its drop-in class is importable by name, and converted timm
models with every family of drop-in survive pickle, deepcopy and torch.save."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import timm
import torch

import qbackprop as qb
from qbackprop.layers.registry import find_swap, quantized_class, registered_types


@pytest.mark.parametrize("source", registered_types(), ids=lambda t: f"{t.__module__}.{t.__name__}")
def test_every_drop_in_class_pickles_by_name(source):
    swap = find_swap(source)
    assert pickle.loads(pickle.dumps(swap.mixin)) is swap.mixin
    assert pickle.loads(pickle.dumps(source)) is source
    cls = quantized_class(swap.mixin, source)
    assert quantized_class(*cls.__bases__[:2]) is cls  # what __reduce_ex__ rebuilds from


MODELS = {
    "test_efficientnet": {},
    "test_resnet": {},
    "convnext_atto": {},
    "mobilenetv3_large_100": {},
    "efficientnetv2_rw_t": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
}


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_timm_models_round_trip(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **MODELS[name])
    qb.convert_model(model, "4bit-nearest")
    x = torch.randn(2, 3, 32, 32)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [
        pickle.loads(pickle.dumps(model)),
        copy.deepcopy(model),
        torch.load(buffer, weights_only=False),
    ]
    model.eval()
    expected = model(x)
    for other in copies:
        assert type(other) is type(model)
        assert [type(m).__name__ for m in other.modules()] == [
            type(m).__name__ for m in model.modules()
        ]
        assert qb.conversion_report(other) == qb.conversion_report(model)
        other.eval()
        torch.testing.assert_close(other(x), expected)
        other.train()
        other(x).sum().backward()
        assert all(p.grad is None or p.grad.isfinite().all() for p in other.parameters())
        # ... and still trains with compressed activations.
        report = qb.measure_saved_activations(other, x)
        assert report.stored_bytes * 4 < report.fp32_bytes
