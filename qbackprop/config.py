"""QuantConfig: the ``quant:`` section and its per-layer rules, read from files and dicts."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .quant.spec import PRESETS, QuantSpec
from .schema import (
    Kind,
    Problem,
    boolean,
    check_values,
    from_mapping,
    integer,
    join,
    keys,
    names,
    option,
    suggest,
    text,
    unknown_keys,
    validate,
)
from .strict_yaml import load_yaml_file

FAMILIES = ("conv", "linear", "batchnorm", "norm", "activation", "elementwise", "pool",
            "attention", "dropout")  # fmt: skip
SCHEMA_VERSION = 1
TOP_LEVEL_KEYS = ("model", "quant", "train")
SPEC_KEYS = tuple(f.name for f in dataclasses.fields(QuantSpec))
RULE_KEYS = ("match", "type", "enabled", "preset", *SPEC_KEYS)
_BARE_QUANT_KEYS = {"default", "layers", "fallback"}  # a file with these but no quant: section
_PRESET = f"a preset name ({', '.join(PRESETS)})"
_DEFAULT_KEYS = dict.fromkeys(("preset", *SPEC_KEYS))  # keys under quant.default, for overrides
_DEFAULT_EXPECTED = f"a mapping of QuantSpec fields or {_PRESET}"


def _plain(spec: QuantSpec) -> dict[str, Any]:
    """Every field of ``spec`` (None included), enums as plain strings."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in vars(spec).items() if k != "key"}


def _preset(value: Any, path: str) -> tuple[dict | None, list[Problem]]:
    if isinstance(value, str) and value in PRESETS:
        return _plain(QuantSpec.preset(value)), []
    return None, [Problem(path, value, _PRESET, suggest(value, tuple(PRESETS)))]


def _on_preset(raw: Mapping, base: dict, path: str) -> tuple[dict, dict, list[Problem]]:
    """``(base, explicit QuantSpec keys, problems)``: a valid ``preset:`` replaces ``base``."""
    explicit = {k: raw[k] for k in SPEC_KEYS if k in raw}
    if "preset" not in raw:
        return base, explicit, []
    preset, problems = _preset(raw["preset"], join(path, "preset"))
    return preset or base, explicit, problems


def _spec_problems(fields: dict, path: str, only: Iterable[str] | None = None) -> list[Problem]:
    """QuantSpec's checks on ``fields``; with ``only``, just the problems of those keys."""
    _, problems = check_values(QuantSpec, fields, path)
    if only is not None:
        keys = {join(path, k) for k in only}
        problems = [p for p in problems if p.path in keys]
    return problems


def _overrides(value: Any, path: str, context: Mapping) -> tuple[Any, list[Problem]]:
    """QuantSpec keys a rule sets, as canonical ``(key, value)`` pairs."""
    given = dict(value)
    plain = {k: v.value if isinstance(v, Enum) else v for k, v in given.items()}
    return tuple((k, plain[k]) for k in SPEC_KEYS if k in plain), unknown_keys(
        given, SPEC_KEYS, path
    )


def _default_spec(raw: Any, path: str, context: Mapping) -> tuple[Any, list[Problem]]:
    """``quant.default`` (a QuantSpec, a preset name, or QuantSpec keys with an optional
    ``preset:`` under them) as a QuantSpec; when invalid, its fields as far as they were read."""
    if raw is None or isinstance(raw, QuantSpec):
        return raw or QuantSpec(), []
    if isinstance(raw, str):
        fields, problems = _preset(raw, path)
    elif isinstance(raw, Mapping):
        base, explicit, problems = _on_preset(raw, _plain(QuantSpec()), path)
        fields = {**base, **explicit}
        problems = unknown_keys(raw, tuple(_DEFAULT_KEYS), path) + problems
        problems += _spec_problems(fields, path)
    else:
        fields, problems = None, [Problem(path, raw, _DEFAULT_EXPECTED)]
    return (QuantSpec(**fields) if not problems else fields or _plain(QuantSpec())), problems


def _rules(raw: Any, path: str, context: Mapping) -> tuple[Any, list[Problem]]:
    """``quant.layers``: LayerRules or their mappings, each checked on top of the default."""
    if raw is None:
        return (), []
    if not isinstance(raw, (list, tuple)):
        return (), [Problem(path, raw, "a list of rules (- match: PATTERN ...)")]
    base = context.get("default")
    base_ok = isinstance(base, QuantSpec)
    base = _plain(base) if base_ok else base or _plain(QuantSpec())
    checked = [_rule(entry, base, base_ok, f"{path}[{i}]") for i, entry in enumerate(raw)]
    return tuple(r for r, _ in checked), [p for _, errors in checked for p in errors]


def _rule(raw: Any, base: dict, base_ok: bool, path: str) -> tuple[Any, list[Problem]]:
    if isinstance(raw, LayerRule):
        raw = raw.to_dict()
    if not isinstance(raw, Mapping):
        return None, [Problem(path, raw, 'a mapping with a "match" key')]
    given = {k: raw[k] for k in ("match", "type", "enabled") if k in raw}
    rule_base, overrides, errors = _on_preset(raw, base, path)
    values, problems = check_values(LayerRule, {**given, "overrides": overrides}, path)
    problems = unknown_keys(raw, RULE_KEYS, path) + problems + errors
    if rule_base is not base:  # the preset replaces the default for this rule
        base, base_ok, overrides = rule_base, True, {**rule_base, **overrides}
    problems += _spec_problems({**base, **overrides}, path, None if base_ok else overrides)
    if problems:
        return None, problems
    return LayerRule(values["match"], values["type"], values["enabled"], overrides), []


