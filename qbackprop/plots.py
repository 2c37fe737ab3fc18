"""PNG plots (matplotlib, headless): memory and gradient fidelity per block; runs: train."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .memory import LayerMemory

if TYPE_CHECKING:
    from .fidelity import FidelityReport

MiB = 2**20


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def memory_bar_chart(rows: Sequence[LayerMemory], path: str | Path, title: str = "") -> Path:
    """Bars of fp32 vs converted saved-activation MiB per block; returns the path written."""
    plt = pyplot()
    names = [r.name for r in rows]
    fp32 = [r.fp32_bytes / MiB for r in rows]
    conv = [r.stored_bytes / MiB for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4.5))
    pos = range(len(rows))
    ax.bar([p - 0.2 for p in pos], fp32, width=0.4, label="fp32 (unconverted)")
    ax.bar([p + 0.2 for p in pos], conv, width=0.4, label="qbackprop")
    ax.set_xticks(list(pos), names, rotation=60, ha="right")
    ax.set_ylabel("saved activations (MiB, measured)")
    total_fp32, total_conv = sum(fp32), sum(conv)
    ratio = total_fp32 / total_conv if total_conv else float("inf")
    ax.set_title(title or f"{total_fp32:.1f} MiB -> {total_conv:.2f} MiB ({ratio:.1f}x)")
    ax.legend()
    return _save(plt, fig, path)


def fidelity_bar_chart(report: FidelityReport, path: str | Path, title: str = "") -> Path:
    """Bars of each group's gradient-noise ratio (log scale), lines at 1x and the total.

    Args:
        report: what ``measure_fidelity`` returned.
        path: the PNG to write.
        title: the figure title (default: the total ratio).

    Returns:
        The path written.
    """
    plt = pyplot()
    names = [g.name for g in report.groups]
    ratios = [g.ratio for g in report.groups]
    positive = [r for r in [*ratios, report.ratio] if r > 0 and math.isfinite(r)]
    floor = min([*positive, 1.0]) / 10
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4.5))
    pos = list(range(len(names)))
    ax.bar(pos, [r if r > 0 and math.isfinite(r) else 0.0 for r in ratios], color="C0")
    for p, r in zip(pos, ratios, strict=True):
        if not r > 0:  # log scale: a group that adds no noise gets a label instead of a bar
            ax.text(p, floor * 1.2, "0" if r == 0 else "n/a", ha="center", va="bottom")
    ax.axhline(1.0, color="C3", linestyle="--", label="fp32 SGD noise (1x)")
    if report.ratio > 0 and math.isfinite(report.ratio):
        ax.axhline(report.ratio, color="C1", label=f"all compressed ({report.ratio:.2g}x)")
    ax.set_yscale("log")
    ax.set_ylim(floor, max(ax.get_ylim()[1], 2.0))  # the 1x line always shows
    ax.set_xticks(pos, names, rotation=60, ha="right")
    ax.set_ylabel(f"gradient noise / SGD noise ({report.by} alone)")
    ax.set_title(title or f"compression adds {report.ratio:.2g}x the SGD noise")
    ax.legend()
    return _save(plt, fig, path)


def tune_bits_chart(model, result, path: str | Path, title: str = "") -> Path:
    """Bars of the average bits per block chosen by ``qbackprop tune`` (weighted by the bytes
    each layer keeps), with the budget's average width as a line.

    Args:
        model: the (unconverted) model, for its block names.
        result: what ``qbackprop.tune.tune`` returned.
        path: the PNG to write.
        title: the figure title.
    """
    from .blocks import block_namer

    plt = pyplot()
    name_of = block_namer(model)
    weight: dict[str, float] = {}
    bits: dict[str, float] = {}
    for c in result.layers:
        block = name_of(c.name)
        w = max(c.predicted_bytes, 1.0)
        weight[block] = weight.get(block, 0.0) + w
        bits[block] = bits.get(block, 0.0) + w * c.average_bits
    names = list(weight)
    values = [bits[n] / weight[n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4.5))
    ax.bar(range(len(names)), values, color="C0")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_ylabel("average bits (weighted by saved bytes)")
    ax.set_ylim(0, 8.5)
    ax.set_title(title or "bits per block")
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
