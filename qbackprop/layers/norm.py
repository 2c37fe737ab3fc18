"""Drop-in BatchNorm layers (torch BatchNorm1d/2d/3d, timm BatchNormAct2d) saving a compressed x̂."""

from __future__ import annotations

import torch
from torch import nn

from ..functions import shared
from ..functions.norm import batch_norm, normalized_spec
from .registry import QuantizedModule, register_swap


class _BatchNormMixin(QuantizedModule):
    """torch's ``_BatchNorm.forward`` logic (momentum, cumulative average, eval), our Function."""

    def _xhat_spec(self):
        """x̂'s spec under the sharing plan: 2·b bits (max 8) alone, or wider when shared.

        Derived once per (spec, plan) and kept on the module, so a traced forward reads it
        instead of re-deriving (and validating) a spec in every layer."""
        key = (
            self.qspec,
            self.qshare,
            shared.feeds_converted(self),
            shared.has_smooth_activation(self),
        )
        cached = self.__dict__.get("_qbackprop_xhat_spec")
        if cached is not None and cached[0] == key:
            return cached[1]
        spec = self._derive_xhat_spec()
        if not torch.compiler.is_compiling():
            self.__dict__["_qbackprop_xhat_spec"] = (key, spec)
        return spec

    def _derive_xhat_spec(self):
        spec = normalized_spec(self.qspec)
        if self.qshare and spec is not None and spec.enabled and shared.feeds_converted(self):
            # One copy serves BN and its consumer: see functions/shared.py.
            wide = shared.widen(self.qspec, shared.has_smooth_activation(self))
            spec = wide if wide.bits > spec.bits else spec
        return spec

    def saves(self) -> str:
        spec = self._xhat_spec()
        if spec is None or not spec.enabled:
            return ""
        if self.qshare and shared.feeds_converted(self):
            return f"x̂ at {spec.bits}b, shared with its consumer"
        return f"x̂ at {spec.bits}b"

    def _qbackprop_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # momentum=None means a cumulative moving average, exactly as torch computes it.
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else factor
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        spec = self._xhat_spec()
        sources = [] if self.qshare and spec is not None and spec.enabled else None
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
        if sources and sources[0] is not None:
            affine = (self.weight, self.bias) if self.affine else ()
            ready = shared.feeds_converted(self)
            # What x̂ would keep once shared (the smaller, smooth-activation split).
            promise = shared.leaf_bits(shared.widen(self.qspec, smooth=True))
            shared.tag(out, shared.affine(sources[0], affine, out.dtype, ready, self, promise))
        return out


@register_swap(nn.BatchNorm1d, "batchnorm")
@register_swap(nn.BatchNorm2d, "batchnorm")
@register_swap(nn.BatchNorm3d, "batchnorm")
class QBatchNorm(_BatchNormMixin):
    """BatchNorm1d/2d/3d: train mode (batch statistics) and eval mode, affine or not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qbackprop_batch_norm(x)


def _timm_batchnorm_act():
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # timm is a dependency, but the torch layers work without it
        return None
    return BatchNormAct2d


_BatchNormAct2d = _timm_batchnorm_act()
if _BatchNormAct2d is not None:

    @register_swap(_BatchNormAct2d, "batchnorm")
    class QBatchNormAct2d(_BatchNormMixin):
        """timm's BatchNorm + drop + act. The BN saves x̂; the activation (a child module) is
        converted on its own and saves only its few-bit derivative code, so the pair keeps one
        b-bit tensor plus one derivative code where torch keeps two fp32 tensors."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self._qbackprop_batch_norm(x)
            x = self.drop(x)
            return self.act(x)
