"""``qbackprop validate``: check a config (and, for a training config, its train: section) and
that its rules match its model, without running anything heavy."""

from __future__ import annotations

import argparse

from .loading import convert_for_config, load_model_and_quant


def add_validate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``validate`` subcommand.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.
    """
    p = subparsers.add_parser(
        "validate",
        help="check a config and its model",
        description="Check CONFIG (every problem at once; with a train: section, that too and "
        "that model and data agree) and that its rules match the model.",
        epilog="example:\n  qbackprop validate configs/per_layer_example.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML file")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from ..config import load_yaml_file
    from ..surgery import conversion_report
    from ..train.config import run_config_from_dict

    raw = load_yaml_file(args.config)
    if "train" in raw:  # a training config: every section, and that model and data agree
        run_config_from_dict(raw, source=args.config)
    model_spec, quant = load_model_and_quant(args.config)
    model = convert_for_config(model_spec.build(), quant, args.config, model_spec.input_size)
    plan = conversion_report(model)
    converted = sum(r.converted for r in plan)
    print(f"{args.config}: OK ({model_spec.name}, {converted} of {len(plan)} layers converted)")
    return 0
