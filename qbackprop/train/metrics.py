"""RUNDIR/metrics.csv: one row per epoch, appended as training goes.

Memory columns: ``peak_rss_mib`` is the process's peak resident set size during the epoch's
training and evaluation, as the OS sees it (Linux VmHWM, reset at the start of each epoch's
steps; where it cannot be reset, the peak since the process started). On CUDA,
``cuda_max_allocated_mib`` / ``cuda_max_reserved_mib`` are ``torch.cuda.max_memory_allocated``
/ ``max_memory_reserved`` over the same span (``peak_cuda_mem_bytes`` is the former in bytes).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.csv"
# columns that measure the machine, not the training: they differ between identical runs
TIMING_COLUMNS = (
    "step_time_s",
    "epoch_time_s",
    "peak_cuda_mem_bytes",
    "peak_rss_mib",
    "cuda_max_allocated_mib",
    "cuda_max_reserved_mib",
)
COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
    "mix_prob",
    "saved_activation_bytes",
    "fp32_activation_bytes",
    "retunes",  # train.retune_every: re-tunes in the epoch (empty when off)
    *TIMING_COLUMNS,
)
_INT_COLUMNS = (
    "epoch",
    "saved_activation_bytes",
    "fp32_activation_bytes",
    "retunes",
    "peak_cuda_mem_bytes",
)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)  # repr: exact round trip


def append_metrics(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one epoch's row (header first when the file is new).

    Args:
        path: the CSV file.
        row: values keyed by :data:`COLUMNS`; missing or None cells stay empty.
    """
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(COLUMNS)
        writer.writerow([_cell(row.get(c)) for c in COLUMNS])
        f.flush()


def _parse(column: str, text: str) -> Any:
    if text == "":
        return None
    return int(text) if column in _INT_COLUMNS else float(text)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.csv, numbers parsed (empty cells are None).

    Args:
        path: the CSV file or the run directory holding it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def truncate_metrics(path: str | Path, last_epoch: int) -> None:
    """Drop rows after ``last_epoch``: a run killed between writing its row and its checkpoint
    repeats that epoch on resume, and must not list it twice."""
    path = Path(path)
    rows = [r for r in read_metrics(path) if r["epoch"] <= last_epoch]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    for row in rows:
        append_metrics(tmp, row)
    if rows:
        os.replace(tmp, path)
    else:
        path.unlink(missing_ok=True)
