"""The config schema: every key declared once, and one walker for files, dicts and dataclasses.

A config section is a frozen dataclass whose fields are made with :func:`option`: a default, a
:class:`Kind` (type, range or choices, and the words for what is allowed) and a one-line doc.
:func:`check_values` checks a mapping against a section, or a constructed dataclass's own fields
(:func:`validate`, from ``__post_init__``): the same checks and messages either way. Every
mistake becomes a :class:`Problem` (key path, value, what is expected, a suggestion), all
reported at once. ``qbackprop schema`` and docs/config.md print the same declarations.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from enum import Enum
from typing import Any

import yaml

from .errors import ConfigError
from .strict_yaml import load_strict

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
        message: a sentence written right after the path, instead of "=VALUE is not allowed;
            expected ...": ``": unknown key"``, ``" is set but mix_prob is not"``.
        note: appended in parentheses, e.g. which override set the value.
    """

    path: str
    value: Any = NOTHING
    expected: str = ""
    hint: str = ""
    message: str = ""
    note: str = ""

    def __str__(self) -> str:
        if self.message or self.value is NOTHING:
            text = f"{self.path}{self.message}"
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
            message=": unknown key",
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

Check = Callable[[Any, str, Mapping], tuple[Any, list[Problem]]]


@dataclasses.dataclass(frozen=True)
class Kind:
    """What one key accepts, made by the functions below (``integer(1)``, ``choice(...)``).

    Args:
        expected: the words for what is allowed, shown when a value is refused.
        ok: whether a value is accepted; ``normalize``: how an accepted one is stored.
        hint: a suggestion for a refused value (e.g. the closest choice).
        type_name: the type, as docs show it; ``nullable``: null is accepted too.
        children: the keys below this one, where dotted overrides may go (None: not checked).
        custom: ``(value, path, earlier values) -> (value, problems)`` replacing the above, for
            a nested section (a spec, a list of rules).
    """

    expected: str = ""
    ok: Callable[[Any], bool] = lambda v: True
    normalize: Callable[[Any], Any] = lambda v: v
    hint: Callable[[Any], str] = lambda v: ""
    type_name: str = "any"
    nullable: bool = False
    children: Mapping[str, Any] | None = None
    custom: Check | None = None

    def check(self, value: Any, path: str, context: Mapping) -> tuple[Any, list[Problem]]:
        """``(stored value, problems)``; ``context`` holds the section's earlier keys."""
        if self.custom is not None:
            return self.custom(value, path, context)
        if self.nullable and value is None:
            return None, []
        if self.ok(value):
            return self.normalize(value), []
        return value, [Problem(path, value, self.expected, self.hint(value))]


def _range(low: float, high: float | None, op: str = ">=") -> str:
    return f"in [{low:g}, {high:g}]" if high is not None else f"{op} {low:g}"


def integer(low=0, high=None, *, nullable=False, also=(), expected="") -> Kind:
    """An int in ``[low, high]``; ``also``: other values taken as they are (``"tensor"``)."""
    return Kind(
        expected or "null or " * nullable + f"an int {_range(low, high)}",
        lambda v: (is_int(v) and v >= low and (high is None or v <= high)) or v in also,
        type_name="int",
        nullable=nullable,
    )


def number(low=0.0, high=None, *, nullable=False, above=False, expected="") -> Kind:
    """A number in ``[low, high]`` (``above``: strictly greater than ``low``), stored as float."""
    return Kind(
        expected or "null or " * nullable + f"a number {_range(low, high, '>' * above or '>=')}",
        lambda v: is_number(v) and (v > low if above else v >= low) and (high is None or v <= high),
        float,
        type_name="number",
        nullable=nullable,
    )


def boolean() -> Kind:
    return Kind("true or false", lambda v: isinstance(v, bool), type_name="bool")


