"""``qbackprop fidelity``: fp32 warm-up on the config's data, then measure_fidelity, printed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .errors import ConfigError, QbackpropUserError
from .fidelity import GROUP_BY, MAX_GROUP_DRAWS, FidelityReport, measure_fidelity
from .schema import Problem

VARIANCE_BATCHES = 16  # minibatches besides batch 0, for the fp32 gradient variance
WARMUP_LR = 1e-3

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
    p = subparsers.add_parser(
        "fidelity",
        help="gradient noise of the compression vs fp32 SGD noise, total and per group",
        description="Warm CONFIG's model up at fp32 on its dataset, then measure how much "
        "gradient noise its quant rules add, relative to SGD's own minibatch noise: in total "
        "and per family, block or layer, with a verdict.",
        epilog=FIDELITY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_warmed_model_args(p)
    p.add_argument("--draws", type=int, default=8, metavar="K", help="stochastic draws (8)")
    p.add_argument("--by", choices=GROUP_BY, default="family", help="default: family")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the ratio per group")
    p.set_defaults(func=cmd_fidelity)


def add_warmed_model_args(p: argparse.ArgumentParser) -> None:
    """The arguments ``warmed_model`` reads (and ``--json``), shared by fidelity and tune."""
    p.add_argument("config", help="YAML file with model:, quant: and train: sections")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="default: 32")
    p.add_argument(
        "--warmup-steps", type=int, default=100, metavar="S", help="fp32 steps first (100)"
    )
    p.add_argument(
        "--checkpoint", metavar="PATH", help="checkpoint.pt or run dir of qbackprop train"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--seed", type=int, metavar="N", help="default: the config's train.seed")


# --- data and weights -------------------------------------------------------------------------


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


def _load(path: str):
    from .train.config import load_run_config
    from .train.data import num_classes

    config = load_run_config(path)
    if config.classes_from_data:  # Tiny ImageNet / imagefolder: the class count is on disk
        model = dataclasses.replace(config.model, num_classes=num_classes(config.train.data_spec()))
        config = config.replace(model=model, classes_from_data=False)
    return config


def _device(name: str) -> torch.device:
    from .train.distributed import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError as exc:
        raise QbackpropUserError(str(exc)) from None


def _batches(dataset: Dataset, batch_size: int, count: int, seed: int):
    """``count`` batches in a seeded order; a new permutation whenever one runs out."""
    if len(dataset) < batch_size:
        raise QbackpropUserError(
            f"--batch-size={batch_size} is larger than the training set ({len(dataset)} images)"
        )
    generator = torch.Generator().manual_seed(seed)
    per_epoch = len(dataset) // batch_size
    for i in range(count):
        if i % per_epoch == 0:
            order = torch.randperm(len(dataset), generator=generator)
        idx = order[(i % per_epoch) * batch_size : (i % per_epoch + 1) * batch_size]
        images, labels = zip(*(dataset[int(j)] for j in idx), strict=True)
        yield torch.stack(images), torch.tensor(labels)


def _warm_up(model: nn.Module, dataset: Dataset, args, seed: int, device) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR)
    model.train()
    batches = _batches(dataset, args.batch_size, args.warmup_steps, seed)
    quiet = not sys.stderr.isatty()
    for x, y in tqdm(
        batches, total=args.warmup_steps, desc="fp32 warm-up", leave=False, disable=quiet
    ):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()


def _load_weights(model: nn.Module, path: str, config_path: str) -> None:
    from .train.checkpoint import CHECKPOINT_NAME, load_checkpoint

    given = Path(path)
    file = given / CHECKPOINT_NAME if given.is_dir() else given
    if not file.is_file():
        raise QbackpropUserError(
            f"{path}: no such checkpoint; expected a checkpoint.pt of qbackprop train or its "
            "run directory"
        )
    try:
        state = load_checkpoint(file)
    except QbackpropUserError as exc:  # torch's message may span many lines: keep the first
        raise QbackpropUserError(exc.problems[0].splitlines()[0]) from None
    weights = state.get("model", state) if isinstance(state, Mapping) else None
    if not isinstance(weights, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise QbackpropUserError(f"{file}: not a model checkpoint (no model state_dict in it)")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0].rstrip(":. ")
        raise QbackpropUserError(
            f"{file}: does not fit the model of {config_path}: {first}"
        ) from None


# --- the command --------------------------------------------------------------------------------


def _print_report(report: FidelityReport, header: str) -> None:
    from .cli import format_table

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


def warmed_model(args: argparse.Namespace):
    """``(config, data spec, model, batches)`` for a measuring command (``fidelity``, ``tune``):
    the config's model with the weights of ``--checkpoint`` or after ``--warmup-steps`` fp32
    steps, and ``1 + VARIANCE_BATCHES`` seeded batches of its training split."""
    from .train.data import build_datasets

    _check_args(args)
    config = _load(args.config)
    seed = config.train.seed if args.seed is None else args.seed
    device = _device(config.train.device)
    data = dataclasses.replace(config.train.data_spec(config.model.num_classes), augment=False)
    torch.manual_seed(seed)
    model = config.model.build().to(device)
    if args.checkpoint:
        _load_weights(model, args.checkpoint, args.config)
    train, _ = build_datasets(data)
    if not args.checkpoint:
        _warm_up(model, train, args, seed, device)
    batches = list(_batches(train, args.batch_size, 1 + VARIANCE_BATCHES, seed + 1))
    return config, data, model, batches


def cmd_fidelity(args: argparse.Namespace) -> int:
    config, data, model, batches = warmed_model(args)
    try:
        report = measure_fidelity(
            model, config.quant, batches, draws=args.draws, by=args.by, progress=sys.stderr.isatty()
        )
    except ConfigError as exc:  # a rule that matches no module of this model
        raise ConfigError([f"{args.config}: {p}" for p in exc.problems]) from None
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
        from .plots import fidelity_bar_chart

        path = fidelity_bar_chart(
            report,
            args.plot,
            title=f"{config.model.name} ({Path(args.config).name}): "
            f"compression adds {report.ratio:.2g}x the SGD noise",
        )
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
