"""Fused compress / decompress: one compiled kernel each (torch.compile), eager fallback.

``compress`` reads each bucket once: its min/max (or abs-max), the scale, the rounding (random
bits included) and the packing into the planar byte layout of ``packing.py`` run in a single
Inductor kernel (C++ on CPU, Triton on CUDA); ``decompress`` unpacks and dequantizes in one
more. Nearest codes equal the eager (Brevitas) codes bit for bit: the same fp32 operations in
the same order. Stochastic rounding is ``floor(u + r)`` with 16 random bits ``r`` per element
from a counter-based hash of the element's position and one seed per call, so it is unbiased
(each ``r`` is uniform over the seeds) and reproducible from a generator (one draw per call).

Handled: flat bucket layout with buckets of whole 64-element blocks (bucket 64, 128, ..., 512
whenever the tensor's size allows), one width of 1..8 bits, minmax or absmax scale, any float
dtype; everything else (mixed widths, channel layout, L2 scale, wider codes, odd buckets,
tensors under ``MIN_NUMEL``) takes the eager path, which stores the same format.

When: ``QBACKPROP_FUSED=0`` (or ``set_enabled(False)``) never; ``QBACKPROP_FUSED=1`` (or
``set_enabled(True)``) on every device, compiling at first use; unset (``set_enabled(None)``),
CPU tensors only, and a configuration (width, rounding, scale, dtype) is compiled once it has
passed ``AUTO_ELEMENTS`` elements through the eager path: compiling costs seconds, so short
runs (tests, a demo) stay eager and training switches over within its first steps. If a kernel
fails to compile, one warning is issued and the eager path is used from then on.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .buckets import Buckets, flat_view, from_buckets
from .packing import BLOCK, block_geometry
from .spec import Rounding, Scale

if TYPE_CHECKING:
    from .compressed import CompressedTensor
    from .spec import QuantSpec

# Below this many elements the fixed cost of a compiled call (~0.1-0.3 ms) beats the saving.
MIN_NUMEL = 1 << 15
# Smaller tensors run a single-threaded kernel: starting OpenMP threads costs more than they
# save there, and far more on a busy machine, where a parallel region waits for a free core.
PARALLEL_NUMEL = 1 << 18
# Auto mode compiles a configuration after this many eager elements (~2 s of eager compress
# on CPU), the same order as the compile time, so that warm-up never costs much more than it
# could save.
AUTO_ELEMENTS = 1 << 27
_MAX_NUMEL = 1 << 30  # element counters are int32
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_COUNTER_MULTIPLIER = -1640531535  # 0x9E3779B1 (golden ratio) as int32


def _mode_from_env() -> bool | None:
    value = os.environ.get("QBACKPROP_FUSED", "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    return None


_state: dict = {"mode": _mode_from_env(), "broken": False}
_cache: dict[tuple, Callable] = {}  # compiled kernels by configuration
_eager_elements: dict[tuple, int] = {}  # auto mode: elements seen per configuration
_zero_seeds: dict[torch.device, torch.Tensor] = {}


def set_enabled(enabled: bool | None) -> None:
    """Use the fused kernels: True always (any device), False never, None automatically.

    Automatic (the default unless ``QBACKPROP_FUSED`` is set): CPU tensors, once a
    configuration has been used on enough elements to pay for its compilation.
    """
    _state["mode"] = None if enabled is None else bool(enabled)


def is_enabled() -> bool | None:
    """The current setting: True (always), False (never) or None (automatic)."""
    return _state["mode"]


def _wanted(key: tuple, device: torch.device, numel: int) -> bool:
    """Whether this call should run compiled (and compile the configuration if needed)."""
    mode = _state["mode"]
    if mode is False or _state["broken"] or torch.compiler.is_compiling():
        return False
    if mode:
        return True
    if device.type != "cpu":  # not measured elsewhere: opt in with set_enabled(True)
        return False
    seen = _eager_elements.get(key, 0) + numel
    _eager_elements[key] = seen
    return seen >= AUTO_ELEMENTS


def _fits(numel: int, layout: Buckets) -> bool:
    return (
        MIN_NUMEL <= numel < _MAX_NUMEL
        and not layout.channel
        and layout.bucket_len % BLOCK == 0
        and layout.num_buckets >= 4
    )


def compress_fused(
    x: torch.Tensor, spec: QuantSpec, layout: Buckets, generator: torch.Generator | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor] | None:
    """Packed codes, metadata and a flag "a bucket is not finite"; None: use the eager path.

    The buckets are read in place; only when the last one is short are two copied.
    """
    if (
        spec.bits > 8
        or spec.mix_bits is not None
        or spec.scale == Scale.L2  # a sum's order would differ from eager's
        or x.dtype not in _FLOAT_DTYPES
        or not _fits(x.numel(), layout)
    ):
        return None
    stochastic = spec.rounding == Rounding.STOCHASTIC
    key = ("compress", spec.bits, spec.scale.value, stochastic, x.dtype, x.device.type)
    if not _wanted(key, x.device, x.numel()):
        return None
    flat = flat_view(x, layout).contiguous()  # a strided view would need another kernel
    seed = _seed(generator, x.device) if stochastic else _zero_seed(x.device)
    pad = layout.padded_numel - flat.numel()
    key += (x.device.type == "cpu" and x.numel() < PARALLEL_NUMEL,)
    if not pad:
        return _encode(key, flat.view(layout.num_buckets, -1, BLOCK), seed)
    # The last bucket is short: copy the last two buckets and pad (two, not one, so that the
    # bucket count is never 1, which the compiler would specialize and compile anew).
    last = (layout.num_buckets - 2) * layout.bucket_len
    main = _encode(key, flat[:last].view(layout.num_buckets - 2, -1, BLOCK), seed)
    if main is None:
        return None
    tail = flat[last:]
    tail = torch.cat([tail, tail[-1:].expand(pad)]).view(2, -1, BLOCK)
    # The tail's counters continue the main part's: counter * K + seed is linear in the counter.
    shifted = seed.long() + (last // 2) * _COUNTER_MULTIPLIER  # one hash per two elements
    end = _encode(key, tail, (shifted & 0xFFFFFFFF).to(torch.int32))
    if end is None:
        return None
    packed = torch.cat([main[0], end[0]])
    meta = tuple(torch.cat([a, b]) for a, b in zip(main[1], end[1], strict=True))
    return packed, meta, main[2] | end[2]


def decompress_fused(ct: CompressedTensor) -> torch.Tensor | None:
    """``ct.decompress()`` in one kernel; None: use the eager path."""
    layout, bits = ct.layout, ct.row_bits()
    if (
        not isinstance(bits, int)
        or bits > 8
        or ct.mix_mask is not None
        or ct.dtype not in _FLOAT_DTYPES
        or not _fits(ct.numel(), layout)
    ):
        return None
    key = ("decompress", bits, ct.spec.scale.value, ct.dtype, ct.device.type)
    if not _wanted(key, ct.device, ct.numel()):
        return None
    key += (ct.device.type == "cpu" and ct.numel() < PARALLEL_NUMEL,)
    packed = ct.packed[0].view(layout.num_buckets, layout.bucket_len // BLOCK, -1)
    out = _call(key, _decompress_fn, packed, *ct.meta)
    if out is None:
        return None
    out = out.view(-1)
    if ct.nonfinite_index is not None:
        out.index_copy_(0, ct.nonfinite_index, ct.nonfinite_value.to(out.dtype))
    return from_buckets(out.view(layout.num_buckets, layout.bucket_len), layout, ct.dtype)


def _encode(key: tuple, blocks: torch.Tensor, seed: torch.Tensor):
    out = _call(key, _compress_fn, blocks, seed)
    if out is None:
        return None
    packed, *meta, bad = out
    return packed.view(-1), tuple(meta), bad


def _seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One uniformly random int32 per call: the only draw from the generator."""
    where = generator.device if generator is not None else device
    seed = torch.randint(-(2**31), 2**31, (), dtype=torch.int32, device=where, generator=generator)
    return seed.to(device)


