"""``qbackprop tune``: the budget parser, the solver, the tuned config and the command."""

import json

import pytest
import timm
import torch
import yaml

import qbackprop as qb
from qbackprop.cli import main
from qbackprop.config import QuantConfig
from qbackprop.errors import QbackpropUserError
from qbackprop.tune import Budget, noise_table, parse_budget, solve, tune


def test_parse_budget_kinds_and_errors():
    assert parse_budget("2.1") == Budget("bits", 2.1)
    assert parse_budget(3) == Budget("bits", 3.0)
    assert parse_budget("15x") == Budget("ratio", 15.0)
    assert parse_budget(" 24MiB ") == Budget("mib", 24.0)
    assert Budget("ratio", 4).bytes(1000, 250) == 250
    assert Budget("bits", 2).bytes(1000, 250) == 62.5
    for bad in ("", "abc", "-2", "0x", "2 GB"):
        with pytest.raises(ValueError, match="expected average bits"):
            parse_budget(bad)


def _tables(sensitivity, per_bit=100):
    # bytes grow `per_bit` per bit (plus 10 of metadata); noise as GACT's C·4^-b
    table = {n: {k: 10 + per_bit * k for k in range(1, 9)} for n in sensitivity}
    noise = {n: noise_table(c * 4.0**-2, table[n], 8 * per_bit) for n, c in sensitivity.items()}
    return table, noise


def test_solver_meets_the_budget_exactly_and_gives_sensitive_layers_more_bits():
    sensitivity = {"a": 1.0, "b": 10.0, "c": 100.0, "d": 1000.0}
    table, noise = _tables(sensitivity)
    budget = sum(table[n][3] for n in table) + 37  # between widths: one layer gets a mix
    bits = solve(noise, table, budget)
    used = sum(
        table[n][int(b)] + (b - int(b)) * (table[n][min(int(b) + 1, 8)] - table[n][int(b)])
        for n, b in bits.items()
    )
    assert used == pytest.approx(budget)
    order = [bits[n] for n in ("a", "b", "c", "d")]
    assert order == sorted(order) and order[0] < order[-1]  # monotone in the sensitivity
    assert sum(b != int(b) for b in bits.values()) <= 1  # at most one two-bit mix
    # 10x the noise is worth log4(10) ≈ 1.66 more bits
    assert bits["d"] - bits["a"] == pytest.approx(3 * 1.66, abs=1.0)


def test_solver_refuses_a_budget_below_one_bit_everywhere():
    table, noise = _tables({"a": 1.0, "b": 2.0})
    with pytest.raises(ValueError, match="below every layer at 1 bit"):
        solve(noise, table, sum(table[n][1] for n in table) - 1)


def test_noise_table_reads_the_stored_width_off_the_bytes():
    flat = noise_table(1.0, {k: 500 for k in range(1, 9)}, 800)  # a 1-bit mask: no change
    assert set(flat.values()) == {1.0}
    double = noise_table(1.0, {k: 200 * k for k in range(1, 9)}, 800)  # x̂ at 2·b bits
    assert double[3] == pytest.approx(1 / 16)


def _digits(n=5, batch=8):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[: n * batch], dtype=torch.float32)[:, None] / 16
    x = torch.nn.functional.interpolate(x, size=16).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target[: n * batch])
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n * batch, batch)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10)


def test_tune_fits_the_measured_budget_and_the_config_round_trips(tiny):
    batches = _digits()
    result = tune(tiny, "2bit-stochastic", batches, "6x", fidelity_draws=1)
    assert abs(result.measured_bytes - result.budget_bytes) <= 0.02 * result.budget_bytes
    converted = qb.convert_model(
        __import__("copy").deepcopy(tiny), result.config, example_input=batches[0][0][:2]
    )
    assert qb.measure_saved_activations(converted, batches[0][0]).stored_bytes == pytest.approx(
        result.measured_bytes, rel=0.001
    )
    again = QuantConfig.from_dict(result.to_yaml_dict())
    assert again == result.config
    assert result.layers and all(1 <= c.average_bits <= 8 for c in result.layers)
    assert result.measured_ratio is not None and result.measured_ratio > 0


def test_tune_budget_above_fp32_converts_nothing_and_infeasible_is_an_error(tiny):
    batches = _digits(3)
    result = tune(tiny, "2bit-stochastic", batches, "0.5x", fidelity_draws=0)
    assert "nothing is converted" in result.note
    assert not result.config.default.enabled or result.config.default.bits == 32
    with pytest.raises(QbackpropUserError, match="cannot be met"):
        tune(tiny, "2bit-stochastic", batches, "0.5", fidelity_draws=0)


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
FAST = ["--warmup-steps", "2", "--batch-size", "8", "--draws", "1"]


