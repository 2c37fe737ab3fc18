"""Reading a YAML config file: PyYAML's safe loader, except that a key written twice in one
mapping is an error instead of the last one silently winning, and ``1e-3`` is a number (YAML
1.2; PyYAML's 1.1 rules read it as a string unless written ``1.0e-3``). Anchors, aliases and
``<<`` merges keep their YAML meaning (a key given explicitly overrides the same key merged in)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

_MERGE = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[Any, int, int]] = []  # (key, first line, second line)

    def construct_mapping(self, node, deep=False):
        # Checked before the merge keys are flattened in: only keys written in this mapping.
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.duplicates.append((key, seen[key], line))
            else:
                seen[key] = line
        return super().construct_mapping(node, deep)


# Exponent floats without a dot (1e-3, 5E4): numbers in YAML 1.2 and in every other config format.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_strict(text: str) -> tuple[Any, list[tuple[Any, int, int]]]:
    """The document of ``text`` and every duplicate key found, as ``(key, line, line)``.

    Raises:
        yaml.YAMLError: ``text`` is not valid YAML (PyYAML's message, with the position).
    """
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file.

    Raises:
        ConfigError: naming the file when it is missing, a directory, empty, not valid YAML
            (with line and column), a key is written twice in one mapping, or the top level
            is not a mapping.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file (looked in {Path.cwd()} for relative paths)")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected a YAML file")
    try:
        data, duplicates = load_strict(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or exc
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
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
    expected = "a mapping with keys model, quant, train"
    if data is None:
        raise ConfigError(f"{path}: file is empty; expected {expected}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level is a {type(data).__name__}; expected {expected}")
    return data
