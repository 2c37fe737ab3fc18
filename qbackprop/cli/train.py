"""``qbackprop train | sweep | plot``: argument parsing only; the work is in the library."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .overrides import add_override_parser

MiB = 2**20

TRAIN_EPILOG = """KEY=VALUE overrides set any config key by its dotted path; VALUE is read as YAML
and checked like the file:
  train.epochs=3  train.lr=5e-4  model.name=resnet10t  quant.default.bits=4
  quant.default=2bit-stochastic  model.input_size=[3,64,64]  quant.layers.0.bits=8

RUNDIR gets config.yaml (fully resolved), metrics.csv (one row per epoch) and checkpoint.pt
(replaced atomically each epoch). Multi-process (DDP): launch with torchrun, e.g.
  torchrun --nproc_per_node 4 -m qbackprop train CONFIG

examples:
  qbackprop train configs/digits_demo.yaml --out runs/digits
  qbackprop train configs/thesis_cifar10.yaml train.epochs=3 quant.default.bits=4
  qbackprop train configs/thesis_cifar10.yaml --out runs/c10 --resume train.epochs=80
"""

SWEEP_EPILOG = """Each combination of the listed values runs --seeds times (seeds train.seed,
train.seed+1, ...) into SWEEPDIR/runs/<setting>-seed<k>; SWEEPDIR/summary.csv gets the mean and
std across seeds of final and best test accuracy and of the measured saved-activation bytes.
Starting the same sweep again resumes unfinished runs and skips finished ones.

--layers is the per-block sensitivity study: one block (stem, blocks.N, head, classifier,
found automatically) at --bits (default 4), every other block at full precision, plus an
all-fp32 reference run.

examples:
  qbackprop sweep configs/thesis_cifar10.yaml --bits 1,2,4,8,32 --rounding nearest,stochastic \\
      --seeds 3
  qbackprop sweep configs/thesis_cifar10.yaml --bits 2,4 --bucket-size 64,128,256,512
  qbackprop sweep configs/thesis_cifar10.yaml --bits 2 --mix-bits 4 --mix-prob 0.2,0.5,0.8
  qbackprop sweep configs/thesis_cifar10.yaml --layers --bits 4 --seeds 2
  qbackprop sweep configs/digits_demo.yaml --bits 2,4 --seeds 2 train.epochs=2 --dry-run
"""

PLOT_EPILOG = """A run directory gives accuracy.png and loss.png; a sweep directory gives
test_acc_vs_epoch.png, final_acc_vs_bits.png and memory_vs_bits.png (or final_acc_by_layer.png
for a --layers sweep); a directory of run directories gives test_acc_vs_epoch.png.

examples:
  qbackprop plot runs/digits
  qbackprop plot runs/sweep-thesis_cifar10 --out figures/
