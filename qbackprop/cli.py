"""The ``qbackprop`` console script: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, QbackpropUserError
from .schema import Problem

EXIT_USAGE = 2
MiB = 2**20
FALLBACK_WARN_FRACTION = 0.5  # convert warns when the fallback saves more than this share

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


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are reported like config errors (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise QbackpropUserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file with model: and quant: sections")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="default: 32")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="override model.input_size, e.g. 3 64 64",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qbackprop",
        description="Train networks with the activations autograd saves stored as packed "
        "low-bit codes (stochastic or nearest rounding, per-bucket scales, two-bit mixing).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qbackprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "convert",
        help="per-layer plan and measured memory of a config",
        description="Build the model of CONFIG, apply its quant rules and print the per-layer "
        "plan and the saved-activation memory of one training forward (measured).",
        epilog="example:\n  qbackprop convert configs/efficientnetv2_cifar10_2bit.yaml "
        "--batch-size 64 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--save", metavar="PATH", help="write a state_dict a plain model loads")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "memory",
        help="per-block saved-activation memory table (and PNG)",
        description="The thesis's per-block activation-memory table, measured: elements saved, "
        "fp32 MiB, converted MiB, saved MiB and ratio per block, plus totals.",
        epilog="example:\n  qbackprop memory configs/efficientnetv2_cifar10_2bit.yaml "
        "--plot memory.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p)
    p.add_argument("--by", choices=["block", "layer"], default="block", help="default: block")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of fp32 vs converted")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser(
        "validate",
        help="check a config and its model",
        description="Check CONFIG (every problem at once; with a train: section, that too and "
        "that model and data agree) and that its rules match the model.",
        epilog="example:\n  qbackprop validate configs/per_layer_example.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML file")
    p.set_defaults(func=cmd_validate)

    from .fidelity_cli import add_fidelity_parser
    from .schema_cli import add_schema_parser
    from .train.cli_commands import add_train_parsers
    from .tune_cli import add_tune_parser

    add_fidelity_parser(sub)
    add_tune_parser(sub)
    add_train_parsers(sub)
    add_schema_parser(sub)
    return parser


# --- loading ------------------------------------------------------------------------------


def load_model_and_quant(path: str, input_size: Sequence[int] | None = None):
    """``(ModelSpec, QuantConfig)`` of a config file; every problem of both sections at once."""
    from .config import load_config as load_quant
    from .config import load_yaml_file
    from .models import ModelSpec, model_spec_from_dict
    from .schema import check_key

    raw = load_yaml_file(path)
    problems: list = []
    model_spec = quant = None
    try:
        model_spec = model_spec_from_dict(raw.get("model"), source=path)
    except ConfigError as exc:
        problems += exc.problems
    try:
        quant = load_quant(path)
    except ConfigError as exc:
        problems += exc.problems
    if input_size is not None:
        problems += check_key(ModelSpec, "input_size", list(input_size), "--input-size")
    if problems:
        raise ConfigError(problems)
    if input_size is not None:
        from dataclasses import replace

        model_spec = replace(model_spec, input_size=tuple(input_size))
    return model_spec, quant


def _build_converted(args):
    import torch

    from .surgery import convert_model

    if args.batch_size < 1:
        raise QbackpropUserError([Problem("--batch-size", args.batch_size, ">= 1")])
    model_spec, quant = load_model_and_quant(args.config, args.input_size)
    model = model_spec.build()
    try:
        convert_model(model, quant)
    except ConfigError as exc:
        raise ConfigError([f"{args.config}: {p}" for p in exc.problems]) from None
    x = torch.randn(args.batch_size, *model_spec.input_size)
    return model_spec, model, x


# --- commands -----------------------------------------------------------------------------


def format_table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_convert(args) -> int:
    from . import allocator
    from .memory import measure_saved_activations
    from .surgery import conversion_report, sharing_summary

    model_spec, model, x = _build_converted(args)
    report = measure_saved_activations(model, x)
    if report.fallback_fraction > FALLBACK_WARN_FRACTION:
        print(
            f"warning: {100 * report.fallback_fraction:.0f}% of the fp32 saved bytes of "
            f"{args.config} come from ops without a qbackprop drop-in; the generic fallback keeps "
            "them at 8 bits or more, so memory and gradients are what it can do, not what the "
            "config asks; check with `qbackprop fidelity`",
            file=sys.stderr,
        )
    memory_by_name = {r.name: r for r in report.rows}
    plan = conversion_report(model)
    if args.save:
        import torch

        torch.save(model.state_dict(), args.save)
    if args.json:
        layers = []
        for row in plan:
            entry = row.as_dict()
            mem = memory_by_name.get(row.name)
            entry["fp32_bytes"] = mem.fp32_bytes if mem else 0
            entry["converted_bytes"] = mem.stored_bytes if mem else 0
            layers.append(entry)
        out = {
            "model": model_spec.to_dict(),
            "batch_size": args.batch_size,
            **{k: v for k, v in report.to_dict().items() if k != "layers"},
            "sharing_plan": sharing_summary(model),
            "layers": layers,
        }
        print(json.dumps(out, indent=2))
        return 0
    rows = [
        [r.name, r.module_type, r.spec.short() if r.converted else f"skipped: {r.reason}", r.keeps]
        for r in plan
    ]
    print(format_table(rows, ["layer", "type", "plan", "keeps"]))
    converted = sum(r.converted for r in plan)
    print(
        f"\n{model_spec.name}: {converted} of {len(plan)} layers converted; "
        f"saved activations for batch {args.batch_size}x{'x'.join(map(str, model_spec.input_size))}"
        f" (measured): fp32 {report.fp32_bytes / MiB:.2f} MiB -> "
        f"{report.stored_bytes / MiB:.2f} MiB, ratio {report.ratio:.2f}x, "
        f"{100 * report.compressed_fraction:.1f}% of fp32 bytes compressed"
    )
    print(f"sharing plan: {sharing_summary(model) or 'none needed'}")
    tuned = allocator.allocator_settings()
    print(
        "host allocator: "
        + (tuned.describe() if tuned is not None else f"untouched ({allocator.why_not_tuned()})")
    )
    if args.save:
        print(f"state_dict written to {args.save} (loads into the unconverted model)")
    return 0


def cmd_memory(args) -> int:
    from .blocks import block_namer
    from .memory import measure_saved_activations

    model_spec, model, x = _build_converted(args)
    report = measure_saved_activations(model, x)
    rows = report.grouped(block_namer(model)) if args.by == "block" else report.rows
    if args.json:
        print(json.dumps({**report.to_dict(), "by": args.by, "rows": [
            {"name": r.name, "elements": r.elements, "fp32_bytes": r.fp32_bytes,
             "converted_bytes": r.stored_bytes} for r in rows]}, indent=2))  # fmt: skip
    else:
        table = [
            [r.name, r.elements, f"{r.fp32_bytes / MiB:.3f}", f"{r.stored_bytes / MiB:.3f}",
             f"{(r.fp32_bytes - r.stored_bytes) / MiB:.3f}", f"{r.ratio:.2f}x"]
            for r in rows
        ]  # fmt: skip
        table.append([
            "total", sum(r.elements for r in rows), f"{report.fp32_bytes / MiB:.3f}",
            f"{report.stored_bytes / MiB:.3f}",
            f"{(report.fp32_bytes - report.stored_bytes) / MiB:.3f}", f"{report.ratio:.2f}x",
        ])  # fmt: skip
        print(
            format_table(
                table, [args.by, "elements", "fp32 MiB", "converted MiB", "saved MiB", "ratio"]
            )
        )
    if args.plot:
        from .plots import memory_bar_chart

        path = memory_bar_chart(rows, args.plot)
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_validate(args) -> int:
    from .config import load_yaml_file
    from .surgery import conversion_report, convert_model
    from .train.config import run_config_from_dict

    raw = load_yaml_file(args.config)
    if "train" in raw:  # a training config: every section, and that model and data agree
        run_config_from_dict(raw, source=args.config)
    model_spec, quant = load_model_and_quant(args.config)
    model = model_spec.build()
    try:
        convert_model(model, quant)
    except ConfigError as exc:
        raise ConfigError([f"{args.config}: {p}" for p in exc.problems]) from None
    plan = conversion_report(model)
    converted = sum(r.converted for r in plan)
    print(f"{args.config}: OK ({model_spec.name}, {converted} of {len(plan)} layers converted)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for a usage or config mistake)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0
        if hasattr(args, "config") and not Path(args.config).exists():
            raise ConfigError(f"{args.config}: no such file")
        import warnings

        warnings.filterwarnings("ignore", message=".*nothing to convert.*")
        return args.func(args)
    except QbackpropUserError as exc:
        for problem in exc.problems:
            print(f"qbackprop: error: {problem}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
