"""``qbackprop fidelity``: fp32 warm-up on the config's data, then measure_fidelity, printed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import config_errors
from ..fidelity import GROUP_BY, MAX_GROUP_DRAWS, FidelityReport, measure_fidelity
from .overrides import add_override_parser
from .table import format_table
from .warmup_args import add_warmed_model_args, warmed_model_from_args

FIDELITY_EPILOG = """ratio = E||g_q - g||^2 over K stochastic draws of the converted model's
gradient on one batch, divided by the fp32 gradient variance across 16 minibatches of the
same size: below 1 the compression adds less noise than SGD already has. Each family (or
block, or layer) is then measured alone, everything else uncompressed; a group above 0.25x
gets a warning line with the rule to add. The model first trains S fp32 steps (AdamW, lr
1e-3) on the config's train: dataset, unless --checkpoint gives the weights of a
`qbackprop train` run. The exit code is 0 whatever the ratio (2: a config or usage mistake).

examples:
  qbackprop fidelity configs/digits_demo.yaml
  qbackprop fidelity configs/efficientnetv2_cifar10_2bit.yaml --by block --plot fidelity.png
  qbackprop fidelity configs/digits_demo.yaml --checkpoint runs/digits --json > fidelity.json
"""


def add_fidelity_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``fidelity`` subcommand.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.
    """
    p = add_override_parser(
        subparsers,
        "fidelity",
        help="gradient noise of the compression vs fp32 SGD noise, total and per group",
        description="Warm CONFIG's model up at fp32 on its dataset, then measure how much "
        "gradient noise its quant rules add, relative to SGD's own minibatch noise: in total "
        "and per family, block or layer, with a verdict.",
        epilog=FIDELITY_EPILOG,
    )
    add_warmed_model_args(p)
    p.add_argument("--draws", type=int, default=8, metavar="K", help="stochastic draws (8)")
    p.add_argument("--by", choices=GROUP_BY, default="family", help="default: family")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the ratio per group")
    p.set_defaults(func=cmd_fidelity)


# --- the command --------------------------------------------------------------------------------


def _print_report(report: FidelityReport, header: str) -> None:
    rows = [[g.name, g.family, f"{g.ratio:.3g}"] for g in report.groups]
    rows.append(["total", "all", f"{report.ratio:.3g}"])
    print(header)
    print(format_table(rows, ["group", "family", "ratio"]))
    print(
        f"\nratio: {report.ratio:.3g}x the fp32 SGD noise (minibatch gradient variance "
        f"{report.minibatch_variance:.4g})\nbias: the mean of {report.draws} draws is off by "
        f"{report.bias:.3g} of |g| ({report.ideal_bias:.3g} for an unbiased estimator)"
    )
    for line in report.verdict:
        print(line)


def cmd_fidelity(args: argparse.Namespace) -> int:
    config, data, model, batches = warmed_model_from_args(args)
    with config_errors(args.config):  # a rule that matches no module of this model
        report = measure_fidelity(
            model, config.quant, batches, draws=args.draws, by=args.by, progress=sys.stderr.isatty()
        )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        start = args.checkpoint or f"{args.warmup_steps} fp32 warm-up steps"
        _print_report(
            report,
            f"{config.model.name} on {data.name} (train split), batch {args.batch_size}, "
            f"{start}, {args.draws} draws ({min(args.draws, MAX_GROUP_DRAWS)} per group)\n",
        )
    if args.plot:
        from ..plots import fidelity_bar_chart

        path = fidelity_bar_chart(
            report,
            args.plot,
            title=f"{config.model.name} ({Path(args.config).name}): "
            f"compression adds {report.ratio:.2g}x the SGD noise",
        )
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
