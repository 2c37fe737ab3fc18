"""QuantConfig: the ``quant:`` YAML section, its per-layer rules, loading and validation."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from qbackprop.errors import ConfigError
from qbackprop.quant.spec import PRESETS, QuantSpec, spec_errors

from .strict_yaml import load_strict

FAMILIES = (
    "conv",
    "linear",
    "batchnorm",
    "norm",
    "activation",
    "elementwise",
    "pool",
    "attention",
    "dropout",
)
SCHEMA_VERSION = 1
TOP_LEVEL_KEYS = ("model", "quant", "train")
SPEC_KEYS = tuple(f.name for f in dataclasses.fields(QuantSpec))
RULE_KEYS = ("match", "type", "enabled", "preset", *SPEC_KEYS)
_BARE_QUANT_KEYS = {"default", "layers", "fallback"}  # a file with these but no quant: section
_FAMILY_HELP = f"a family or a list of families ({' | '.join(FAMILIES)})"
_PRESET_HELP = f"a preset name ({', '.join(PRESETS)})"


# --- message helpers: every line is "<source>: <key path>... what is allowed" -----------------


def _key(loc: str, key: Any) -> str:
    """``loc`` extended by one key; ``loc`` ending in ": " is the root of a bare file."""
    return f"{loc}{key}" if loc.endswith(": ") else f"{loc}.{key}"


def _suggest(value: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    return f'; did you mean "{close[0]}"?' if close else ""


def _bad(loc: str, value: Any, allowed: str, choices: Sequence[str] = ()) -> str:
    return f"{loc}={value!r} is not allowed; expected {allowed}{_suggest(value, choices)}"


def _unknown_keys(loc: str, mapping: Mapping, allowed: Sequence[str]) -> list[str]:
    problems = []
    for key in mapping:
        if key not in allowed:
            hint = _suggest(key, allowed) or f"; allowed: {', '.join(allowed)}"
            problems.append(f"{_key(loc, key)}: unknown key{hint}")
    return problems


def _bool_errors(value: Any, loc: str) -> list[str]:
    return [] if isinstance(value, bool) else [_bad(loc, value, "true or false")]


def _int_errors(value: Any, loc: str, low: int, allowed: str) -> list[str]:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    return [] if ok else [_bad(loc, value, allowed)]


def _numel_errors(value: Any, loc: str) -> list[str]:
    return _int_errors(value, loc, 0, "an int >= 0")


_FLAG_CHECKS = {
    "fallback": _bool_errors,
    "allow_unmatched": _bool_errors,
    "fallback_min_numel": _numel_errors,
    "share": _bool_errors,
}
QUANT_KEYS = ("schema_version", "default", "layers", *_FLAG_CHECKS)


def _match_errors(value: Any, loc: str) -> list[str]:
    ok = isinstance(value, str) and value
    return [] if ok else [_bad(loc, value, 'an fnmatch pattern on module names, e.g. "blocks.*"')]


def _type_errors(value: Any, loc: str) -> list[str]:
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names:
        return [_bad(loc, value, _FAMILY_HELP)]
    return [_bad(loc, n, _FAMILY_HELP, FAMILIES) for n in names if n not in FAMILIES]


def _spec_fields(spec: QuantSpec) -> dict[str, Any]:
    """Every field of ``spec`` (None included), enums as plain strings."""
    return {
        k: getattr(spec, k).value if isinstance(getattr(spec, k), Enum) else getattr(spec, k)
        for k in SPEC_KEYS
    }


def _override_errors(base: Mapping, base_ok: bool, overrides: Mapping, loc: str) -> list[str]:
    """Problems with ``overrides`` merged onto ``base`` (a namespace, so bad values don't raise)."""
    prefix = _key(loc, "")
    errors = spec_errors(types.SimpleNamespace(**{**base, **overrides}), prefix)
    if not base_ok:  # the base's own mistakes are already reported once; keep the rule's
        errors = [e for e in errors if e[len(prefix) :].startswith(tuple(overrides))]
    return errors


# --- the config objects -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRule:
    """One ``quant.layers`` entry: which modules it selects and what it changes.

    Args:
        match: fnmatch pattern on the qualified module name (``*`` also spans dots).
        type: families the rule applies to (a single string is accepted); None means any.
        enabled: False leaves the selected modules uncompressed.
        overrides: QuantSpec fields this rule sets (a mapping or (key, value) pairs); the values
            are checked against the default by :class:`QuantConfig`, since e.g. ``mix_bits``
            alone is fine when the default already has ``mix_prob``.

    Raises:
        ConfigError: on a bad pattern, an unknown family or an unknown override key.
    """

    match: str
    type: tuple[str, ...] | None = None
    enabled: bool = True
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.type is not None:
            family = (self.type,) if isinstance(self.type, str) else tuple(self.type)
            object.__setattr__(self, "type", family)
        given = dict(self.overrides)
        problems = _match_errors(self.match, "LayerRule.match")
        problems += _type_errors(self.type, "LayerRule.type")
        problems += _bool_errors(self.enabled, "LayerRule.enabled")
        problems += _unknown_keys("LayerRule.overrides", given, SPEC_KEYS)
        if problems:
            raise ConfigError(problems)
        # canonical order and plain values, so equal rules compare and hash equal
        plain = {k: v.value if isinstance(v, Enum) else v for k, v in given.items()}
        object.__setattr__(self, "overrides", tuple((k, plain[k]) for k in SPEC_KEYS if k in plain))

    def matches(self, name: str, family: str) -> bool:
        """Whether this rule selects module ``name`` of layer family ``family``."""
        return fnmatch.fnmatchcase(name, self.match) and (self.type is None or family in self.type)

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML form of the rule, as written under ``quant.layers``."""
        out: dict[str, Any] = {"match": self.match}
        if self.type is not None:
            out["type"] = list(self.type)
        if not self.enabled:
            out["enabled"] = False
        out.update(self.overrides)
        return out


@dataclass(frozen=True)
class QuantConfig:
    """Which saved activations are compressed, and how, for a whole model.

    Precedence in :meth:`spec_for`: the first rule in ``layers`` that matches wins; its overrides
    apply on top of ``default`` (unspecified keys inherit it); ``enabled: false`` means no
    compression; a module no rule matches gets ``default``.

    Args:
        default: the spec for every module no rule overrides.
        layers: per-layer rules, in precedence order.
        fallback: compress tensors saved by ops that have no custom autograd Function.
        allow_unmatched: accept rules that match no module (otherwise an error).
        fallback_min_numel: tensors smaller than this, saved by fallback ops, stay uncompressed.
        share: a BatchNorm output (after its activation) that a converted conv, linear or
            squeeze-excite layer consumes is stored once, as BatchNorm's x̂ at twice the bits,
            and rebuilt for the consumer; likewise the squeeze-excite product. Same bytes as
            two b-bit copies, far smaller gradient error (docs/design-notes.md).

    Raises:
        ConfigError: listing every problem, e.g. a rule override the default makes invalid.
    """

    default: QuantSpec = field(default_factory=QuantSpec)
    layers: tuple[LayerRule, ...] = ()
    fallback: bool = True
    allow_unmatched: bool = False
    fallback_min_numel: int = 1024
    share: bool = True
    # name, family -> spec; filled by spec_for, which runs once per module during conversion
    _spec_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        problems = []
        if not isinstance(self.default, QuantSpec):
            problems.append(_bad("quant.default", self.default, "a QuantSpec"))
        for key, check in _FLAG_CHECKS.items():
            problems += check(getattr(self, key), f"quant.{key}")
        for i, rule in enumerate(self.layers):
            if not isinstance(rule, LayerRule):
                problems.append(_bad(f"quant.layers[{i}]", rule, "a LayerRule"))
            elif isinstance(self.default, QuantSpec):
                base = _spec_fields(self.default)
                problems += _override_errors(base, True, dict(rule.overrides), f"quant.layers[{i}]")
        if problems:
            raise ConfigError(problems)

    def spec_for(self, name: str, family: str) -> QuantSpec | None:
        """The spec for module ``name`` of ``family``; None when a rule disables it.

        Args:
            name: qualified module name, as in ``model.named_modules()``.
            family: one of :data:`FAMILIES`.
        """
        cache = self._spec_cache
        if (name, family) not in cache:
            if family not in FAMILIES:
                raise ValueError(f"unknown layer family {family!r}; expected one of {FAMILIES}")
            cache[name, family] = self._resolve(name, family)
        return cache[name, family]

    def _resolve(self, name: str, family: str) -> QuantSpec | None:
        for rule in self.layers:
            if rule.matches(name, family):
                return self.default.replace(**dict(rule.overrides)) if rule.enabled else None
        return self.default

    def unmatched_rules(self, names_and_families: Iterable[tuple[str, str]]) -> list[str]:
        """One message per rule that selects none of the given modules ([] if allowed).

        Args:
            names_and_families: (qualified module name, family) of every convertible module.
        """
        if self.allow_unmatched:
            return []
        modules = list(names_and_families)
        problems = []
        for i, rule in enumerate(self.layers):
            if not any(rule.matches(name, family) for name, family in modules):
                kind = f", type [{', '.join(rule.type)}]" if rule.type else ""
                problems.append(
                    f'quant.layers[{i}] (match "{rule.match}"{kind}) matches no module; '
                    "set allow_unmatched: true to allow it"
                )
        return problems

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML form of the ``quant:`` section; ``from_dict`` reads it back equal."""
        return {
            "schema_version": SCHEMA_VERSION,
            "default": self.default.to_dict(),
            "layers": [rule.to_dict() for rule in self.layers],
            "fallback": self.fallback,
            "allow_unmatched": self.allow_unmatched,
            "fallback_min_numel": self.fallback_min_numel,
            "share": self.share,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, source: str = "<dict>") -> QuantConfig:
        """Build from a ``quant:`` section, reporting every problem at once.

        Args:
            d: the ``quant:`` mapping (None or {} gives the defaults).
            source: where ``d`` came from (a file path), named in every error line.

        Raises:
            ConfigError: one line per problem: source, key path, bad value, what is allowed.
        """
        config, problems = _parse_quant(d, f"{source}: quant")
        if problems:
            raise ConfigError(problems)
        return config


_DEFAULT_CONFIG = QuantConfig()


# --- parsing a plain mapping --------------------------------------------------------------------


def _parse_preset(value: Any, loc: str) -> tuple[dict[str, Any] | None, list[str]]:
    if isinstance(value, str) and value in PRESETS:
        return _spec_fields(QuantSpec.preset(value)), []
    return None, [_bad(loc, value, _PRESET_HELP, tuple(PRESETS))]


def _parse_default(raw: Any, loc: str) -> tuple[dict[str, Any], list[str]]:
    """All QuantSpec fields of ``quant.default`` (a mapping, preset name or QuantSpec)."""
    if raw is None or isinstance(raw, QuantSpec):
        return _spec_fields(raw or QuantSpec()), []
    if isinstance(raw, str):
        fields, problems = _parse_preset(raw, loc)
        return fields or _spec_fields(QuantSpec()), problems
    if not isinstance(raw, Mapping):
        return _spec_fields(QuantSpec()), [
            _bad(loc, raw, f"a mapping of QuantSpec fields or {_PRESET_HELP}")
        ]
    problems = _unknown_keys(loc, raw, ("preset", *SPEC_KEYS))
    base = None
    if "preset" in raw:  # like a rule's preset: the named spec, then the explicit keys on top
        base, errors = _parse_preset(raw["preset"], _key(loc, "preset"))
        problems += errors
    fields = {**(base or _spec_fields(QuantSpec())), **{k: raw[k] for k in SPEC_KEYS if k in raw}}
    return fields, problems + spec_errors(types.SimpleNamespace(**fields), _key(loc, ""))


def _parse_rule(
    raw: Any, base: dict, base_ok: bool, loc: str
) -> tuple[LayerRule | None, list[str]]:
    if not isinstance(raw, Mapping):
        return None, [_bad(loc, raw, 'a mapping with a "match" key')]
    problems = _unknown_keys(loc, raw, RULE_KEYS)
    if "match" in raw:
        problems += _match_errors(raw["match"], _key(loc, "match"))
    else:
        problems.append(f'{loc}: missing required key "match" (an fnmatch pattern on module names)')
    problems += _type_errors(raw.get("type"), _key(loc, "type"))
    problems += _bool_errors(raw.get("enabled", True), _key(loc, "enabled"))
    overrides = {k: raw[k] for k in SPEC_KEYS if k in raw}
    if "preset" in raw:  # the preset replaces the default for this rule; explicit keys win
        preset, errors = _parse_preset(raw["preset"], _key(loc, "preset"))
        problems += errors
        if preset is not None:
            base, base_ok, overrides = preset, True, {**preset, **overrides}
    problems += _override_errors(base, base_ok, overrides, loc)
    if problems:
        return None, problems
    return LayerRule(raw["match"], raw.get("type"), raw.get("enabled", True), overrides), []


def _version_errors(version: Any, loc: str) -> list[str]:
    errors = _int_errors(version, loc, 1, "an int >= 1")
    if not errors and version > SCHEMA_VERSION:
        errors.append(
            f"{loc}={version!r} is newer than this qbackprop reads (up to {SCHEMA_VERSION}); "
            "upgrade qbackprop"
        )
    return errors


def _parse_layers(
    raw: Any, base: dict, base_ok: bool, loc: str
) -> tuple[tuple[LayerRule, ...], list[str]]:
    if raw is None:
        return (), []
    if not isinstance(raw, list):
        return (), [_bad(loc, raw, "a list of rules (- match: PATTERN ...)")]
    rules, problems = [], []
    for i, entry in enumerate(raw):
        rule, errors = _parse_rule(entry, base, base_ok, f"{loc}[{i}]")
        rules.append(rule)
        problems += errors
    return tuple(rules), problems


def _parse_quant(d: Any, loc: str) -> tuple[QuantConfig | None, list[str]]:
    """The config and every problem in quant section ``d``; ``loc`` is "<source>: <path>"."""
    d = {} if d is None else d
    if not isinstance(d, Mapping):
        return None, [_bad(loc, d, f"a mapping with keys {', '.join(QUANT_KEYS)}")]
    problems = _unknown_keys(loc, d, QUANT_KEYS)
    problems += _version_errors(
        d.get("schema_version", SCHEMA_VERSION), _key(loc, "schema_version")
    )
    base, errors = _parse_default(d.get("default"), _key(loc, "default"))
    problems += errors
    rules, errors = _parse_layers(d.get("layers"), base, not errors, _key(loc, "layers"))
    problems += errors
    flags = {k: d.get(k, getattr(_DEFAULT_CONFIG, k)) for k in _FLAG_CHECKS}
    for key, check in _FLAG_CHECKS.items():
        problems += check(flags[key], _key(loc, key))
    if problems:
        return None, problems
    return QuantConfig(QuantSpec(**base), rules, **flags), []


# --- files ---------------------------------------------------------------------------------------


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"{path}: YAML syntax error: {problem}"
    return f"{path}: YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file.

    Args:
        path: the YAML file.

    Raises:
        ConfigError: naming the file when it is missing, a directory, empty, not valid YAML
            (with line and column) or not a mapping at the top level.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file (looked in {Path.cwd()} for relative paths)")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected a YAML file")
    try:
        data, duplicates = load_strict(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(path, exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if duplicates:
        raise ConfigError(
            [
                f"{path}: line {second}: key {key!r} is given twice in one mapping (first at "
                f"line {first}); YAML would keep the last one silently: delete one"
                for key, first, second in duplicates
            ]
        )
    expected = f"a mapping with keys {', '.join(TOP_LEVEL_KEYS)}"
    if data is None:
        raise ConfigError(f"{path}: file is empty; expected {expected}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level is a {type(data).__name__}; expected {expected}")
    return data


def _config_from_file_dict(raw: Mapping[str, Any], source: str) -> QuantConfig:
    """The QuantConfig of a whole file's mapping (model/quant/train, or a bare quant section)."""
    keys = set(raw)
    if _BARE_QUANT_KEYS & keys and not keys & set(TOP_LEVEL_KEYS):
        config, problems = _parse_quant(raw, f"{source}: ")
    else:
        # a quant key at the top level next to model:/train: is a quant: key mis-indented
        misplaced = [k for k in raw if k in QUANT_KEYS]
        problems = [
            f"{source}: {k}: a quant key at the top level; indent it under quant:"
            for k in misplaced
        ]
        others = {k: v for k, v in raw.items() if k not in QUANT_KEYS}
        problems += _unknown_keys(f"{source}: ", others, TOP_LEVEL_KEYS)
        config, errors = _parse_quant(raw.get("quant"), f"{source}: quant")
        problems += errors
        if "quant" not in raw:
            problems.append(
                f'{source}: no "quant:" section; add e.g. "quant: {{default: 2bit-stochastic}}"'
            )
    if problems:
        raise ConfigError(problems)
    return config


def load_config(path: str | Path) -> QuantConfig:
    """Read the QuantConfig from the ``quant:`` section of a YAML file.

    Args:
        path: a YAML file with ``model:``, ``quant:`` and ``train:`` sections (only ``quant:`` is
            read here), or one holding a bare quant section (``default:``, ``layers:``, ...).

    Raises:
        ConfigError: listing every problem in the file, each naming the file and key.
    """
    return _config_from_file_dict(load_yaml_file(path), str(path))


def as_quant_config(cfg: QuantConfig | QuantSpec | Mapping[str, Any] | str | Path) -> QuantConfig:
    """Whatever the user passed, as a QuantConfig.

    Args:
        cfg: a QuantConfig; a QuantSpec (used as the default); a dict (a ``quant:`` section, or
            a whole file's mapping with a ``quant`` key); a preset name like
            ``"2bit-stochastic"``; or the path of a YAML file.

    Raises:
        ConfigError: when the config is invalid or the string is neither preset nor file.
        TypeError: for any other type.
    """
    if isinstance(cfg, QuantConfig):
        return cfg
    if isinstance(cfg, QuantSpec):
        return QuantConfig(default=cfg)
    if isinstance(cfg, Mapping):
        if "quant" in cfg:  # a whole file's mapping, with model:/train: beside it
            return _config_from_file_dict(cfg, "<dict>")
        return QuantConfig.from_dict(cfg)
    if isinstance(cfg, str):
        if cfg in PRESETS:  # checked before paths: "2/4-mix" looks like one
            return QuantConfig(default=QuantSpec.preset(cfg))
        if not Path(cfg).exists() and Path(cfg).suffix not in (".yaml", ".yml"):
            presets = ", ".join(PRESETS)
            raise ConfigError(f"{cfg!r} is neither a preset ({presets}) nor a YAML file")
    if isinstance(cfg, (str, Path)):
        return load_config(cfg)
    raise TypeError(
        f"expected a QuantConfig, dict, preset name or YAML path, got {type(cfg).__name__}"
    )
