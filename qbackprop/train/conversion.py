"""The quant config of each epoch (mix_prob schedule), applying it, and measuring its memory."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qbackprop.config import QuantConfig
from qbackprop.errors import config_errors
from qbackprop.memory import MemoryReport, measure_saved_activations
from qbackprop.surgery import conversion_report, convert_model, revert_model

from .config import TrainSpec


def quant_for_epoch(quant: QuantConfig, spec: TrainSpec, epoch: int) -> QuantConfig:
    """``quant`` with ``default.mix_prob`` set by ``spec.mix_prob_schedule`` for ``epoch``.

    Rules that set their own ``mix_prob`` keep it; the others inherit the scheduled default.

    Args:
        quant: the run's quant config.
        spec: the train section (``mix_prob_schedule``, ``epochs``).
        epoch: 0-based epoch.
    """
    schedule = spec.mix_prob_schedule
    if schedule is None:
        return quant
    prob = schedule.at(epoch, spec.epochs)
    return dataclasses.replace(quant, default=quant.default.replace(mix_prob=prob))


def quantizes_anything(quant: QuantConfig) -> bool:
    """Whether some module, or the fallback, would compress under ``quant``."""
    if quant.default.enabled:
        return True
    return any(
        rule.enabled and quant.default.replace(**dict(rule.overrides)).enabled
        for rule in quant.layers
    )


def apply_quant(model: nn.Module, quant: QuantConfig, source: str = "<config>") -> bool:
    """Convert ``model`` with ``quant`` (again, if already converted); returns whether it is.

    A config that compresses nothing (bits 32 everywhere) leaves the model plain, so an fp32
    baseline runs torch's own modules and its step time is the honest reference.

    Args:
        model: the unwrapped model.
        quant: the config to apply.
        source: the config file, named in errors.

    Raises:
        ConfigError: a rule matches no module of this model.
    """
    if not quantizes_anything(quant):
        revert_model(model)
        return False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nothing to convert.*")
        with config_errors(source):
            convert_model(model, quant)
    return any(r.converted for r in conversion_report(model))


def measure_memory(
    model: nn.Module, dataset: Dataset, batch_size: int, seed: int, device: torch.device
) -> MemoryReport:
    """Saved-activation bytes of one training step on a fixed batch (the first ``batch_size``
    training images), measured without disturbing the training's random streams.

    Args:
        model: the unwrapped, possibly converted model.
        dataset: the training set.
        batch_size: images per step.
        seed: fixes the batch's augmentation and the rounding draws of the measurement.
        device: where the model lives.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        images, _ = next(iter(DataLoader(dataset, batch_size=min(batch_size, len(dataset)))))
        return measure_saved_activations(model, images.to(device))
