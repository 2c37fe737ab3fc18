"""Fallback: compress what ops without a custom Function save, via public saved-tensor hooks.

Scoped to a converted model's forward (entered by a forward pre-hook, left by a forward hook
that always runs). Parameters and buffers, non-float tensors, tensors our own Functions
already handled and tensors under ``min_numel`` elements are kept as they are. A tensor saved
by several ops (e.g. one activation feeding two pools) is compressed once and shared while it
lives.

Composing with a user's own hooks: ours are entered last, so they are innermost, and torch
hands every saved tensor to the innermost hooks only. So that a user's ``save_on_cpu()`` or
non-reentrant ``checkpoint()`` around a converted model still sees everything the model keeps,
``pack`` does not hold tensors itself: it saves them (the compressed copy, or the tensor as it
is) through ``_Hold``, a tiny autograd Function, with our hooks stepped out of the way, so the
hooks outside ours pack them (offload them, or drop them for recomputation) as if no fallback
were there. ``unpack`` reads them back through the same node.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import runtime
from ..quant import CompressedTensor, QuantSpec, compress
from .saved import is_handled

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None


class _Hold(torch.autograd.Function):
    """Keeps ``tensors`` with ``ctx.save_for_backward``: the saved-tensor hooks in force (those
    outside ours) pack them. Its output is a handle no loss ever reaches."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        return anchor.new_empty(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # pragma: no cover  (no loss depends on a handle)
        return (None,) * len(ctx.needs_input_grad)


class _Packed:
    """What autograd keeps for one fallback tensor: the handle of its ``_Hold`` node and, for
    a compressed copy, the shell that rebuilds it. Weak-referenceable for the dedup cache."""

    __slots__ = ("shell", "handle", "__weakref__")

    def __init__(self, shell: CompressedTensor | None, handle: torch.Tensor) -> None:
        self.shell, self.handle = shell, handle

    def unpack(self) -> torch.Tensor:
        tensors = list(self.handle.grad_fn.saved_tensors)
        return tensors[0] if self.shell is None else self.shell.decompress_from(tensors)


FALLBACK_MIN_BITS = 8


def fallback_spec(spec: QuantSpec) -> QuantSpec:
    """What the fallback compresses with: ``spec`` at 8 bits or more, no two-bit mix.

    The fallback does not know which op saved a tensor nor how its backward uses it (a
    normalization's raw input, a division's denominator, a mask-like output), so it never goes
    below 8 bits, where even ConvNeXt's LayerNorm inputs through the fallback stayed usable
    once the norms had drop-ins (docs/design-notes.md, "Fallback").
    """
    if spec.bits >= FALLBACK_MIN_BITS and spec.mix_bits is None:
        return spec
    return spec.replace(bits=max(spec.bits, FALLBACK_MIN_BITS), mix_bits=None, mix_prob=None)


def _storage_key(t: torch.Tensor) -> tuple:
    # The version counter makes an in-place update of the same storage a different entry. The
    # key alone is not enough: once ``t`` is freed, a new tensor may get the same address, so
    # an entry is valid only while the tensor it was made from is alive (``FallbackCompressor``).
    return (
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
        t._version,
    )


class FallbackCompressor:
    """The pack/unpack pair for ``torch.autograd.graph.saved_tensors_hooks``.

    Args:
        spec: how fallback tensors are compressed.
        min_numel: tensors with fewer elements are kept exactly (metadata would dominate).
    """

    def __init__(self, spec: QuantSpec, min_numel: int) -> None:
        self.spec = spec
        self.min_numel = min_numel
        self.keep: set[int] = set()
        # storage key -> (weak ref to the tensor it was made from, weak ref to its copy)
        self._shared: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        self._anchor = torch.empty(0, requires_grad=True)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __getstate__(self) -> dict:
        # Per-forward state (the dedup cache of live tensors, parameter pointers) is not part
        # of a model: pickle, deepcopy and torch.save keep only the settings.
        return {"spec": self.spec, "min_numel": self.min_numel}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"], state["min_numel"])

    def _eligible(self, t: torch.Tensor) -> bool:
        return (
            self.spec.enabled
            and t.is_floating_point()
            and t.numel() >= self.min_numel
            and not isinstance(t, nn.Parameter)
            and not is_handled(t)
            and t.untyped_storage().data_ptr() not in self.keep
        )

    def _cached(self, key: tuple) -> _Packed | None:
        entry = self._shared.get(key)
        if entry is None or entry[0]() is None:
            return None  # never seen, or its tensor is gone (the address may be reused)
        return entry[1]()

    def _remember(self, key: tuple, t: torch.Tensor, packed: _Packed) -> None:
        shared = self._shared

        def forget(ref: weakref.ref) -> None:
            if shared.get(key, (None,))[0] is ref:
                del shared[key]

        shared[key] = (weakref.ref(t, forget), weakref.ref(packed))

    def _hold(self, shell: CompressedTensor | None, tensors: list[torch.Tensor]) -> _Packed:
        # Our hooks step aside while _Hold saves, so the hooks outside ours see the tensors.
        self.hooks.__exit__(None, None, None)
        try:
            with torch.enable_grad():
                handle = _Hold.apply(self._anchor, *tensors)
        finally:
            self.hooks.__enter__()
        return _Packed(shell, handle)

    def pack(self, t: torch.Tensor) -> _Packed:
        if not self._eligible(t):
            # Detached (lossless: autograd restores the grad_fn on unpack): an output kept with
            # its grad_fn would form a cycle through C++ that leaks if backward never runs.
            return self._hold(None, [t.detach()])
        key = _storage_key(t)
        packed = self._cached(key)
        if packed is None:
            ct = compress(t.detach(), self.spec)
            packed = self._hold(ct, ct.take_tensors())
            self._remember(key, t, packed)
        return packed

    @staticmethod
    def unpack(packed: _Packed) -> torch.Tensor:
        return packed.unpack()


def _is_sharded(t: torch.Tensor) -> bool:
    # FSDP2 holds parameters as DTensors between forwards (a wrapper without a storage of its
    # own); the unsharded parameters it gathers per block are nn.Parameters, which ``pack``
    # never compresses.
    return DTensor is not None and isinstance(t, DTensor)


def _data_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class FallbackScope:
    """Forward pre/post hooks on a root module that enter/leave the fallback hooks."""

    def __init__(self, module: nn.Module, spec: QuantSpec, min_numel: int) -> None:
        self.compressor = FallbackCompressor(spec, min_numel)
        self.enabled = True
        self._stack: list = []
        self._handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._leave, always_call=True),
        ]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_stack"] = []  # hooks entered by a forward in progress stay with that forward
        return state

    def _enter(self, module, args) -> None:
        # Off in a traced graph (runtime.fallback_active): hooks cannot be traced there.
        if not self.enabled or not torch.is_grad_enabled() or not runtime.fallback_active():
            self._stack.append(None)
            return
        # Read at every forward: `.to(device)` after conversion moves parameters and buffers.
        tensors = [*module.parameters(), *module.buffers()]
        self.compressor.keep = {_data_ptr(t) for t in tensors if not _is_sharded(t)}
        hooks = self.compressor.hooks
        hooks.__enter__()
        self._stack.append(hooks)

    def _leave(self, module, args, output) -> None:
        if self._stack:
            hooks = self._stack.pop()
            if hooks is not None:
                hooks.__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
