"""A run directory: its resolved config.yaml, and whether a run may start or resume there."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from qbackprop.errors import ConfigError, QbackpropUserError

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .config import RunConfig

CONFIG_NAME = "config.yaml"
# settings a resumed run may change: they do not change what is computed
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.workers",
    "train.device",
    "train.download",
    "train.data_root",
)


def write_config(config: RunConfig, run_dir: Path) -> Path:
    """Write the fully resolved config to ``run_dir/config.yaml`` (atomically).

    Args:
        config: the resolved run config.
        run_dir: the run directory (must exist).
    """
    path = run_dir / CONFIG_NAME
    text = (
        f"# qbackprop train {path} --out NEW_RUNDIR\n"
        f"# fully resolved from {config.source}\n"
        + yaml.safe_dump(config.to_dict(), sort_keys=False)
    )
    tmp = path.with_name(f".{CONFIG_NAME}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs, except :data:`RESUMABLE_CHANGES`."""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if k not in RESUMABLE_CHANGES]


def check_resumable(
    run_dir: Path, config: RunConfig, resume: bool, device: torch.device
) -> dict[str, Any] | None:
    """The checkpoint to resume from, None for a fresh start, or an error saying what to do.

    Args:
        run_dir: the run directory.
        config: the resolved config of the new invocation.
        resume: whether ``--resume`` was given.
        device: where the checkpoint's tensors go.

    Raises:
        QbackpropUserError: a fresh start in a directory holding a run, ``--resume`` without a
            checkpoint, or a resume whose config changed more than the epochs.
    """
    path = run_dir / CHECKPOINT_NAME
    if not resume:
        if path.exists():
            raise QbackpropUserError(
                f"{run_dir} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue "
                "it, or choose another --out"
            )
        return None
    state = load_checkpoint(path, map_location=device)
    changes = config_changes(state["config"], config.to_dict())
    if changes:
        raise ConfigError(
            [f"{run_dir}: cannot resume, the config differs from the run's:"]
            + [f"  {c}" for c in changes]
            + [f"only {', '.join(RESUMABLE_CHANGES)} may change; or train into another --out"]
        )
    return state
