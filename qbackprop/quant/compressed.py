"""CompressedTensor (packed codes + per-bucket metadata) and ``compress``, its constructor.

Every size is a function of the input's shape and the spec alone (a two-bit mix puts exactly
``round(p * buckets)`` buckets at ``mix_bits``), and nothing is read back to the host: the work
runs as registered ops (``ops.py``) with fake kernels, so ``torch.compile`` traces through it
and a CUDA step never waits on the device.

Non-finite policy: a bucket holding NaN or ±Inf decompresses to all-NaN. The gradients that
use it are then non-finite, so AMP's ``GradScaler`` skips the step exactly as it would in fp32
(whose backward sees the same NaN/Inf); nothing carries over to later steps, and no check
costs a device sync.
"""

from __future__ import annotations

import math

import torch

from .buckets import Buckets, from_buckets, plan_buckets, to_buckets
from .deterministic import nearest_codes
from .packing import code_dtype, pack_codes, packed_numel, unpack_codes
from .spec import MixGranularity, QuantSpec, Rounding, Scale
from .stochastic import mix_mask, stochastic_round


class CompressedTensor:
    """A tensor stored as packed b-bit codes plus per-bucket metadata.

    Metadata per bucket: ``minmax`` keeps the bucket minimum as fp32 and the step as bf16
    rounded *up* (so the codes still cover the bucket's maximum; bf16 has fp32's exponent range,
    so tiny ranges never underflow as they would in fp16); ``absmax`` and ``l2`` keep one fp32
    radius. A bucket holding NaN or ±Inf keeps NaN metadata and decompresses to NaN (see the
    module docstring).

    Use ``compress(x, spec)`` to build one; ``decompress()`` returns a tensor of the original
    shape, dtype, device and strides; ``nbytes`` counts every tensor held.
    """

    __slots__ = ("spec", "dtype", "device", "layout", "raw", "packed", "meta", "mix_mask",
                 "n_mixed", "_taken")  # fmt: skip

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
        self._taken: list[tuple[str, int | None]] | None = None

    def __getstate__(self):
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state) -> None:
        for name, value in state.items():
            setattr(self, name, value)

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
        """True bytes held: codes, per-bucket metadata and mix mask."""
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

    def decompress_from(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Decompress the tensors ``take_tensors`` returned, leaving this shell as it is."""
        if self.layout is None:  # kept as it was (bits 32, empty, not float)
            return tensors[0]
        from .ops import decompress_op

        return decompress_op(tensors, self.spec, self.n_mixed, self.layout, self.dtype)

    def decompress(self) -> torch.Tensor:
        """The dequantized tensor: original shape, dtype, device and memory format."""
        if self.raw is not None:
            return self.raw
        from .ops import decompress_op

        return decompress_op(self.tensors(), self.spec, self.n_mixed, self.layout, self.dtype)

    def __repr__(self) -> str:
        return (
            f"CompressedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"spec={self.spec.short()!r}, nbytes={self.nbytes}, "
            f"bits_per_element={self.bits_per_element:.3f})"
        )


_TENSOR_FIELDS = ("raw", "packed", "meta", "mix_mask")


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


def _bucket_stats(matrix: torch.Tensor, spec: QuantSpec):
    """Per-bucket range; NaN/Inf propagate into it (amin/amax/norm propagate NaN)."""
    if spec.scale == Scale.MINMAX:
        low, high = torch.aminmax(matrix, dim=1, keepdim=True)
        return low, high
    if spec.scale == Scale.ABSMAX:
        return (matrix.abs().amax(dim=1, keepdim=True),)
    return (torch.linalg.vector_norm(matrix, dim=1, keepdim=True),)


def _quantize(matrix, stats, spec: QuantSpec, bits, generator):
    """Codes (integral floats in range, also for non-finite buckets) and the metadata."""
    levels = _levels(bits, matrix.dtype)
    if spec.scale == Scale.MINMAX:
        low, high = stats
        step = (high - low) / levels
        # NaN marks a bucket with NaN/Inf: its codes decompress to NaN (module docstring).
        bad = ~torch.isfinite(step)
        low = torch.where(bad, math.nan, low)
        step_meta = _round_up_bf16(torch.where(bad, math.nan, step))
        step = step_meta.to(matrix.dtype)
        safe_step = torch.where(step > 0, step, 1.0)
        meta = (low, step_meta)
        zero_point = -low / safe_step
    else:
        (radius,) = stats
        radius = torch.where(torch.isfinite(radius), radius, math.nan)
        safe_radius = torch.where(radius > 0, radius, 1.0)
        safe_step = 2 * safe_radius / levels
        meta = (radius,)
        zero_point = levels / 2 + torch.zeros_like(radius)
    if spec.rounding == Rounding.NEAREST:
        width = torch.as_tensor(bits, dtype=matrix.dtype, device=matrix.device)
        codes = nearest_codes(matrix, safe_step, zero_point, width)
    else:
        u = (matrix / safe_step).add_(zero_point)  # one temporary (in place), as below
        codes = stochastic_round(u, levels, generator)
        del u
    # NaN codes (only in NaN buckets) become 0 so that packing never spills into neighbours.
    return codes.nan_to_num_(0.0), tuple(m.view(-1) for m in meta)


def _host_uniform() -> float:
    """A U[0, 1) draw from torch's *CPU* generator (so ``torch.manual_seed`` makes it
    reproducible): a host-side read of a CPU scalar, never a device sync."""
    return float(torch.rand(()))


def mixed_count(spec: QuantSpec, num_buckets: int) -> int:
    """How many buckets use ``spec.mix_bits``: fixed by ``spec`` and the size for a per-bucket
    mix (``round(p * buckets)``, so packed sizes never depend on data or draws); for a
    per-tensor mix, all or none, drawn on the host (Python's ``random``, no device sync)."""
    if spec.mix_bits is None or not spec.mix_prob:
        return 0
    if spec.mix_granularity == MixGranularity.TENSOR:
        return num_buckets if _host_uniform() < spec.mix_prob else 0
    return int(math.floor(spec.mix_prob * num_buckets + 0.5))


def layout_sizes(spec: QuantSpec, layout: Buckets, n_mixed: int) -> list[tuple[int, torch.dtype]]:
    """``(numel, dtype)`` of every tensor ``compress_tensors`` returns, in order: the packed
    code streams, the metadata, the mix mask. Shape arithmetic only (the fake kernels)."""
    n, per, count = layout.num_buckets, layout.bucket_len, layout.padded_numel
    work = _work_dtype(spec)
    if 0 < n_mixed < n:
        streams = [(n_mixed * per, spec.mix_bits), ((n - n_mixed) * per, spec.bits)]
    else:
        streams = [(count, spec.mix_bits if n_mixed else spec.bits)]
    out = [(packed_numel(k, b), code_dtype(b)) for k, b in streams]
    out += [(n, work), (n, torch.bfloat16)] if spec.scale == Scale.MINMAX else [(n, work)]
    if 0 < n_mixed < n:
        out.append((packed_numel(n, 1), torch.uint8))
    return out


def compress_tensors(
    x: torch.Tensor,
    spec: QuantSpec,
    layout: Buckets,
    n_mixed: int,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The eager implementation: the tensors of ``layout_sizes``, in that order."""
    matrix = to_buckets(x.detach(), layout, _work_dtype(spec))
    stats = _bucket_stats(matrix, spec)
    n = layout.num_buckets
    if not 0 < n_mixed < n:
        bits = spec.mix_bits if n_mixed else spec.bits
        codes, meta = _quantize(matrix, stats, spec, bits, generator)
        return [pack_codes(codes.reshape(-1), bits), *meta]
    mask = mix_mask(n, n_mixed, matrix.device, generator)
    bits = torch.where(mask, spec.mix_bits, spec.bits).view(-1, 1)
    codes, meta = _quantize(matrix, stats, spec, bits, generator)
    flat = codes.index_select(0, _mixed_first(mask)).reshape(-1)
    k = n_mixed * layout.bucket_len
    mixed, plain = pack_codes(flat[:k], spec.mix_bits), pack_codes(flat[k:], spec.bits)
    return [mixed, plain, *meta, pack_codes(mask.to(torch.uint8), 1)]


def decompress_tensors(
    tensors: list[torch.Tensor],
    spec: QuantSpec,
    layout: Buckets,
    n_mixed: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of ``compress_tensors`` (the eager implementation)."""
    ct = CompressedTensor.__new__(CompressedTensor)
    ct.spec, ct.layout, ct.n_mixed, ct.raw = spec, layout, n_mixed, None
    _assign(ct, tensors)
    work = _work_dtype(spec)
    q = ct.codes(work)
    levels = _levels(ct.row_bits(), work)
    if spec.scale == Scale.MINMAX:
        low, step = (m.to(work).view(-1, 1) for m in ct.meta)
        matrix = torch.addcmul(low, q, step)
    else:
        radius = ct.meta[0].to(work).view(-1, 1)
        matrix = (2 * q - levels).div_(levels).mul_(radius)
    return from_buckets(matrix, layout, dtype)


def _assign(ct: CompressedTensor, tensors: list[torch.Tensor]) -> None:
    """Split the flat tensor list of ``compress_tensors`` into the object's fields."""
    mixed = 0 < ct.n_mixed < ct.layout.num_buckets
    streams = 2 if mixed else 1
    metas = 2 if ct.spec.scale == Scale.MINMAX else 1
    ct.packed = tuple(tensors[:streams])
    ct.meta = tuple(tensors[streams : streams + metas])
    ct.mix_mask = tensors[streams + metas] if mixed else None


def compress(
    x: torch.Tensor, spec: QuantSpec | str, *, generator: torch.Generator | None = None
) -> CompressedTensor:
    """Compress ``x`` to packed low-bit codes with per-bucket scaling.

    Args:
        x: any tensor. Non-float tensors, empty tensors and ``bits=32`` are kept as they are
            (no copy).
        spec: a ``QuantSpec`` or a preset name such as ``"2bit-stochastic"``.
        generator: optional ``torch.Generator`` for reproducible stochastic rounding and mixing
            (runs the eager implementation directly instead of the registered op).

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
    out.n_mixed = mixed_count(spec, layout.num_buckets)
    if generator is not None:
        tensors = compress_tensors(x, spec, layout, out.n_mixed, generator)
    else:
        from .ops import compress_op

        tensors = compress_op(x.detach(), spec, out.n_mixed)
    _assign(out, tensors)
    return out
