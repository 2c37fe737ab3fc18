"""Optimizer and per-step learning-rate schedule of a TrainSpec."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainSpec

_ONECYCLE_PCT = 0.3  # torch.optim.lr_scheduler.OneCycleLR's defaults
_ONECYCLE_DIV = 25.0
_ONECYCLE_FINAL_DIV = 1e4


def build_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW or SGD over ``model``'s trainable parameters.

    Weight decay applies to weights only: decaying biases and norm scales toward zero only
    hurts (timm and most recipes exclude every parameter with fewer than 2 dimensions).

    Args:
        model: the model (unwrapped or DDP-wrapped).
        spec: optimizer, lr, weight_decay, momentum.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=spec.lr)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, spec: TrainSpec) -> float:
    """Multiplier of ``spec.lr`` at optimizer step ``step`` (0-based) of ``total_steps``.

    Args:
        step: steps taken so far.
        total_steps: steps of the whole run.
        steps_per_epoch: steps in one epoch (for ``warmup_epochs`` and ``step_epochs``).
        spec: schedule, warmup_epochs, min_lr, step_epochs, step_gamma.
    """
    if spec.schedule == "onecycle":
        rise = max(1.0, _ONECYCLE_PCT * total_steps)
        low = 1.0 / _ONECYCLE_DIV
        if step < rise:
            return _cosine(low, 1.0, step / rise)
        return _cosine(1.0, low / _ONECYCLE_FINAL_DIV, (step - rise) / max(1.0, total_steps - rise))
    warmup = spec.warmup_epochs * steps_per_epoch
    if step < warmup:  # linear from ~0; (step + 1) so the very first step does move
        return (step + 1) / (warmup + 1)
    if spec.schedule == "cosine":
        progress = (step - warmup) / max(1.0, total_steps - warmup)
        return _cosine(1.0, spec.min_lr / spec.lr if spec.lr else 0.0, min(1.0, progress))
    if spec.schedule == "step":
        return spec.step_gamma ** (step // (spec.step_epochs * steps_per_epoch))
    return 1.0


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: TrainSpec, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler; its state is only the step count, so a resumed run (even with
    more epochs) recomputes the same function of (step, total steps).

    Args:
        optimizer: from :func:`build_optimizer`.
        spec: the schedule settings and ``epochs``.
        steps_per_epoch: optimizer steps per epoch.
    """
    total = spec.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, steps_per_epoch, spec)
    )
