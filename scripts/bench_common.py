"""Shared pieces of the benchmark scripts: model building, per-stage checkpointing, tables."""

from __future__ import annotations

import platform
import sys
import warnings

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Where timm keeps the list of stages, by model family.
_STAGE_ATTRS = ("blocks", "stages", "features")
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """A randomly initialised timm model (no download)."""
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def stages(model: nn.Module) -> list[nn.Module]:
    """The model's stages: the children of ``blocks``/``stages`` or ResNet's layer1..4."""
    if all(hasattr(model, a) for a in _RESNET_STAGES):
        return [getattr(model, a) for a in _RESNET_STAGES]
    for attr in _STAGE_ATTRS:
        seq = getattr(model, attr, None)
        if isinstance(seq, nn.Sequential):
            return list(seq)
    raise ValueError(f"cannot find the stages of {type(model).__name__}")


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if not torch.is_grad_enabled():
            return self.inner(x)
        # Reentrant checkpointing keeps only the stage input for backward, visible to hooks.
        return checkpoint(self.inner, x, use_reentrant=True)


def checkpoint_stages(model: nn.Module) -> nn.Module:
    """Wrap every stage in ``torch.utils.checkpoint`` (recomputed in backward); in place."""
    if all(hasattr(model, a) for a in _RESNET_STAGES):
        for attr in _RESNET_STAGES:
            setattr(model, attr, _Checkpointed(getattr(model, attr)))
        return model
    for attr in _STAGE_ATTRS:
        seq = getattr(model, attr, None)
        if isinstance(seq, nn.Sequential):
            for i in range(len(seq)):
                seq[i] = _Checkpointed(seq[i])
            return model
    raise ValueError(f"cannot find the stages of {type(model).__name__}")


def header(title: str) -> str:
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return (
        f"# {title}\n# command: {' '.join(sys.argv)}\n"
        f"# torch {torch.__version__}, timm {timm.__version__}, {threads} threads, "
        f"device: {device or platform.machine()}"
    )


def table(rows: list[list], headers: list[str]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *[fmt(r) for r in cells[1:]]])


def quiet() -> None:
    warnings.filterwarnings("ignore")
