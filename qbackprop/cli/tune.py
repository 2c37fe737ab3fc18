"""``qbackprop tune``: per-layer bits under a memory budget, written as a config that the other
commands accept unchanged."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from ..errors import QbackpropUserError, config_errors
from ..tune import MiB, TuneResult, parse_budget, tune
from .overrides import add_override_parser
from .table import format_table
from .warmup_args import add_warmed_model_args, warmed_model_from_args

TUNE_EPILOG = """The budget: average bits per saved element (2.1), a ratio to fp32 (15x) or MiB of
saved activations at --batch-size (24MiB). Each layer's gradient noise is measured alone at
2 bits on a real batch (after S fp32 warm-up steps, or the weights of --checkpoint), its saved
bytes at every width 1..8; the solver spends the budget where it removes the most noise per
byte (one layer may get a two-bit mix), then the tuned model is measured: its bytes, corrected
until within 2 % of the budget, and its variance ratio.

examples:
  qbackprop tune configs/resnet18_cifar10_2bit.yaml --budget 2 --out tuned.yaml
  qbackprop tune configs/digits_demo.yaml --budget 15x --plot bits.png
  qbackprop tune configs/digits_demo.yaml --budget 1MiB --json > tuned.json
  qbackprop train tuned.yaml          # the tuned file is a full config
"""


def add_tune_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``tune`` subcommand."""
    p = add_override_parser(
        subparsers,
        "tune",
        help="per-layer bits from measured sensitivity under a memory budget",
        description="Measure each layer's sensitivity on CONFIG's data and choose its bits "
        "(1..8, with two-bit mixes) so that the saved activations fit --budget with the least "
        "gradient noise; write the result as a config with one rule per layer.",
        epilog=TUNE_EPILOG,
    )
    add_warmed_model_args(p)
    p.add_argument("--budget", required=True, help="2.1 (bits), 15x (ratio) or 24MiB")
    p.add_argument("--out", metavar="FILE.yaml", help="write the tuned config here")
    p.add_argument("--draws", type=int, default=1, metavar="K", help="draws per layer (1)")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the bits per block")
    p.set_defaults(func=cmd_tune)


def _print(result: TuneResult, header: str) -> None:
    print(header)
    if result.note:
        print(result.note)
        return
    top = sorted(result.layers, key=lambda c: (-c.average_bits, c.name))
    top = [c for c in top if c.predicted_bytes > 0][:10]
    rows = [
        [c.name, c.family, f"{c.average_bits:.2f}", f"{c.predicted_bytes / 1024:.1f}"] for c in top
    ]
    print("layers with the most bits:")
    print(format_table(rows, ["layer", "family", "bits", "KiB"]))
    ratio = "not measured" if result.measured_ratio is None else f"{result.measured_ratio:.3g}"
    print(
        f"\nbudget {result.budget}: {result.budget_bytes / MiB:.3f} MiB "
        f"(fp32 {result.fp32_bytes / MiB:.3f} MiB)\n"
        f"saved bytes: predicted {result.predicted_bytes / MiB:.3f} MiB, measured "
        f"{result.measured_bytes / MiB:.3f} MiB ({result.fp32_bytes / result.measured_bytes:.2f}x "
        f"less than fp32)\nvariance ratio: predicted {result.predicted_ratio:.3g}, measured {ratio}"
    )


def _write(result: TuneResult, config_path: str, overrides: list[str], out: str) -> None:
    from ..config import load_yaml_file
    from ..schema import apply_overrides
    from ..train.config import SECTIONS

    # The overrides were validated when the config was loaded; the file gets them too.
    raw, _ = apply_overrides(load_yaml_file(config_path), overrides, SECTIONS, config_path)
    raw["quant"] = result.to_yaml_dict()
    command = " ".join([config_path, *overrides])
    header = f"# qbackprop tune {command} --budget {result.budget}: one rule per layer\n"
    Path(out).write_text(header + yaml.safe_dump(raw, sort_keys=False))


def cmd_tune(args: argparse.Namespace) -> int:
    try:
        budget = parse_budget(args.budget)
    except ValueError as exc:
        raise QbackpropUserError(str(exc)) from None
    config, data, model, batches = warmed_model_from_args(args)
    with config_errors(args.config):
        result = tune(
            model, config.quant, batches, budget, draws=args.draws, progress=sys.stderr.isatty()
        )
    if args.out:
        _write(result, args.config, args.overrides, args.out)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        _print(result, f"{config.model.name} on {data.name}, batch {args.batch_size}\n")
        if args.out:
            print(f"tuned config written to {args.out}")
    if args.plot and result.layers:
        from ..plots import tune_bits_chart

        path = tune_bits_chart(model, result, args.plot, title=f"{config.model.name}: {budget}")
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
