"""PNG plots of runs and sweeps: accuracy vs epoch, final accuracy and memory vs bits."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qbackprop.errors import QbackpropUserError
from qbackprop.plots import pyplot

from .metrics import METRICS_NAME, read_metrics
from .sweep import RUNS_NAME, SUMMARY_NAME

MiB = 2**20


def _read_csv(path: Path) -> list[dict[str, Any]]:
    def value(text: str) -> Any:
        if text == "":
            return None
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_accuracy_curves(runs: Mapping[str, str | Path], path: str | Path, title: str = "") -> Path:
    """Test accuracy vs epoch, one line per run.

    Args:
        runs: label → run directory (holding metrics.csv).
        path: the PNG to write.
        title: figure title.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run_dir in runs.items():
        rows = read_metrics(run_dir)
        ax.plot(
            [r["epoch"] for r in rows],
            [100 * r["test_acc"] for r in rows],
            marker="o",
            markersize=3,
            label=label,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "test accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(runs) > 8 else 1)
    return _save(fig, Path(path))


def plot_run(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """accuracy.png and loss.png (train and test vs epoch) of one run."""
    plt = pyplot()
    rows = read_metrics(run_dir)
    epochs = [r["epoch"] for r in rows]
    written = []
    for kind, scale, unit in (("acc", 100, " (%)"), ("loss", 1, "")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in ("train", "test"):
            ax.plot(epochs, [scale * r[f"{split}_{kind}"] for r in rows], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(("accuracy" if kind == "acc" else "loss") + unit)
        ax.set_title(Path(run_dir).name)
        ax.grid(alpha=0.3)
        ax.legend()
        name = "accuracy.png" if kind == "acc" else "loss.png"
        written.append(_save(fig, Path(out_dir) / name))
    return written


def _series_label(row: Mapping[str, Any]) -> str:
    label = f"{row['rounding']}, bucket {_fmt(row['bucket_size'])}"
    if row.get("mix_bits") is not None:
        label += f", mix {_fmt(row['mix_bits'])}b p={_fmt(row['mix_prob'])}"
    return label


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _by_bits(
    summary: Sequence[Mapping[str, Any]],
    path: Path,
    y: str,
    ylabel: str,
    scale: float,
    log_y: bool = False,
) -> Path:
    """One line per series (rounding, bucket, mix) over bits; fp32 as a dashed reference."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[Mapping[str, Any]]] = {}
    for row in summary:
        if row["bits"] != 32 or row.get("rounding") is not None:
            series.setdefault(_series_label(row), []).append(row)
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["bits"])
        std = [scale * _nan0(r.get(f"{y}_std")) for r in rows]
        ax.errorbar(
            [r["bits"] for r in rows],
            [scale * r[f"{y}_mean"] for r in rows],
            yerr=std,
            marker="o",
            capsize=3,
            label=label,
        )
    for row in summary:
        if row["bits"] == 32 and row.get("rounding") is None:
            ax.axhline(scale * row[f"{y}_mean"], color="gray", linestyle="--", label="fp32")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["bits"] for rows in series.values() for r in rows})
    ax.set_xticks(ticks, [_fmt(t) for t in ticks])
    ax.minorticks_off()
    if log_y:  # memory: equal steps are equal ratios
        ax.set_yscale("log")
    ax.set_xlabel("bits per saved activation")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _nan0(value: Any) -> float:
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _by_layer(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    plt = pyplot()
    rows = [r for r in summary if r.get("layer") is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4.5))
    labels = [f"{r['layer']} @{_fmt(r['bits'])}b" for r in rows]
    ax.bar(
        range(len(rows)),
        [100 * r["final_acc_mean"] for r in rows],
        yerr=[100 * _nan0(r["final_acc_std"]) for r in rows],
        capsize=3,
    )
    for row in summary:
        if row.get("layer") is None:
            ax.axhline(
                100 * row["final_acc_mean"], color="gray", linestyle="--", label=row["group"]
            )
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("one block quantized at a time, the rest full precision")
    if len(rows) < len(summary):
        ax.legend()
    return _save(fig, path)


def plot_sweep(sweep_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """The plots of a sweep directory (summary.csv, runs.csv and runs/*/metrics.csv)."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    summary = _read_csv(sweep_dir / SUMMARY_NAME)
    runs = _read_csv(sweep_dir / RUNS_NAME)
    curves = {str(r["name"]): Path(str(r["run_dir"])) for r in runs}
    written = [plot_accuracy_curves(curves, out_dir / "test_acc_vs_epoch.png")]
    if any(r.get("layer") is not None for r in summary):
        written.append(_by_layer(summary, out_dir / "final_acc_by_layer.png"))
    else:
        written.append(
            _by_bits(
                summary,
                out_dir / "final_acc_vs_bits.png",
                "final_acc",
                "final test accuracy (%), mean ± std over seeds",
                100,
            )
        )
        written.append(
            _by_bits(
                summary,
                out_dir / "memory_vs_bits.png",
                "saved_bytes",
                "saved activations per step (MiB, measured)",
                1 / MiB,
                log_y=True,
            )
        )
    return written


def plot(path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """PNGs for a run directory, a sweep directory, or a directory of run directories.

    Args:
        path: the directory.
        out_dir: where the PNGs go (default ``path/plots``).

    Returns:
        The files written.

    Raises:
        QbackpropUserError: ``path`` holds neither metrics.csv, summary.csv nor runs.
    """
    path = Path(path)
    out = Path(out_dir) if out_dir is not None else path / "plots"
    if (path / SUMMARY_NAME).exists():
        return plot_sweep(path, out)
    if (path / METRICS_NAME).exists():
        return plot_run(path, out)
    runs = {d.name: d for d in sorted(path.glob("*")) if (d / METRICS_NAME).exists()}
    if runs:
        return [plot_accuracy_curves(runs, out / "test_acc_vs_epoch.png")]
    raise QbackpropUserError(
        f"{path}: nothing to plot; expected a run directory (metrics.csv), a sweep directory "
        "(summary.csv) or a directory of run directories"
    )