def choice(values: Sequence[str] = (), *, enum: type[Enum] | None = None, aliases=None) -> Kind:
    """One of ``values`` (or of ``enum``'s values, stored as the enum); ``aliases`` maps other
    spellings to a value (YAML 1.1 reads a bare ``off`` as false)."""
    values, aliases = tuple(m.value for m in enum) if enum else tuple(values), aliases or {}

    def canonical(v: Any) -> Any:
        return aliases.get(v, v) if isinstance(v, Hashable) else v

    return Kind(
        " | ".join(values),
        lambda v: isinstance(v, Hashable) and canonical(v) in values,
        lambda v: enum(canonical(v)) if enum else canonical(v),
        lambda v: suggest(v, values),
        type_name="choice",
    )


def text(expected: str, *, paths: bool = False) -> Kind:
    """A non-empty string (or, with ``paths``, an ``os.PathLike``, stored as str)."""
    types = (str, os.PathLike) if paths else str
    return Kind(expected, lambda v: isinstance(v, types) and bool(os.fspath(v)), os.fspath,
                type_name="str")  # fmt: skip


def names(values: Sequence[str], expected: str) -> Kind:
    """One name or a non-empty list of names from ``values`` (stored as a tuple); null: any."""

    def check(value: Any, path: str, context: Mapping) -> tuple[Any, list[Problem]]:
        given = [value] if isinstance(value, str) else value
        if value is not None and (not isinstance(given, (list, tuple)) or not given):
            return value, [Problem(path, value, expected)]
        bad = [
            Problem(path, n, expected, suggest(n, values)) for n in given or () if n not in values
        ]
        return (value, bad) if bad else (None if value is None else tuple(given), [])

    return Kind(expected, type_name="list", custom=check)


def int_list(length: int, low: int, expected: str) -> Kind:
    ok = lambda v: (
        isinstance(v, (list, tuple)) and len(v) == length and all(is_int(i) and i >= low for i in v)
    )
    return Kind(expected, ok, tuple, type_name="list")


def mapping() -> Kind:
    """A free mapping, passed on as a dict (checked by whoever reads it)."""
    return Kind("a mapping", lambda v: isinstance(v, Mapping), dict, type_name="mapping")


# --- sections: dataclasses whose fields are options ---------------------------------------------


