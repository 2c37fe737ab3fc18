"""QuantConfig: rule precedence, dict/YAML round trips, and error reports."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from qbackprop.config import (
    FAMILIES,
    SCHEMA_VERSION,
    TOP_LEVEL_KEYS,
    LayerRule,
    QuantConfig,
    as_quant_config,
    load_config,
    load_yaml_file,
)
from qbackprop.errors import ConfigError
from qbackprop.quant.spec import QuantSpec, Rounding

BITS_ALLOWED = "expected an integer from 1 to 32 (32 = full precision)"


def problems_of(d, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        QuantConfig.from_dict(d, **kwargs)
    return info.value.problems


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- precedence: one test per rule ---------------------------------------------------------------


def test_first_matching_rule_wins():
    cfg = QuantConfig(
        default=QuantSpec(bits=2),
        layers=(
            LayerRule("blocks.1.conv", overrides={"bits": 8}),
            LayerRule("blocks.*", overrides={"bits": 4}),
        ),
    )
    assert cfg.spec_for("blocks.1.conv", "conv").bits == 8
    assert cfg.spec_for("blocks.2.conv", "conv").bits == 4


def test_type_filter_skips_other_families():
    cfg = QuantConfig(
        layers=(LayerRule("blocks.*", type=["conv", "batchnorm"], overrides={"bits": 8}),)
    )
    assert cfg.spec_for("blocks.0.bn", "batchnorm").bits == 8
    assert cfg.spec_for("blocks.0.act", "activation") == cfg.default


def test_unspecified_keys_inherit_default():
    default = QuantSpec(bits=2, bucket_size=128, scale="absmax", mix_bits=4, mix_prob=0.3)
    cfg = QuantConfig(
        default=default, layers=(LayerRule("head", overrides={"rounding": "nearest"}),)
    )
    assert cfg.spec_for("head", "linear") == default.replace(rounding=Rounding.NEAREST)


def test_enabled_false_disables_compression():
    cfg = QuantConfig(layers=(LayerRule("classifier", enabled=False, overrides={"bits": 8}),))
    assert cfg.spec_for("classifier", "linear") is None


def test_no_matching_rule_gives_default():
    cfg = QuantConfig(
        default=QuantSpec(bits=3), layers=(LayerRule("conv_stem", overrides={"bits": 8}),)
    )
    assert cfg.spec_for("blocks.0.conv", "conv") == QuantSpec(bits=3)


def test_spec_for_caches_and_rejects_unknown_family():
    cfg = QuantConfig(layers=(LayerRule("a*", overrides={"bits": 8}),))
    assert cfg.spec_for("ab", "conv") is cfg.spec_for("ab", "conv")
    with pytest.raises(ValueError, match="convolution"):
        cfg.spec_for("ab", "convolution")


def test_layer_rule_normalises_type_and_overrides():
    rule = LayerRule("x", type="conv", overrides={"rounding": Rounding.NEAREST, "bits": 8})
    assert rule.type == ("conv",)
    assert rule == LayerRule("x", type=("conv",), overrides=[("bits", 8), ("rounding", "nearest")])
    assert hash(rule) == hash(
        LayerRule("x", type=["conv"], overrides={"bits": 8, "rounding": "nearest"})
    )


def test_layer_rule_rejects_bad_fields():
    with pytest.raises(ConfigError) as info:
        LayerRule("", type="cnv", overrides={"bitz": 8})
    text = str(info.value)
    assert "LayerRule.match=''" in text
    assert "LayerRule.type='cnv'" in text and 'did you mean "conv"' in text
    assert 'LayerRule.overrides.bitz: unknown key; did you mean "bits"?' in text


def test_quant_config_checks_rule_overrides_against_default():
    with pytest.raises(ConfigError, match=r"quant\.layers\[0\]\.bits=0"):
        QuantConfig(layers=(LayerRule("x", overrides={"bits": 0}),))
    # mix_bits alone is fine when the default already sets mix_prob
    cfg = QuantConfig(
        default=QuantSpec(mix_bits=4, mix_prob=0.5),
        layers=(LayerRule("x", overrides={"mix_bits": 8}),),
    )
    assert cfg.spec_for("x", "conv").mix_bits == 8


# --- dicts and YAML ------------------------------------------------------------------------------

FULL = {
    "default": {
        "bits": 2,
        "rounding": "stochastic",
        "bucket_size": 256,
        "mix_bits": 4,
        "mix_prob": 0.3,
    },
    "layers": [
        {"match": "conv_stem", "bits": 8},
        {"match": "blocks.5.*", "type": ["conv", "batchnorm"], "rounding": "nearest"},
        {"match": "blocks.6.*", "preset": "4bit-nearest", "bucket_size": "tensor"},
        {"match": "classifier", "enabled": False},
    ],
    "fallback": False,
    "allow_unmatched": True,
    "fallback_min_numel": 4096,
}


def test_from_dict_reads_every_key():
    cfg = QuantConfig.from_dict(FULL)
    assert cfg.default == QuantSpec(bits=2, bucket_size=256, mix_bits=4, mix_prob=0.3)
    assert (cfg.fallback, cfg.allow_unmatched, cfg.fallback_min_numel) == (False, True, 4096)
    assert cfg.spec_for("conv_stem", "conv") == cfg.default.replace(bits=8)
    assert cfg.spec_for("blocks.5.conv", "conv").rounding == Rounding.NEAREST
    assert cfg.spec_for("classifier", "linear") is None


def test_rule_preset_replaces_default_and_explicit_keys_win():
    cfg = QuantConfig.from_dict(FULL)
    assert cfg.spec_for("blocks.6.conv", "conv") == QuantSpec.preset("4bit-nearest").replace(
        bucket_size="tensor"
    )  # no mix_bits inherited from the default


def test_default_may_be_a_preset_name():
    cfg = QuantConfig.from_dict({"default": "2/4-mix"})
    assert cfg.default == QuantSpec.preset("2/4-mix")


def test_round_trip_to_dict_from_dict():
    cfg = QuantConfig.from_dict(FULL)
    out = cfg.to_dict()
    assert out["schema_version"] == SCHEMA_VERSION
    assert QuantConfig.from_dict(out) == cfg
    assert QuantConfig.from_dict(QuantConfig().to_dict()) == QuantConfig()


def test_round_trip_through_yaml_text(tmp_path):
    cfg = QuantConfig.from_dict(FULL)
    path = write(tmp_path, yaml.safe_dump({"quant": cfg.to_dict()}))
    assert load_config(path) == cfg


def test_load_config_reads_quant_section_of_full_file(tmp_path):
    path = write(
        tmp_path,
        """\
