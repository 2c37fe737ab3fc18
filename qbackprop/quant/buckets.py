"""Bucket layout: view a tensor as a (buckets, bucket_len) matrix and back, without Python loops."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .spec import BucketLayout, QuantSpec


@dataclass(frozen=True)
class Buckets:
    """How a tensor was laid out into equal buckets.

    The tensor is seen as ``rows`` rows of ``row_len`` elements (one row for the flat layout, one
    row per channel for the channel layout); each row is split into ``per_row`` buckets of
    ``bucket_len`` elements, the last padded by repeating the row's last element (so padding
    never widens a bucket's range).
    """

    shape: tuple[int, ...]
    stride: tuple[int, ...] | None  # original strides when dense; None: return contiguous
    perm: tuple[int, ...]  # flat layout: dims in memory order
    channel: bool
    rows: int
    row_len: int
    per_row: int
    bucket_len: int

    @property
    def num_buckets(self) -> int:
        return self.rows * self.per_row

    @property
    def padded_numel(self) -> int:
        return self.num_buckets * self.bucket_len


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _memory_order(
    shape: tuple[int, ...], stride: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Dims sorted outermost-first by stride, and the strides if dense (no gaps, no overlap).

    Shape arithmetic only, so compression ops can plan a layout from ``(shape, stride)``
    alone (their fake kernels see no data)."""
    if _is_contiguous(shape, stride):  # the common case, without the sort
        return tuple(range(len(shape))), stride
    perm = tuple(sorted(range(len(shape)), key=lambda d: (-stride[d], d)))
    permuted = tuple(shape[d] for d in perm), tuple(stride[d] for d in perm)
    if _is_contiguous(*permuted):
        return perm, stride
    return tuple(range(len(shape))), None


def plan_layout(shape: tuple[int, ...], stride: tuple[int, ...], spec: QuantSpec) -> Buckets:
    """The bucket layout of a tensor of ``shape`` and ``stride`` under ``spec``."""
    shape, stride = tuple(shape), tuple(stride)
    perm, dense = _memory_order(shape, stride)
    channel = spec.bucket_layout == BucketLayout.CHANNEL and len(shape) >= 2 and shape[1] > 0
    numel = math.prod(shape)
    rows = shape[1] if channel else 1
    row_len = numel // rows if rows else 0
    limit = row_len if spec.per_tensor else spec.bucket_size
    # Split each row into equal buckets of at most `limit`: padding stays under one per bucket.
    per_row = max(1, math.ceil(row_len / max(limit, 1)))
    bucket_len = max(1, math.ceil(row_len / per_row))
    return Buckets(shape, dense, perm, channel, rows, row_len, per_row, bucket_len)


def plan_buckets(x: torch.Tensor, spec: QuantSpec) -> Buckets:
    """Choose the layout of ``x`` for ``spec``; cheap, shape arithmetic only."""
    return plan_layout(tuple(x.shape), tuple(x.stride()), spec)


def flat_view(x: torch.Tensor, layout: Buckets) -> torch.Tensor:
    """The flat layout's single row: ``x`` in memory order, a view unless ``x`` has gaps."""
    if x.is_contiguous():
        return x.view(-1)
    if layout.stride is not None:
        return x.permute(layout.perm).reshape(-1)  # a view: memory order, no copy
    return x.reshape(-1)


def to_buckets(x: torch.Tensor, layout: Buckets, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a ``(num_buckets, bucket_len)`` matrix of ``dtype``."""
    if layout.channel:
        rows = x.transpose(0, 1).reshape(layout.rows, layout.row_len)
    else:
        rows = flat_view(x, layout).view(1, -1)
    rows = rows.to(dtype)
    pad = layout.per_row * layout.bucket_len - layout.row_len
    if pad:
        rows = F.pad(rows.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    return rows.reshape(layout.num_buckets, layout.bucket_len)


def from_buckets(matrix: torch.Tensor, layout: Buckets, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``to_buckets``: the original shape, dtype and strides."""
    rows = matrix.reshape(layout.rows, layout.per_row * layout.bucket_len)[:, : layout.row_len]
    shape = layout.shape
    if layout.channel:
        swapped = (shape[1], shape[0], *shape[2:])
        y = rows.reshape(swapped).transpose(0, 1)
    elif layout.stride is not None:
        permuted_shape = [shape[d] for d in layout.perm]
        inverse = [layout.perm.index(d) for d in range(len(shape))]
        y = rows.reshape(permuted_shape).permute(inverse)
    else:
        y = rows.reshape(shape)
    if layout.stride is None:
        return y.to(dtype).contiguous()
    if y.dtype == dtype and y.stride() == layout.stride:
        return y
    out = torch.empty_strided(shape, layout.stride, dtype=dtype, device=matrix.device)
    return out.copy_(y)
