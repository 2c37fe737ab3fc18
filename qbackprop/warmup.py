"""A config's model with weights worth measuring: a short fp32 warm-up (or a checkpoint's
weights) and seeded batches of its training split, for ``fidelity`` and ``tune``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .errors import QbackpropUserError
from .schema import Problem

if TYPE_CHECKING:
    from .train.config import RunConfig
    from .train.data import DataSpec

VARIANCE_BATCHES = 16  # minibatches besides batch 0, for the fp32 gradient variance
WARMUP_LR = 1e-3

Batch = tuple[torch.Tensor, torch.Tensor]


class WarmedModel(NamedTuple):
    """What :func:`warmed_model` returns; unpacks as ``config, data, model, batches``."""

    config: RunConfig
    data: DataSpec
    model: nn.Module
    batches: list[Batch]


def _load(path: str | os.PathLike, overrides: Sequence[str]) -> RunConfig:
    from .train.config import load_run_config
    from .train.data import num_classes

    config = load_run_config(path, overrides)
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


def _batches(dataset: Dataset, batch_size: int, count: int, seed: int) -> Iterator[Batch]:
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


def _warm_up(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    steps: int,
    seed: int,
    device: torch.device,
    progress: bool,
) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR)
    model.train()
    batches = _batches(dataset, batch_size, steps, seed)
    for x, y in tqdm(batches, total=steps, desc="fp32 warm-up", leave=False, disable=not progress):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()


def _load_weights(model: nn.Module, path: str | os.PathLike, config_path: str) -> None:
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


def warmed_model(
    config_path: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    batch_size: int = 32,
    warmup_steps: int = 100,
    checkpoint: str | os.PathLike | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> WarmedModel:
    """The model of a training config, with weights worth measuring, and batches to measure on.

    The weights are those of ``checkpoint``, or else of ``warmup_steps`` fp32 AdamW steps
    (lr ``WARMUP_LR``) on the config's training split; the batches are ``1 + VARIANCE_BATCHES``
    seeded batches of that split (no augmentation), as ``measure_fidelity`` and ``tune`` want.

    Args:
        config_path: a YAML file with ``model:``, ``quant:`` and ``train:`` sections.
        overrides: dotted ``KEY=VALUE`` settings on top of the file, e.g. ``train.lr=3e-4``.
        batch_size: images per batch, >= 1.
        warmup_steps: fp32 steps first when no checkpoint is given, >= 0.
        checkpoint: a ``checkpoint.pt`` of ``qbackprop train`` or its run directory.
        seed: seeds the model's initialisation and the batch order; default ``train.seed``.
        progress: show a progress bar for the warm-up.

    Returns:
        ``WarmedModel(config, data, model, batches)``: the loaded config, its data spec, the
        model (on ``train.device``, in train mode) and the batches (on the CPU).

    Raises:
        ValueError: ``batch_size`` < 1 or ``warmup_steps`` < 0.
        QbackpropUserError: the config, checkpoint, device or dataset does not fit.
    """
    if batch_size < 1:
        raise ValueError(str(Problem("batch_size", batch_size, ">= 1")))
    if warmup_steps < 0:
        raise ValueError(str(Problem("warmup_steps", warmup_steps, ">= 0")))
    from .train.data import build_datasets

    config = _load(config_path, overrides)
    seed = config.train.seed if seed is None else seed
    device = _device(config.train.device)
    data = dataclasses.replace(config.train.data_spec(config.model.num_classes), augment=False)
    torch.manual_seed(seed)
    model = config.model.build().to(device)
    if checkpoint:
        _load_weights(model, checkpoint, str(config_path))
    train, _ = build_datasets(data)
    if not checkpoint:
        _warm_up(
            model,
            train,
            batch_size=batch_size,
            steps=warmup_steps,
            seed=seed,
            device=device,
            progress=progress,
        )
    batches = list(_batches(train, batch_size, 1 + VARIANCE_BATCHES, seed + 1))
    return WarmedModel(config, data, model, batches)
