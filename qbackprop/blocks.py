"""Group module names into the thesis's blocks: stem, blocks.0 … blocks.N, head, classifier."""

from __future__ import annotations

from torch import nn


def _classifier_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) else None


def block_namer(model: nn.Module):
    """A function mapping a qualified module name to its block.

    Top-level containers of stages (``nn.Sequential`` / ``nn.ModuleList`` children, e.g. timm's
    ``blocks`` or ResNet's ``layer1``) give one block per child (``blocks.3``); top-level modules
    before the first container are the ``stem``, those after it the ``head``, and the timm
    classifier is ``classifier``.
    """
    children = list(model.named_children())
    containers = [n for n, m in children if isinstance(m, (nn.Sequential, nn.ModuleList))]
    first = next((i for i, (n, _) in enumerate(children) if n in containers), None)
    before = {n for i, (n, _) in enumerate(children) if first is not None and i < first}
    classifier = _classifier_name(model)

    def name_of(qualified: str) -> str:
        if not qualified or qualified == "<root>":
            return "head"
        parts = qualified.split(".")
        if classifier and (qualified == classifier or qualified.startswith(classifier + ".")):
            return "classifier"
        if parts[0] in containers:
            return ".".join(parts[:2])
        if first is None:
            return parts[0]
        return "stem" if parts[0] in before else "head"

    return name_of
