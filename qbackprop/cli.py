"""The ``qbackprop`` console script: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import sys

from . import __version__

EPILOG = """examples:
  qbackprop --version
  python -c "import qbackprop as qb, torch; print(qb.compress(torch.randn(1024), '2bit-stochastic'))"
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbackprop",
        description="Train networks with the activations autograd saves stored as packed "
        "low-bit codes (stochastic or nearest rounding, per-bucket scales, two-bit mixing).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qbackprop {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for a usage or config mistake)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
