"""Hand-written Triton kernels for min-max bucket compression: one kernel per direction.

``compress_minmax`` turns a ``(num_buckets, bucket_len)`` matrix into exactly what the eager
path of ``compressed.py`` stores for a min-max spec with 1..8 bits: the packed codes
(``packing.pack_codes`` of the codes in row-major order), the bucket minimum (fp32) and the
step (bf16, rounded up). ``decompress_minmax`` is its inverse, ``low + code * step``.

Kernel design
-------------
* One program per bucket (``grid = (num_buckets,)``). A bucket is a whole number of 64-code
  blocks (``bucket_len % 64 == 0``), so every packed block lies inside one bucket and a
  program never shares an output byte with another: no atomics, no cross-program order.
* The program walks its bucket in chunks of ``CHUNK`` blocks (a power of two, capped so that
  a chunk stays in registers), each chunk held as a 3-D tile ``(CHUNK, C, P)``: block, code
  plane, position in the plane (``packing.block_geometry``). In that shape packing is a
  shift by ``bits * plane`` and a sum over the plane axis (the bit fields are disjoint, so
  the sum is an OR), and the word's bytes come out as a ``(CHUNK, B, P)`` tile that is
  stored with a single contiguous store: the planar layout was designed for exactly this.
* Compression reads its bucket twice: pass 1 reduces min / max / "any non-finite", pass 2
  quantizes and packs. For the usual bucket sizes (<= 2048 elements) pass 2 re-reads a chunk
  that was just read, from cache; the two-pass form keeps register use bounded for any
  ``bucket_len`` (per-tensor buckets included).
* Nearest codes are bit-identical to the eager path: the same fp32 operations in the same
  order (``u = x / step + (-low / step)`` with IEEE division, ``tl.fdiv(ieee_rounding=True)``,
  since Triton's plain ``/`` may lower to an approximate division on GPUs), then clamp to
  ``[0, levels]`` and round half to even with the fp32 magic-number trick
  ``(u + 2**23) - 2**23`` (exact for ``0 <= u < 2**22``; libdevice's ``rint`` is not
  available under the interpreter). Clamping before rounding gives the same codes as eager
  rounding then clamping, because the bounds are integers and rounding is monotone.
* Stochastic codes are ``floor(u) + [r < frac(u)]`` with ``r`` a uniform 32-bit integer from
  Philox (``tl.randint``) keyed by ``seed`` (read on the device, never by the host) and the
  element's global offset, and ``frac(u)`` scaled to 32 bits. This is ``floor(u + r)`` in
  distribution, but without the fp32 rounding of ``u + r`` (which rounds up whenever ``r`` is
  within half an ulp of 1): the probability of rounding up is ``frac(u)`` to within 2**-32.
* Non-finite policy (no host sync): a bucket holding NaN or +-Inf, or whose range
  overflows fp32, stores ``low = NaN``, ``step = NaN`` and codes 0, so it decompresses to
  all-NaN and the other buckets are untouched. This is the eager path's policy too.
* ``decompress_minmax`` is one program per bucket as well: load the ``(CHUNK, B, P)`` bytes,
  assemble the words, shift out the ``(CHUNK, C, P)`` codes, ``low + code * step`` in fp32,
  cast, store. ``code * step`` is exact in fp32 (8-bit code times 8-bit bf16 significand),
  so whether the compiler fuses the multiply-add or not, the result is bit-identical to
  eager ``torch.addcmul``.

Triton is imported on first use, so ``import qbackprop`` works without it; the two ops are
registered at import when Triton is installed. The kernels are ``triton.jit``-ed on first use
as well. ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests) must be set before Triton is
first imported: Triton builds its own library functions in the mode of that moment
(``interpreting()`` / ``compiling()`` say which mode is in force). Under the interpreter the
ops run eagerly only; ``torch.compile`` traces them (into Triton kernel calls Inductor can
see) with the compiled kernels.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .packing import BLOCK, block_geometry

# Set by ``_triton()`` on first use: the kernel bodies below resolve ``tl`` from this module's
# globals when Triton compiles (or interprets) them.
triton = None
tl = None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest chunk a program holds at once (in 64-code blocks): 32 blocks = 2048 elements, a few
# registers per thread at the warp counts chosen below.
MAX_CHUNK_BLOCKS = 32
# Largest number of 64-code blocks a bucket may have: bucket-local offsets stay in int32.
MAX_BUCKET_BLOCKS = (2**31 - 1) // BLOCK


def _triton():
    """Import Triton (once) and publish it as this module's ``triton`` and ``tl``."""
    global triton, tl
    if triton is None:
        import triton as _triton_mod
        import triton.language as _tl

        triton, tl = _triton_mod, _tl
    return triton


