"""Sharing a BatchNorm output with its consumer (functions/shared.py): bytes, gradients, safety."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qbackprop as qb
from qbackprop.config import ConfigError


class BnActConv(nn.Module):
    """conv -> BN -> act -> conv, optionally with an in-place change between act and conv."""

    def __init__(self, act: nn.Module, poke: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = act
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.poke = poke

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv1(x)))
        if self.poke:
            x += 1.0  # in place after tagging: the recipe no longer describes x
        return self.conv2(x)


def grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def rel_error(a: dict, b: dict) -> float:
    num = sum((a[k] - b[k]).square().sum() for k in a)
    den = sum(b[k].square().sum() for k in b)
    return float((num / den).sqrt())


def row_bytes(report, name: str) -> int:
    return next((r.stored_bytes for r in report.rows if r.name == name), 0)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("act", "xhat_bits", "code_bits"), [(nn.SiLU(), 4, 3), (nn.ReLU(), 4, 1)], ids=["silu", "relu"]
)
def test_consumer_stores_nothing_and_the_bytes_go_to_precision(x, act, xhat_bits, code_bits):
    torch.manual_seed(0)
    model = qb.convert_model(BnActConv(act), "2bit-stochastic")
    grads(model, x)  # the first step learns that bn feeds a converted conv
    assert model.bn.qplan.shared_output
    report = qb.measure_saved_activations(model, x)
    assert row_bytes(report, "conv2") == 0  # rebuilt from bn's x̂: no bytes of its own
    plain = qb.measure_saved_activations(
        qb.convert_model(BnActConv(act), {"default": "2bit-stochastic", "share": False}), x
    )
    assert row_bytes(plain, "conv2") > 0
    # Every normalization keeps x̂ at 2b bits (normalized_spec), shared or not; a shared one
    # takes the wider of that and its sharing split (3 + 3 bits after a smooth activation).
    # The derivative code of a smooth activation between keeps its wider share (3 bits).
    assert row_bytes(report, "bn") == pytest.approx(row_bytes(plain, "bn") * xhat_bits / 4, rel=0.1)
    n = x.shape[0] * 8 * x.shape[2] * x.shape[3]
    assert row_bytes(report, "act") == pytest.approx(n * code_bits / 8, abs=2)
    assert report.stored_bytes <= plain.stored_bytes * 1.01


def test_measure_learns_sharing_on_a_fresh_model(x):
    report = qb.measure_saved_activations(
        qb.convert_model(BnActConv(nn.ReLU()), "2bit-stochastic"), x
    )
    assert row_bytes(report, "conv2") == 0


@pytest.mark.parametrize("act", [nn.SiLU(), nn.ReLU(inplace=True), nn.GELU(), nn.Identity()])
def test_shared_gradients_are_faithful_at_8_bits(x, act):
    torch.manual_seed(0)
    ref = BnActConv(act)
    exact = grads(ref, x)
    model = qb.convert_model(copy.deepcopy(ref), {"default": {"bits": 8}})
    grads(model, x)
    assert model.bn.qplan.shared_output
    assert rel_error(grads(model, x), exact) < 0.02


def test_sharing_is_exact_at_32_bits(x):
    torch.manual_seed(0)
    ref = BnActConv(nn.SiLU())
    exact = grads(ref, x)
    model = qb.convert_model(copy.deepcopy(ref), {"default": {"bits": 32}})
    for _ in range(2):
        got = grads(model, x)
    assert all(torch.equal(got[k], exact[k]) for k in exact)


def test_in_place_change_after_bn_disables_sharing(x):
    # A stale recipe would rebuild conv2's input without the +1: a large weight-gradient error.
    torch.manual_seed(0)
    ref = BnActConv(nn.Identity(), poke=True)
    exact = grads(ref, x)
    model = qb.convert_model(copy.deepcopy(ref), {"default": {"bits": 8}})
    for _ in range(2):
        got = grads(model, x)
    assert not model.bn.qplan.shared_output
    assert rel_error(got, exact) < 0.02


def test_dropout_between_bn_and_consumer_disables_sharing(x):
    torch.manual_seed(0)
    model = qb.convert_model(BnActConv(nn.Dropout(0.5)), "2bit-stochastic")
    grads(model, x)
    assert not model.bn.qplan.shared_output
    assert row_bytes(qb.measure_saved_activations(model, x), "conv2") > 0


def test_sharing_lowers_two_bit_gradient_error(x):
    torch.manual_seed(0)
    ref = BnActConv(nn.SiLU())
    exact = grads(ref, x)

    def mean_sq_error(share: bool) -> float:
        model = qb.convert_model(copy.deepcopy(ref), {"default": "2bit-stochastic", "share": share})
        grads(model, x)
        return sum(rel_error(grads(model, x), exact) ** 2 for _ in range(8)) / 8

    assert mean_sq_error(True) < 0.8 * mean_sq_error(False)


def test_squeeze_excite_product_is_shared():
    pytest.importorskip("timm")
    from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

    torch.manual_seed(0)
    block = InvertedResidual(16, 16, exp_ratio=4.0, se_layer=SqueezeExcite)
    model = qb.convert_model(block, "2bit-stochastic")
    x = torch.randn(4, 16, 8, 8)
    report = qb.measure_saved_activations(model, x)
    # conv_pwl's input is x * gate: rebuilt from what the SE multiply keeps.
    assert row_bytes(report, "conv_pwl") == 0
    assert row_bytes(report, "conv_dw") == 0  # rebuilt from bn1's x̂


def test_the_plan_is_made_at_conversion_and_revert_forgets_it(x):
    model = qb.convert_model(BnActConv(nn.SiLU()), "2bit-stochastic")
    assert model.bn.qplan.shared_output  # before any training step
    row = next(r for r in qb.conversion_report(model) if r.name == "bn")
    assert row.keeps == "x̂ at 4b, shared with conv2" and row.feeds == ("conv2",)
    assert model.bn.qplan.feeds == ("conv2",) and "shared with conv2" in repr(model)
    qb.convert_model(model, {"default": "4bit-stochastic", "share": False})
    assert not model.bn.qplan.shared_output
    grads(model, x)
    assert not model.bn.qplan.shared_output  # training steps never change the plan
    qb.convert_model(model, "4bit-stochastic")
    assert model.bn.qplan.shared_output
    qb.revert_model(model)
    assert "qplan" not in model.bn.__dict__ and "qbackprop_plan" not in model.__dict__
    assert not any(k.startswith("_qbackprop") for m in model.modules() for k in vars(m))


def test_share_must_be_a_bool():
    with pytest.raises(ConfigError, match="quant.share"):
        qb.QuantConfig.from_dict({"share": "yes"})


def test_sharing_survives_autocast_casts(x):
    torch.manual_seed(0)
    ref = BnActConv(nn.SiLU())
    model = qb.convert_model(copy.deepcopy(ref), {"default": {"bits": 8}})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = grads(ref, x)
        grads(model, x)
        assert model.bn.qplan.shared_output
        report = qb.measure_saved_activations(model, x)
        got = grads(model, x)
    # Only the bf16 copy of the weight, as torch keeps; the input is rebuilt from bn's x̂.
    assert row_bytes(report, "conv2") == model.conv2.weight.numel() * 2
    assert rel_error(got, exact) < 0.05


def test_two_bit_mix_shares_too(x):
    # x̂ widened to a 3/6 mix (4.5 bits expected) is finer than the conv's own 2/4 mix (3).
    model = qb.convert_model(BnActConv(nn.SiLU()), "2/4-mix")
    report = qb.measure_saved_activations(model, x)
    assert row_bytes(report, "conv2") == 0
    plain = qb.measure_saved_activations(
        qb.convert_model(BnActConv(nn.SiLU()), {"default": "2/4-mix", "share": False}), x
    )
    assert report.stored_bytes < plain.stored_bytes


def test_a_finer_consumer_keeps_its_own_copy(x):
    cfg = {"default": "2bit-stochastic", "layers": [{"match": "conv2", "bits": 8}]}
    model = qb.convert_model(BnActConv(nn.SiLU()), cfg)
    report = qb.measure_saved_activations(model, x)
    assert row_bytes(report, "conv2") > 0  # an 8-bit conv does not take a 3-bit x̂
    assert not model.bn.qplan.shared_output  # ... so bn does not widen for nothing


def test_non_affine_bn_and_a_second_backward(x):
    torch.manual_seed(0)
    ref = BnActConv(nn.SiLU())
    ref.bn = nn.BatchNorm2d(8, affine=False)
    exact = grads(ref, x)
    model = qb.convert_model(copy.deepcopy(ref), {"default": {"bits": 8}})
    grads(model, x)
    assert model.bn.qplan.shared_output
    model.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    loss.backward(retain_graph=True)  # the shared x̂ is rebuilt again for a second backward
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()
    second = {n: p.grad - first[n] for n, p in model.named_parameters()}
    assert rel_error(first, exact) < 0.02
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_activation_checkpointing_of_a_converted_block(x):
    # torch.utils.checkpoint reruns the forward in backward: recipes are rebuilt with it.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ref = BnActConv(nn.SiLU())
    exact = grads(ref, x)
    model = qb.convert_model(copy.deepcopy(ref), {"default": {"bits": 8}})
    grads(model, x)
    model.zero_grad(set_to_none=True)
    checkpoint(model, x, use_reentrant=False).square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert rel_error(got, exact) < 0.02


class _FailsOnce(nn.Module):
    """BnActConv whose forward raises on the planning batch (an input it does not accept)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = BnActConv(nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if x.shape[-1] != 16:
            raise RuntimeError("this model takes 16 px images")
        return out


def test_a_failed_planning_forward_commits_nothing_but_own_copies():
    model = _FailsOnce()
    with pytest.warns(UserWarning, match="sharing plan's forward failed"):
        qb.convert_model(model, "2bit-stochastic")
    # The forward ran up to the error and would have marked bn as shared: nothing of it stays.
    assert not model.inner.bn.qplan.shared_output
    assert qb.surgery.model_plan(model).structure.consumers == {}
    planned = qb.convert_model(
        _FailsOnce(), "2bit-stochastic", example_input=torch.randn(2, 3, 16, 16)
    )
    assert planned.inner.bn.qplan.feeds == ("inner.conv2",)


def test_a_users_example_input_that_fails_raises():
    with pytest.raises(RuntimeError, match="16 px"):
        qb.convert_model(_FailsOnce(), "2bit-stochastic", example_input=torch.randn(2, 3, 8, 8))


def test_replan_derives_plans_without_a_forward():
    model = qb.convert_model(BnActConv(nn.SiLU()), "2bit-stochastic")
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    qb.surgery.replan(model, {"conv2": None})
    assert not model.bn.qplan.shared_output and calls == []  # its only consumer is off
    qb.surgery.replan(model, {"conv2": qb.QuantSpec(bits=2)})
    assert model.bn.qplan.feeds == ("conv2",)


def test_a_traced_graph_keeps_the_unshared_width():
    model = qb.convert_model(BnActConv(nn.SiLU()), "2bit-stochastic")
    plan = model.bn.qplan
    # Eagerly x̂ is shared (it serves conv2 too); where nothing is shared it keeps its own width.
    assert plan.saved_spec(shares=True) == plan.saves
    assert plan.saved_spec(shares=False) == plan.alone
    assert plan.alone.bits == 4
