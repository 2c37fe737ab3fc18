"""CompressedTensor (packed codes + per-bucket metadata) and ``compress``, its constructor."""

from __future__ import annotations

import torch

from . import fused
from .buckets import Buckets, from_buckets, plan_buckets, to_buckets
from .deterministic import nearest_codes
from .packing import pack_codes, unpack_codes
from .spec import QuantSpec, Rounding, Scale
from .stochastic import draw_mix, stochastic_round


class CompressedTensor:
    """A tensor stored as packed b-bit codes plus per-bucket metadata.

    Metadata per bucket: ``minmax`` keeps the bucket minimum as fp32 and the step as bf16
    rounded *up* (so the codes still cover the bucket's maximum; bf16 has fp32's exponent range,
    so tiny ranges never underflow as they would in fp16); ``absmax`` and ``l2`` keep one fp32
    radius. Non-finite inputs (NaN, ±Inf) are kept exactly in a sparse side table and do not
    take part in their bucket's range, so they neither spread to nor are hidden from their
    neighbours: decompression returns them where they were, as FP32 would see them.

    Use ``compress(x, spec)`` to build one; ``decompress()`` returns a tensor of the original
    shape, dtype, device and strides; ``nbytes`` counts every tensor held.
    """

    __slots__ = (
        "spec", "dtype", "device", "layout", "raw", "packed", "meta",
        "mix_mask", "n_mixed", "nonfinite_index", "nonfinite_value", "_taken",
    )  # fmt: skip

    def __init__(self, spec: QuantSpec, x: torch.Tensor) -> None:
        self.spec = spec
        self.dtype = x.dtype
        self.device = x.device
        self.layout: Buckets | None = None
        self.raw: torch.Tensor | None = None
        self.packed: tuple[torch.Tensor, ...] = ()
        self.meta: tuple[torch.Tensor, ...] = ()
        self.mix_mask: torch.Tensor | None = None  # 1 bit per bucket, packed
        self.n_mixed = 0
        self.nonfinite_index: torch.Tensor | None = None
        self.nonfinite_value: torch.Tensor | None = None
        self._taken: list[tuple[str, int | None]] | None = None

    @property
    def shape(self) -> torch.Size:
        return self.raw.shape if self.raw is not None else torch.Size(self.layout.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object holds (what ``nbytes`` counts)."""
        held = []
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            held.extend(value if isinstance(value, tuple) else [value])
        return [t for t in held if t is not None]

    def take_tensors(self) -> list[torch.Tensor]:
        """Remove and return the held tensors (``tensors()`` order); ``put_tensors`` restores.

        Lets an autograd Function keep the tensors only in autograd's saved-tensor slots.
        """
        taken, out = [], []
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                taken.append((name, len(value)))
                out.extend(value)
                setattr(self, name, ())
            elif value is not None:
                taken.append((name, None))
                out.append(value)
                setattr(self, name, None)
        self._taken = taken
        return out

    def put_tensors(self, tensors: list[torch.Tensor]) -> CompressedTensor:
        """Give back the tensors removed by ``take_tensors``; returns self."""
        it = iter(tensors)
        for name, count in self._taken:
            setattr(
                self, name, next(it) if count is None else tuple(next(it) for _ in range(count))
            )
        self._taken = None
        return self

    @property
    def nbytes(self) -> int:
        """True bytes held: codes, per-bucket metadata, mix mask and non-finite table."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def bits_per_element(self) -> float:
        n = self.numel()
        return 8.0 * self.nbytes / n if n else 0.0

    def row_bits(self) -> torch.Tensor | int:
        """Bit width of each bucket: an int when uniform, else a ``(buckets, 1)`` tensor."""
        spec, layout = self.spec, self.layout
        if self.mix_mask is None:
            return (
                spec.mix_bits if self.n_mixed and self.n_mixed == layout.num_buckets else spec.bits
            )
        mask = unpack_codes(self.mix_mask, 1, layout.num_buckets).bool()
        return torch.where(mask, spec.mix_bits, spec.bits).view(-1, 1)

    def codes(self, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Unpacked integer codes, a ``(buckets, bucket_len)`` matrix of ``dtype`` (int32 by
        default; a float dtype for dequantizing)."""
        layout = self.layout
        per_bucket = layout.bucket_len
        if self.mix_mask is None:
            flat = unpack_codes(self.packed[0], self.row_bits(), layout.padded_numel, dtype)
            return flat.view(layout.num_buckets, per_bucket)
        k = self.n_mixed
        mixed = unpack_codes(self.packed[0], self.spec.mix_bits, k * per_bucket, dtype)
        plain_n = (layout.num_buckets - k) * per_bucket
        plain = unpack_codes(self.packed[1], self.spec.bits, plain_n, dtype)
        ordered = torch.cat([mixed, plain]).view(layout.num_buckets, per_bucket)
        order = _mixed_first(unpack_codes(self.mix_mask, 1, layout.num_buckets).bool())
        return torch.empty_like(ordered).index_copy_(0, order, ordered)

    def decompress(self) -> torch.Tensor:
        """The dequantized tensor: original shape, dtype, device and memory format."""
        if self.raw is not None:
            return self.raw
        out = fused.decompress_fused(self)
        if out is not None:
            return out
        layout = self.layout
        work = _work_dtype(self.spec)
        q = self.codes(work)
        levels = _levels(self.row_bits(), work)
        if self.spec.scale == Scale.MINMAX:
            low, step = (m.to(work).view(-1, 1) for m in self.meta)
            matrix = torch.addcmul(low, q, step)
        else:
            radius = self.meta[0].to(work).view(-1, 1)
            matrix = (2 * q - levels).div_(levels).mul_(radius)
        if self.nonfinite_index is not None:
            matrix.view(-1).index_copy_(0, self.nonfinite_index, self.nonfinite_value.to(work))
        return from_buckets(matrix, layout, self.dtype)

    def __repr__(self) -> str:
        return (
            f"CompressedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"spec={self.spec.short()!r}, nbytes={self.nbytes}, "
            f"bits_per_element={self.bits_per_element:.3f})"
        )


_TENSOR_FIELDS = ("raw", "packed", "meta", "mix_mask", "nonfinite_index", "nonfinite_value")


def _work_dtype(spec: QuantSpec) -> torch.dtype:
    # fp32 resolves codes up to 12 bits with room to spare; wider codes need fp64 arithmetic
    # (and keep the bucket minimum in fp64) so the error stays within half a step.
    return torch.float64 if max(spec.bits, spec.mix_bits or 0) > 12 else torch.float32


def _levels(bits: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor | float:
    """Largest code ``2**bits - 1``, a float or a per-bucket tensor."""
    if isinstance(bits, int):
        return float(2**bits - 1)
    return torch.exp2(bits.to(dtype)).sub_(1)


def _mixed_first(mask: torch.Tensor) -> torch.Tensor:
    """Bucket indices, those using ``mix_bits`` first, each group in ascending order."""
    return torch.argsort(mask.logical_not().to(torch.uint8), stable=True)


def _round_up_bf16(step: torch.Tensor) -> torch.Tensor:
    """``step`` in bf16, never smaller than the fp32 value (so the top code covers the max)."""
    rounded = step.to(torch.bfloat16)
    too_small = rounded.to(step.dtype) < step
    return torch.where(too_small, torch.nextafter(rounded, torch.full_like(rounded, 1e30)), rounded)


def _split_nonfinite(matrix: torch.Tensor):
    """Replace non-finite entries by a finite in-range value; return them and their positions."""
    bad = ~torch.isfinite(matrix)
    fill = torch.where(bad, float("inf"), matrix).amin(dim=1, keepdim=True)
    fill = torch.where(torch.isfinite(fill), fill, 0.0)
    index = bad.view(-1).nonzero().squeeze(1)
    values = matrix.view(-1)[index]
    return torch.where(bad, fill, matrix), index, values


def _bucket_stats(matrix: torch.Tensor, spec: QuantSpec):
    if spec.scale == Scale.MINMAX:
        low, high = torch.aminmax(matrix, dim=1, keepdim=True)
        return low, high
    if spec.scale == Scale.ABSMAX:
        return (matrix.abs().amax(dim=1, keepdim=True),)
    return (torch.linalg.vector_norm(matrix, dim=1, keepdim=True),)


def _quantize(matrix, stats, spec: QuantSpec, bits, generator):
    """Codes (integral floats) and the metadata that decompression needs."""
    levels = _levels(bits, matrix.dtype)
    if spec.scale == Scale.MINMAX:
        low, high = stats
        step_meta = _round_up_bf16((high - low) / levels)
        step = step_meta.to(matrix.dtype)
        safe_step = torch.where(step > 0, step, 1.0)
        meta = (low, step_meta)
        zero_point = -low / safe_step
    else:
        (radius,) = stats
        safe_radius = torch.where(radius > 0, radius, 1.0)
        safe_step = 2 * safe_radius / levels
        meta = (radius,)
        zero_point = levels / 2 + torch.zeros_like(radius)
    if spec.rounding == Rounding.NEAREST:
        width = torch.as_tensor(bits, dtype=matrix.dtype, device=matrix.device)
        codes = nearest_codes(matrix, safe_step, zero_point, width)
    else:
        codes = stochastic_round(matrix / safe_step + zero_point, levels, generator)
    return codes, tuple(m.view(-1) for m in meta)


def compress(
    x: torch.Tensor, spec: QuantSpec | str, *, generator: torch.Generator | None = None
) -> CompressedTensor:
    """Compress ``x`` to packed low-bit codes with per-bucket scaling.

    Large tensors may take the compiled kernels of ``fused.py`` (see there for when); they
    store the same bytes (nearest) or the same distribution (stochastic) as this eager path.

    Args:
        x: any tensor. Non-float tensors, empty tensors and ``bits=32`` are kept as they are
            (no copy).
        spec: a ``QuantSpec`` or a preset name such as ``"2bit-stochastic"``.
        generator: optional ``torch.Generator`` for reproducible stochastic rounding and mixing.

    Returns:
        A ``CompressedTensor``; ``.decompress()`` gives the dequantized tensor back.
    """
    if isinstance(spec, str):
        spec = QuantSpec.preset(spec)
    out = CompressedTensor(spec, x)
    if not spec.enabled or not x.is_floating_point() or x.numel() == 0:
        out.raw = x
        return out
    layout = plan_buckets(x, spec)
    out.layout = layout
    result = fused.compress_fused(x.detach(), spec, layout, generator)
    # One scalar read (a sync on CUDA): buckets with NaN/Inf are redone on the eager path.
    if result is not None and not bool(result[2]):
        out.packed, out.meta = (result[0],), result[1]
        return out
    matrix = to_buckets(x.detach(), layout, _work_dtype(spec))
    stats = _bucket_stats(matrix, spec)
    # One small check (a sync on CUDA) keeps NaN/Inf from poisoning a bucket's scale.
    if not bool(torch.isfinite(torch.cat([s.view(-1) for s in stats])).all()):
        matrix, out.nonfinite_index, values = _split_nonfinite(matrix)
        out.nonfinite_value = values.to(x.dtype)
        stats = _bucket_stats(matrix, spec)

    mask, out.n_mixed = draw_mix(layout.num_buckets, spec, matrix.device, generator)
    if mask is None:
        bits = spec.mix_bits if out.n_mixed else spec.bits
        codes, out.meta = _quantize(matrix, stats, spec, bits, generator)
        out.packed = (pack_codes(codes.reshape(-1), bits),)
        return out
    bits = torch.where(mask, spec.mix_bits, spec.bits).view(-1, 1)
    codes, out.meta = _quantize(matrix, stats, spec, bits, generator)
    ordered = codes.index_select(0, _mixed_first(mask))
    k = out.n_mixed * layout.bucket_len
    flat = ordered.reshape(-1)
    out.packed = (pack_codes(flat[:k], spec.mix_bits), pack_codes(flat[k:], spec.bits))
    out.mix_mask = pack_codes(mask.to(torch.uint8), 1)
    return out
