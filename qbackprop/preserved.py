"""Run something on a model and leave no trace: buffers, train/eval modes and RNG restored."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Within the block, forwards may update buffers (BatchNorm running statistics), switch
    modes and draw random numbers; all three are as before afterwards (measurements and the
    planning forward of ``convert_model`` use it)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    # Only devices already in use: a CPU-only run must not initialize CUDA.
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for module, training in modes:
                module.training = training