@dataclass(frozen=True)
class LayerRule:
    """One ``quant.layers`` entry: which modules it selects and what it changes; the fields are
    documented in the schema (``qbackprop schema quant.layers``). The override values are
    checked against the default by :class:`QuantConfig` (``mix_bits`` alone is fine when the
    default already has ``mix_prob``).

    Raises:
        ConfigError: on a bad pattern, an unknown family or an unknown override key.
    """

    match: str = option(
        kind=text(expected='an fnmatch pattern on module names, e.g. "blocks.*"'),
        doc="an fnmatch pattern on module names",
    )
    type: tuple[str, ...] | None = option(
        None,
        names(FAMILIES, expected=f"a family or a list of families ({' | '.join(FAMILIES)})"),
        "families the rule applies to; null: any",
    )
    enabled: bool = option(True, boolean(), "false leaves the selected modules uncompressed")
    overrides: tuple[tuple[str, Any], ...] = option(
        (),
        Kind("QuantSpec keys", custom=_overrides),
        "QuantSpec keys written beside match (unset ones inherit quant.default); preset: NAME "
        "starts from that preset instead",
        shown="<quant.default keys>, preset",
    )

    def __post_init__(self) -> None:
        validate(self, "LayerRule")

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
        return {**out, **dict(self.overrides)}


@dataclass(frozen=True)
class QuantConfig:
    """Which saved activations are compressed, and how, for a whole model; the fields are
    documented in the schema (``qbackprop schema quant``, docs/config.md).

    Precedence in :meth:`spec_for`: the first rule in ``layers`` that matches wins; its overrides
    apply on top of ``default`` (unspecified keys inherit it); ``enabled: false`` means no
    compression; a module no rule matches gets ``default``.

    Raises:
        ConfigError: listing every problem, e.g. a rule override the default makes invalid.
    """

    schema_version: int = option(SCHEMA_VERSION, integer(1), "the config format version")
    default: QuantSpec = option(
        kind=Kind(
            _DEFAULT_EXPECTED, type_name="mapping", custom=_default_spec, children=_DEFAULT_KEYS
        ),
        factory=QuantSpec,
        doc="the spec of every module no rule overrides: QuantSpec keys, a preset name, or "
        "preset: NAME with keys on top",
    )
    layers: tuple[LayerRule, ...] = option(
        (),
        Kind("a list of rules (- match: PATTERN ...)", type_name="list", custom=_rules),
        "per-layer rules; the first match wins",
    )
    fallback: bool = option(
        True, boolean(), "compress tensors saved by ops that have no custom autograd Function"
    )
    allow_unmatched: bool = option(False, boolean(), "accept rules that match no module")
    fallback_min_numel: int = option(
        1024, integer(0), "tensors smaller than this, saved by fallback ops, stay uncompressed"
    )
    share: bool = option(
        True,
        boolean(),
        "store a BatchNorm/LayerNorm output once, as x̂ at twice the bits, for "
        "norm and consumer (same bytes, far less gradient error)",
    )
    tune_allocator: bool = option(
        True,
        boolean(),
        "fix glibc's mmap threshold at conversion (process-wide) so freed activations go back "
        "to the OS and peak RSS follows the bytes held; false keeps glibc's defaults",
    )
    # name, family -> spec; filled by spec_for, which runs once per module during conversion
    _spec_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate(self, "quant")

    @staticmethod
    def cross_problems(values: dict, failed: set, path: str) -> list[Problem]:
        version = values["schema_version"]
        if "schema_version" in failed or version <= SCHEMA_VERSION:
            return []
        text = f"={version!r} is newer than this qbackprop reads (up to {SCHEMA_VERSION})"
        return [Problem(join(path, "schema_version"), message=text + "; upgrade qbackprop")]

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
        out = {k: getattr(self, k) for k in QUANT_KEYS}
        layers = [r.to_dict() for r in self.layers]
        return {**out, "default": self.default.to_dict(), "layers": layers}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, source: str = "<dict>") -> QuantConfig:
        """Build from a ``quant:`` section, reporting every problem at once.

        Args:
            d: the ``quant:`` mapping (None or {} gives the defaults).
            source: where ``d`` came from (a file path), named in every error line.

        Raises:
            ConfigError: one line per problem: source, key path, bad value, what is allowed.
        """
        return from_mapping(cls, d, f"{source}: quant")


QUANT_KEYS = keys(QuantConfig)


# --- files ---------------------------------------------------------------------------------------


def top_level_problems(raw: Mapping[str, Any], source: str) -> list:
    """Keys of a file's top level other than model, quant and train."""
    # a quant key at the top level next to model:/train: is a quant: key mis-indented
    problems = [
        f"{source}: {k}: a quant key at the top level; indent it under quant:"
        for k in raw
        if k in QUANT_KEYS
    ]
    others = {k: v for k, v in raw.items() if k not in QUANT_KEYS}
    return problems + unknown_keys(others, TOP_LEVEL_KEYS, f"{source}: ")


def _config_from_file_dict(raw: Mapping[str, Any], source: str) -> QuantConfig:
    """The QuantConfig of a whole file's mapping (model/quant/train, or a bare quant section)."""
    if _BARE_QUANT_KEYS & set(raw) and not set(raw) & set(TOP_LEVEL_KEYS):
        return from_mapping(QuantConfig, raw, f"{source}: ")
    problems = top_level_problems(raw, source)
    try:
        config = from_mapping(QuantConfig, raw.get("quant"), f"{source}: quant")
    except ConfigError as exc:
        problems += exc.details
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