model:
  name: efficientnetv2_rw_t
  num_classes: 10
quant:
  default:
    bits: 2
    rounding: stochastic
  layers:
    - match: "conv_stem"
      bits: 8
    - match: "classifier"
      enabled: false
  fallback: true
train:
  epochs: 1
""",
    )
    cfg = load_config(path)
    assert cfg.spec_for("conv_stem", "conv").bits == 8
    assert cfg.spec_for("classifier", "linear") is None
    assert set(load_yaml_file(path)) == set(TOP_LEVEL_KEYS)


def test_load_config_accepts_bare_quant_section(tmp_path):
    path = write(tmp_path, "default: {bits: 4}\nlayers: [{match: head, bits: 8}]\n")
    cfg = load_config(path)
    assert cfg.default.bits == 4 and cfg.spec_for("head", "linear").bits == 8


def test_bare_quant_section_errors_use_top_level_key_paths(tmp_path):
    path = write(tmp_path, "default: {bits: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: default.bits=0 is not allowed; " + BITS_ALLOWED]


def test_as_quant_config_accepts_every_form(tmp_path):
    cfg = QuantConfig.from_dict(FULL)
    path = write(tmp_path, yaml.safe_dump({"quant": cfg.to_dict()}))
    assert as_quant_config(cfg) is cfg
    assert as_quant_config(FULL) == cfg
    assert as_quant_config({"quant": FULL, "model": {}}) == cfg
    assert as_quant_config(path) == cfg and as_quant_config(str(path)) == cfg
    assert as_quant_config("2bit-stochastic") == QuantConfig(
        default=QuantSpec.preset("2bit-stochastic")
    )
    assert as_quant_config(QuantSpec(bits=4)).default.bits == 4


def test_as_quant_config_rejects_unknown_strings_and_types():
    with pytest.raises(ConfigError, match="neither a preset"):
        as_quant_config("2bit-stochastc")
    with pytest.raises(TypeError):
        as_quant_config(3)


# --- validation errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("default", "expected"),
    [
        (
            {"bits": "two"},
            "quant.default.bits='two' is not allowed; expected an integer from 1 to 32",
        ),
        ({"bits": 0}, "quant.default.bits=0 is not allowed"),
        ({"bits": 33}, "quant.default.bits=33 is not allowed"),
        ({"bits": 2.0}, "quant.default.bits=2.0 is not allowed"),
        (
            {"rounding": "round"},
            "quant.default.rounding='round' is not allowed; expected nearest | stochastic",
        ),
        (
            {"mix_bits": 4, "mix_prob": 1.5},
            "quant.default.mix_prob=1.5 is not allowed; expected a number in [0, 1]",
        ),
        ({"mix_bits": 4}, "quant.default.mix_bits is set but mix_prob is not"),
        ({"bucket_size": 0}, "quant.default.bucket_size=0 is not allowed"),
        ({"bucket_size": -4}, "quant.default.bucket_size=-4 is not allowed"),
        (
            {"storage": "disk"},
            "quant.default.storage='disk' is not allowed; expected packed | on_backward",
        ),
        ("2bit", "quant.default='2bit' is not allowed; expected a preset name (2bit-stochastic, "),
        ([2], "quant.default=[2] is not allowed; expected a mapping"),
    ],
)
def test_bad_default_names_file_key_value_and_allowed(default, expected):
    problems = problems_of({"default": default}, source="run.yaml")
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"run.yaml: {expected}")


@pytest.mark.parametrize(
    ("quant", "expected"),
    [
        ({"layers": [{"bits": 8}]}, 'quant.layers[0]: missing required key "match"'),
        ({"layers": [{"match": 3}]}, "quant.layers[0].match=3 is not allowed"),
        ({"layers": [{"match": "x", "type": "cnv"}]}, "quant.layers[0].type='cnv' is not allowed"),
        (
            {"layers": [{"match": "x", "type": ["conv", "relu"]}]},
            "quant.layers[0].type='relu' is not allowed",
        ),
        (
            {"layers": [{"match": "x", "enabled": "no"}]},
            "quant.layers[0].enabled='no' is not allowed; expected true or false",
        ),
        (
            {"layers": [{"match": "x", "preset": "8bit"}]},
            "quant.layers[0].preset='8bit' is not allowed",
        ),
        (
            {"layers": [{"match": "x"}, {"match": "y"}, {"match": "z", "bits": 64}]},
            "quant.layers[2].bits=64 is not allowed",
        ),
        (
            {"layers": [{"match": "x", "mix_prob": 0.5}]},
            "quant.layers[0].mix_prob is set but mix_bits is not",
        ),
        (
            {"layers": "conv_stem"},
            "quant.layers='conv_stem' is not allowed; expected a list of rules",
        ),
        (
            {"layers": ["conv_stem"]},
            "quant.layers[0]='conv_stem' is not allowed; expected a mapping",
        ),
        ({"fallback": "yes"}, "quant.fallback='yes' is not allowed; expected true or false"),
        ({"allow_unmatched": 1}, "quant.allow_unmatched=1 is not allowed; expected true or false"),
        (
            {"fallback_min_numel": -1},
            "quant.fallback_min_numel=-1 is not allowed; expected an int >= 0",
        ),
        ({"schema_version": "1"}, "quant.schema_version='1' is not allowed"),
        (
            {"schema_version": SCHEMA_VERSION + 1},
            f"quant.schema_version={SCHEMA_VERSION + 1} is newer",
        ),
    ],
)
def test_bad_quant_section_names_file_key_and_value(quant, expected):
    problems = problems_of(quant, source="run.yaml")
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"run.yaml: {expected}")


def test_rule_type_error_lists_families_and_suggests():
    (problem,) = problems_of({"layers": [{"match": "x", "type": "batchnrom"}]})
    assert " | ".join(FAMILIES) in problem and 'did you mean "batchnorm"?' in problem


def test_unknown_key_gets_close_match_suggestion():
    assert problems_of({"default": {"bitz": 2}}, source="a.yaml") == [
        'a.yaml: quant.default.bitz: unknown key; did you mean "bits"?'
    ]
    (problem,) = problems_of({"layers": [{"match": "x", "roundng": "nearest"}]})
    assert problem == '<dict>: quant.layers[0].roundng: unknown key; did you mean "rounding"?'
    (problem,) = problems_of({"zzz": 1})
    assert problem.startswith("<dict>: quant.zzz: unknown key; allowed: schema_version, default")


def test_every_problem_is_reported_at_once():
    problems = problems_of(
        {"default": {"bits": 0, "rounding": "round"}, "layers": [{"type": "conv"}]}, source="x.yaml"
    )
    assert problems == [
        "x.yaml: quant.default.bits=0 is not allowed; " + BITS_ALLOWED,
        "x.yaml: quant.default.rounding='round' is not allowed; expected nearest | stochastic",
        'x.yaml: quant.layers[0]: missing required key "match" '
        "(an fnmatch pattern on module names)",
    ]


def test_bad_default_is_not_repeated_for_each_rule():
    problems = problems_of(
        {"default": {"bits": 0}, "layers": [{"match": "a"}, {"match": "b", "bits": 40}]}
    )
    assert len(problems) == 2
    assert "quant.default.bits=0" in problems[0] and "quant.layers[1].bits=40" in problems[1]


def test_file_errors_collect_top_level_and_quant_problems(tmp_path):
    path = write(tmp_path, "modle: {}\nquant:\n  default: {bits: 99}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f'{path}: modle: unknown key; did you mean "model"?',
        f"{path}: quant.default.bits=99 is not allowed; " + BITS_ALLOWED,
    ]


def test_file_without_quant_section_is_an_error(tmp_path):
    path = write(tmp_path, "model: {name: resnet18}\ntrain: {epochs: 1}\n")
    with pytest.raises(ConfigError, match='no "quant:" section'):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "file is empty"),
        ("# only a comment\n", "file is empty"),
        ("- 1\n- 2\n", "top level is a list; expected a mapping with keys model, quant, train"),
        ("just text\n", "top level is a str"),
    ],
)
def test_bad_file_contents_name_the_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {expected}")


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path, "quant:\n  default:\n    bits: 2\n   rounding: [nearest\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_file(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: YAML syntax error at line 4, column 4")


def test_missing_file_and_directory_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


# --- rules that match nothing ----------------------------------------------------------------


def test_unmatched_rules_names_each_rule():
    cfg = QuantConfig.from_dict(
        {
            "layers": [
                {"match": "conv_stem"},
                {"match": "blocks.*", "type": "linear"},
                {"match": "blocks.99.*"},
            ]
        }
    )
    modules = [("conv_stem", "conv"), ("blocks.0.conv", "conv")]
    assert cfg.unmatched_rules(iter(modules)) == [
        'quant.layers[1] (match "blocks.*", type [linear]) matches no module; '
        "set allow_unmatched: true to allow it",
        'quant.layers[2] (match "blocks.99.*") matches no module; '
        "set allow_unmatched: true to allow it",
    ]


def test_allow_unmatched_silences_unmatched_rules():
    cfg = QuantConfig.from_dict({"layers": [{"match": "blocks.99.*"}], "allow_unmatched": True})
    assert cfg.unmatched_rules([("conv_stem", "conv")]) == []


def test_quant_key_at_top_level_next_to_model_says_indent_it(tmp_path):
    path = write(tmp_path, "model: {name: resnet18}\nquant: {}\nlayers: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}: layers: a quant key at the top level; indent it under quant:"
    ]


def test_config_stays_hashable_and_replaceable_after_lookups():
    cfg = QuantConfig.from_dict(FULL)
    cfg.spec_for("conv_stem", "conv")
    assert hash(cfg) == hash(QuantConfig.from_dict(FULL))
    other = dataclasses.replace(cfg, fallback=True)
    assert other.fallback and other.spec_for("conv_stem", "conv").bits == 8


def test_default_mapping_may_start_from_a_preset():
    cfg = QuantConfig.from_dict({"default": {"preset": "4bit-nearest", "bucket_size": 64}})
    assert cfg.default == QuantSpec.preset("4bit-nearest").replace(bucket_size=64)


def test_a_key_written_twice_is_an_error_with_both_lines(tmp_path):
    from qbackprop.errors import ConfigError

    path = tmp_path / "dup.yaml"
    path.write_text(
        "quant:\n"
        "  default:\n"
        "    bits: 2\n"
        "  default:\n"
        "    bits: 4\n"
        "    rounding: nearest\n"
        "    rounding: stochastic\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    problems = exc.value.problems
    assert len(problems) == 2  # every duplicate at once
    assert "line 4: key 'default' is given twice" in problems[0]
    assert "first at line 2" in problems[0] and str(path) in problems[0]
    assert "line 7: key 'rounding'" in problems[1] and "first at line 6" in problems[1]


def test_anchors_and_merges_keep_their_yaml_meaning(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "quant:\n"
        "  default: &base\n"
        "    bits: 2\n"
        "    rounding: stochastic\n"
        "  layers:\n"
        "    - <<: *base\n"
        '      match: "conv_stem"\n'
        "      bits: 8\n"  # an explicit key overrides the merged one: not a duplicate
        '    - {match: "classifier", bits: 8}\n'
    )
    cfg = load_config(path)
    assert cfg.default.bits == 2
    assert [dict(r.overrides)["bits"] for r in cfg.layers] == [8, 8]


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML's YAML 1.1 rules read ``1e-3`` as a string; configs and overrides read a number."""
    from qbackprop.train.config import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("model: {name: test_resnet}\ntrain: {dataset: digits, lr: 1e-3}\n")
    assert load_run_config(path).train.lr == 1e-3
    assert load_run_config(path, ["train.lr=5E-4"]).train.lr == 5e-4
    assert load_run_config(path, ["train.weight_decay=2e-2"]).train.weight_decay == 0.02
