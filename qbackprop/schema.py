"""The config schema: every key declared once, and one walker for files, dicts and dataclasses.

A config section is a frozen dataclass whose fields are made with :func:`option`: a default, a
:class:`Kind` (type, range or choices, and the words for what is allowed) and a one-line doc.
:func:`check_values` checks a mapping against a section, or a constructed dataclass's own fields
(:func:`validate`, from ``__post_init__``): the same checks and messages either way. Every
mistake becomes a :class:`Problem` (key path, value, what is expected, a suggestion), all
reported at once. ``qbackprop schema`` and docs/config.md print the same declarations.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Hashable, Mapping, Sequence
from enum import Enum
from typing import Any, ClassVar

from .errors import ConfigError

REQUIRED = dataclasses.MISSING


class _Nothing:
    def __repr__(self) -> str:
        return "<nothing>"


NOTHING = _Nothing()  # a Problem about a key, not about one value


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, printed as one line.

    Args:
        path: where: ``"<source>: <key path>"``, e.g. ``"run.yaml: quant.default.bits"``.
        value: what was given (NOTHING for a problem about the key itself).
        expected: what is allowed instead.
        hint: e.g. ``did you mean "bits"?``.
        message: said instead of "is not allowed; expected ..." (unknown key, disagreement).
        note: appended in parentheses, e.g. which override set the value.
        sep: between path and message (" " for "quant.default.mix_bits is set but ...").
    """

    path: str
    value: Any = NOTHING
    expected: str = ""
    hint: str = ""
    message: str = ""
    note: str = ""
    sep: str = ": "

    def __str__(self) -> str:
        if self.message or self.value is NOTHING:
            text = f"{self.path}{self.sep}{self.message}"
        else:
            text = f"{self.path}={self.value!r} is not allowed; expected {self.expected}"
        text += f"; {self.hint}" if self.hint else ""
        return text + (f" ({self.note})" if self.note else "")

    @property
    def key(self) -> str:
        """The key path alone, list items as ``.N``: ``quant.layers.0.bits``."""
        return self.path.rpartition(": ")[2].replace("[", ".").replace("]", "")


def join(path: str, key: Any) -> str:
    """``path`` extended by one key; a path ending in ": " is the root of a file."""
    return f"{path}{key}" if path.endswith(": ") or not path else f"{path}.{key}"


