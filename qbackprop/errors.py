"""User-facing error types: a mistake in input, reported without a traceback by the CLI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class QbackpropUserError(Exception):
    """A mistake in what the user gave (config, path, name), not a bug.

    Args:
        problems: one per problem, a line of text or a structured ``schema.Problem``; each
            names the file/key/value and what is allowed.

    Attributes:
        problems: the lines, as printed.
        details: what was given (``schema.Problem`` objects keep path, value and expected).
    """

    def __init__(self, problems: list | str) -> None:
        self.details = [problems] if isinstance(problems, str) else list(problems)
        self.problems = [str(p) for p in self.details]
        super().__init__("\n".join(self.problems))


class ConfigError(QbackpropUserError, ValueError):
    """A config file or dict is invalid; ``problems`` lists every problem found."""


class DatasetNotFoundError(QbackpropUserError, FileNotFoundError):
    """A dataset directory or file is missing; the message says how to obtain it."""


@contextmanager
def config_errors(source: str | os.PathLike) -> Iterator[None]:
    """Name the config file in each problem of a ``ConfigError`` raised inside the block.

    A check of a config against a model (``convert_model``: a rule that matches no module)
    knows the rule, not the file it came from.

    Args:
        source: the config file, written in front of each problem.

    Raises:
        ConfigError: the same problems, each as ``"<source>: <problem>"``.
    """
    try:
        yield
    except ConfigError as exc:
        raise ConfigError([f"{source}: {p}" for p in exc.problems]) from None
