"""Train a small EfficientNetV2 on digits at fp32, 2-bit stochastic, 4-bit nearest, 2/4 mix and
auto (bits re-tuned per layer to 12x less saved memory than fp32).

The main job of ``make demo``: offline (scikit-learn's bundled digits), a few minutes on two
CPU cores. Each variant trains the same config from the same seed; only ``quant.default``
(and, for auto, ``train.retune_every`` / ``train.retune_budget``) differs. Prints one table
(test accuracy, measured saved-activation MiB per training step, memory ratio and step-time
ratio vs fp32) and writes a plot of test accuracy per epoch.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from qbackprop.errors import QbackpropUserError
from qbackprop.train.config import load_run_config
from qbackprop.train.engine import train
from qbackprop.train.plots import plot_accuracy_curves

MiB = 2**20
# label -> (run name, overrides): quant.default presets (bucket 512, minmax scale; see
# QuantSpec.preset), and auto: qbackprop tune re-run once per epoch (22 steps) at 12x.
VARIANTS = {
    "fp32": ("fp32", ["quant.default=fp32"]),
    "2-bit stochastic": ("2bit-stochastic", ["quant.default=2bit-stochastic"]),
    "4-bit nearest": ("4bit-nearest", ["quant.default=4bit-nearest"]),
    "2/4 mix (p=0.5)": ("2-4-mix", ["quant.default=2/4-mix"]),
    "auto (12x)": (
        "auto-12x",
        ["quant.default=2bit-stochastic", "train.retune_every=22", "train.retune_budget=12x"],
    ),
}
EPILOG = """columns:
  test acc           top-1 on the 360 held-out digits after the last epoch (mean ± std over seeds)
  saved MiB/step     bytes autograd holds for backward after one training forward of a batch,
                     measured (codes + scales + masks), not computed from the bit width
  memory vs fp32     fp32 saved MiB / this variant's saved MiB (how many times less)
  step time vs fp32  median training-step time / fp32's (compression costs time on CPU)

examples:
  python scripts/demo_train.py
  python scripts/demo_train.py --seeds 3
  python scripts/demo_train.py --threads 2   # on an otherwise idle machine
  python scripts/demo_train.py --epochs 3 --out runs/demo_quick
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/digits_demo.yaml", help="base config")
    parser.add_argument("--out", default="runs/demo", help="runs and plot go here (replaced)")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per variant (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: these convolutions are small, and on a shared "
        "machine torch's thread pool slows them down several-fold)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("epochs", "seeds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def run_variants(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Train every variant and seed; returns label -> list of per-run summaries."""
    results: dict[str, list[dict]] = {label: [] for label in VARIANTS}
    total = len(VARIANTS) * args.seeds
    done = 0
    for seed in range(args.seeds):
        for label, (name, variant) in VARIANTS.items():
            overrides = [*variant, f"train.seed={seed}"]
            if args.epochs:
                overrides.append(f"train.epochs={args.epochs}")
            config = load_run_config(args.config, overrides)
            run_dir = Path(args.out) / f"{name}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
            done += 1
            print(
                f"[{done}/{total}] {label}, seed {seed}: {config.train.epochs} epochs of "
                f"{config.model.name} on {config.train.dataset}",
                flush=True,
            )
            started = time.perf_counter()
            rows = train(config, run_dir, progress=not args.quiet).metrics
            results[label].append(
                {
                    "run_dir": run_dir,
                    "acc": rows[-1]["test_acc"],
                    "saved": rows[-1]["saved_activation_bytes"],
                    "fp32": rows[-1]["fp32_activation_bytes"],
                    "step": statistics.mean(r["step_time_s"] for r in rows),
                    "batch": config.train.batch_size,
                }
            )
            print(
                f"      test accuracy {100 * rows[-1]['test_acc']:.2f}% "
                f"in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
    return results


def _mean_std(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    return (
        f"{mean:.2f}" if len(values) < 2 else f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"
    )


def format_table(results: dict[str, list[dict]]) -> str:
    base = results["fp32"]
    base_saved = statistics.mean(r["saved"] for r in base)
    base_step = statistics.mean(r["step"] for r in base)
    seeds = len(base)
    headers = [
        "variant",
        f"test acc % ({seeds} seed{'s' if seeds > 1 else ''})",
        "saved MiB/step",
        "memory vs fp32",
        "step time vs fp32",
    ]
    rows = []
    for label, runs in results.items():
        saved = statistics.mean(r["saved"] for r in runs)
        step = statistics.mean(r["step"] for r in runs)
        rows.append(
            [
                label,
                _mean_std([r["acc"] for r in runs]),
                f"{saved / MiB:.2f}",
                f"{base_saved / saved:.1f}x",
                f"{step / base_step:.2f}x",
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        results = run_variants(args)
    except QbackpropUserError as exc:
        for problem in exc.problems:
            print(f"demo_train: error: {problem}", file=sys.stderr)
        return 2
    curves = {
        f"{label} (seed {i})" if len(runs) > 1 else label: run["run_dir"]
        for label, runs in results.items()
        for i, run in enumerate(runs)
    }
    plot = plot_accuracy_curves(
        curves,
        Path(args.out) / "test_acc_vs_epoch.png",
        title="digits, test_efficientnet: test accuracy per epoch",
    )
    first = results["fp32"][0]
    print(
        f"\nsaved activations per training step of batch {first['batch']}, fp32: "
        f"{first['fp32'] / MiB:.2f} MiB"
        f" (measured); wall time {time.perf_counter() - started:.0f} s on "
        f"{torch.get_num_threads()} thread(s)\n"
    )
    print(format_table(results))
    print(f"\nplot: {plot}\nruns: {args.out}/<variant>-seed<k>/metrics.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