"""


def _list_of(kind: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}")
        return values

    return parse


def _bucket(text: str) -> int | str:
    return "tensor" if text == "tensor" else int(text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file with model:, quant: and train: sections")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def add_train_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``train``, ``sweep`` and ``plot`` subcommands.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.
    """
    p = add_override_parser(
        subparsers,
        "train",
        help="train a config; metrics.csv, checkpoint, resumable",
        description="Train the model of CONFIG with its quant rules on its train: dataset. "
        "Every epoch appends a row to RUNDIR/metrics.csv and replaces RUNDIR/checkpoint.pt.",
        epilog=TRAIN_EPILOG,
    )
    _common(p)
    p.add_argument("--out", metavar="RUNDIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue RUNDIR's run to train.epochs")
    p.set_defaults(func=cmd_train)

    p = add_override_parser(
        subparsers,
        "sweep",
        help="bit-width / rounding / bucket / mix grids or the per-block study, K seeds",
        description="Run a grid of quant settings (or one block at a time with --layers), "
        "each --seeds times, and summarise mean and std across seeds.",
        epilog=SWEEP_EPILOG,
    )
    _common(p)
    p.add_argument("--out", metavar="SWEEPDIR", help="default: runs/sweep-<config name>")
    p.add_argument(
        "--bits",
        type=_list_of(int, "comma-separated ints, e.g. 1,2,4,32"),
        metavar="B,B,...",
        help="bit-widths, 1..32 (32: full precision); --layers default: 4",
    )
    p.add_argument(
        "--rounding",
        type=_list_of(str, "nearest,stochastic"),
        metavar="R,R",
        help="nearest and/or stochastic",
    )
    p.add_argument(
        "--bucket-size",
        type=_list_of(_bucket, 'ints or "tensor", e.g. 64,512'),
        metavar="N,N,...",
        help='elements per scale, or "tensor"',
    )
    p.add_argument(
        "--mix-prob",
        type=_list_of(float, "probabilities, e.g. 0.2,0.5,0.8"),
        metavar="P,P,...",
        help="probability per bucket of --mix-bits (two-bit mixing)",
    )
    p.add_argument("--mix-bits", type=int, help="second bit-width for --mix-prob")
    p.add_argument("--seeds", type=int, default=1, metavar="K", help="runs per setting (default 1)")
    p.add_argument("--layers", action="store_true", help="per-block sensitivity study")
    p.add_argument(
        "--blocks",
        type=_list_of(str, "block names"),
        metavar="NAME,...",
        help="with --layers: only these blocks, e.g. stem,blocks.3",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser(
        "plot",
        help="PNG plots of a run or sweep directory",
        description="Plot test accuracy per epoch, final accuracy and memory vs bits.",
        epilog=PLOT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("rundir", metavar="RUNDIR_OR_SWEEPDIR", help="a run or sweep directory")
    p.add_argument("--out", metavar="DIR", help="where the PNGs go (default: <dir>/plots)")
    p.set_defaults(func=cmd_plot)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.config import load_run_config
    from ..train.engine import train

    config = load_run_config(args.config, args.overrides)
    out = args.out or str(Path("runs") / Path(args.config).stem)
    result = train(config, out, resume=args.resume, progress=not args.quiet)
    if result.metrics and _is_main():
        last = result.metrics[-1]
        best = max(r["test_acc"] for r in result.metrics)
        print(
            f"{out}: {len(result.metrics)} epochs, test accuracy {100 * last['test_acc']:.2f}% "
            f"(best {100 * best:.2f}%), saved activations "
            f"{last['saved_activation_bytes'] / MiB:.2f} MiB/step "
            f"(fp32 {last['fp32_activation_bytes'] / MiB:.2f} MiB)"
        )
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..train.config import load_run_config
    from ..train.sweep import plan_bit_sweep, plan_layer_sweep, run_sweep

    config = load_run_config(args.config, args.overrides)
    if args.layers:
        runs = plan_layer_sweep(config, bits=args.bits, seeds=args.seeds, blocks=args.blocks)
    else:
        runs = plan_bit_sweep(
            config,
            bits=args.bits,
            rounding=args.rounding,
            bucket_size=args.bucket_size,
            mix_prob=args.mix_prob,
            mix_bits=args.mix_bits,
            seeds=args.seeds,
        )
    out = args.out or str(Path("runs") / f"sweep-{Path(args.config).stem}")
    if args.dry_run:
        for run in runs:
            print(f"{out}/runs/{run.name}")
        print(f"{len(runs)} runs of {config.train.epochs} epochs")
        return 0
    summary = run_sweep(runs, out, progress=not args.quiet)
    for row in summary:
        print(
            f"{row['group']}: final {100 * row['final_acc_mean']:.2f}% ± "
            f"{100 * row['final_acc_std']:.2f} ({row['seeds']} seeds), "
            f"{row['memory_ratio']:.1f}x less saved memory"
        )
    print(f"summary written to {out}/summary.csv")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ..train.plots import plot

    for path in plot(args.rundir, args.out):
        print(path)
    return 0
