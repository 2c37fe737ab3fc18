"""The ``qbackprop`` parser, with one subcommand per module of this package, and ``main``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, QbackpropUserError
from .convert import add_convert_parsers
from .errors import UsageErrorParser, report_user_error
from .fidelity import add_fidelity_parser
from .schema import add_schema_parser
from .train import add_train_parsers
from .tune import add_tune_parser
from .validate import add_validate_parser

EPILOG = """commands:
  convert   build the model of a config, apply its quant rules, print the per-layer plan
            and the measured saved-activation memory (fp32 vs converted)
  memory    the per-block memory table (stem, blocks.N, head, classifier), optional PNG
  fidelity  how much gradient noise the compression adds vs fp32 SGD noise (after a short
            fp32 warm-up on the config's data), total and per family / block / layer
  tune      per-layer bits from measured sensitivity under a memory budget, written as a
            config (--budget 2.1 bits | 15x | 24MiB)
  validate  check a config and its model without running anything heavy
  train     train a model (dataset, schedule, AMP, seeds from the train: section)
  sweep     bit-width / rounding / bucket / mix sweeps and the layer-sensitivity study
  plot      PNG plots of a run or a sweep directory
  schema    every config key: type, default, allowed values and doc (docs/config.md)

examples:
  qbackprop convert configs/efficientnetv2_cifar10_2bit.yaml --batch-size 64
  qbackprop convert configs/efficientnetv2_cifar10_2bit.yaml --json > plan.json
  qbackprop memory configs/efficientnetv2_cifar10_2bit.yaml --plot memory.png
  qbackprop fidelity configs/digits_demo.yaml --by block --plot fidelity.png
  qbackprop tune configs/digits_demo.yaml --budget 2 --out tuned.yaml
  qbackprop validate configs/per_layer_example.yaml
  qbackprop train configs/digits_demo.yaml --out runs/demo train.epochs=3
  qbackprop sweep configs/digits_demo.yaml --bits 2,4,32 --seeds 3 --out runs/sweep
  qbackprop plot runs/sweep
  qbackprop schema train

A config or usage mistake exits with code 2 and one line per problem on stderr.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``qbackprop`` parser with every subcommand registered."""
    parser = UsageErrorParser(
        prog="qbackprop",
        description="Train networks with the activations autograd saves stored as packed "
        "low-bit codes (stochastic or nearest rounding, per-bucket scales, two-bit mixing).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qbackprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=UsageErrorParser)
    add_convert_parsers(sub)
    add_validate_parser(sub)
    add_fidelity_parser(sub)
    add_tune_parser(sub)
    add_train_parsers(sub)
    add_schema_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for a usage or config mistake).

    Args:
        argv: the arguments after ``qbackprop``; default ``sys.argv[1:]``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0
        if hasattr(args, "config") and not Path(args.config).exists():
            raise ConfigError(f"{args.config}: no such file")
        return args.func(args)
    except QbackpropUserError as exc:
        return report_user_error(exc)


if __name__ == "__main__":
    sys.exit(main())
