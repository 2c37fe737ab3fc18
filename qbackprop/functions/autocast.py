"""How our Functions run: autocast casts like torch's, a guarded backward, compile safety.

An ``autograd.Function`` is invisible to autocast's dispatch, so a converted conv would run in
fp32 inside an autocast region while torch's ran in bf16 / fp16. These helpers reproduce what
autocast does for its "lower precision" ops (conv*, linear): each eligible input is cast with a
differentiable ``.to(dtype)`` *outside* the Function, which then computes (and compresses the
low-precision activation) with autocast off. Autograd's ``ToCopyBackward`` casts each gradient
back to its input's original dtype, exactly as with torch's own autocast.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

from . import shared


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs conv / linear in on ``device_type``, or None when it is off.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ... (a tensor's ``device.type``).
    """
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _eligible(t: torch.Tensor | None, device_type: str) -> bool:
    # Autocast leaves float64 and tensors of other devices alone (is_autocast_eligible in ATen).
    return (
        t is not None
        and t.is_floating_point()
        and t.dtype != torch.float64
        and t.device.type == device_type
    )


def autocast_inputs(
    device_type: str, *tensors: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    """Cast ``tensors`` as autocast would for a conv / linear op on ``device_type``.

    Args:
        device_type: the device type whose autocast state applies.
        *tensors: the op's tensor arguments (None entries pass through).

    Returns:
        The tensors, each eligible one cast (differentiably) to the autocast dtype; unchanged
        when autocast is off.
    """
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(_cast(t, dtype) if _eligible(t, device_type) else t for t in tensors)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = t.to(dtype)
    recipe = shared.recipe_of(t)
    if recipe is not None and out is not t:  # a shared BatchNorm output stays shared
        shared.tag(out, recipe.then(_same, dtype))
    return out


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def autocast_disabled(device_type: str) -> Iterator[None]:
    """Run the enclosed code with autocast off for ``device_type`` (a no-op where unsupported).

    Our Functions cast their inputs themselves (``autocast_inputs``); their forward and backward
    run with autocast off so that no kernel inside (convolution, mm, compression arithmetic) is
    cast a second time, whatever autocast state ``backward()`` is called in.
    """
    if not _autocast_on(device_type):  # nothing to turn off (entering it costs ~30 us)
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


def _autocast_on(device_type: str) -> bool:
    if not torch.amp.is_autocast_available(device_type):
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument; assume on, as before
        return True


def refuse_create_graph(backward: Callable) -> Callable:
    """Make a Function's ``backward`` (above ``@once_differentiable``) refuse double backward.

    ``once_differentiable`` alone inserts its error node only when the incoming gradients
    require grad; with a constant upstream gradient (``loss.sum()``) the second-order term would
    be dropped silently. Backward runs with grad mode on exactly when ``create_graph=True``, so
    that is refused at once, naming the Function.
    """

    @functools.wraps(backward)
    def guarded(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"qbackprop: double backward (create_graph=True) through "
                f"{type(ctx).__name__} is not supported: its backward uses a lossy compressed "
                "copy of the saved activation and is not differentiable. Leave this layer "
                "unconverted (or use torch's own module) where higher-order gradients are needed."
            )
        return backward(ctx, *grads)

    return guarded
