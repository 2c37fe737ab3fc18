"""YAML as PyYAML's safe loader reads it, except that a key written twice in one mapping is
an error instead of the last one silently winning. Anchors, aliases and ``<<`` merges keep
their YAML meaning (a key given explicitly overrides the same key merged in)."""

from __future__ import annotations

from typing import Any

import yaml

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
