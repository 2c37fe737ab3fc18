"""Gradient fidelity: measure_fidelity's metric, groups and verdict, and `qbackprop fidelity`."""

import copy
import json
import math
import textwrap

import pytest
import timm
import torch
from torch import nn

import qbackprop
from qbackprop import FidelityReport, measure_fidelity
from qbackprop.cli import main
from qbackprop.fidelity import GROUP_THRESHOLD
from qbackprop.layers.registry import QuantizedModule
from qbackprop.surgery import conversion_report, convert_model
from qbackprop.train.checkpoint import save_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and a busy 2-core machine makes OpenMP's
    # barriers spin for seconds per step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def _batches(count=5, size=8, side=8):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, side, side, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(count)
    ]


def _measure(cfg, model=None, **kwargs) -> FidelityReport:
    torch.manual_seed(0)
    return measure_fidelity(model or _tiny(), cfg, kwargs.pop("batches", _batches()), **kwargs)


# --- the metric ----------------------------------------------------------------------------------


def test_full_precision_adds_no_noise():
    report = _measure({"default": {"bits": 32}}, draws=2)
    assert report.ratio < 1e-6 and report.bias < 1e-6
    assert report.groups and all(row.ratio < 1e-6 for row in report.groups)
    assert report.verdict[0].startswith("ok: compression adds")


def test_two_bit_stochastic_noisier_than_eight_bit_nearest():
    low = _measure("2bit-stochastic", draws=4)
    high = _measure("8bit-nearest", draws=4)
    assert low.ratio > high.ratio > 0
    assert low.bias >= 0 and high.bias >= 0


def test_bias_of_the_mean_against_ideal():
    # nearest rounding draws the same gradient every time: the mean is as far off as one draw
    nearest = _measure("8bit-nearest", draws=4)
    assert nearest.bias == pytest.approx(nearest.ideal_bias * math.sqrt(4), rel=1e-6)
    # stochastic rounding is unbiased: averaging K draws shrinks the error about sqrt(K)-fold
    stochastic = _measure("2bit-stochastic", draws=8)
    assert 0 < stochastic.bias < 2 * stochastic.ideal_bias


def test_minibatch_variance_is_the_fp32_gradient_spread():
    model, batches = _tiny(), _batches(4)
    report = measure_fidelity(model, "2bit-stochastic", batches[:1], minibatch_batches=batches[1:])
    grads = []
    for x, y in batches[1:]:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    stacked = torch.stack(grads)
    expected = (stacked - stacked.mean(0)).square().sum(1).mean().item()
    assert report.minibatch_variance == pytest.approx(expected, rel=1e-5)


def test_model_passed_in_is_not_modified():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_fidelity(model, "2bit-stochastic", _batches(3), draws=2, by="layer")
    assert not any(isinstance(m, QuantizedModule) for m in model.modules())
    assert conversion_report(model) == [] and not model._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included


def test_too_few_batches_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="at least 2 batches"):
        measure_fidelity(_tiny(), "2bit-stochastic", _batches(1))
    with pytest.raises(ValueError, match="by='blocks'"):
        measure_fidelity(_tiny(), "2bit-stochastic", _batches(3), by="blocks")
    with pytest.raises(ValueError, match="draws=0"):
        measure_fidelity(_tiny(), "2bit-stochastic", _batches(3), draws=0)


# --- groups and verdict --------------------------------------------------------------------------


def test_family_groups_are_the_converted_families_plus_fallback():
    report = _measure("2bit-stochastic", draws=2)
    # AdaptiveAvgPool2d is not converted: no pool row
    assert [row.name for row in report.groups] == [
        "conv", "linear", "batchnorm", "activation", "fallback"
    ]  # fmt: skip
    assert all(row.family == row.name for row in report.groups)
    assert all(row.ratio >= 0 for row in report.groups)
    fp32 = _measure("fp32", draws=1)  # nothing compressed: no fallback hooks, so no fallback row
    assert "fallback" not in [row.name for row in fp32.groups]


