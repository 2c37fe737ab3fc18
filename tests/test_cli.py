"""The qbackprop CLI: every user mistake exits 2 with one line per problem and no traceback."""

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from qbackprop.cli import main

TINY = """\
model:
  name: test_efficientnet
  num_classes: 5
  input_size: [3, 32, 32]
quant:
  default:
    bits: 2
    rounding: stochastic
    bucket_size: 512
"""


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("qbackprop: error:") for line in lines)
    for needle in needles:
        assert needle in err, (needle, err)


def test_convert_json_reports_measured_ratio(tmp_path, capsys):
    cfg = _write(tmp_path, TINY)
    ckpt = tmp_path / "model.pt"
    code, out, err = _run(
        ["convert", cfg, "--batch-size", "4", "--json", "--save", str(ckpt)], capsys
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["fp32_bytes"] > data["converted_bytes"] > 0
    assert data["ratio"] == pytest.approx(data["fp32_bytes"] / data["converted_bytes"])
    assert any(row["converted"] for row in data["layers"])
    import timm

    plain = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    plain.load_state_dict(torch.load(ckpt))  # a plain, unconverted model loads the checkpoint


def test_convert_prints_plan(tmp_path, capsys):
    code, out, _ = _run(["convert", _write(tmp_path, TINY), "--batch-size", "2"], capsys)
    assert code == 0
    assert "conv_stem" in out and "2b stochastic" in out and "ratio" in out


def test_convert_says_when_training_retunes_the_plan(tmp_path, capsys):
    auto = TINY.replace("[3, 32, 32]", "[3, 24, 24]")
    auto += "train:\n  dataset: digits\n  retune_every: 50\n  retune_budget: 12x\n"
    code, out, _ = _run(["convert", _write(tmp_path, auto), "--batch-size", "2"], capsys)
    assert code == 0 and "re-tunes it every 50 steps to 12x" in out
    assert "example batch of 2x3x24x24" in out  # planned at the model's input size
    code, out, _ = _run(["convert", _write(tmp_path, TINY), "--batch-size", "2"], capsys)
    assert code == 0 and "re-tunes" not in out


def test_memory_table_and_plot(tmp_path, capsys):
    png = tmp_path / "mem.png"
    code, out, _ = _run(
        ["memory", _write(tmp_path, TINY), "--batch-size", "2", "--plot", str(png)], capsys
    )
    assert code == 0
    assert "stem" in out and "blocks.0" in out and "total" in out
    assert png.exists() and png.stat().st_size > 1000
    code, out, _ = _run(["memory", _write(tmp_path, TINY), "--by", "layer", "--json"], capsys)
    assert code == 0 and json.loads(out)["by"] == "layer"


def test_validate_ok(tmp_path, capsys):
    code, out, _ = _run(["validate", _write(tmp_path, TINY)], capsys)
    assert code == 0 and "OK" in out


def test_validate_checks_the_train_section_when_there_is_one(tmp_path, capsys):
    code, _, err = _run(["validate", _write(tmp_path, TINY + "train:\n  epocs: 3\n")], capsys)
    _assert_user_error(code, err, "train.epocs", 'did you mean "epochs"')
    code, out, _ = _run(
        ["validate", _write(tmp_path, TINY + "train:\n  dataset: synthetic\n")], capsys
    )
    assert code == 0 and "OK" in out


def test_cli_leaves_the_process_warnings_filters_alone(tmp_path, capsys):
    nothing = TINY + '  layers:\n    - match: "*"\n      enabled: false\n'
    for text in (TINY, nothing):  # the second converts nothing: its warning is silenced, scoped
        before = list(warnings.filters)
        code, _, err = _run(["convert", _write(tmp_path, text), "--batch-size", "2"], capsys)
        assert code == 0, err
        assert list(warnings.filters) == before


BAD_QUANT = [
    ("bits: 0", "quant.default.bits"),
    ("bits: 33", "quant.default.bits"),
    ("bits: two", "quant.default.bits"),
    ("rounding: round", "quant.default.rounding"),
    ("mix_bits: 4\n    mix_prob: 1.5", "mix_prob"),
    ("mix_bits: 4", "mix_prob"),
    ("bucket_size: 0", "quant.default.bucket_size"),
    ("bucket_size: -4", "quant.default.bucket_size"),
    ("bitz: 2", "bitz"),
]


@pytest.mark.parametrize("line, key", BAD_QUANT)
def test_bad_quant_values_exit_2(tmp_path, capsys, line, key):
    text = f"model:\n  name: test_efficientnet\nquant:\n  default:\n    {line}\n"
    code, _, err = _run(["convert", _write(tmp_path, text)], capsys)
    _assert_user_error(code, err, key)


def test_misspelled_key_suggests(tmp_path, capsys):
    text = "model:\n  name: test_efficientnet\nquant:\n  default:\n    bitz: 2\n"
    code, _, err = _run(["validate", _write(tmp_path, text)], capsys)
    _assert_user_error(code, err, 'did you mean "bits"')


def test_all_problems_reported_at_once(tmp_path, capsys):
    text = "model:\n  name: test_efficientnet\nquant:\n  default:\n    bits: 0\n    rounding: up\n"
    code, _, err = _run(["convert", _write(tmp_path, text)], capsys)
    _assert_user_error(code, err, "bits", "rounding")
    assert len(err.strip().splitlines()) >= 2


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("model: [1\n", "line"),
        ("modle:\n  name: resnet18\nquant: {default: {bits: 2}}\n", "modle"),
        (
            "model:\n  name: efficientnetv2_rw_tt\nquant: {default: {bits: 2}}\n",
            "efficientnetv2_rw_t",
        ),
        (
            "model:\n  name: resnet18\n  input_size: [3, 32]\nquant: {default: {bits: 2}}\n",
            "input_size",
        ),
        (TINY + "  layers:\n    - match: blocks.99.*\n      bits: 8\n", "blocks.99"),
    ],
)
def test_file_and_model_errors_exit_2(tmp_path, capsys, text, needle):
    code, _, err = _run(["convert", _write(tmp_path, text)], capsys)
    _assert_user_error(code, err, needle)


def test_yaml_syntax_error_has_line_and_column(tmp_path, capsys):
    code, _, err = _run(["validate", _write(tmp_path, "quant:\n  default: {bits: 2\n")], capsys)
    _assert_user_error(code, err, "line", "column")


def test_missing_file_exit_2(tmp_path, capsys):
    code, _, err = _run(["convert", str(tmp_path / "nope.yaml")], capsys)
    _assert_user_error(code, err, "nope.yaml")


def test_usage_errors_exit_2(capsys):
    code, _, err = _run(["convert"], capsys)
    _assert_user_error(code, err, "config")
    code, _, err = _run(["frobnicate"], capsys)
    _assert_user_error(code, err, "frobnicate")


def test_bad_batch_size_and_input_size(tmp_path, capsys):
    cfg = _write(tmp_path, TINY)
    code, _, err = _run(["convert", cfg, "--batch-size", "0"], capsys)
    _assert_user_error(code, err, "--batch-size")
    code, _, err = _run(["convert", cfg, "--input-size", "3", "0", "32"], capsys)
    _assert_user_error(code, err, "--input-size")


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "convert" in out and "memory" in out
    for sub in ["convert", "memory", "validate"]:
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        assert "example" in capsys.readouterr().out


def test_console_script_version():
    out = subprocess.run(
        [sys.executable, "-m", "qbackprop", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("qbackprop ")
