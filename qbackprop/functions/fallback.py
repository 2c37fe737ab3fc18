"""Fallback: compress what ops without a custom Function save, via public saved-tensor hooks.

Scoped to a converted model's forward (entered by a forward pre-hook, left by a forward hook
that always runs). Parameters and buffers, non-float tensors, tensors our own Functions
already handled and tensors under ``min_numel`` elements are kept as they are. A storage saved
by several ops (e.g. one activation feeding two pools) is compressed once and shared.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..quant import CompressedTensor, QuantSpec, compress
from .saved import is_handled

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None

# Observers see what the innermost saved-tensor hook stores: an outer hook (e.g. a memory
# measurement) is shadowed by ours while a converted forward runs, so we report to it.
_OBSERVERS: list[Callable[[torch.Tensor | CompressedTensor], None]] = []


def add_observer(fn: Callable[[torch.Tensor | CompressedTensor], None]) -> None:
    _OBSERVERS.append(fn)


def remove_observer(fn: Callable[[torch.Tensor | CompressedTensor], None]) -> None:
    _OBSERVERS.remove(fn)


class _Packed:
    """A compressed saved tensor; weak-referenceable so the dedup cache never keeps it alive."""

    __slots__ = ("ct", "__weakref__")

    def __init__(self, ct: CompressedTensor) -> None:
        self.ct = ct


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
    # The version counter makes an in-place update of the same storage a different entry.
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
        self._shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

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

    def pack(self, t: torch.Tensor):
        if not self._eligible(t):
            for observe in _OBSERVERS:
                observe(t)
            # Detached (lossless: autograd restores the grad_fn on unpack): an output kept with
            # its grad_fn would form a cycle through C++ that leaks if backward never runs.
            return t.detach()
        key = _storage_key(t)
        packed = self._shared.get(key)
        if packed is None:
            packed = _Packed(compress(t.detach(), self.spec))
            self._shared[key] = packed
            for observe in _OBSERVERS:
                observe(packed.ct)
        return packed

    @staticmethod
    def unpack(obj):
        return obj.ct.decompress() if isinstance(obj, _Packed) else obj


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
        # Under torch.compile the fallback is off: saved-tensor hooks cannot be traced, and
        # AOTAutograd decides what the compiled graph saves (docs/design-notes.md).
        if not self.enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._stack.append(None)
            return
        # Read at every forward: `.to(device)` after conversion moves parameters and buffers.
        tensors = [*module.parameters(), *module.buffers()]
        self.compressor.keep = {_data_ptr(t) for t in tensors if not _is_sharded(t)}
        hooks = torch.autograd.graph.saved_tensors_hooks(
            self.compressor.pack, self.compressor.unpack
        )
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
