"""Eager or traced: the one place that decides what a converted model does under torch.compile.

Every layer reads the same frozen plan (``plan.py``) in both modes; what differs is only what a
graph traced by Dynamo cannot express, and each such rule is a function here:

- ``shares()``: sharing a normalization's x̂ with its consumer is off in a traced graph. Its
  handoff is a side table keyed on live tensor objects (``functions/tensor_table.py``), which
  Dynamo does not trace. A producer then keeps x̂ at its own width, not the shared one, so a
  traced graph keeps what ``share: false`` keeps eagerly: each consumer its own b-bit copy.
- ``fallback_active()``: the fallback's saved-tensor hooks are off in a traced graph (hooks
  are not traced); what ops without a drop-in save is left to AOTAutograd, at full precision.
- ``in_place_allowed()``: an in-place activation runs out of place in a traced graph
  (functionalization would copy it anyway).
- ``validates_specs()``: a ``QuantSpec`` made inside a traced forward is derived from a checked
  one and is not validated again (the schema's checks are not traceable).
- ``prepares()``: host-side preparation (few-bit derivative tables, the NaN probe of an
  activation) runs eagerly only; a traced graph uses what conversion's planning forward built.
- ``knows_history()``: ``grad_fn`` cannot be read in a traced graph; a tensor that needs no
  gradient is the model's input there.

So compiled graphs keep more bytes than eager ones where the model shares (BatchNorm and
LayerNorm outputs feeding converted layers) or reaches the fallback: docs/benchmarks.md,
"Under torch.compile", measures how much.
"""

from __future__ import annotations

import torch


def tracing() -> bool:
    """Whether Dynamo is tracing the current forward (``torch.compile``)."""
    return torch.compiler.is_compiling()


def shares() -> bool:
    """Whether a producer's output may be rebuilt by its consumer (eager only)."""
    return not tracing()


def fallback_active() -> bool:
    """Whether the fallback's saved-tensor hooks apply (eager only)."""
    return not tracing()


def in_place_allowed() -> bool:
    """Whether an in-place activation may modify its input (eager only)."""
    return not tracing()


def validates_specs() -> bool:
    """Whether a new ``QuantSpec`` checks its fields (eager only)."""
    return not tracing()


def prepares() -> bool:
    """Whether host-side tables and probes may be built now (eager only)."""
    return not tracing()


def knows_history() -> bool:
    """Whether a tensor's ``grad_fn`` may be read (eager only)."""
    return not tracing()
