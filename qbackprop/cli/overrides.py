"""Dotted ``KEY=VALUE`` config overrides on the command line: a subcommand parser that also
collects them when they follow options (argparse would otherwise reject them as extras)."""

from __future__ import annotations

import argparse
from typing import Any


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _override_parser(base: type[argparse.ArgumentParser]) -> type[argparse.ArgumentParser]:
    class OverrideParser(base):  # type: ignore[misc, valid-type]
        """Also accepts KEY=VALUE overrides after options: argparse leaves positionals that
        follow an option over, so they are collected here instead of rejected."""

        def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
            namespace, extras = super().parse_known_args(args, namespace)
            late = [a for a in extras if _is_override(a)]
            namespace.overrides = [*(getattr(namespace, "overrides", None) or []), *late]
            return namespace, [a for a in extras if not _is_override(a)]

    return OverrideParser


def add_override_parser(subparsers, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """``subparsers.add_parser(name, **kwargs)`` whose parser also collects ``KEY=VALUE``
    overrides given after options (into ``overrides``), with a raw-text epilog."""
    original = subparsers._parser_class  # keep the CLI's parser class (its error handling)
    subparsers._parser_class = _override_parser(original)
    try:
        return subparsers.add_parser(
            name, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
        )
    finally:
        subparsers._parser_class = original
