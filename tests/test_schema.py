"""The config schema: declared once, read by validation, `qbackprop schema` and docs/config.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qbackprop.cli import main
from qbackprop.cli.schema import SECTIONS, render_markdown, rows
from qbackprop.errors import ConfigError
from qbackprop.schema import Problem, check_mapping, options
from qbackprop.train.config import run_config_from_dict

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_docs_config_md_is_current():
    expected = render_markdown(list(SECTIONS))
    actual = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert actual == expected, "docs/config.md is stale: run `make docs`"


def test_schema_prints_every_key_type_default_and_allowed(capsys):
    code, out, _ = _run(["schema", "train"], capsys)
    assert code == 0
    assert "train.epochs: int = 50" in out and "allowed: adamw | sgd" in out
    assert "train.grad_clip_norm: number or null = 1.0" in out
    printed = {line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  t")}
    assert printed == {f"train.{f.name}" for f in options(SECTIONS["train"][0])}
    code, out, _ = _run(["schema", "quant.default"], capsys)
    assert "quant.default.bits: int = 2" in out and "nearest | stochastic" in out


def test_schema_markdown_has_one_row_per_key(capsys):
    code, out, _ = _run(["schema", "model", "--markdown"], capsys)
    assert code == 0
    table = [line for line in out.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == ["name", "num_classes", "input_size", "kwargs"]
    assert "| `num_classes` | int | `10` | an int >= 1 |" in out


def test_schema_unknown_section_exits_2_with_suggestion(capsys):
    code, _, err = _run(["schema", "trian"], capsys)
    assert code == 2 and 'did you mean "train"?' in err and "Traceback" not in err


@pytest.mark.parametrize("section", [s for s in SECTIONS if s != "quant.layers"])
def test_every_documented_default_is_accepted_and_unknown_keys_refused(section):
    # what the docs list is what validation reads: the defaults pass, a stray key does not
    cls, _ = SECTIONS[section]
    given = {f.name: f.default for f in options(cls) if f.default is not dataclasses.MISSING}
    required = {"name": "digits", "start": 0.5, "end": 0.5}  # DataSpec, MixProbSchedule
    given.update(
        {k: v for k, v in required.items() if k in {f.name for f in options(cls)} - set(given)}
    )
    values, problems = check_mapping(cls, given, "x")
    assert problems == [], problems
    _, problems = check_mapping(cls, {**given, "bogus_key": 1}, "x")
    assert [p.key for p in problems] == ["x.bogus_key"]
    assert len(rows(section)) == len(options(cls))


def test_problems_are_structured_and_marked_by_their_override():
    raw = {"model": {"name": "test_efficientnet"}, "quant": {"default": {"bits": 2}}}
    with pytest.raises(ConfigError) as exc:
        run_config_from_dict(raw, source="r.yaml", overrides=["train.momentum=2"])
    (problem,) = exc.value.details
    assert isinstance(problem, Problem)
    assert (problem.key, problem.value, problem.expected) == (
        "train.momentum",
        2,
        "a number in [0, 1]",
    )
    assert str(problem).endswith("(set by override train.momentum)")


def test_override_keys_are_checked_below_sections_too():
    raw = {"model": {"name": "test_efficientnet"}, "quant": {"default": {"bits": 2}}}
    with pytest.raises(ConfigError) as exc:
        run_config_from_dict(raw, overrides=["train.mix_prob_schedule.strt=0.2"])
    assert 'did you mean "train.mix_prob_schedule.start"?' in exc.value.problems[0]
    cfg = run_config_from_dict(raw, overrides=["quant.layers=[{match: 'conv_stem', bits: 8}]"])
    cfg2 = run_config_from_dict(
        {**raw, "quant": {"default": {"bits": 2}, "layers": [{"match": "conv_stem", "bits": 4}]}},
        overrides=["quant.layers.0.bits=8"],
    )
    assert cfg.quant.layers == cfg2.quant.layers
