"""PNG plots (matplotlib, headless): memory per block; training curves come with train."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .memory import LayerMemory

MiB = 2**20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def memory_bar_chart(rows: Sequence[LayerMemory], path: str | Path, title: str = "") -> Path:
    """Bars of fp32 vs converted saved-activation MiB per block; returns the path written."""
    plt = _pyplot()
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
