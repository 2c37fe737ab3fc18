"""User-facing error types: a mistake in input, reported without a traceback by the CLI."""

from __future__ import annotations


class QbackpropUserError(Exception):
    """A mistake in what the user gave (config, path, name), not a bug.

    Args:
        problems: one line per problem; each names the file/key/value and what is allowed.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(QbackpropUserError, ValueError):
    """A config file or dict is invalid; ``problems`` lists every problem found."""


class DatasetNotFoundError(QbackpropUserError, FileNotFoundError):
    """A dataset directory or file is missing; the message says how to obtain it."""
