"""Compression as registered ops: ``qbackprop::compress`` and ``qbackprop::decompress``.

Registered with ``torch.library.custom_op`` and fake kernels, so ``torch.compile`` (Dynamo,
AOTAutograd, Inductor) treats each as one opaque call with known output sizes: the sizes are a
function of the input's shape and stride, the spec and the mix count, never of the data. The
spec travels as a canonical string key (custom ops take primitive arguments). The CPU and CUDA
kernels are the eager torch implementation of ``compressed.py``; on CUDA the hand-written
Triton kernels of ``triton_kernels.py`` run instead where they apply (one kernel per tensor and
direction), the eager implementation elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import triton_kernels
from .buckets import Buckets, flat_view, from_buckets, plan_layout
from .compressed import compress_tensors, decompress_tensors, layout_sizes
from .spec import QuantSpec, Rounding, Scale


def spec_key(spec: QuantSpec) -> str:
    """The canonical string form of ``spec`` that the ops take, e.g.
    ``bits=2;bucket_size=512;...`` (made once, when the spec is constructed)."""
    return spec.key


@functools.lru_cache(maxsize=4096)
def spec_from_key(key: str) -> QuantSpec:
    fields = dict(item.split("=", 1) for item in key.split(";"))
    return QuantSpec(**{name: _parse(value) for name, value in fields.items()})


def _parse(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _contiguous_stride(shape: list[int]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _layout(spec: QuantSpec, shape: list[int], stride: list[int]) -> Buckets:
    # An empty stride list stands for "not dense": the layout then returns contiguous tensors.
    if stride:
        return plan_layout(tuple(shape), tuple(stride), spec)
    layout = plan_layout(tuple(shape), _contiguous_stride(shape), spec)
    return dataclasses.replace(layout, stride=None)


@torch.library.custom_op("qbackprop::compress", mutates_args=())
def _compress(x: torch.Tensor, spec: str, n_mixed: int) -> list[torch.Tensor]:
    qspec = spec_from_key(spec)
    layout = plan_layout(tuple(x.shape), tuple(x.stride()), qspec)
    return compress_tensors(x, qspec, layout, n_mixed)


@_compress.register_fake
def _(x: torch.Tensor, spec: str, n_mixed: int) -> list[torch.Tensor]:
    qspec = spec_from_key(spec)
    layout = plan_layout(tuple(x.shape), tuple(x.stride()), qspec)
    return [x.new_empty(n, dtype=dtype) for n, dtype in layout_sizes(qspec, layout, n_mixed)]


def _triton_bits(
    qspec: QuantSpec,
    layout: Buckets,
    n_mixed: int,
    numel: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """The code width when the hand-written Triton kernels apply to this tensor, else 0: the
    one decision compress and decompress both take, so a tensor never goes one way and back
    the other.

    They cover the common case: minmax scale, one width of 1..8 bits, the flat layout of a
    dense tensor split into buckets of whole 64-code blocks with no padding, fp32/fp16/bf16,
    on a device the kernels run on (``triton_kernels.runs_on``)."""
    bits = qspec.mix_bits if n_mixed else qspec.bits
    if (
        qspec.scale != Scale.MINMAX
        or 0 < n_mixed < layout.num_buckets
        or not 1 <= bits <= 8
        or layout.channel
        or layout.stride is None
        or layout.padded_numel != numel
        or layout.bucket_len % 64
        or dtype not in (torch.float32, torch.float16, torch.bfloat16)
        or not triton_kernels.runs_on(device, layout.bucket_len)
    ):
        return 0
    return bits


def compress_triton_or_eager(x: torch.Tensor, spec: str, n_mixed: int) -> list[torch.Tensor]:
    """The CUDA kernel of ``qbackprop::compress``: one Triton kernel per tensor where it
    applies (``triton_kernels.py``; same format, nearest codes bit for bit), else eager."""
    qspec = spec_from_key(spec)
    layout = plan_layout(tuple(x.shape), tuple(x.stride()), qspec)
    bits = _triton_bits(qspec, layout, n_mixed, x.numel(), x.dtype, x.device)
    if bits:
        matrix = flat_view(x, layout).view(layout.num_buckets, layout.bucket_len)
        # The seed is drawn on the device: the host never waits for it.
        seed = torch.randint(0, 2**62, (), device=x.device, dtype=torch.int64)
        stochastic = qspec.rounding == Rounding.STOCHASTIC
        return list(triton_kernels.compress_minmax(matrix, bits, stochastic, seed))
    return compress_tensors(x, qspec, layout, n_mixed)


def decompress_triton_or_eager(
    tensors: list[torch.Tensor],
    spec: str,
    n_mixed: int,
    shape: list[int],
    stride: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The CUDA kernel of ``qbackprop::decompress`` (see ``compress_triton_or_eager``)."""
    qspec = spec_from_key(spec)
    layout = _layout(qspec, shape, stride)
    bits = _triton_bits(qspec, layout, n_mixed, math.prod(shape), dtype, tensors[0].device)
    if bits and len(tensors) == 3:
        packed, low, step = tensors
        matrix = triton_kernels.decompress_minmax(
            packed, low, step, bits, layout.num_buckets, layout.bucket_len, dtype
        )
        return from_buckets(matrix, layout, dtype)
    return decompress_tensors(tensors, qspec, layout, n_mixed, dtype)


@torch.library.custom_op("qbackprop::decompress", mutates_args=())
def _decompress(
    tensors: list[torch.Tensor],
    spec: str,
    n_mixed: int,
    shape: list[int],
    stride: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    qspec = spec_from_key(spec)
    return decompress_tensors(tensors, qspec, _layout(qspec, shape, stride), n_mixed, dtype)


_compress.register_kernel("cuda")(compress_triton_or_eager)
_decompress.register_kernel("cuda")(decompress_triton_or_eager)


@_decompress.register_fake
def _(tensors, spec, n_mixed, shape, stride, dtype) -> torch.Tensor:
    device = tensors[0].device
    if stride:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def compress_op(x: torch.Tensor, spec: QuantSpec, n_mixed: int) -> list[torch.Tensor]:
    """``qbackprop::compress``: the tensors of ``compressed.layout_sizes`` for ``x``."""
    return torch.ops.qbackprop.compress(x, spec_key(spec), n_mixed)


def decompress_op(
    tensors: list[torch.Tensor],
    spec: QuantSpec,
    n_mixed: int,
    layout: Buckets,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``qbackprop::decompress``: the dequantized tensor of ``layout``'s shape and strides."""
    stride = list(layout.stride) if layout.stride is not None else []
    return torch.ops.qbackprop.decompress(
        tensors, spec_key(spec), n_mixed, list(layout.shape), stride, dtype
    )


__all__ = ["compress_op", "decompress_op", "spec_from_key", "spec_key"]
