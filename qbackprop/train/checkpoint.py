"""Atomic training checkpoints: model, optimizer, scheduler, scaler and RNG states."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qbackprop.errors import QbackpropUserError

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """Every random generator training draws from (torch CPU and CUDA, numpy, random)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save`` atomically.

    The bytes go to a temporary file in the same directory, are flushed to disk, and only
    then renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows), so a kill at
    any moment leaves either the previous checkpoint or the new one, never a torn file.

    Args:
        state: anything ``torch.save`` accepts.
        path: the checkpoint file.

    Returns:
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file.
        map_location: where to put its tensors.

    Raises:
        QbackpropUserError: the file is missing or unreadable, with what to do instead.
    """
    path = Path(path)
    if not path.is_file():
        raise QbackpropUserError(f"{path}: no checkpoint to resume from; run without --resume")
    try:
        # weights_only=False: the file holds numpy / Python RNG states; it is our own output.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise QbackpropUserError(f"{path}: cannot read checkpoint: {exc}") from None
