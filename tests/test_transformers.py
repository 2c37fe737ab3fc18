"""Transformers: attention, LayerScale and Dropout drop-ins against torch, converted ViT / DeiT /
Swin / torchvision ViT / nn.TransformerEncoder exact at 32 bits, presets keep attention wide."""

import copy
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import qbackprop as qb
from qbackprop.functions.attention import attention_specs, quantized_attention
from qbackprop.functions.dropout import quantized_dropout
from qbackprop.functions.elementwise import quantized_scale
from qbackprop.layers.registry import QuantizedModule
from qbackprop.models import ModelSpec
from qbackprop.quant import QuantSpec


def _qkv(b=2, h=3, n=10, m=None, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = m or n
    shapes = [(b, h, n, d), (b, h, m, d), (b, h, m, d)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _reference(q, k, v, bias=None, mask=None, windows=False, is_causal=False, explicit=False):
    if not explicit and not windows:
        full = bias if mask is None else (mask if bias is None else bias + mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=full, is_causal=is_causal)
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.where(bias, 0.0, -math.inf)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = (s.view(-1, mask.shape[0], *s.shape[1:]) + mask.unsqueeze(1).unsqueeze(0)).view(s.shape)
    return s.softmax(-1) @ v


def _grads(fn, tensors, seed=3):
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, [t for t in tensors if t.requires_grad], g)
    return out, grads


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("case", ["plain", "bias", "bool", "causal", "windows"])
def test_attention_exact_at_32_bits(explicit, case):
    q, k, v = _qkv(b=4)
    kwargs = {}
    if case == "bias":  # a relative-position bias that learns
        kwargs["bias"] = torch.randn(1, 3, 10, 10).requires_grad_()
    elif case == "bool":
        kwargs["bias"] = torch.rand(10, 10) > 0.3
        kwargs["bias"][:, 0] = True  # every row attends somewhere
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "windows":  # Swin: a (num_windows, N, N) mask over B·num_windows windows
        kwargs["mask"] = torch.where(torch.rand(2, 10, 10) > 0.3, 0.0, -100.0)
        kwargs["windows"] = True
    tensors = [q, k, v] + ([kwargs["bias"]] if case == "bias" else [])
    rest = {key: val for key, val in kwargs.items() if case != "bias" or key != "bias"}

    def ours(q, k, v, *bias):
        extra = {"bias": bias[0]} if bias else {}
        return quantized_attention(q, k, v, explicit=explicit, spec=None, **rest, **extra)

    def ref(q, k, v, *bias):
        extra = {"bias": bias[0]} if bias else {}
        if case == "causal" and explicit:
            causal = torch.ones(10, 10, dtype=torch.bool).tril()
            return _reference(q, k, v, bias=torch.where(causal, 0.0, -math.inf), explicit=True)
        return _reference(q, k, v, explicit=explicit, **rest, **extra)

    out, grads = _grads(ours, tensors)
    out_ref, grads_ref = _grads(ref, tensors)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_close_at_8_bits_and_keeps_qk_at_8_bits_under_2_bit_spec():
    q, k, v = _qkv(n=16, d=16)
    _, exact = _grads(lambda *t: _reference(*t), [q, k, v])
    assert [s.bits for s in attention_specs(QuantSpec(bits=2))] == [8, 4]

    def rel_errors(spec):
        _, got = _grads(lambda *t: quantized_attention(*t, spec=spec), [q, k, v])
        return [((g - e).norm() / e.norm()).item() for g, e in zip(got, exact, strict=True)]

    assert max(rel_errors(QuantSpec(bits=8, rounding="nearest"))) < 0.02
    # 2 bits asked: dv reads only the probabilities, from q and k kept at 8 bits
    assert rel_errors(QuantSpec(bits=2))[2] < 0.02


def test_attention_dropout_mask_is_what_forward_used():
    q, k, v = _qkv()
    torch.manual_seed(5)
    out, grads = _grads(lambda *t: quantized_attention(*t, dropout_p=0.3), [q, k, v])
    torch.manual_seed(5)

    def ref(q, k, v):
        p = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        keep = torch.rand_like(p) >= 0.3
        return (p * keep / 0.7) @ v

    out_ref, grads_ref = _grads(ref, [q, k, v])
    torch.testing.assert_close(out, out_ref)
    for g, e in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def _saved_bytes(fn):
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(sizes.values())


def test_dropout_keeps_one_bit_per_element_and_masks_the_gradient():
    x = torch.randn(64, 128, requires_grad=True)
    torch.manual_seed(0)
    out, held = _saved_bytes(lambda: quantized_dropout(x, 0.25, True))
    assert held <= x.numel() // 8 + 64  # torch keeps a byte (CPU: a float) per element
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(grad, kept.float() / 0.75)
    # eval and p == 0 are torch's op (nothing saved, input returned)
    assert quantized_dropout(x, 0.25, False) is x
    assert torch.equal(quantized_dropout(x, 0.0, True), x)


def test_layer_scale_exact_at_32_bits_and_close_at_8():
    x = torch.randn(4, 9, 16, requires_grad=True)
    gamma = nn.Parameter(torch.rand(16))
    g = torch.randn(4, 9, 16)
    ref = torch.autograd.grad(x * gamma, (x, gamma), g)
    exact = torch.autograd.grad(quantized_scale(x, gamma, spec=None), (x, gamma), g)
    for a, b in zip(exact, ref, strict=True):
        torch.testing.assert_close(a, b)
    spec = QuantSpec(bits=8, rounding="nearest")
    dx, dgamma = torch.autograd.grad(quantized_scale(x, gamma, spec=spec), (x, gamma), g)
    torch.testing.assert_close(dx, ref[0])  # dx never reads the compressed x
    assert ((dgamma - ref[1]).norm() / ref[1].norm()).item() < 0.01


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "padding", "attn", "causal", "cross"])
def test_multihead_attention_exact_at_32_bits(batch_first, masks):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a lone MHA cannot run the planning forward
        conv = qb.convert_model(copy.deepcopy(ref), {"default": {"bits": 32}})
    assert isinstance(conv, QuantizedModule)
    shape = (3, 7, 16) if batch_first else (7, 3, 16)
    x = torch.randn(shape, requires_grad=True)
    key = torch.randn(shape, requires_grad=True) if masks == "cross" else x
    kwargs = {"need_weights": False}
    if masks == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 5 + [True] * 2] * 3)
    elif masks == "attn":
        kwargs["attn_mask"] = torch.randn(7, 7)
    elif masks == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(7)
        kwargs["is_causal"] = True
    g = torch.randn(shape)
    results = []
    for module in (ref, conv):
        out, weights = module(x, key, key, **kwargs)
        assert weights is None
        inputs = [x] + ([key] if masks == "cross" else []) + list(module.parameters())
        results.append((out, torch.autograd.grad(out, inputs, g)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # need_weights=True (the module's default) is torch's own path
    out, weights = conv(x, x, x)
    assert weights is not None


def _timm(name, num_classes=7, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(
        name,
        pretrained=False,
        num_classes=num_classes,
        drop_rate=0.0,
        drop_path_rate=0.0,
        **kwargs,
    )


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))


TRANSFORMERS = {
    "vit_tiny": (lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=4), (3, 32, 32)),
    "vit_small": (lambda: _timm("vit_small_patch16_224", img_size=32, patch_size=8), (3, 32, 32)),
    "deit_tiny": (lambda: _timm("deit_tiny_patch16_224", img_size=32, patch_size=4), (3, 32, 32)),
    "swin_tiny": (
        lambda: _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=4),
        (3, 64, 64),
    ),
    "tv:vit_b_16": (
        lambda: ModelSpec("tv:vit_b_16", 7, kwargs={"image_size": 32}).build(),
        (3, 32, 32),
    ),
    "TransformerEncoder": (_encoder, (5, 32)),
}


