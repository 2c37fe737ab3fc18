"""Scaled dot-product attention that saves compressed q, k, v and recomputes the rest.

torch's attention keeps, for backward, q, k, v, the output and the log-sum-exp (fused SDPA) or
the whole ``(B, H, N, M)`` probability matrix (the explicit softmax path). This Function keeps
only compressed q, k, v (and a 1-bit dropout mask when dropout is on); backward recomputes the
scores and probabilities from the dequantized copies, so the recomputed softmax is consistent
with the q̃, k̃ it came from.

The scores ``q kᵀ`` go through an exponential: an error in q or k scales the probabilities,
while an error in v enters the gradient linearly. q and k are therefore kept at
``QK_MIN_BITS`` or more and v at ``V_MIN_BITS`` or more, whatever the layer's spec (measured:
docs/design-notes.md, "Attention").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..quant import QuantSpec
from ..quant.packing import pack_codes, unpack_codes
from .autocast import autocast_disabled, autocast_inputs
from .base import QFunction, records_grad
from .saved import load_saved, save_for_backward

QK_MIN_BITS = 8
V_MIN_BITS = 4


def _at_least(spec: QuantSpec | None, bits: int) -> QuantSpec | None:
    if spec is None or not spec.enabled or spec.bits >= bits:
        return spec
    return spec.replace(bits=bits, mix_bits=None, mix_prob=None)


def attention_specs(spec: QuantSpec | None) -> tuple[QuantSpec | None, QuantSpec | None]:
    """How an attention layer with ``spec`` keeps ``(q and k, v)``: at >= 8 and >= 4 bits."""
    return _at_least(spec, QK_MIN_BITS), _at_least(spec, V_MIN_BITS)


def attention_saves(spec: QuantSpec | None) -> str:
    """The report's "keeps" note for an attention layer with ``spec``."""
    qk, v = attention_specs(spec)
    if qk is None or not qk.enabled:
        return ""
    return f"q,k at {qk.bits}b, v at {v.bits}b"


def _bool_as_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # SDPA's boolean masks say where to attend; the recomputation adds a float bias.
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def _scores(q, k, scale, bias, mask, windows, is_causal):
    """``(q·scale) kᵀ + bias + mask``, as timm's explicit path computes them."""
    s = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        s = s + bias
    if mask is not None:
        if windows:  # a (num_windows, N, M) mask over a (B·num_windows, H, N, M) batch
            shape = s.shape
            s = (s.view(-1, mask.shape[0], *shape[1:]) + mask.unsqueeze(1).unsqueeze(0)).view(shape)
        else:
            s = s + mask
    if is_causal:
        n, m = s.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=s.device).tril_(m - n)
        s = s.masked_fill(~causal, float("-inf"))
    return s


