"""The sharing plan: decided once, at conversion, by one planning forward on a small batch.

Which BatchNorm outputs feed a converted layer (so one wider copy of x̂ serves both, see
``functions/shared.py``) depends only on the model's structure. ``convert_model`` finds it by
running the converted model once in training mode on an example batch inside
``shared.planning()``; every later forward only reads the plan. So the first training step
keeps exactly the bytes every later step keeps (a tight batch size that fits at step 1,000
fits at step 1), and ``conversion_report`` / ``print(model)`` show what each layer keeps.

The planning forward leaves no trace: buffers (BatchNorm statistics), train/eval modes and
the RNG state are restored, and nothing is kept for a backward.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .functions import shared
from .preserved import preserved_state

# CNNs share the same way at any resolution: plan on small images first (fast at conversion);
# models that need their own input size (ViT) are retried at it.
PLANNING_IMAGE_SIZE = 32
PLANNING_BATCH = 2  # BatchNorm in training mode needs more than one value per channel


def _first(model: nn.Module, types: tuple[type, ...]) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, types)), None)


def example_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Candidate planning batches for ``model``, smallest first (empty when unknown)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    shapes = []
    conv = _first(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if conv is not None:
        dims = conv.weight.dim() - 2
        shapes.append((conv.in_channels, *[PLANNING_IMAGE_SIZE] * dims))
        # A ViT / Swin built for another size says so (timm's patch_embed, torchvision's ViT).
        fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
        fixed = fixed or getattr(model, "image_size", None)
        if isinstance(fixed, int):
            fixed = (fixed,) * dims
        if fixed is not None and len(fixed) == dims:
            shapes.append((conv.in_channels, *fixed))
        if size is not None and len(size) == dims + 1:
            shapes.append(tuple(size))
    else:
        linear = _first(model, (nn.Linear,))
        if linear is not None:
            shapes.append((linear.in_features,))
    return [torch.randn(PLANNING_BATCH, *s, device=device, dtype=dtype) for s in shapes]


def plan_sharing(model: nn.Module, example: torch.Tensor | tuple | None = None) -> tuple[bool, str]:
    """Run the planning forward; returns ``(planned, how)`` for the conversion report."""
    candidates = [example] if example is not None else example_inputs(model)
    if not candidates:
        return False, "no example input (pass example_input=): each layer keeps its own copy"
    errors = []
    with preserved_state(model):
        model.train()
        for batch in candidates:
            args = batch if isinstance(batch, tuple) else (batch,)
            try:
                with torch.enable_grad(), shared.planning():
                    model(*args)
                    # Once more with the plan in force: tables of the widths it chose (a
                    # wider derivative code after a shared BatchNorm) are built now, not in
                    # the first training step.
                    model(*args)
            except Exception as err:  # noqa: BLE001  (any model error: try the next size)
                errors.append(f"{type(err).__name__}: {err}")
                continue
            shape = "x".join(str(d) for d in args[0].shape) if args else "()"
            return True, f"planned on an example batch of {shape}"
    reason = errors[-1].splitlines()[0][:200] if errors else "unknown"
    warnings.warn(
        f"convert_model: the sharing plan's forward failed ({reason}); each layer keeps its "
        "own copy (pass example_input= to convert_model to plan sharing)",
        stacklevel=3,
    )
    return False, f"not planned ({reason})"
