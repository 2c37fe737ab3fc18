"""The arguments of the measuring commands (``fidelity``, ``tune``) that choose the weights and
batches they measure on, and their translation to :func:`qbackprop.warmup.warmed_model`."""

from __future__ import annotations

import argparse
import sys

from ..errors import QbackpropUserError
from ..schema import Problem
from ..warmup import WarmedModel, warmed_model


def add_warmed_model_args(p: argparse.ArgumentParser) -> None:
    """The arguments ``warmed_model_from_args`` reads (and ``--json``)."""
    p.add_argument("config", help="YAML file with model:, quant: and train: sections")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="default: 32")
    p.add_argument(
        "--warmup-steps", type=int, default=100, metavar="S", help="fp32 steps first (100)"
    )
    p.add_argument(
        "--checkpoint", metavar="PATH", help="checkpoint.pt or run dir of qbackprop train"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--seed", type=int, metavar="N", help="default: the config's train.seed")


def _check_args(args: argparse.Namespace) -> None:
    limits = {"--batch-size": (args.batch_size, 1), "--draws": (args.draws, 1)}
    limits["--warmup-steps"] = (args.warmup_steps, 0)
    problems = [
        str(Problem(flag, value, f">= {low}"))
        for flag, (value, low) in limits.items()
        if value < low
    ]
    if problems:
        raise QbackpropUserError(problems)


def warmed_model_from_args(args: argparse.Namespace) -> WarmedModel:
    """``warmed_model`` of ``args.config`` with the flags of ``add_warmed_model_args``, after
    checking them (and ``--draws``) all at once."""
    _check_args(args)
    return warmed_model(
        args.config,
        overrides=args.overrides,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        checkpoint=args.checkpoint,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
