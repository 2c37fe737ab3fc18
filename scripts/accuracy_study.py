"""The accuracy study: fp32, uniform 2-bit and auto (re-tuned to a memory target) per model,
several seeds each, with the accuracy curve per epoch per setting.

Each model's config (``configs/study/<model>_digits.yaml`` by default) is trained with:

- ``fp32``: ``quant.default=fp32`` (torch's own modules), no re-tuning;
- ``2bit``: the config's quant section (the uniform 2-bit stochastic preset), no re-tuning;
- ``auto``: the same, re-tuned every ``--retune-every`` steps to ``--target`` (default 12x) by
  ``qbackprop tune``'s sensitivities (``train.retune_every`` / ``train.retune_budget``: what
  the study configs set, so ``qbackprop train`` on one of them is this setting).

Runs go to ``OUT/<model>/<setting>-seed<k>`` through ``qbackprop.train`` (an interrupted study
resumes where it stopped). ``OUT/summary.csv`` and ``summary.json`` get the mean and sample
std across seeds of the final and best test accuracy and of the measured saved-activation
ratio, and whether each setting is within 0.5 points or one fp32 std of fp32 (the study's
bar); ``OUT/<model>.png`` plots the test accuracy per epoch (mean, and the band of min..max
over seeds) of every setting.

Example (the whole study of docs/benchmarks.md; hours on a 2-core CPU):
    python scripts/accuracy_study.py --seeds 3 --out runs/study
    python scripts/accuracy_study.py --models resnet18 --seeds 1 --epochs 2 --out /tmp/s
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

from qbackprop.train.checkpoint import CHECKPOINT_NAME
from qbackprop.train.config import load_run_config
from qbackprop.train.engine import train
from qbackprop.train.metrics import read_metrics

MODELS = (
    "resnet18",
    "efficientnetv2_rw_t",
    "convnext_atto",
    "mobilenetv3_large_100",
    "vit_tiny",
)
SETTINGS = ("fp32", "2bit", "auto")
COLUMNS = (
    "model",
    "setting",
    "seeds",
    "final_acc_mean",
    "final_acc_std",
    "best_acc_mean",
    "memory_ratio_mean",
    "faithful",
)


def setting_overrides(setting: str, target: str, retune_every: int) -> list[str]:
    """The KEY=VALUE overrides that turn a study config into ``setting``."""
    off = ["train.retune_every=null", "train.retune_budget=null"]
    if setting == "fp32":
        return ["quant.default=fp32", *off]
    if setting == "2bit":
        return off
    if setting == "auto":
        return [f"train.retune_every={retune_every}", f"train.retune_budget={target}"]
    raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(curves: dict[str, list[list[dict]]], model: str) -> list[dict]:
    """One row per setting of ``model``; ``curves[setting]`` holds each seed's metrics rows."""
    rows = []
    for setting, runs in curves.items():
        final = [100 * float(r[-1]["test_acc"]) for r in runs]
        best = [100 * max(float(x["test_acc"]) for x in r) for r in runs]
        ratio = [
            float(r[-1]["fp32_activation_bytes"]) / max(float(r[-1]["saved_activation_bytes"]), 1)
            for r in runs
        ]
        mean, std = _mean_std(final)
        rows.append(
            {
                "model": model,
                "setting": setting,
                "seeds": len(runs),
                "final_acc_mean": mean,
                "final_acc_std": std,
                "best_acc_mean": _mean_std(best)[0],
                "memory_ratio_mean": _mean_std(ratio)[0],
            }
        )
    ref = next((r for r in rows if r["setting"] == "fp32"), None)
    for row in rows:
        if ref is None or row is ref:
            row["faithful"] = ""
            continue
        gap = ref["final_acc_mean"] - row["final_acc_mean"]
        spread = ref["final_acc_std"] if not math.isnan(ref["final_acc_std"]) else 0.0
        row["faithful"] = "yes" if gap <= max(0.5, spread) else f"no ({gap:.2f} points below)"
    return rows


def plot_curves(curves: dict[str, list[list[dict]]], path: Path, title: str) -> Path:
    """Test accuracy per epoch: the mean over seeds, with the min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for setting, runs in curves.items():
        epochs = min(len(r) for r in runs)
        acc = [[100 * float(r[e]["test_acc"]) for r in runs] for e in range(epochs)]
        x = list(range(1, epochs + 1))
        ax.plot(x, [statistics.fmean(a) for a in acc], label=f"{setting} ({len(runs)} seeds)")
        ax.fill_between(x, [min(a) for a in acc], [max(a) for a in acc], alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="default: each config's train.epochs")
    parser.add_argument("--target", default="12x", help="auto's memory target (default 12x)")
    parser.add_argument("--retune-every", type=int, default=100, help="auto: steps (100)")
    parser.add_argument("--configs", default="configs/study", help="folder of <model>_digits.yaml")
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for model in args.models.split(","):
        path = Path(args.configs) / f"{model}_digits.yaml"
        if not path.exists():
            print(f"{path}: no study config for {model}", file=sys.stderr)
            return 2
        curves: dict[str, list[list[dict]]] = {}
        for setting in args.settings.split(","):
            overrides = setting_overrides(setting, args.target, args.retune_every)
            if args.epochs:
                overrides.append(f"train.epochs={args.epochs}")
            base = load_run_config(path, overrides)
            for k in range(args.seeds):
                seed = base.train.seed + k
                config = load_run_config(path, [*overrides, f"train.seed={seed}"])
                run_dir = out / model / f"{setting}-seed{seed}"
                resume = (run_dir / CHECKPOINT_NAME).exists()
                if not (resume and len(read_metrics(run_dir)) >= config.train.epochs):
                    train(config, run_dir, resume=resume, progress=not args.quiet)
                curves.setdefault(setting, []).append(read_metrics(run_dir))
        rows = summarize(curves, model)
        summary += rows
        plot_curves(curves, out / f"{model}.png", f"{model} on the digits")
        for row in rows:
            print(
                f"{model:24s} {row['setting']:5s} {row['final_acc_mean']:6.2f} "
                f"± {row['final_acc_std']:.2f} %  memory {row['memory_ratio_mean']:.2f}x  "
                f"{row['faithful']}",
                flush=True,
            )
        with open(out / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