def option(default: Any = REQUIRED, kind: Kind = Kind(), doc: str = "", *, factory=None,
           shown=None) -> Any:  # fmt: skip
    """A dataclass field the schema knows: its default, :class:`Kind` and doc line; ``shown``:
    how docs name the key when YAML does not write it as the field's name."""
    meta = {"kind": kind, "doc": doc, "shown": shown}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def like(cls: type, name: str, **changes: Any) -> Any:
    """An option declared like ``cls.name`` (kind and doc) under another key; ``metadata["like"]``
    keeps the original name (``train.dataset`` is ``DataSpec.name``)."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    made = option(
        changes.get("default", f.default),
        changes.get("kind", f.metadata["kind"]),
        changes.get("doc", f.metadata["doc"]),
    )
    made.metadata = {**made.metadata, "like": name}
    return made


def options(cls: type) -> list[dataclasses.Field]:
    """The fields of section ``cls`` that the schema declares, in order."""
    return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]


def keys(cls: type) -> tuple[str, ...]:
    """The keys a section accepts, in the order they are declared (and messages list them)."""
    return tuple(f.name for f in options(cls))


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
                Problem(path, message=f': missing required key "{f.name}" ({f.metadata["doc"]})')
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


def section(cls: type, expected: str, shorthand: Callable[[Any], Any] = lambda v: v) -> Kind:
    """A nested section ``cls`` (null, an instance, or its mapping); ``shorthand`` turns another
    form into the mapping first (``0.3`` into ``{start: 0.3, end: 0.3}``)."""

    def check(raw: Any, path: str, context: Mapping) -> tuple[Any, list[Problem]]:
        raw = shorthand(raw)
        if raw is None or isinstance(raw, cls):
            return raw, []
        if not isinstance(raw, Mapping):
            return raw, [Problem(path, raw, expected)]
        values, problems = check_mapping(cls, raw, path)
        return (raw, problems) if problems else (cls(**values), [])

    return Kind(expected, type_name="mapping", children=_children(cls), custom=check)


def check_key(cls: type, name: str, value: Any, path: str) -> list[Problem]:
    """The problems of ``value`` given for key ``name`` of section ``cls`` (e.g. a CLI flag)."""
    (f,) = [f for f in options(cls) if f.name == name]
    return f.metadata["kind"].check(value, path, {})[1]


# --- dotted KEY=VALUE overrides ----------------------------------------------------------------


def _children(node: Any) -> Mapping[str, Any] | None:
    """The keys below a schema node (a section or a kind); None where they are not declared."""
    if isinstance(node, type) and dataclasses.is_dataclass(node):
        kinds = {f.name: f.metadata["kind"] for f in options(node)}
        return {k: kinds.get(k) for k in keys(node)}
    return node.children if isinstance(node, Kind) else None


def _set(out: dict, path: list[str], value: Any, roots: Mapping[str, Any]) -> str | None:
    """Set ``value`` at ``path`` in ``out``, checking the keys against the schema on the way."""
    node: Any = out
    children: Mapping[str, Any] | None = roots
    for depth, part in enumerate(path):
        if children is not None and part not in children:
            prefix = "".join(f"{p}." for p in path[:depth])
            hint = suggest(part, tuple(children), prefix) or f"allowed: {', '.join(children)}"
            return f"unknown key {prefix}{part}; {hint}"
        children = _children(children[part]) if children is not None else None
        index = int(part) if part.isdigit() else None
        if isinstance(node, list) and (index is None or index >= len(node)):
            return f"{part} is not an index of a list of {len(node)}"
        slot = index if isinstance(node, list) else part
        if depth == len(path) - 1:
            node[slot] = value
            return None
        child = node[slot] if isinstance(node, list) else node.get(part)
        if child is None:
            child = node[slot] = {}
        elif isinstance(child, str) and "preset" in (children or ()):
            child = node[slot] = {"preset": child}  # "default: 2bit-stochastic", then .bits=4
        elif not isinstance(child, (dict, list)):
            return f"{'.'.join(path[: depth + 1])} is {child!r}, not a mapping"
        node = child
    return None


def apply_overrides(
    raw: Mapping[str, Any], overrides: Sequence[str], roots: Mapping[str, Any], source: str
) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``raw`` with each ``a.b.c=VALUE`` set (VALUE read as YAML), and the problems.

    Keys are checked against the sections in ``roots`` (with a close-match suggestion);
    values are checked afterwards by the walker, like values in the file. List items are
    addressed by index (``quant.layers.0.bits=8``). A bad override is skipped, not fatal.
    """
    out, problems = copy.deepcopy(dict(raw)), []
    for text in overrides:
        key, sep, value_text = text.partition("=")
        path = key.strip().split(".")
        if not sep or not key.strip() or any(not p for p in path):
            why = "expected KEY=VALUE, e.g. train.epochs=3"
        else:
            try:
                why = _set(out, path, load_strict(value_text)[0] if value_text.strip() else None,
                           roots)  # fmt: skip
            except yaml.YAMLError as exc:
                why = f"{key} value is not valid YAML: {exc}"
        if why:
            problems.append(f"{source}: override {text!r}: {why}")
    return out, problems


def mark_overridden(problems: list, overrides: Sequence[str]) -> list:
    """Say which problems an override (rather than the file) set the value of."""
    given = [o.partition("=")[0].strip() for o in overrides]
    marked = []
    for p in problems:
        hits = [k for k in given if isinstance(p, Problem) and f"{p.key}.".startswith(f"{k}.")]
        marked.append(dataclasses.replace(p, note=f"set by override {hits[-1]}") if hits else p)
    return marked
