"""Fused compress / decompress: one compiled kernel each (Inductor), eager fallback.

``compress`` reads each bucket once: its min/max (or abs-max), the scale, the rounding (random
bits included) and the packing into the planar byte layout of ``packing.py`` run in a single
Inductor kernel (C++ on CPU, Triton on CUDA); ``decompress`` unpacks and dequantizes in one
more. Nearest codes equal the eager (Brevitas) codes bit for bit: the same fp32 operations in
the same order. Stochastic rounding is ``floor(u + r)`` with 16 random bits ``r`` per element
from a counter-based hash of the element's position and one seed per call, so it is unbiased
(each ``r`` is uniform over the seeds) and reproducible from a generator (one draw per call).
The activations' derivative codes (``functions/fewbit.py``) have kernels here too. Each kernel
is traced once to a shape-polymorphic graph and called without Dynamo (``_compile_graph``).

Handled: flat bucket layout with buckets of whole 64-element blocks (bucket 64, 128, ..., 512
whenever the tensor's size allows), one width of 1..8 bits, minmax or absmax scale, any float
dtype; everything else (mixed widths, channel layout, L2 scale, wider codes, odd buckets,
tensors under ``MIN_NUMEL``) takes the eager path, which stores the same format.

When: ``QBACKPROP_FUSED=0`` (or ``set_enabled(False)``) never; ``QBACKPROP_FUSED=1`` (or
``set_enabled(True)``) on every device, compiling at first use; unset (``set_enabled(None)``),
CPU and CUDA tensors (the devices it was measured on: docs/benchmarks.md), and a
configuration (width, rounding, scale, dtype) is compiled once it has
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

# Below this size the fixed cost of a compiled call (~0.02 ms through the graph called
# directly, see _compile_graph, plus ~0.1 ms of bookkeeping) beats the saving: eager compress
# is a chain of ~30 small ops (~0.6 ms at 4096 elements on CPU), eager decompress ~6 (~0.2 ms).
MIN_NUMEL = 1 << 12
# Smaller tensors run a single-threaded kernel: starting OpenMP threads costs more than they
# save there, and far more on a busy machine, where a parallel region waits for a free core.
PARALLEL_NUMEL = 1 << 18
# Auto mode compiles a configuration after this many eager elements (~2 s of eager compress
# on CPU), the same order as the compile time, so that warm-up never costs much more than it
# could save.
AUTO_ELEMENTS = 1 << 27
_MAX_NUMEL = 1 << 30  # element counters are int32
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
_constant_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}


def set_enabled(enabled: bool | None) -> None:
    """Use the fused kernels: True always (any device), False never, None automatically.

    Automatic (the default unless ``QBACKPROP_FUSED`` is set): CPU and CUDA tensors, once a
    configuration has been used on enough elements to pay for its compilation.
    """
    _state["mode"] = None if enabled is None else bool(enabled)


def is_enabled() -> bool | None:
    """The current setting: True (always), False (never) or None (automatic)."""
    return _state["mode"]


def _kernel_key(config: tuple, device: torch.device, numel: int) -> tuple | None:
    """The kernel to run this call with, ``(*config, device type, serial)``, or None when the
    call should stay eager (see ``set_enabled``); ``config[1:]`` are the factory's arguments."""
    key = (*config, device.type)
    mode = _state["mode"]
    if mode is False or _state["broken"] or torch.compiler.is_compiling():
        return None
    if mode is None:
        if device.type not in ("cpu", "cuda"):  # not measured elsewhere: set_enabled(True)
            return None
        seen = _eager_elements.get(key, 0) + numel
        _eager_elements[key] = seen
        if seen < AUTO_ELEMENTS:
            return None
    return (*key, device.type == "cpu" and numel < PARALLEL_NUMEL)


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
    key = _kernel_key(
        ("compress", spec.bits, spec.scale.value, stochastic, x.dtype), x.device, x.numel()
    )
    if key is None:
        return None
    flat = flat_view(x, layout).contiguous()  # a strided view would need another kernel
    seed = _seed(generator, x.device) if stochastic else _zero_seed(x.device)
    pad = layout.padded_numel - flat.numel()
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
    # The tail's counters continue the main part's (one hash per two elements).
    shifted = seed.long() + last // 2
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
    key = _kernel_key(("decompress", bits, ct.spec.scale.value, ct.dtype), ct.device, ct.numel())
    if key is None:
        return None
    packed = ct.packed[0].view(layout.num_buckets, layout.bucket_len // BLOCK, -1)
    out = _call(key, _decompress_fn, packed, *ct.meta)
    if out is None:
        return None
    out = out.view(-1)
    if ct.nonfinite_index is not None:
        out.index_copy_(0, ct.nonfinite_index, ct.nonfinite_value.to(out.dtype))
    return from_buckets(out.view(layout.num_buckets, layout.bucket_len), layout, ct.dtype)


def encode_range_fused(
    values: torch.Tensor,
    low: float,
    high: float,
    bits: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Packed stochastic ``bits``-wide codes of the whole 64-element blocks of flat ``values``
    on ``2**bits`` levels spread evenly over the fixed range ``[low, high]`` (values clamped
    into it): the unbiased derivative codes of ``functions/fewbit.py`` in one kernel. The
    bytes are ``pack_codes``'s block layout; the caller packs the last ``numel % 64`` codes.
    None: use the eager path.
    """
    n = values.numel() - values.numel() % BLOCK
    if bits > 8 or values.dtype not in _FLOAT_DTYPES or not MIN_NUMEL <= n < _MAX_NUMEL:
        return None
    key = _kernel_key(("range_encode", bits, values.dtype), values.device, n)
    if key is None:
        return None
    top = 2**bits - 1
    scale = top / (high - low) if high > low else 0.0
    blocks = values.reshape(-1)[:n].view(-1, BLOCK)
    seed = _seed(generator, values.device)
    out = _call(key, _range_encode_fn, blocks, seed, *_constants(values.device, low, scale))
    return None if out is None else out.view(-1)


def decode_range_fused(
    packed: torch.Tensor, n: int, low: float, high: float, bits: int
) -> torch.Tensor | None:
    """fp32 levels of the first ``n - n % 64`` codes that ``encode_range_fused`` packed (the
    inverse map, ``low + code * step``); None: use the eager path."""
    found = _packed_blocks("range_decode", packed, n, bits)
    if found is None:
        return None
    key, blocks = found
    step = (high - low) / (2**bits - 1)
    out = _call(key, _range_decode_fn, blocks, *_constants(packed.device, low, step))
    return None if out is None else out.view(-1)


def encode_grid_fused(
    x: torch.Tensor, table: torch.Tensor, half: int, cells_per_unit: float, bits: int
) -> torch.Tensor | None:
    """Packed ``bits``-wide codes ``table[clamp(ceil(x * cells_per_unit), -half, half) + half]``
    (NaN: the top cell) of the whole 64-element blocks of flat ``x``: the deterministic
    derivative codes of ``functions/fewbit.py`` in one kernel, the same bytes as its eager
    path. ``cells_per_unit`` must be a power of two (the product is then exact). None: eager.
    """
    n = x.numel() - x.numel() % BLOCK
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if bits > 8 or x.dtype not in dtypes or not MIN_NUMEL <= n < _MAX_NUMEL:
        return None
    key = _kernel_key(("grid_encode", bits, half, float(cells_per_unit), x.dtype), x.device, n)
    if key is None:
        return None
    out = _call(key, _grid_encode_fn, x.reshape(-1)[:n].view(-1, BLOCK), table)
    return None if out is None else out.view(-1)


def decode_levels_fused(
    packed: torch.Tensor, n: int, levels: torch.Tensor, bits: int
) -> torch.Tensor | None:
    """``levels[code]`` (fp32) of the first ``n - n % 64`` packed codes; None: eager."""
    found = _packed_blocks("level_decode", packed, n, bits)
    if found is None:
        return None
    key, blocks = found
    out = _call(key, _level_decode_fn, blocks, levels.float())
    return None if out is None else out.view(-1)


def _packed_blocks(kind: str, packed: torch.Tensor, n: int, bits: int):
    """``(kernel key, (blocks, bytes per block) view)`` of the whole 64-code blocks among the
    first ``n`` packed codes, or None when they stay eager."""
    n -= n % BLOCK
    if bits > 8 or not MIN_NUMEL <= n < _MAX_NUMEL:
        return None
    key = _kernel_key((kind, bits), packed.device, n)
    if key is None:
        return None
    return key, packed[: n * bits // 8].view(n // BLOCK, -1)


def _constants(device: torch.device, *values: float) -> tuple[torch.Tensor, ...]:
    """fp32 scalars as 0-dim tensors, made once: a Python float argument would be compiled in
    as a constant, so every activation's range would compile a kernel of its own."""
    out = _constant_cache.get((device, values))
    if out is None:
        out = tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in values)
        _constant_cache[(device, values)] = out
    return out


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
    # The compiled code assumes dense inputs (it checks their strides).
    args = tuple(t if t.is_contiguous() else t.contiguous() for t in args)
    fn = _cache.get(key)
    try:
        if fn is None:
            name = "qbackprop_" + "_".join(map(str, key))
            fn = _cache[key] = _compile(factory(*key[1:-1]), name, key[-1], args)
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


def _compile(fn: Callable, name: str, serial: bool, args: tuple[torch.Tensor, ...]) -> Callable:
    """``fn`` compiled by Inductor for inputs like ``args`` of any size in every dimension but
    the last (the bucket and block counts)."""
    options = {"cpp.threads": 1} if serial else {}
    options.update(_exact_division_option())
    try:
        return _compile_graph(fn, args, options)
    except Exception as err:  # another release's internals: go through Dynamo instead
        _state["graph_error"] = f"{type(err).__name__}: {err}"
        return _compile_dynamo(fn, name, options)


def _compile_graph(fn: Callable, args: tuple[torch.Tensor, ...], options: dict) -> Callable:
    """Trace ``fn`` to an aten graph with symbolic sizes and hand it to Inductor directly.

    Called through ``torch.compile``, each kernel call also runs Dynamo's frame evaluation,
    guards and AOTAutograd's wrappers: ~0.2 ms on CPU, more than the kernel itself for the
    tensors of a small model. The graph called directly costs ~0.02 ms. It is traced once, on
    inputs whose dynamic sizes are distinct and above 1 (5 and 3), so that no size is
    specialized and no two sizes are merged; the kernels are shape-polymorphic by design.
    """
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        single = not isinstance(fn(*args), tuple)  # (also checks that fn runs eagerly)

    def as_tuple(*inputs):
        out = fn(*inputs)
        return (out,) if single else tuple(out)

    static = getattr(fn, "static_args", ())
    examples = [torch.zeros_like(t) if i in static else _example(t) for i, t in enumerate(args)]
    graph = make_fx(as_tuple, decomposition_table=select_decomp_table(), tracing_mode="symbolic")(
        *examples
    )
    fakes = [node.meta["val"] for node in graph.graph.nodes if node.op == "placeholder"]
    with config.patch(options):
        compiled = compile_fx_inner(graph, fakes)

    def run(*inputs: torch.Tensor):
        out = compiled(list(inputs))  # (the compiled code empties the list it is given)
        return out[0] if single else tuple(out)

    return run


def _example(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` whose dynamic sizes (all but the last) are 5 and 3: the same
    quantity (bucket count, blocks per bucket) is the same dimension in every kernel input."""
    if t.dim() == 0:
        return torch.zeros((), dtype=t.dtype, device=t.device)
    dynamic = (5, 3)[: max(t.dim() - 1, 1)]
    shape = dynamic + tuple(t.shape[len(dynamic) :])
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


def _compile_dynamo(fn: Callable, name: str, options: dict) -> Callable:
    # A fresh code object per configuration: Dynamo caches compiled graphs (and counts
    # recompilations) per code object, so configurations never evict one another.
    name = "".join(c if c.isalnum() else "_" for c in name)
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    fresh = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    compiled = torch.compile(fresh, fullgraph=True, options=options)
    calls = 0

    def run(*inputs: torch.Tensor):
        nonlocal calls
        inputs = tuple(_plain(t) for t in inputs)
        if not calls:
            # Bucket and block counts vary with the shape: compile them as symbols, so that
            # new shapes reuse the kernel instead of recompiling.
            for t in inputs:
                for dim in range(min(t.dim(), 2)):
                    torch._dynamo.maybe_mark_dynamic(t, dim)
        calls += 1
        with torch.no_grad():  # (the graph path records no autograd graph to begin with)
            return compiled(*inputs)

    return run


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` (same storage, sizes, strides) but not a view: Dynamo guards views through their
    base too, and a base of another shape would make it compile again."""
    if t._base is None:
        return t
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _exact_division_option() -> dict:
    """Inductor's switch for IEEE division in Triton (``/`` is approximate there by default),
    so that nearest codes match eager CUDA bit for bit; its name changed between releases."""
    from torch._inductor import config

    if hasattr(getattr(config, "eager_numerics", None), "division_rounding"):
        return {"eager_numerics.division_rounding": True}
    if hasattr(config, "emulate_divison_rounding"):  # (sic) before torch 2.12
        return {"emulate_divison_rounding": True}
    return {}


# ----- the pure tensor functions that get compiled -----------------------------------------


def _geometry(bits: int) -> tuple[int, int, int]:
    """``block_geometry``, with 8-bit blocks seen as two planes of 32 (same bytes) so that
    one 32-bit hash serves two codes there too."""
    planes, byte_planes, length = block_geometry(bits)
    return (2, 2, length // 2) if planes == 1 else (planes, byte_planes, length)


def _hash32(counter: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` of ``counter + seed`` on int32 (wrapping); right shifts made logical.

    The counter enters unscaled: Inductor folds a constant factor into its index arithmetic,
    where Triton then rejects the product as out of the int32 range."""
    h = counter + seed
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


def _range_encode_fn(bits: int, *_input_kind) -> Callable:
    """The fixed-range stochastic encode kernel (see ``encode_range_fused``)."""
    planes, byte_planes, length = _geometry(bits)
    top = float(2**bits - 1)

    def encode(blocks: torch.Tensor, seed: torch.Tensor, low: torch.Tensor, scale: torch.Tensor):
        count = blocks.shape[0]
        u = ((blocks.float() - low) * scale).clamp(0.0, top).view(count, 1, planes, length)
        thresholds = _thresholds((count, 1, length), seed, planes)
        codes = [(u[:, :, k] + thresholds[k]).floor().clamp(max=top) for k in range(planes)]
        return _pack_planes(codes, bits, byte_planes)

    return encode


def _range_decode_fn(bits: int, _device_type: str) -> Callable:
    """The fixed-range decode kernel: fp32 ``low + code * step``."""
    planes, byte_planes, length = _geometry(bits)

    def decode(blocks: torch.Tensor, low: torch.Tensor, step: torch.Tensor):
        count = blocks.shape[0]
        codes = _unpack_planes(blocks.view(count, 1, byte_planes, length), bits, planes)
        return torch.stack([q * step + low for q in codes], dim=2)

    return decode


def _grid_encode_fn(bits: int, half: int, cells_per_unit: float, *_input_kind) -> Callable:
    """The grid-lookup encode kernel (see ``encode_grid_fused``); the table is fixed-size."""
    planes, byte_planes, length = _geometry(bits)

    def encode(blocks: torch.Tensor, table: torch.Tensor):
        count = blocks.shape[0]
        cell = (blocks.float() * cells_per_unit).ceil().clamp(-half, half)
        cell = torch.where(cell.isnan(), float(half), cell)
        codes = table[(cell + half).long()].float().view(count, 1, planes, length)
        return _pack_planes([codes[:, :, k] for k in range(planes)], bits, byte_planes)

    encode.static_args = (1,)
    return encode


def _level_decode_fn(bits: int, _device_type: str) -> Callable:
    """The level-lookup decode kernel: ``levels[code]``; the levels are fixed-size."""
    planes, byte_planes, length = _geometry(bits)

    def decode(blocks: torch.Tensor, levels: torch.Tensor):
        count = blocks.shape[0]
        codes = _unpack_planes(blocks.view(count, 1, byte_planes, length), bits, planes)
        return torch.stack([levels[q.long()] for q in codes], dim=2)

    decode.static_args = (1,)
    return decode
