"""How the CLI reports a user's mistake: one line per problem on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys

from ..errors import QbackpropUserError

EXIT_USAGE = 2


class UsageErrorParser(argparse.ArgumentParser):
    """argparse, but usage errors are reported like config errors (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise QbackpropUserError(f"{self.prog}: {message} (see {self.prog} --help)")


def report_user_error(exc: QbackpropUserError) -> int:
    """Print each problem of ``exc`` as one ``qbackprop: error:`` line; return ``EXIT_USAGE``."""
    for problem in exc.problems:
        print(f"qbackprop: error: {problem}", file=sys.stderr)
    return EXIT_USAGE