def _loss_grads(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(TRANSFORMERS))
@pytest.mark.parametrize("fused", [True, False])
def test_transformer_exact_at_32_bits(name, fused):
    build, shape = TRANSFORMERS[name]
    ref = build()
    if not fused:
        if not any(hasattr(m, "fused_attn") for m in ref.modules()):
            pytest.skip("torch's attention has no explicit path to switch to")
        for m in ref.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    conv = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the planning forward runs at the model's own size
        qb.convert_model(conv, {"default": {"bits": 32}})
    families = {m.family for m in conv.modules() if isinstance(m, QuantizedModule)}
    assert {"attention", "linear", "norm"} <= families
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    out_ref, g_ref = _loss_grads(ref, x)
    out_conv, g_conv = _loss_grads(conv, x)
    torch.testing.assert_close(out_conv, out_ref, atol=1e-5, rtol=0)
    assert g_ref.keys() == g_conv.keys()
    for key in g_ref:
        torch.testing.assert_close(g_conv[key], g_ref[key], atol=1e-5, rtol=1e-4, msg=key)
    plain = build()
    plain.load_state_dict(conv.state_dict())  # checkpoints load both ways
    conv.load_state_dict(ref.state_dict())


def test_two_bit_preset_keeps_attention_wide_and_says_so():
    model = qb.convert_model(TRANSFORMERS["vit_tiny"][0](), "2bit-stochastic")
    rows = [r for r in qb.conversion_report(model) if r.family == "attention"]
    assert len(rows) == 12 and all(r.converted for r in rows)
    assert all(r.keeps == "q,k at 8b, v at 4b" for r in rows)
    x = torch.randn(4, 3, 32, 32)
    report = qb.measure_saved_activations(model, x)
    assert report.ratio > 8  # measured bytes, the wider q, k, v counted
    fp32_attention = qb.measure_saved_activations(
        qb.convert_model(TRANSFORMERS["vit_tiny"][0](), {"default": {"bits": 32}}), x
    )
    assert fp32_attention.ratio == pytest.approx(1.0, abs=0.01)