# Mode checks are read by Dynamo as constants (torch.compile traces the public entry points;
# Triton's knobs call a C function Dynamo cannot trace). A change of TRITON_INTERPRET within a
# process is not supported anyway: see ``_modes``.
@torch.compiler.assume_constant_result
@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (looked up once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _modes() -> tuple[bool, bool]:
    """``(knob, library)``: whether ``TRITON_INTERPRET`` is on now, and whether it was on when
    ``triton.language`` was first imported. Triton jit-s its own library functions
    (``tl.max``, ``tl.randint``, ...) at that import, in the mode of that moment, and a kernel
    works only when both agree."""
    _triton()
    from triton.runtime.interpreter import InterpretedFunction

    return bool(triton.knobs.runtime.interpret), isinstance(tl.randint, InterpretedFunction)


@torch.compiler.assume_constant_result
def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` now and
    already when ``triton.language`` was first imported (set it before importing Triton)."""
    return triton_available() and all(_modes())


@torch.compiler.assume_constant_result
def compiling() -> bool:
    """Whether the kernels are compiled for the GPU: ``TRITON_INTERPRET`` off, now and when
    ``triton.language`` was first imported."""
    return triton_available() and not any(_modes())


def supported(matrix: torch.Tensor, bits: int) -> bool:
    """Whether ``compress_minmax`` applies to ``matrix`` and ``bits``.

    True for a contiguous 2-D fp32 / fp16 / bf16 matrix whose rows (buckets) are a whole
    number of 64-code blocks, ``1 <= bits <= 8``, Triton importable, and the matrix either on
    a CUDA device (``compiling()``) or on the CPU with ``TRITON_INTERPRET=1`` set before
    Triton was imported (``interpreting()``; slow, for tests). Shape, dtype and device checks
    only: works on fake tensors, never syncs. Imports Triton on its first call.
    """
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        return False
    if matrix.dim() != 2 or matrix.dtype not in FLOAT_DTYPES or not matrix.is_contiguous():
        return False
    return runs_on(matrix.device, matrix.shape[1])


def runs_on(device: torch.device, bucket_len: int) -> bool:
    """Whether the kernels run on ``device`` for buckets of ``bucket_len`` codes: whole 64-code
    blocks, at most ``MAX_BUCKET_BLOCKS`` of them, and CUDA (``compiling()``) or the CPU under
    ``TRITON_INTERPRET=1`` (``interpreting()``). The one test compress and decompress share."""
    if bucket_len == 0 or bucket_len % BLOCK or bucket_len // BLOCK > MAX_BUCKET_BLOCKS:
        return False
    if device.type == "cuda":
        return compiling()
    return device.type == "cpu" and interpreting()


def _geometry(bits: int) -> dict[str, int]:
    """The constexpr arguments shared by both kernels for ``bits``-wide codes."""
    planes, byte_planes, plane_len = block_geometry(bits)
    return {
        "BITS": bits,
        "PLANES": planes,
        "BYTE_PLANES": byte_planes,
        # tl.arange needs a power of two: 3 byte planes (3 and 6 bits) are tiled as 4, 5 and 7
        # (5 and 7 bits) as 8, the extra planes masked off.
        "BYTE_TILE": 1 << (byte_planes - 1).bit_length(),
        "PLANE_LEN": plane_len,
        # A word holds C codes: up to 24 bits fit int32; 5 and 7 bits make 40- and 56-bit words.
        "WIDE": planes * bits > 31,
    }


def _chunk(blocks_per_bucket: int) -> tuple[int, int]:
    """``(CHUNK blocks, num_warps)`` for buckets of ``blocks_per_bucket`` 64-code blocks."""
    chunk = min(triton.next_power_of_2(blocks_per_bucket), MAX_CHUNK_BLOCKS)
    # About 8 elements per thread: 64 codes -> 1 warp ... 2048 codes -> 8 warps.
    return chunk, max(1, min(8, chunk * BLOCK // 256))


# ----------------------------------------------------------------------------------------------
# Kernel bodies. Plain functions here, jit-ed by ``_kernel`` on first use (see module docstring).
# ----------------------------------------------------------------------------------------------


def _compress_minmax_kernel(
    x_ptr,  # (num_buckets, blocks_per_bucket * 64) fp32 / fp16 / bf16, contiguous
    packed_ptr,  # uint8, blocks_per_bucket * BYTE_PLANES * PLANE_LEN bytes per bucket
    low_ptr,  # fp32 per bucket
    step_ptr,  # bf16 per bucket
    seed_ptr,  # 0-dim int64 (read only when STOCHASTIC)
    blocks_per_bucket,
    LEVELS: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    CHUNK: tl.constexpr,
    BITS: tl.constexpr,
    PLANES: tl.constexpr,
    BYTE_PLANES: tl.constexpr,
    BYTE_TILE: tl.constexpr,
    PLANE_LEN: tl.constexpr,
    WIDE: tl.constexpr,
):
    bucket = tl.program_id(0).to(tl.int64)  # int64: num_buckets * bucket_len may pass 2**31
    x_base = x_ptr + bucket * blocks_per_bucket * 64
    blk = tl.arange(0, CHUNK)[:, None, None]
    plane = tl.arange(0, PLANES)[None, :, None]
    lane = tl.arange(0, PLANE_LEN)[None, None, :]
    in_block = plane * PLANE_LEN + lane  # (1, C, P): code k*P + j of the block

    # Pass 1: range and non-finite flag. Masked-off blocks load 0 (finite) and are kept out of
    # the range by the +-inf fill. abs(x) < inf is False exactly for NaN and +-Inf.
    lo = tl.full((CHUNK, PLANES, PLANE_LEN), float("inf"), tl.float32)
    hi = tl.full((CHUNK, PLANES, PLANE_LEN), float("-inf"), tl.float32)
    bad = tl.zeros((CHUNK, PLANES, PLANE_LEN), tl.int32)
    for start in range(0, blocks_per_bucket, CHUNK):
        blocks = start + blk
        valid = blocks < blocks_per_bucket
        x = tl.load(x_base + blocks * 64 + in_block, mask=valid, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.where(valid, x, float("inf")))
        hi = tl.maximum(hi, tl.where(valid, x, float("-inf")))
        bad = tl.maximum(bad, tl.where(tl.abs(x) < float("inf"), 0, 1))
    low = tl.min(lo)
    high = tl.max(hi)
    # Same fp32 ops as the eager path: (high - low) / levels with IEEE division.
    step = tl.fdiv(high - low, LEVELS, ieee_rounding=True)
    # A NaN/Inf element, or a range that overflows fp32, marks the bucket as non-finite.
    nonfinite = (tl.max(bad) > 0) | ~(tl.abs(step) < float("inf"))
    # Finite stand-ins for a non-finite bucket: every code below is then 0, with no NaN reaching
    # a float-to-int conversion; the NaN metadata is stored at the end.
    low = tl.where(nonfinite, 0.0, low)
    step = tl.where(nonfinite, 0.0, step)
    # Round the step up to bf16 (never below the fp32 value, so the top code still covers the
    # maximum): for a non-negative float, clearing the low 16 bits after adding 0xFFFF is the
    # ceiling in bf16; an exact bf16 value is unchanged. Same value as eager _round_up_bf16.
    step_bits = (step.to(tl.uint32, bitcast=True) + 0xFFFF) & 0xFFFF0000
    step = step_bits.to(tl.float32, bitcast=True)
    safe_step = tl.where(step > 0.0, step, 1.0)
    zero_point = tl.fdiv(-low, safe_step, ieee_rounding=True)
    if STOCHASTIC:
        seed = tl.load(seed_ptr)

    # Pass 2: codes, packed words, bytes.
    packed_base = packed_ptr + bucket * blocks_per_bucket * (BYTE_PLANES * PLANE_LEN)
    byte_plane = tl.arange(0, BYTE_TILE)[None, :, None]
    byte_offs = byte_plane * PLANE_LEN + tl.arange(0, PLANE_LEN)[None, None, :]
    for start in range(0, blocks_per_bucket, CHUNK):
        blocks = start + blk
        valid = blocks < blocks_per_bucket
        offs = blocks * 64 + in_block
        x = tl.load(x_base + offs, mask=valid, other=0.0).to(tl.float32)
        x = tl.where(nonfinite, 0.0, x)
        u = tl.fdiv(x, safe_step, ieee_rounding=True) + zero_point
        # Clamp first: u then lies in [0, levels] (the magic-number rounding and the 32-bit
        # threshold below both need that; padding may lie anywhere).
        u = tl.minimum(tl.maximum(u, 0.0), LEVELS)
        if STOCHASTIC:
            down = tl.floor(u)
            frac = u - down  # exact; in [0, 1 - 2**-24], so the threshold fits in uint32
            threshold = (frac * 4294967296.0).to(tl.uint32)
            r = tl.randint(seed, bucket * blocks_per_bucket * 64 + offs).to(tl.uint32)
            q = down + tl.where(r < threshold, 1.0, 0.0)  # down == levels implies frac == 0
        else:
            # Round half to even: adding 2**23 leaves no fraction bits (fp32 rounds the sum to
            # nearest, ties to even); subtracting it again is exact.
            q = (u + 8388608.0) - 8388608.0
        if WIDE:  # noqa: SIM108 (a constexpr branch: the compiled kernel keeps only one)
            codes = q.to(tl.int64)
        else:
            codes = q.to(tl.int32)
        # Word j of a block gathers codes k*P + j at bit BITS*k: disjoint fields, so sum == OR.
        words = tl.sum(codes << (plane * BITS), axis=1)  # (CHUNK, P)
        out = ((words[:, None, :] >> (byte_plane * 8)) & 0xFF).to(tl.uint8)  # (CHUNK, B, P)
        tl.store(
            packed_base + blocks * (BYTE_PLANES * PLANE_LEN) + byte_offs,
            out,
            mask=valid & (byte_plane < BYTE_PLANES),
        )

    tl.store(low_ptr + bucket, tl.where(nonfinite, float("nan"), low))
    # The step's bf16 bits are the top half of its fp32 bits (exact by construction); written
    # as bits because the interpreter's fp32 -> bf16 conversion truncates (the GPU's rounds).
    step_bf16 = tl.where(nonfinite, 0x7FC0, step_bits >> 16).to(tl.uint16)
    tl.store(step_ptr + bucket, step_bf16.to(tl.bfloat16, bitcast=True))


def _decompress_minmax_kernel(
    packed_ptr,
    low_ptr,  # fp32 per bucket
    step_ptr,  # bf16 per bucket
    out_ptr,  # (num_buckets, blocks_per_bucket * 64) of the output dtype
    blocks_per_bucket,
    OUT_BF16: tl.constexpr,
    CHUNK: tl.constexpr,
    BITS: tl.constexpr,
    PLANES: tl.constexpr,
    BYTE_PLANES: tl.constexpr,
    BYTE_TILE: tl.constexpr,
    PLANE_LEN: tl.constexpr,
    WIDE: tl.constexpr,
):
    bucket = tl.program_id(0).to(tl.int64)
    low = tl.load(low_ptr + bucket)
    step = tl.load(step_ptr + bucket).to(tl.float32)
    packed_base = packed_ptr + bucket * blocks_per_bucket * (BYTE_PLANES * PLANE_LEN)
    out_base = out_ptr + bucket * blocks_per_bucket * 64
    blk = tl.arange(0, CHUNK)[:, None, None]
    plane = tl.arange(0, PLANES)[None, :, None]
    lane = tl.arange(0, PLANE_LEN)[None, None, :]
    byte_plane = tl.arange(0, BYTE_TILE)[None, :, None]
    for start in range(0, blocks_per_bucket, CHUNK):
        blocks = start + blk
        valid = blocks < blocks_per_bucket
        raw = tl.load(
            packed_base + blocks * (BYTE_PLANES * PLANE_LEN) + byte_plane * PLANE_LEN + lane,
            mask=valid & (byte_plane < BYTE_PLANES),
            other=0,
        )
        if WIDE:  # noqa: SIM108 (a constexpr branch: the compiled kernel keeps only one)
            bytes_ = raw.to(tl.int64)
        else:
            bytes_ = raw.to(tl.int32)
        words = tl.sum(bytes_ << (byte_plane * 8), axis=1)  # (CHUNK, P)
        codes = (words[:, None, :] >> (plane * BITS)) & ((1 << BITS) - 1)  # (CHUNK, C, P)
        # code * step is exact in fp32, so a fused multiply-add gives the same bits as eager.
        values = low + codes.to(tl.float32) * step
        if OUT_BF16:
            # fp32 -> bf16 round to nearest even on the bits, as torch does: the interpreter's
            # own conversion truncates. Adding 0x7FFF plus the lowest kept bit rounds the
            # dropped half to nearest, ties to even (a carry runs into the exponent, up to
            # Inf, as it should); NaN is kept NaN explicitly.
            bits = values.to(tl.uint32, bitcast=True)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            rounded = tl.where(values != values, 0x7FC0, rounded).to(tl.uint16)
            values = rounded.to(tl.bfloat16, bitcast=True)
        else:
            values = values.to(out_ptr.dtype.element_ty)
        tl.store(out_base + blocks * 64 + plane * PLANE_LEN + lane, values, mask=valid)


_KERNEL_BODIES = {
    "compress": _compress_minmax_kernel,
    "decompress": _decompress_minmax_kernel,
}


@functools.cache
def _jitted(name: str, interpret: bool):
    # Triton decides at jit time whether a kernel is compiled or interpreted, from the
    # TRITON_INTERPRET knob; ``interpret`` is part of the cache key so each mode gets its own.
    del interpret
    return _triton().jit(_KERNEL_BODIES[name])


def _kernel(name: str):
    """The jit-ed kernel ``name`` for the current ``TRITON_INTERPRET`` setting."""
    return _jitted(name, interpreting())


# ----------------------------------------------------------------------------------------------
# Launchers: plain Python, torch ops and one kernel launch each (the bodies of the triton_ops).
# ----------------------------------------------------------------------------------------------


def _check_launchable(t: torch.Tensor) -> None:
    # The interpreter runs kernels on real host memory: under FakeTensorMode (torch.compile's
    # tracing, where the op body doubles as its fake kernel) it cannot run. Only compiled
    # kernels trace (into Triton kernel HOPs); say so instead of failing deep inside Triton.
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t) and not compiling():
        raise RuntimeError(
            "the qbackprop Triton ops cannot be traced under TRITON_INTERPRET=1 (the interpreter "
            "only runs eagerly); torch.compile needs the compiled kernels on CUDA"
        )


def _launch_compress(
    matrix: torch.Tensor, bits: int, stochastic: bool, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    _triton()
    _check_launchable(matrix)
    num_buckets, bucket_len = matrix.shape
    blocks = bucket_len // BLOCK
    geometry = _geometry(bits)
    device = matrix.device
    packed = torch.empty(num_buckets * bucket_len * bits // 8, dtype=torch.uint8, device=device)
    low = torch.empty(num_buckets, dtype=torch.float32, device=device)
    step = torch.empty(num_buckets, dtype=torch.bfloat16, device=device)
    if num_buckets:
        chunk, warps = _chunk(blocks)
        wrap_triton(_kernel("compress"))[(num_buckets,)](
            matrix,
            packed,
            low,
            step,
            seed,
            blocks,
            LEVELS=float(2**bits - 1),
            STOCHASTIC=bool(stochastic),
            CHUNK=chunk,
            num_warps=warps,
            **geometry,
        )
    return packed, low, step


def _launch_decompress(
    packed: torch.Tensor,
    low: torch.Tensor,
    step: torch.Tensor,
    bits: int,
    num_buckets: int,
    bucket_len: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    from torch.library import wrap_triton

    _triton()
    _check_launchable(packed)
    out = torch.empty((num_buckets, bucket_len), dtype=dtype, device=packed.device)
    if num_buckets:
        chunk, warps = _chunk(bucket_len // BLOCK)
        wrap_triton(_kernel("decompress"))[(num_buckets,)](
            packed,
            low,
            step,
            out,
            bucket_len // BLOCK,
            OUT_BF16=dtype == torch.bfloat16,
            CHUNK=chunk,
            num_warps=warps,
            **_geometry(bits),
        )
    return out


# ----------------------------------------------------------------------------------------------
# Registered ops: torch.compile sees the kernels inside (triton_op, wrap_triton).
# ----------------------------------------------------------------------------------------------


def _compress_op_impl(
    matrix: torch.Tensor, bits: int, stochastic: bool, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_compress(matrix, bits, stochastic, seed)


def _decompress_op_impl(
    packed: torch.Tensor,
    low: torch.Tensor,
    step: torch.Tensor,
    bits: int,
    num_buckets: int,
    bucket_len: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return _launch_decompress(packed, low, step, bits, num_buckets, bucket_len, dtype)


COMPRESS_OP = "qbackprop::triton_compress_minmax"
DECOMPRESS_OP = "qbackprop::triton_decompress_minmax"


def _op_registered(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def _register_ops() -> None:
    # The registration itself needs no Triton; the bodies import it when they run. Skipped
    # when an earlier import (e.g. importlib.reload) already registered the names.
    if not _op_registered(COMPRESS_OP):
        torch.library.triton_op(COMPRESS_OP, _compress_op_impl, mutates_args=())
    if not _op_registered(DECOMPRESS_OP):
        torch.library.triton_op(DECOMPRESS_OP, _decompress_op_impl, mutates_args=())


if triton_available():
    _register_ops()


# ----------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"bits={bits!r} is not supported by the Triton kernels; expected 1..8")


def compress_minmax(
    matrix: torch.Tensor, bits: int, stochastic: bool, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantize and pack every row (bucket) of ``matrix`` in one kernel launch.

    Args:
        matrix: contiguous ``(num_buckets, bucket_len)`` fp32 / fp16 / bf16 tensor,
            ``bucket_len % 64 == 0`` (see ``supported``).
        bits: code width, 1..8.
        stochastic: unbiased stochastic rounding instead of nearest (round half to even).
        seed: 0-dim int64 tensor on ``matrix``'s device; with the element offset it keys the
            Philox draws. Read by the kernel only, so no host sync; pass a fresh seed per call
            for independent draws.

    Returns:
        ``(packed, low, step)``: uint8 codes (``num_buckets * bucket_len * bits / 8`` bytes,
        the same bytes as ``packing.pack_codes(codes.reshape(-1), bits)``), the fp32 bucket
        minima and the bf16 steps (rounded up). A bucket holding NaN or +-Inf gets NaN for
        ``low`` and ``step`` and zero codes, so it decompresses to all-NaN.

    Raises:
        ValueError: when ``supported(matrix, bits)`` is False, or ``seed`` is not a 0-dim
            int64 tensor on ``matrix``'s device.
    """
    _check_bits(bits)
    if not supported(matrix, bits):
        raise ValueError(
            f"compress_minmax does not apply to a {tuple(matrix.shape)} {matrix.dtype} "
            f"tensor on {matrix.device} (contiguous={matrix.is_contiguous()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}); see supported()"
        )
    if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device != matrix.device:
        raise ValueError(
            f"seed must be a 0-dim int64 tensor on {matrix.device}; got {seed.dtype} "
            f"{tuple(seed.shape)} on {seed.device}"
        )
    return torch.ops.qbackprop.triton_compress_minmax(matrix, bits, bool(stochastic), seed)


def decompress_minmax(
    packed: torch.Tensor,
    low: torch.Tensor,
    step: torch.Tensor,
    bits: int,
    num_buckets: int,
    bucket_len: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of ``compress_minmax``: the ``(num_buckets, bucket_len)`` matrix
    ``low + code * step`` (fp32 arithmetic, bit-identical to eager ``torch.addcmul``), cast to
    ``dtype``, in one kernel launch.

    Raises:
        ValueError: on sizes or dtypes that ``compress_minmax`` would not have produced.
    """
    _check_bits(bits)
    shape_ok = (
        bucket_len > 0
        and bucket_len % BLOCK == 0
        and packed.dtype == torch.uint8
        and packed.is_contiguous()
        and packed.numel() == num_buckets * bucket_len * bits // 8
        and low.dtype == torch.float32
        and step.dtype == torch.bfloat16
        and low.numel() == step.numel() == num_buckets
        and dtype in FLOAT_DTYPES
    )
    if not shape_ok:
        raise ValueError(
            f"decompress_minmax: packed {packed.dtype} x{packed.numel()}, low {low.dtype} "
            f"x{low.numel()}, step {step.dtype} x{step.numel()} do not match {num_buckets} "
            f"buckets of {bucket_len} {bits}-bit codes decompressed to {dtype}"
        )
    return torch.ops.qbackprop.triton_decompress_minmax(
        packed, low.contiguous(), step.contiguous(), bits, num_buckets, bucket_len, dtype
    )


__all__ = [
    "COMPRESS_OP",
    "DECOMPRESS_OP",
    "compress_minmax",
    "decompress_minmax",
    "compiling",
    "interpreting",
    "supported",
    "triton_available",
]
