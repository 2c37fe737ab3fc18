"""Drop-in attention: timm ``Attention``, Swin ``WindowAttention``, ``nn.MultiheadAttention``.

Each reproduces its module's forward step for step, with the attention core (SDPA or the
explicit softmax) replaced by ``quantized_attention``, which keeps compressed q, k, v instead
of torch's q, k, v, output and log-sum-exp (or the full probability matrix). The projections
are the modules' own ``nn.Linear`` children, converted by their own rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.models.swin_transformer import WindowAttention as SwinWindowAttention
from torch import nn

from ..functions.attention import attention_saves, quantized_attention
from ..functions.linear import quantized_linear
from .conv import forward_override_check
from .registry import QuantizedModule, register_swap


class _AttentionSaves(QuantizedModule):
    def saves(self) -> str:
        return attention_saves(self.qspec)


@register_swap(TimmAttention, "attention", check=forward_override_check(TimmAttention))
class QuantizedTimmAttention(_AttentionSaves):
    """timm's multi-head self-attention (ViT, DeiT, ...), fused SDPA or explicit path."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = quantized_attention(
            q,
            k,
            v,
            bias=attn_mask,
            is_causal=is_causal,
            scale=None if self.fused_attn else self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            explicit=not self.fused_attn,
            spec=self.qspec,
        )
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


@register_swap(SwinWindowAttention, "attention", check=forward_override_check(SwinWindowAttention))
class QuantizedWindowAttention(_AttentionSaves):
    """Swin's window attention: relative-position bias (learned, gets its gradient) and the
    shifted-window mask (kept once per window, not once per batch element and head)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = quantized_attention(
            q,
            k,
            v,
            bias=self._get_rel_pos_bias(),
            mask=mask,
            windows=mask is not None,
            scale=None if self.fused_attn else self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            explicit=not self.fused_attn,
            spec=self.qspec,
        )
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


def _mha_check(module: nn.Module) -> str | None:
    reason = forward_override_check(nn.MultiheadAttention)(module)
    if reason:
        return reason
    if not module._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim; not converted"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn; not converted"
    return None


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # nn.MultiheadAttention's masks: True (or -inf) = do not attend, as F._canonical_mask reads.
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask.bool(), float("-inf")
    )


@register_swap(nn.MultiheadAttention, "attention", check=_mha_check)
class QuantizedMultiheadAttention(_AttentionSaves):
    """``nn.MultiheadAttention`` (``nn.TransformerEncoderLayer``, torchvision ViT).

    With ``need_weights=True`` (the module's default, which returns the probability matrix)
    or an unbatched input it runs torch's own forward, covered by the fallback hooks; the
    transformer layers of torch and torchvision call it with ``need_weights=False``.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if need_weights or query.dim() != 3:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        self_attention = query is key and key is value
        if self.batch_first:  # torch's layout inside is (L, B, E)
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        L, B, E = query.shape
        S, H = key.shape[0], self.num_heads
        d = E // H
        spec = self.qspec
        if self_attention:
            proj = quantized_linear(query, self.in_proj_weight, self.in_proj_bias, spec=spec)
            proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2)
            q, k, v = proj.contiguous().unbind(0)
        else:
            weights = self.in_proj_weight.chunk(3)
            biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = (
                quantized_linear(t, w, b, spec=spec)
                for t, w, b in zip((query, key, value), weights, biases, strict=True)
            )
        mask = _float_mask(attn_mask, q.dtype)
        if is_causal and mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        if mask is not None:
            mask = mask.unsqueeze(0) if mask.dim() == 2 else mask.view(B, H, L, S)
        if key_padding_mask is not None:
            padding = _float_mask(key_padding_mask, q.dtype).view(B, 1, 1, S)
            mask = padding if mask is None else mask + padding
        # As torch: is_causal replaces attn_mask (a hint) unless a padding mask is merged in.
        causal = is_causal and key_padding_mask is None
        if causal:
            mask = None
        q = q.view(L, B * H, d).transpose(0, 1).view(B, H, L, d)
        k = k.view(S, B * H, d).transpose(0, 1).view(B, H, S, d)
        v = v.view(S, B * H, d).transpose(0, 1).view(B, H, S, d)
        out = quantized_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            spec=spec,
        )
        out = out.permute(2, 0, 1, 3).contiguous().view(B * L, E)
        out = (
            self.out_proj(out)
            if _converted(self.out_proj)
            else F.linear(out, self.out_proj.weight, self.out_proj.bias)
        )
        out = out.view(L, B, E)
        return (out.transpose(1, 0) if self.batch_first else out), None


def _converted(module: nn.Module) -> bool:
    return isinstance(module, QuantizedModule)
