"""Drop-in BatchNorm layers (torch BatchNorm1d/2d/3d, timm BatchNormAct2d) saving a compressed x̂."""

from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d
from torch import nn

from .. import runtime
from ..functions import shared
from ..functions.norm import batch_norm, normalized_spec
from ..functions.shared import leaf_bits
from ..quant import QuantSpec
from .plan import LayerPlan, PlanContext
from .registry import QuantizedModule, register_swap


def shared_norm_plan(
    name: str,
    spec: QuantSpec | None,
    share: bool,
    ctx: PlanContext,
    promise: float,
    widened: QuantSpec | None,
) -> LayerPlan:
    """The plan of a normalization whose output its consumers may rebuild from its x̂.

    Alone it keeps x̂ at ``normalized_spec`` (2·b bits, at most 8). Its output is shared with
    the consumers the planning forward saw that would use what it ``promise``s (bits per
    element); then x̂ is kept at ``widened`` (the bytes of the copies no longer made)."""
    alone = normalized_spec(spec)
    feeds: tuple[str, ...] = ()
    if share and alone is not None and alone.enabled:
        feeds = tuple(
            c
            for c in ctx.structure.consumers.get(name, ())
            if (s := ctx.specs.get(c)) is not None and s.enabled and promise >= leaf_bits(s)
        )
    saves = widened if feeds and widened is not None and widened.bits > alone.bits else alone
    note = ""
    if alone is not None and alone.enabled:
        note = f"x̂ at {saves.bits}b" + (f", shared with {', '.join(feeds)}" if feeds else "")
    return LayerPlan(name, spec, share, saves, alone, feeds, note)


class _BatchNormMixin(QuantizedModule):
    """torch's ``_BatchNorm.forward`` logic (momentum, cumulative average, eval), our Function."""

    producer = True

    def make_plan(
        self, name: str, spec: QuantSpec | None, share: bool, ctx: PlanContext
    ) -> LayerPlan:
        # One copy serves BN and its consumer (functions/shared.py): x̂ takes the bytes of the
        # consumer's copy, split with a smooth activation's code when one sits between.
        smooth = name in ctx.structure.smooth
        widened = shared.widen(spec, smooth) if spec is not None and spec.enabled else None
        promise = shared.leaf_bits(shared.widen(spec, smooth=True)) if widened else 0.0
        return shared_norm_plan(name, spec, share, ctx, promise, widened)

    def _batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # momentum=None means a cumulative moving average, exactly as torch computes it.
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else factor
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        plan = self.qplan
        spec = plan.saved_spec(runtime.shares())
        tags = plan.share and spec is not None and spec.enabled and runtime.shares()
        sources = [] if tags else None
        out = batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            spec,
            sources=sources,
        )
        if sources and sources[0] is not None and (plan.feeds or shared.watcher()):
            affine = (self.weight, self.bias) if self.affine else ()
            # What x̂ would keep once shared (the smaller, smooth-activation split).
            promise = shared.leaf_bits(shared.widen(plan.spec, smooth=True))
            ready = plan.shared_output
            shared.tag(out, shared.affine(sources[0], affine, out.dtype, ready, self, promise))
        return out


@register_swap(nn.BatchNorm1d, "batchnorm")
@register_swap(nn.BatchNorm2d, "batchnorm")
@register_swap(nn.BatchNorm3d, "batchnorm")
class QBatchNorm(_BatchNormMixin):
    """BatchNorm1d/2d/3d: train mode (batch statistics) and eval mode, affine or not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._batch_norm(x)


@register_swap(BatchNormAct2d, "batchnorm")
class QBatchNormAct2d(_BatchNormMixin):
    """timm's BatchNorm + drop + act. The BN saves x̂; the activation (a child module) is
    converted on its own and saves only its few-bit derivative code, so the pair keeps one
    b-bit tensor plus one derivative code where torch keeps two fp32 tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._batch_norm(x)
        x = self.drop(x)
        return self.act(x)