def test_cli_writes_a_config_that_convert_accepts(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "tuned.yaml"
    png = tmp_path / "bits.png"
    code = main(["tune", str(cfg), "--budget", "6x", "--out", str(out), "--plot", str(png), *FAST])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "measured" in printed and out.exists() and png.stat().st_size > 0
    assert main(["convert", str(out)]) == 0
    capsys.readouterr()
    assert main(["tune", str(cfg), "--budget", "6x", "--json", *FAST]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"budget_bytes", "measured_bytes", "layers", "quant"} <= set(data)


def test_cli_bad_budget_exits_2(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    code = main(["tune", str(cfg), "--budget", "lots", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "--budget='lots'" in err


def test_train_retune_every_rechooses_bits_in_place(tmp_path):
    from qbackprop.surgery import converted_config
    from qbackprop.train.engine import train
    from qbackprop.train.metrics import read_metrics

    result = train(_retune_config(1, retune_every=1), tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [int(r["retunes"]) for r in rows] == [2]  # 2 steps, one re-tune after each
    tuned = converted_config(result.model)
    assert len(tuned.layers) > 0  # one explicit rule per tuned layer
    assert {r.overrides for r in tuned.layers} != {(("bits", 2),)}  # not all left at 2 bits
    assert float(rows[0]["train_loss"]) == float(rows[0]["train_loss"])  # finite, not NaN


def test_cli_overrides_reach_the_run_and_the_tuned_file(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "tuned.yaml"
    args = [
        "tune",
        str(cfg),
        "--budget",
        "6x",
        "--out",
        str(out),
        *FAST,
        "model.input_size=[3,8,8]",
    ]
    assert main(args) == 0, capsys.readouterr().err
    written = yaml.safe_load(out.read_text())
    assert written["model"]["input_size"] == [3, 8, 8]
    assert "model.input_size=[3,8,8]" in out.read_text().splitlines()[0]
    code = main(["fidelity", str(cfg), *FAST, "train.lr=oops"])
    err = capsys.readouterr().err
    assert code == 2 and "train.lr" in err and "Traceback" not in err


def _retune_config(epochs: int, **train):
    from qbackprop.train.config import run_config_from_dict

    raw = {
        "model": {"name": "test_resnet", "input_size": [3, 16, 16]},
        "quant": {"default": {"bits": 2}},
        "train": {
            "dataset": "synthetic",
            "num_samples": 32,
            "image_size": 16,
            "batch_size": 16,
            "epochs": epochs,
            "device": "cpu",
            "retune_every": 2,
            **train,
        },
    }
    return run_config_from_dict(raw, source="retune.yaml")


def test_resume_restores_the_retuned_plan(tmp_path):
    """A re-tuned plan is in the checkpoint: a run resumed after a re-tune goes on with the
    tuned bits (the same metrics as an uninterrupted run), not with the configured ones."""
    from qbackprop.surgery import converted_config
    from qbackprop.train.engine import train
    from qbackprop.train.metrics import read_metrics

    whole = train(_retune_config(2), tmp_path / "whole", progress=False)
    train(_retune_config(1), tmp_path / "split", progress=False)
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert state["tuned_quant"] is not None  # re-tuned after step 2, the end of epoch 1
    resumed = train(_retune_config(2), tmp_path / "split", resume=True, progress=False)
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    for key in ("train_loss", "test_loss", "saved_activation_bytes"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert converted_config(resumed.model) == converted_config(whole.model)


def test_retune_budget_sets_the_bytes_a_retune_keeps(tmp_path):
    from qbackprop.train.engine import train
    from qbackprop.train.metrics import read_metrics

    train(_retune_config(1, retune_budget="4x"), tmp_path / "loose", progress=False)
    train(_retune_config(1, retune_budget="12x"), tmp_path / "tight", progress=False)
    (loose,), (tight,) = read_metrics(tmp_path / "loose"), read_metrics(tmp_path / "tight")
    ratio = lambda r: float(r["fp32_activation_bytes"]) / float(r["saved_activation_bytes"])  # noqa: E731
    assert ratio(tight) >= 11.0 and ratio(loose) < ratio(tight)


def test_convert_shows_the_plan_a_run_retuned_to(tmp_path, capsys):
    from qbackprop.train.engine import train

    config = _retune_config(1, retune_budget="12x")
    train(config, tmp_path / "run", progress=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["convert", str(cfg), "--json"]) == 0
    configured = json.loads(capsys.readouterr().out)
    assert main(["convert", str(cfg), "--json", "--checkpoint", str(tmp_path / "run")]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert "re-tuned bits" in tuned["run_plan"] and configured["run_plan"] is None
    assert tuned["ratio"] > configured["ratio"]  # 12x, where the configured 2 bits keep less
    assert [r["spec"] for r in tuned["layers"]] != [r["spec"] for r in configured["layers"]]
