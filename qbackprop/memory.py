"""Measured saved-activation memory: the bytes autograd really holds after a forward pass."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layers.registry import QuantizedModule
from .preserved import preserved_state
from .surgery import temporarily_unconverted


@dataclass(frozen=True)
class LayerMemory:
    """Saved bytes attributed to one module (the innermost module running when saved)."""

    name: str
    module_type: str
    fp32_bytes: int  # the unconverted model, same input
    stored_bytes: int  # the converted model
    elements: int  # elements of the tensors the unconverted model saves

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.stored_bytes if self.stored_bytes else float("inf")


@dataclass(frozen=True)
class MemoryReport:
    """What autograd holds for backward after one forward, unconverted vs converted.

    ``fp32_bytes`` and ``stored_bytes`` count every distinct storage autograd keeps (parameters
    and buffers excluded), measured with saved-tensor hooks, not computed from bit widths.
    ``uncompressed_float_bytes`` is what the converted model still keeps as plain float tensors.
    """

    fp32_bytes: int
    stored_bytes: int
    uncompressed_float_bytes: int
    rows: list[LayerMemory] = field(default_factory=list)
    fallback_fp32_bytes: int = 0

    @property
    def fallback_fraction(self) -> float:
        """Share of the fp32 saved bytes saved by ops outside qbackprop's drop-in layers (what
        the generic fallback handles, at 8 bits or more: ``fallback.fallback_spec``)."""
        return self.fallback_fp32_bytes / self.fp32_bytes if self.fp32_bytes else 0.0

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.stored_bytes if self.stored_bytes else float("inf")

    @property
    def compressed_fraction(self) -> float:
        """Share of the unconverted model's saved bytes that the converted model compresses."""
        if not self.fp32_bytes:
            return 0.0
        return max(0.0, 1.0 - self.uncompressed_float_bytes / self.fp32_bytes)

    def grouped(self, key: Callable[[str], str]) -> list[LayerMemory]:
        """Rows summed by ``key(name)`` (e.g. a block name), in first-seen order."""
        sums: dict[str, list[int]] = {}
        for row in self.rows:
            acc = sums.setdefault(key(row.name), [0, 0, 0])
            acc[0] += row.fp32_bytes
            acc[1] += row.stored_bytes
            acc[2] += row.elements
        return [LayerMemory(k, "", a, b, n) for k, (a, b, n) in sums.items()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp32_bytes": self.fp32_bytes,
            "converted_bytes": self.stored_bytes,
            "ratio": self.ratio,
            "compressed_fraction": self.compressed_fraction,
            "fallback_fraction": self.fallback_fraction,
            "layers": [
                {
                    "name": r.name,
                    "type": r.module_type,
                    "elements": r.elements,
                    "fp32_bytes": r.fp32_bytes,
                    "converted_bytes": r.stored_bytes,
                }
                for r in self.rows
            ],
        }


class _Recorder:
    """Attributes every saved tensor (or compressed copy) to the module that saved it."""

    def __init__(self, model: nn.Module) -> None:
        self.keep = {t.untyped_storage().data_ptr() for t in model.parameters()}
        self.keep |= {t.untyped_storage().data_ptr() for t in model.buffers()}
        self.stack: list[str] = []
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = defaultdict(int)
        self.elements: dict[str, int] = defaultdict(int)
        self.uncompressed_float = 0
        self.types: dict[str, str] = {}

    def observe(self, obj: torch.Tensor) -> None:
        name = self.stack[-1] if self.stack else ""
        if isinstance(obj, nn.Parameter):
            return
        storage = obj.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.keep or ptr in self.seen:
            return
        self.seen.add(ptr)
        self.bytes[name] += storage.nbytes()
        self.elements[name] += obj.numel()
        if obj.is_floating_point():
            self.uncompressed_float += storage.nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.observe(t)
        # Detached: a saved *output* kept with its grad_fn would own the node that owns it, a
        # cycle through C++ that no gc breaks when, as here, backward never runs.
        return t.detach()

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        handles = []
        for name, module in model.named_modules():
            self.types[name] = type(module).__name__
            handles.append(module.register_forward_pre_hook(self._push(name)))
            handles.append(module.register_forward_hook(self._pop, always_call=True))
        try:
            # The fallback's hooks save what they keep through the hooks outside theirs
            # (functions/fallback.py), so these see every byte a converted model holds.
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _push(self, name: str):
        def hook(module, args):
            self.stack.append(name)

        return hook

    def _pop(self, module, args, output) -> None:
        if self.stack:
            self.stack.pop()


def _run(model: nn.Module, inputs: Any) -> _Recorder:
    recorder = _Recorder(model)
    # The caller holds its inputs whatever autograd keeps: a saved reference costs no bytes.
    given = inputs if isinstance(inputs, tuple) else (inputs,)
    recorder.keep |= {t.untyped_storage().data_ptr() for t in given if torch.is_tensor(t)}
    with recorder.attached(model):
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    del out  # releases the graph and everything it saved
    return recorder


def measure_saved_activations(
    model: nn.Module, inputs: torch.Tensor | tuple, *, train: bool = True
) -> MemoryReport:
    """Measure the bytes autograd keeps for backward after one forward of ``model``.

    Runs the forward on the same input and RNG state: once with every qbackprop layer acting as
    its original module (the fp32 baseline) and once converted (with the sharing plan that
    ``convert_model`` decided: the bytes of every training step, the first included).
    Model buffers, train/eval mode and the RNG state are restored afterwards.

    Args:
        model: a converted (or plain) model.
        inputs: a tensor, or a tuple of positional inputs.
        train: measure a training-mode forward (default) or the model's current mode.

    Returns:
        A ``MemoryReport`` with totals and one row per module that saved something.
    """
    seed = int(torch.randint(0, 2**31 - 1, ()))
    with preserved_state(model):
        if train:
            model.train()
        torch.manual_seed(seed)
        with temporarily_unconverted(model):
            base = _run(model, inputs)
        torch.manual_seed(seed)
        conv = _run(model, inputs)
    names = list(dict.fromkeys([*base.bytes, *conv.bytes]))
    rows = [
        LayerMemory(
            name or "<root>",
            conv.types.get(name, base.types.get(name, "")),
            base.bytes.get(name, 0),
            conv.bytes.get(name, 0),
            base.elements.get(name, 0),
        )
        for name in names
    ]
    converted = {name for name, m in model.named_modules() if isinstance(m, QuantizedModule)}
    return MemoryReport(
        fallback_fp32_bytes=sum(b for name, b in base.bytes.items() if name not in converted),
        fp32_bytes=sum(base.bytes.values()),
        stored_bytes=sum(conv.bytes.values()),
        uncompressed_float_bytes=conv.uncompressed_float,
        rows=rows,
    )