def test_block_and_layer_groups_follow_the_model():
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    batches = _batches(3, side=16)
    report = _measure("2bit-stochastic", model, batches=batches, draws=1, by="block")
    plan = conversion_report(convert_model(copy.deepcopy(model), "2bit-stochastic"))
    blocks = [
        ".".join(r.name.split(".")[:2]) if r.name.startswith("blocks.") else r.name.split(".")[0]
        for r in plan
        if r.converted
    ]
    assert [row.name for row in report.groups] == [*dict.fromkeys(blocks), "fallback"]
    assert {"conv_stem", "blocks.3", "classifier"} <= {row.name for row in report.groups}
    families = {row.name: row.family for row in report.groups}
    assert families["conv_stem"] == "conv" and families["blocks.3"] == "mixed"

    layers = _measure("2bit-stochastic", _tiny(), draws=1, by="layer")
    assert [row.name for row in layers.groups] == ["0", "1", "2", "3", "4", "5", "8", "fallback"]


def test_verdict_warns_per_group_above_threshold_with_a_rule():
    report = _measure({"default": {"bits": 1}}, draws=2)
    warned = [line for line in report.verdict if line.startswith("warning:")]
    loud = {row.name for row in report.groups if row.ratio > GROUP_THRESHOLD}
    assert loud and len(warned) == len(loud) + (report.ratio > 1)
    for name in loud:
        line = next(w for w in warned if w.startswith(f"warning: {name} alone"))
        assert "x the SGD noise; try bits: 2 there" in line
        assert f'{{match: "*", type: [{name}], bits: 2}}' in line
    assert not any(line.startswith("ok:") for line in report.verdict)


def test_as_dict_is_json():
    report = _measure("2bit-stochastic", draws=2)
    data = json.loads(json.dumps(report.as_dict()))
    assert data["ratio"] == pytest.approx(report.ratio) and data["bias"] >= 0
    assert data["draws"] == 2 and data["verdict"] == list(report.verdict)
    assert [set(g) for g in data["groups"]] == [{"name", "family", "ratio"}] * len(report.groups)
    assert "measure_fidelity" in qbackprop.__all__ and "FidelityReport" in qbackprop.__all__


def test_progress_bar_goes_to_stderr(capsys):
    _measure("2bit-stochastic", draws=1, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "gradient fidelity" in err


# --- the CLI -------------------------------------------------------------------------------------

CONFIG = """\
model:
  name: test_resnet
  input_size: [3, 16, 16]
quant:
  default: 2bit-stochastic
train:
  dataset: digits
  device: cpu
"""
FAST = ["--warmup-steps", "2", "--draws", "2", "--batch-size", "8"]


def _config(tmp_path, text=CONFIG):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def _user_error(code, err, *needles):
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("qbackprop: error:") for line in lines)
    for needle in needles:
        assert needle in err, (needle, err)


def test_cli_json_is_one_object(tmp_path, capsys):
    code = main(["fidelity", _config(tmp_path), "--json", *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)  # the whole of stdout
    assert {"ratio", "bias", "groups", "verdict"} <= set(data)
    assert data["ratio"] > 0 and data["draws"] == 2
    assert "conv" in [g["name"] for g in data["groups"]]


def test_cli_table_and_plot(tmp_path, capsys):
    png = tmp_path / "fidelity.png"
    code = main(["fidelity", _config(tmp_path), *FAST, "--by", "block", "--plot", str(png)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "layer1.0" in out and "total" in out and "bias:" in out
    assert any(line.startswith(("ok:", "warning:")) for line in out.splitlines())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_cli_loads_a_train_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    save_checkpoint({"epoch": 1, "model": model.state_dict()}, tmp_path / "checkpoint.pt")
    code = main(["fidelity", _config(tmp_path), *FAST, "--checkpoint", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert str(tmp_path) in out and "warm-up" not in out


def test_cli_bad_config_key_exits_2(tmp_path, capsys):
    cfg = _config(tmp_path, CONFIG.replace("  device: cpu", "  devcie: cpu"))
    code = main(["fidelity", cfg, *FAST])
    _user_error(code, capsys.readouterr().err, "train.devcie", 'did you mean "device"')


def test_cli_missing_or_bad_checkpoint_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope" / "checkpoint.pt"
    code = main(["fidelity", _config(tmp_path), *FAST, "--checkpoint", str(missing)])
    _user_error(code, capsys.readouterr().err, str(missing))
    other = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    code = main(["fidelity", _config(tmp_path), *FAST, "--checkpoint", str(tmp_path / "other.pt")])
    _user_error(code, capsys.readouterr().err, "other.pt", "does not fit the model")
