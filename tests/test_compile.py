"""Whole-model ``torch.compile(fullgraph=True)`` of converted models (no graph breaks)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import qbackprop as qb

# The model list of the engine issue. efficientnetv2_rw_t takes the longest to trace: it is
# compiled with the "eager" backend (Dynamo alone: still one graph, fullgraph=True), the others
# through AOTAutograd as well ("aot_eager": fake kernels, joint graph, partitioning).
MODELS = {
    "resnet18": "aot_eager",
    "convnext_atto": "aot_eager",
    "mobilenetv3_large_100": "aot_eager",
    "efficientnetv2_rw_t": "eager",
    "vit_tiny_patch16_224": "aot_eager",  # the attention Function, LayerNorm sharing off
}
KWARGS = {"vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2}}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **KWARGS.get(name, {}))


def _small_converted() -> torch.nn.Module:
    """Conv, BatchNorm+SiLU, conv, pool, linear at the 2/4 mix: every op family, in seconds."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        BatchNormAct2d(8, act_layer=torch.nn.SiLU),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )
    return qb.convert_model(model, "2/4-mix")


def _activation_bytes(model, x) -> int:
    """Bytes of activations a (compiled) forward saves: parameters and the input excluded."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_compiles_as_one_graph(name):
    model = qb.convert_model(_build(name), "2bit-stochastic")
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend=MODELS[name])  # fails on any break
    out = compiled(x)
    with torch.no_grad():  # the forward is exact: compiled and eager outputs agree
        reference = model(x)
    torch.testing.assert_close(out.detach(), reference, rtol=1e-4, atol=1e-4)
    out.logsumexp(dim=1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_compiled_graph_still_stores_codes():
    x = torch.randn(16, 3, 32, 32)  # (per-bucket metadata weighs more on tiny batches)
    fp32 = _build("resnet18")
    converted = qb.convert_model(copy.deepcopy(fp32), "2bit-stochastic")
    sizes = []
    for model in (fp32, converted):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        compiled(x).sum().backward()  # compile first, then count
        sizes.append(_activation_bytes(compiled, x))
    # Codes, not fp32 copies: ~9.7x fewer bytes here. (Eager keeps more than 12x fewer: its
    # BatchNorm outputs are shared with their consumers, which a traced graph cannot do yet;
    # docs/design-notes.md, "Under torch.compile".)
    assert sizes[0] >= 8 * sizes[1], sizes


def test_compiled_nearest_gradients_match_eager():
    # Sharing and the fallback hooks are eager-only (docs/design-notes.md): compare like with
    # like, so the compiled and eager steps run the same method.
    cfg = {"default": "4bit-nearest", "share": False, "fallback": False}
    model = qb.convert_model(_build("resnet18"), cfg)
    x = torch.randn(4, 3, 32, 32)
    model(x).logsumexp(dim=1).mean().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).logsumexp(dim=1).mean().backward()
    for g, e in zip((p.grad for p in model.parameters()), eager, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


def test_a_new_batch_size_recompiles_with_symbolic_sizes():
    # A smaller last batch makes Dynamo retrace with a dynamic batch dimension: the ops' fake
    # kernels then compute the packed sizes symbolically.
    model = _small_converted()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for batch in (4, 3, 5):
        model.zero_grad(set_to_none=True)
        compiled(torch.randn(batch, 3, 16, 16)).square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters()), batch


def test_cuda_graphs_would_accept_the_compiled_graphs():
    # mode="reduce-overhead" records CUDA graphs; Inductor refuses graphs with a node it
    # cannot capture (host reads, data-dependent sizes, CPU-only ops). Checked here on the
    # forward and backward graphs AOTAutograd makes (the check needs no GPU).
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    model = _small_converted()
    backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    compiled(torch.randn(4, 3, 16, 16)).square().mean().backward()
    assert len(graphs) == 2  # one forward, one backward
    for gm in graphs:
        assert any("qbackprop" in str(node.target) for node in gm.graph.nodes)
        assert get_first_incompatible_cudagraph_node(gm) is None