def _zero_seed(device: torch.device) -> torch.Tensor:
    # Nearest rounding draws nothing; a cached constant keeps the call cheap.
    seed = _zero_seeds.get(device)
    if seed is None:
        seed = _zero_seeds[device] = torch.zeros((), dtype=torch.int32, device=device)
    return seed


def _call(key: tuple, factory: Callable[..., Callable], *args: torch.Tensor):
    """Run the kernel for ``key`` (kind, *factory arguments, serial), compiling it on first
    use; None if that fails."""
    args = tuple(_plain(t) for t in args)
    fn = _cache.get(key)
    if fn is None:
        name = "qbackprop_" + "_".join(map(str, key))
        fn = _cache[key] = _compile(factory(*key[1:-1]), name, serial=key[-1])
        # Bucket and block counts vary with the shape: compile them as symbols, so that new
        # shapes reuse the kernel instead of recompiling.
        for t in args:
            for dim in range(min(t.dim(), 2)):
                torch._dynamo.maybe_mark_dynamic(t, dim)
    try:
        with torch.no_grad():
            return fn(*args)
    except Exception as err:  # no C++ compiler, no Triton, ...: fall back for good
        _state["broken"] = True
        warnings.warn(
            f"qbackprop: compiling the fused compress kernels failed ({type(err).__name__}: "
            f"{err}); using the eager path from now on",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` (same storage, sizes, strides) but not a view: Dynamo guards views through their
    base too, and a base of another shape would make it compile again."""
    if t._base is None:
        return t
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _compile(fn: Callable, name: str, serial: bool) -> Callable:
    # A fresh code object per configuration: Dynamo caches compiled graphs (and counts
    # recompilations) per code object, so configurations never evict one another.
    name = "".join(c if c.isalnum() else "_" for c in name)
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    fresh = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return torch.compile(fresh, fullgraph=True, options={"cpp.threads": 1} if serial else None)


# ----- the pure tensor functions that get compiled -----------------------------------------


def _geometry(bits: int) -> tuple[int, int, int]:
    """``block_geometry``, with 8-bit blocks seen as two planes of 32 (same bytes) so that
    one 32-bit hash serves two codes there too."""
    planes, byte_planes, length = block_geometry(bits)
    return (2, 2, length // 2) if planes == 1 else (planes, byte_planes, length)


def _hash32(counter: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` of ``counter + seed`` on int32 (wrapping); right shifts made logical."""
    h = counter * _COUNTER_MULTIPLIER + seed
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * 0x7FEB352D
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * -2073254261  # 0x846CA68B
    return h ^ ((h >> 16) & 0xFFFF)


def _thresholds(shape: tuple, seed: torch.Tensor, planes: int) -> list[torch.Tensor]:
    """Uniform thresholds in (0, 1), one tensor of ``shape`` = (buckets, blocks, P) per plane.

    One 32-bit hash serves two planes: 16 random bits each.
    """
    buckets, blocks, length = shape
    groups = planes // 2
    count = buckets * blocks * groups * length
    counter = torch.arange(count, dtype=torch.int32, device=seed.device)
    counter = counter.view(buckets, blocks, groups, length)
    hashes = [_hash32(counter[:, :, g], seed) for g in range(groups)]
    high = [((h >> 16) & 0xFFFF).float() * 2.0**-16 + 2.0**-17 for h in hashes]
    low = [(h & 0xFFFF).float() * 2.0**-16 + 2.0**-17 for h in hashes]
    return high + low


def _ceil_bf16(value: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= ``value`` (>= 0), as fp32: round the bit pattern up."""
    return ((value.view(torch.int32) + 0xFFFF) & -0x10000).view(torch.float32)


def _pack_planes(codes: list[torch.Tensor], bits: int, byte_planes: int) -> torch.Tensor:
    """Float code planes (C of them, integral) -> uint8 byte planes stacked on dim 2.

    Byte ``m`` gathers the bit fields of the codes it overlaps (see ``packing.py``). The fields
    are disjoint, so OR is a sum; computing in fp32 (exact below 2**24) keeps every step a
    plain vector op on CPU, where uint8 shifts are emulated.
    """
    out = []
    for m in range(byte_planes):
        byte = None
        for k, code in enumerate(codes):
            shift = bits * k - 8 * m  # where code k's bit 0 lands in byte m
            if not -bits < shift < 8:
                continue
            if shift < 0:  # the code's high bits start this byte
                term = (code * 2.0**shift).floor()
            else:
                term = code * 2.0**shift
                if shift + bits > 8:  # its high bits spill into the next byte
                    term = term - (term * (1 / 256)).floor() * 256
            byte = term if byte is None else byte + term
        out.append(byte.to(torch.uint8))
    return torch.stack(out, dim=2)


def _unpack_planes(packed: torch.Tensor, bits: int, planes: int) -> list[torch.Tensor]:
    """uint8 byte planes ``(buckets, blocks, B, P)`` -> ``planes`` float code planes.

    Code ``k`` is its bit field of the bytes it overlaps, taken modulo ``2**bits``; in fp32,
    like ``_pack_planes``.
    """
    byte_planes = packed.shape[2]
    values = [packed[:, :, m].float() for m in range(byte_planes)]
    codes = []
    for k in range(planes):
        code = None
        for m, value in enumerate(values):
            shift = bits * k - 8 * m
            if -bits < shift < 8:
                term = (value * 2.0**-shift).floor() if shift > 0 else value * 2.0**-shift
                code = term if code is None else code + term
        if bits < 8:
            code = code - (code * 2.0**-bits).floor() * 2.0**bits
        codes.append(code)
    return codes


def _compress_fn(bits: int, scale: str, stochastic: bool, *_input_kind) -> Callable:
    """The compress kernel for one configuration (the input's dtype and device, also part of
    the configuration, need no code of their own)."""
    planes, byte_planes, length = _geometry(bits)
    levels = float(2**bits - 1)
    minmax = scale == Scale.MINMAX.value

    def compress(blocks: torch.Tensor, seed: torch.Tensor):
        buckets, count = blocks.shape[:2]
        blocks = blocks.float()
        if minmax:
            low, high = blocks.amin(dim=(1, 2)), blocks.amax(dim=(1, 2))
            step = _ceil_bf16((high - low) / levels)
            safe = torch.where(step > 0, step, 1.0).view(-1, 1, 1)
            meta = (low, step.to(torch.bfloat16))
            finite = torch.isfinite(low) & torch.isfinite(high)
        else:
            radius = blocks.abs().amax(dim=(1, 2))
            safe = (2 * torch.where(radius > 0, radius, 1.0) / levels).view(-1, 1, 1)
            meta = (radius,)
            finite = torch.isfinite(radius)
        blocks = blocks.view(buckets, count, planes, length)
        if stochastic:
            # The noise swamps the last bit, so multiply by the reciprocal (division is slow),
            # and u = x * inverse - low * inverse is >= 0 exactly: no clamp at 0 for minmax.
            inverse = 1.0 / safe
            zero = -(low.view(-1, 1, 1) * inverse) if minmax else levels / 2
            thresholds = _thresholds((buckets, count, length), seed, planes)
        else:
            zero = (-low.view(-1, 1, 1) / safe) if minmax else levels / 2
        codes = []
        for k in range(planes):
            if stochastic:
                # floor(u + r), r uniform in (0, 1): rounds up with probability frac(u).
                q = (blocks[:, :, k] * inverse + zero + thresholds[k]).floor()
                q = q.clamp(max=levels) if minmax else q.clamp(0.0, levels)
            else:
                # Exactly Brevitas's IntQuant.to_int: round(x / scale + zero_point), half to
                # even, clamped.
                q = (blocks[:, :, k] / safe + zero).round().clamp(0.0, levels)
            codes.append(q)
        return _pack_planes(codes, bits, byte_planes), *meta, ~finite.all()

    return compress


def _decompress_fn(bits: int, scale: str, dtype: torch.dtype, _device_type: str) -> Callable:
    """The decompress kernel for one configuration; ``dtype`` is the output's."""
    planes, byte_planes, length = _geometry(bits)
    levels = float(2**bits - 1)

    def unpack(packed: torch.Tensor) -> list[torch.Tensor]:
        buckets, count = packed.shape[:2]
        return _unpack_planes(packed.view(buckets, count, byte_planes, length), bits, planes)

    def decompress_minmax(packed: torch.Tensor, low: torch.Tensor, step: torch.Tensor):
        low, step = low.view(-1, 1, 1), step.float().view(-1, 1, 1)
        values = [(low + q * step).to(dtype) for q in unpack(packed)]  # as torch.addcmul
        return torch.stack(values, dim=2)

    def decompress_symmetric(packed: torch.Tensor, radius: torch.Tensor):
        radius = radius.view(-1, 1, 1)
        values = [((2 * q - levels) / levels * radius).to(dtype) for q in unpack(packed)]
        return torch.stack(values, dim=2)

    return decompress_minmax if scale == Scale.MINMAX.value else decompress_symmetric