def _full_mask(bias, mask, windows, batch, heads):
    """The single additive mask SDPA takes: bias + mask (windowed masks expanded)."""
    if mask is not None and windows:
        n_win = mask.shape[0]
        n, m = mask.shape[-2:]
        mask = mask.view(1, n_win, 1, n, m).expand(batch // n_win, -1, heads, -1, -1)
        mask = mask.reshape(-1, heads, n, m)
    if bias is None:
        return mask
    return bias if mask is None else bias + mask


class AttentionFunction(QFunction):
    """``softmax((q·scale) kᵀ + bias + mask) v`` (with dropout on the probabilities).

    Forward is torch's: ``F.scaled_dot_product_attention`` on the fused path, timm's explicit
    ops otherwise (and whenever dropout is on, with a mask this Function draws and keeps at
    1 bit per probability). Saved: q, k at ``qk_spec``, v at ``v_spec``, ``bias`` and ``mask``
    exactly (small: a relative-position bias, a window or padding mask). Backward recomputes
    scores and probabilities from q̃, k̃ and returns dq, dk, dv and d(bias).

    ``mask`` never gets a gradient; ``windows`` says it is ``(num_windows, N, M)`` for a batch
    of ``B·num_windows`` windows (Swin's shifted-window mask).
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor | None,
        windows: bool,
        is_causal: bool,
        scale: float,
        dropout_p: float,
        explicit: bool,
        qk_spec: QuantSpec | None,
        v_spec: QuantSpec | None,
    ) -> torch.Tensor:
        keep = None
        if dropout_p > 0.0 or explicit:
            s = _scores(q, k, scale, bias, mask, windows, is_causal)
            p = s.softmax(dim=-1)
            if dropout_p > 0.0:
                keep = torch.rand_like(p) >= dropout_p
                p = p * keep / (1.0 - dropout_p)
            out = p @ v
        else:
            full = _full_mask(bias, mask, windows, q.shape[0], q.shape[1])
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=full, is_causal=is_causal, scale=scale
            )
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        need_p = need_q or need_k or need_bias
        packed_keep = None
        if keep is not None:
            ctx.keep_shape = keep.shape
            packed_keep = pack_codes(keep.reshape(-1), 1)
        # dv reads the probabilities (q, k); dq, dk and d(bias) read everything.
        save_for_backward(
            ctx,
            [
                (q if need_p or need_v else None, qk_spec),
                (k if need_p or need_v else None, qk_spec),
                (v if need_p else None, v_spec),
            ],
            exact=[bias, mask, packed_keep],
        )
        ctx.meta = (windows, is_causal, scale, dropout_p)
        ctx.v_shape = v.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        windows, is_causal, scale, dropout_p = ctx.meta
        with autocast_disabled(grad.device.type):
            (q, k, v), (bias, mask, packed_keep) = load_saved(ctx)
            need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
            p = _scores(q, k, scale, bias, mask, windows, is_causal).softmax(dim=-1)
            keep = None
            if packed_keep is not None:
                n = math.prod(ctx.keep_shape)
                keep = unpack_codes(packed_keep, 1, n, p.dtype).view(ctx.keep_shape)
                keep = keep / (1.0 - dropout_p)
            grad_q = grad_k = grad_v = grad_bias = None
            if need_v:
                dropped = p * keep if keep is not None else p
                grad_v = (dropped.transpose(-2, -1) @ grad).sum_to_size(ctx.v_shape)
            if need_q or need_k or need_bias:
                dp = grad @ v.transpose(-2, -1)
                if keep is not None:
                    dp = dp * keep
                # softmax backward: dS = P ⊙ (dP − Σ_j dP·P)
                ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
                if need_q:
                    grad_q = (ds @ k) * scale
                if need_k:
                    grad_k = (ds.transpose(-2, -1) @ q) * scale
                if need_bias:
                    grad_bias = ds.sum_to_size(bias.shape)
        return grad_q, grad_k, grad_v, grad_bias, *([None] * 8)


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    windows: bool = False,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    explicit: bool = False,
    spec: QuantSpec | None = None,
) -> torch.Tensor:
    """Attention over ``(B, H, N, d)`` q and ``(B, H, M, d)`` k, v whose backward keeps only
    compressed q, k, v (see ``AttentionFunction``).

    Args:
        q, k, v: queries, keys, values; the output is ``(B, H, N, d_v)``.
        bias: an additive term broadcastable to the scores that may need a gradient (Swin's
            relative-position bias), or a boolean / float ``attn_mask`` as SDPA takes it.
        mask: an additive mask without gradient (padding, shifted windows).
        windows: ``mask`` is ``(num_windows, N, M)`` for a batch of ``B·num_windows`` windows.
        is_causal: a causal (lower-triangular) mask, as in SDPA.
        scale: the score scale; default ``1/sqrt(d)``.
        dropout_p: dropout on the probabilities (training only: pass 0 in eval).
        explicit: compute forward with timm's explicit ops instead of SDPA (same maths).
        spec: the layer's spec; q, k are kept at >= 8 bits, v at >= 4 (``attention_specs``).

    Returns:
        The attention output, equal to torch's (the fused path is SDPA itself).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not records_grad(q, k, v, bias):
        full = _full_mask(_bool_as_bias(bias, q.dtype), mask, windows, q.shape[0], q.shape[1])
        if explicit or dropout_p > 0.0:
            return _explicit_eval(q, k, v, full, is_causal, scale, dropout_p)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=full, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    device_type = q.device.type
    q, k, v, bias, mask = autocast_inputs(device_type, q, k, v, bias, mask)
    bias = _bool_as_bias(bias, q.dtype)
    mask = _bool_as_bias(mask, q.dtype)
    qk_spec, v_spec = attention_specs(spec)
    with autocast_disabled(device_type):
        return AttentionFunction.apply(
            q, k, v, bias, mask, windows, is_causal, scale, dropout_p, explicit, qk_spec, v_spec
        )


def _explicit_eval(q, k, v, full, is_causal, scale, dropout_p):
    p = _scores(q, k, scale, full, None, False, is_causal).softmax(dim=-1)
    return F.dropout(p, dropout_p) @ v