def test_vit_gradients_faithful_at_8_and_4_bits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:96], dtype=torch.float32) / 16
    images = F.interpolate(images[:, None], size=32).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target[:96])
    batches = [(images[i : i + 16], labels[i : i + 16]) for i in range(0, 96, 16)]
    model = _timm("vit_tiny_patch16_224", 10, img_size=32, patch_size=4, depth=4)
    nearest = qb.measure_fidelity(model, "8bit-nearest", batches, draws=1, by=None)
    four = qb.measure_fidelity(model, "4bit-stochastic", batches, draws=2, by=None)
    assert nearest.ratio < 0.01
    assert four.ratio < 0.1


def test_layer_norm_output_is_shared_with_its_consumer():
    x = torch.randn(4, 3, 32, 32)
    shared = qb.convert_model(TRANSFORMERS["vit_tiny"][0](), "2bit-stochastic")
    own = qb.convert_model(TRANSFORMERS["vit_tiny"][0](), {"default": {"bits": 2}, "share": False})
    keeps = {r.name: r.keeps for r in qb.conversion_report(shared)}
    assert keeps["blocks.0.norm1"] == "x̂ at 4b, shared with blocks.0.attn.qkv"
    assert keeps["blocks.0.norm2"] == "x̂ at 4b, shared with blocks.0.mlp.fc1"
    assert keeps["norm"] == "x̂ at 4b"  # the class token is sliced out first: not shared
    saved = qb.measure_saved_activations(shared, x).stored_bytes
    assert saved < 0.95 * qb.measure_saved_activations(own, x).stored_bytes
    shared(x).sum().backward()  # the rebuilt inputs give finite gradients
    assert all(torch.isfinite(p.grad).all() for p in shared.parameters() if p.grad is not None)


def test_a_linear_fed_one_vector_per_sample_keeps_it_at_8_bits():
    model = qb.convert_model(TRANSFORMERS["vit_tiny"][0](), "2bit-stochastic")
    keeps = {r.name: r.keeps for r in qb.conversion_report(model)}
    assert keeps["head"] == "input at 8b (one vector per sample)"  # (B, 192) class tokens
    assert keeps["blocks.0.mlp.fc1"] == ""  # (B, N, 192) tokens: the preset's 2 bits
    x = torch.randn(16, 3, 32, 32)
    exact = qb.revert_model(copy.deepcopy(model))
    grads = []
    for m in (exact, model):
        m.zero_grad()
        m(x).logsumexp(1).sum().backward()
        grads.append(m.head.weight.grad)
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 0.05


VIT_CONFIG = """\
model:
  name: vit_tiny_patch16_224
  input_size: [3, 16, 16]
  kwargs: {img_size: 16, patch_size: 8, depth: 2}
quant:
  default: 2bit-stochastic
train:
  dataset: digits
  device: cpu
"""


def test_fidelity_cli_on_a_vit(tmp_path, capsys):
    import json

    from qbackprop.cli import main

    path = tmp_path / "vit.yaml"
    path.write_text(VIT_CONFIG)
    fast = ["--warmup-steps", "2", "--draws", "2", "--batch-size", "8", "--json"]
    code = main(["fidelity", str(path), *fast])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    groups = {g["name"]: g["ratio"] for g in data["groups"]}
    assert {"attention", "linear", "norm", "activation"} <= set(groups)
    assert data["ratio"] is not None and data["ratio"] > 0


def test_multihead_attention_close_at_8_bits():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = qb.convert_model(copy.deepcopy(ref), "8bit-nearest")
    x = torch.randn(4, 12, 32, requires_grad=True)
    g = torch.randn(4, 12, 32)
    grads = []
    for module in (ref, conv):
        out, _ = module(x, x, x, need_weights=False)
        grads.append(torch.autograd.grad(out, [x, *module.parameters()], g))
    for exact, got in zip(*grads, strict=True):
        assert ((got - exact).norm() / exact.norm()).item() < 0.02
