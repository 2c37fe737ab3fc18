"""``qbackprop convert`` and ``qbackprop memory``: a config's per-layer plan and its measured
saved-activation memory."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import QbackpropUserError, config_errors
from ..schema import Problem
from .loading import convert_for_config, load_model_and_quant
from .table import format_table

MiB = 2**20
FALLBACK_WARN_FRACTION = 0.5  # convert warns when the fallback saves more than this share


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


def add_convert_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``convert`` and ``memory`` subcommands.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.
    """
    p = subparsers.add_parser(
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
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="checkpoint.pt or run dir of qbackprop train: show the plan that run used last "
        "(its re-tuned bits, with train.retune_every)",
    )
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser(
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


def _run_quant(path: str):
    """``(quant, epoch)`` of the re-tuned plan a ``qbackprop train`` checkpoint holds, or
    ``(None, epoch)`` when that run kept its configured plan."""
    from pathlib import Path

    from ..config import QuantConfig
    from ..train.checkpoint import CHECKPOINT_NAME, load_checkpoint

    file = Path(path) / CHECKPOINT_NAME if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise QbackpropUserError(f"--checkpoint={path!r}: no {CHECKPOINT_NAME} there")
    state = load_checkpoint(file)
    tuned = state.get("tuned_quant")
    if tuned is None:
        return None, state.get("epoch")
    with config_errors(str(file)):
        return QuantConfig.from_dict(tuned, source=f"{file} (re-tuned plan)"), state.get("epoch")


def _build_converted(args: argparse.Namespace):
    import torch

    if args.batch_size < 1:
        raise QbackpropUserError([Problem("--batch-size", args.batch_size, ">= 1")])
    model_spec, quant = load_model_and_quant(args.config, args.input_size)
    run_plan = None
    if getattr(args, "checkpoint", None):
        tuned, epoch = _run_quant(args.checkpoint)
        run_plan = (
            f"plan: the re-tuned bits of {args.checkpoint} (after epoch {epoch})"
            if tuned is not None
            else f"plan: {args.checkpoint} (epoch {epoch}) kept the configured bits"
        )
        quant = tuned or quant
    model = convert_for_config(model_spec.build(), quant, args.config, model_spec.input_size)
    x = torch.randn(args.batch_size, *model_spec.input_size)
    return model_spec, model, x, run_plan


def _retune_note(path: str) -> str | None:
    """What training does to this plan when the config re-tunes it (``train.retune_every``)."""
    from ..config import load_yaml_file
    from ..errors import ConfigError
    from ..train.config import TrainSpec

    raw = load_yaml_file(path).get("train")
    if not isinstance(raw, dict) or raw.get("retune_every") is None:
        return None
    try:
        spec = TrainSpec.from_dict(raw, source=path)
    except ConfigError:
        return None  # `qbackprop validate` names the problem; convert shows the quant plan
    budget = spec.retune_budget or "the bytes of this plan"
    return (
        f"auto bits: training starts from this plan and re-tunes it every {spec.retune_every} "
        f"steps to {budget} (qbackprop tune on the current weights; the plan in use is saved "
        "in every checkpoint)"
    )


def cmd_convert(args: argparse.Namespace) -> int:
    from .. import allocator
    from ..memory import measure_saved_activations
    from ..surgery import conversion_report, sharing_summary

    model_spec, model, x, run_plan = _build_converted(args)
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
            "run_plan": run_plan,
            "retune": _retune_note(args.config),
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
    if run_plan:
        print(run_plan)
    note = _retune_note(args.config)
    if note:
        print(note)
    tuned = allocator.allocator_settings()
    print(
        "host allocator: "
        + (tuned.describe() if tuned is not None else f"untouched ({allocator.why_not_tuned()})")
    )
    if args.save:
        print(f"state_dict written to {args.save} (loads into the unconverted model)")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from ..blocks import block_namer
    from ..memory import measure_saved_activations

    model_spec, model, x, _ = _build_converted(args)
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
        from ..plots import memory_bar_chart

        path = memory_bar_chart(rows, args.plot)
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