def suggest(value: Any, choices: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f'did you mean "{prefix}{close[0]}"?' if close else ""


def unknown_keys(raw: Mapping, allowed: Sequence[str], path: str) -> list[Problem]:
    return [
        Problem(
            join(path, k),
            message="unknown key",
            hint=suggest(k, allowed) or f"allowed: {', '.join(allowed)}",
        )
        for k in raw
        if k not in allowed
    ]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- kinds: what one key accepts ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """What one key accepts; ``expected`` is the text shown when a value is refused."""

    expected: str = dataclasses.field(default="", kw_only=True)
    type_name = "any"
    children: ClassVar[Mapping[str, Any] | None] = None  # keys below this one (overrides)

    def ok(self, value: Any) -> bool:
        return True

    def normalize(self, value: Any) -> Any:
        return value

    def hint(self, value: Any) -> str:
        return ""

    def check(self, value: Any, path: str, context: Mapping) -> tuple[Any, list[Problem]]:
        """``(normalized value, problems)``; ``context`` holds the section's earlier keys."""
        if self.ok(value):
            return self.normalize(value), []
        return value, [Problem(path, value, self.expected, self.hint(value))]


@dataclasses.dataclass(frozen=True)
class Int(Kind):
    low: int = 0
    high: int | None = None
    nullable: bool = False
    also: tuple = ()  # other values accepted as they are, e.g. "tensor"
    type_name = "int"

    def __post_init__(self) -> None:
        if not self.expected:
            rng = f"in [{self.low}, {self.high}]" if self.high is not None else f">= {self.low}"
            object.__setattr__(self, "expected", ("null or " * self.nullable) + f"an int {rng}")

    def ok(self, v: Any) -> bool:
        if (self.nullable and v is None) or (isinstance(v, str) and v in self.also):
            return True
        return is_int(v) and v >= self.low and (self.high is None or v <= self.high)


@dataclasses.dataclass(frozen=True)
class Number(Kind):
    low: float = 0.0
    high: float | None = None
    nullable: bool = False
    above: bool = False  # strictly greater than low
    type_name = "number"

    def __post_init__(self) -> None:
        if not self.expected:
            rng = (
                f"in [{self.low:g}, {self.high:g}]"
                if self.high is not None
                else (f"{'>' if self.above else '>='} {self.low:g}")
            )
            object.__setattr__(self, "expected", ("null or " * self.nullable) + f"a number {rng}")

    def ok(self, v: Any) -> bool:
        if self.nullable and v is None:
            return True
        return (
            is_number(v)
            and (v > self.low if self.above else v >= self.low)
            and (self.high is None or v <= self.high)
        )

    def normalize(self, v: Any) -> Any:
        return None if v is None else float(v)


@dataclasses.dataclass(frozen=True)
class Bool(Kind):
    expected: str = dataclasses.field(default="true or false", kw_only=True)
    type_name = "bool"

    def ok(self, v: Any) -> bool:
        return isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Choice(Kind):
    values: tuple[str, ...] = ()
    enum: type[Enum] | None = None
    aliases: Mapping[Any, str] = dataclasses.field(default_factory=dict)  # e.g. YAML's off: false
    type_name = "choice"

    def __post_init__(self) -> None:
        if self.enum is not None:
            object.__setattr__(self, "values", tuple(m.value for m in self.enum))
        if not self.expected:
            object.__setattr__(self, "expected", " | ".join(self.values))

    def normalize(self, v: Any) -> Any:
        v = self.aliases.get(v, v) if isinstance(v, Hashable) else v
        return self.enum(v) if self.enum is not None else v

    def ok(self, v: Any) -> bool:
        return isinstance(v, Hashable) and self.aliases.get(v, v) in self.values

    def hint(self, v: Any) -> str:
        return suggest(v, self.values)


@dataclasses.dataclass(frozen=True)
class Text(Kind):
    """A non-empty string (or a path, for ``paths=True``)."""

    paths: bool = False
    type_name = "str"

    def ok(self, v: Any) -> bool:
        return bool(isinstance(v, str) or (self.paths and isinstance(v, os.PathLike))) and bool(
            os.fspath(v) if self.paths and isinstance(v, os.PathLike) else v
        )

    def normalize(self, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v


@dataclasses.dataclass(frozen=True)
class Names(Kind):
    """One name or a list of names from ``values``; null means any."""

    values: tuple[str, ...] = ()
    type_name = "list"

    def check(self, value: Any, path: str, context: Mapping) -> tuple[Any, list[Problem]]:
        if value is None:
            return None, []
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not names:
            return value, [Problem(path, value, self.expected)]
        bad = [
            Problem(path, n, self.expected, suggest(n, self.values))
            for n in names
            if n not in self.values
        ]
        return (value, bad) if bad else (tuple(names), [])


@dataclasses.dataclass(frozen=True)
class IntList(Kind):
    length: int = 3
    low: int = 1
    type_name = "list"

    def ok(self, v: Any) -> bool:
        return (
            isinstance(v, (list, tuple))
            and len(v) == self.length
            and all(is_int(i) and i >= self.low for i in v)
        )

    def normalize(self, v: Any) -> Any:
        return tuple(v)


@dataclasses.dataclass(frozen=True)
class Table(Kind):
    """A free mapping, passed on as it is (checked by whoever reads it)."""

    expected: str = dataclasses.field(default="a mapping", kw_only=True)
    type_name = "mapping"

    def ok(self, v: Any) -> bool:
        return isinstance(v, Mapping)

    def normalize(self, v: Any) -> Any:
        return dict(v)


# --- sections: dataclasses whose fields are options ---------------------------------------------


def option(
    default: Any = REQUIRED, kind: Kind = Kind(), doc: str = "", *, factory=None, shown=None
) -> Any:
    """A dataclass field the schema knows: its default, :class:`Kind` and doc line; ``shown``:
    how docs name the key when YAML does not write it as the field's name."""
    meta = {"kind": kind, "doc": doc, "shown": shown}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def like(cls: type, name: str, **changes: Any) -> Any:
    """An option declared like ``cls.name`` (kind and doc), e.g. under another key."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    return option(
        changes.get("default", f.default),
        changes.get("kind", f.metadata["kind"]),
        changes.get("doc", f.metadata["doc"]),
    )


def options(cls: type) -> list[dataclasses.Field]:
    """The fields of section ``cls`` that the schema declares, in order."""
    return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]


def keys(cls: type) -> tuple[str, ...]:
    """The keys a section accepts, in the order messages list them."""
    return getattr(cls, "KEYS", None) or tuple(f.name for f in options(cls))


def check_values(
    cls: type, raw: Mapping[str, Any], path: str, allowed: Sequence[str] | None = None
) -> tuple[dict[str, Any], list[Problem]]:
    """Check mapping ``raw`` against section ``cls``: ``(normalized values, problems)``.

    Keys missing from ``raw`` take their defaults; with ``allowed`` not None, other keys are
    reported (with a close match). A section's ``cross_problems(values, failed, path)``
    staticmethod adds the checks that involve several keys.
    """
    problems = [] if allowed is None else unknown_keys(raw, allowed, path)
    values: dict[str, Any] = {}
    failed: set[str] = set()
    for f in options(cls):
        if f.name not in raw and f.default is REQUIRED and f.default_factory is REQUIRED:
            problems.append(
                Problem(path, message=f'missing required key "{f.name}" ({f.metadata["doc"]})')
            )
            failed.add(f.name)
            continue
        given = (
            raw[f.name]
            if f.name in raw
            else (f.default if f.default is not REQUIRED else f.default_factory())
        )
        values[f.name], errors = f.metadata["kind"].check(given, join(path, f.name), values)
        if errors:
            failed.add(f.name)
            problems += errors
    cross = getattr(cls, "cross_problems", None)
    return values, problems + (cross(values, failed, path) if cross else [])


def check_mapping(cls: type, raw: Any, path: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Like :func:`check_values` for a YAML section: None is all defaults, unknown keys refused."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        return None, [Problem(path, raw, f"a mapping with keys {', '.join(keys(cls))}")]
    return check_values(cls, raw, path, keys(cls))


def from_mapping(cls: type, raw: Any, path: str) -> Any:
    """Section ``cls`` built from mapping ``raw``; ConfigError lists every problem."""
    values, problems = check_mapping(cls, raw, path)
    if problems:
        raise ConfigError(problems)
    return cls(**values)


def validate(obj: Any, path: str) -> None:
    """Check a constructed section's own fields (from ``__post_init__``) and normalize them."""
    # fields of the instance, not of type(obj): torch.compile traces specs made in forward
    values, problems = check_values(obj, {f.name: getattr(obj, f.name) for f in options(obj)}, path)
    if problems:
        raise ConfigError(problems)
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def check_key(cls: type, name: str, value: Any, path: str) -> list[Problem]:
    """The problems of ``value`` given for key ``name`` of section ``cls`` (e.g. a CLI flag)."""
    (f,) = [f for f in options(cls) if f.name == name]
    return f.metadata["kind"].check(value, path, {})[1]


def key_problem(path: Sequence[str], roots: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(unknown dotted key, suggestion)`` when ``path`` names no key of the schema.

    ``roots`` maps top-level names to sections; below a key whose kind declares no
    ``children`` (a free mapping, a list, a value) nothing is checked here.
    """
    children: Mapping[str, Any] | None = roots
    for depth, part in enumerate(path):
        if children is None:
            return None
        if part not in children:
            prefix = "".join(f"{p}." for p in path[:depth])
            hint = suggest(part, tuple(children), prefix) or f"allowed: {', '.join(children)}"
            return prefix + part, hint
        node = children[part]
        if isinstance(node, type) and dataclasses.is_dataclass(node):
            children = {
                k: {f.name: f.metadata["kind"] for f in options(node)}.get(k) for k in keys(node)
            }
        else:
            children = getattr(node, "children", None)
    return None
