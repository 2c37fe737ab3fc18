"""The one pattern of every qbackprop autograd Function: ``QFunction``.

A subclass declares only its compute (``forward``: exact torch, plus what it saves through
``saved.save_for_backward``) and its gradient (``backward``). The base wraps that backward
once, at class creation, with what every op needs and none should forget:

- ``once_differentiable``: backward uses a lossy copy of the saved activation, so its result
  is not differentiable;
- double-backward refusal (``autocast.refuse_create_graph``): ``create_graph=True`` through
  any qbackprop op raises an error naming the Function instead of silently dropping the
  second-order term.
"""

from __future__ import annotations

import weakref

import torch
from torch.autograd.function import once_differentiable

from .autocast import refuse_create_graph


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on ``tensors``: every drop-in's shortcut. When it
    will not (eval, ``no_grad``, nothing needs a gradient), nothing would be saved, and the
    drop-in calls torch's own op (autocast dispatch included), the exact answer at eval speed."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Backwards already wrapped (a subclass inheriting one must not wrap it twice).
_WRAPPED: weakref.WeakSet = weakref.WeakSet()


class QFunction(torch.autograd.Function):
    """Base of every qbackprop Function (see the module docstring)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        backward = cls.__dict__.get("backward")
        if isinstance(backward, staticmethod):
            backward = backward.__func__
        if backward is not None and backward not in _WRAPPED:
            wrapped = refuse_create_graph(once_differentiable(backward))
            _WRAPPED.add(wrapped)
            cls.backward = staticmethod(wrapped)
