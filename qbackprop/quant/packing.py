"""Dense packing of b-bit integer codes: 1..8 bits into a uint8 bit stream, wider codes widened.

Layout of the uint8 stream (no wasted bits): codes are taken in blocks of ``BLOCK`` (64). A
block is read as ``C`` *code planes* of ``P`` consecutive codes (``C = 8 / gcd(b, 8)``: the
fewest codes that fill whole bytes, ``P = 64 / C``). Position ``j`` of the block gathers the
``C`` codes ``code[k * P + j]`` into one word, code ``k`` at bit ``b * k`` (little-endian), and
the word's ``B = C * b / 8`` bytes go to *byte planes*: byte ``m`` of word ``j`` is stored at
``m * P + j``. So a block of 2-bit codes is 16 bytes, byte ``j`` holding codes ``j``,
``16 + j``, ``32 + j`` and ``48 + j``. Planes keep every load and store of a fused kernel
contiguous (vectorizable), unlike byte-by-byte interleaving. The last ``n % 64`` codes, if any,
are packed in plain little-endian order after the blocks: ``ceil(n * b / 8)`` bytes in all.
"""

from __future__ import annotations

import math

import torch

from qbackprop import runtime

BLOCK = 64
_GCD_WITH_8 = {b: math.gcd(b, 8) for b in range(1, 9)}


def block_geometry(bits: int) -> tuple[int, int, int]:
    """``(code planes C, byte planes B, plane length P)`` of a 64-code block of ``bits`` codes."""
    planes = 8 // _GCD_WITH_8[bits]  # a table, not math.gcd: traceable by torch.compile
    return planes, planes * bits // 8, BLOCK // planes


def code_dtype(bits: int) -> torch.dtype:
    """The storage dtype of ``bits``-wide codes once packed."""
    if bits <= 8:
        return torch.uint8
    if bits <= 16:
        return torch.int16
    return torch.int32


def packed_numel(n: int, bits: int) -> int:
    """Number of storage elements ``pack_codes`` returns for ``n`` codes of ``bits`` bits."""
    if bits <= 8:
        return (n * bits + 7) // 8
    return n


def _word_dtype(bits: int) -> torch.dtype:
    # A word holds C codes: 8 bits for 1, 2, 4, 8; 24 for 3 and 6; 40 and 56 for 5 and 7.
    return torch.uint8 if 8 % bits == 0 else torch.int32 if bits % 3 == 0 else torch.int64


_shift_cache: dict[tuple, torch.Tensor] = {}


def _shifts(count: int, step: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[0, step, ..., (count - 1) * step]`` as a ``(1, count, 1)`` tensor, made once per
    device: packing runs for every saved tensor, and small tensors are dominated by such
    fixed costs."""
    if runtime.tracing():  # a traced graph makes its constants once anyway
        return torch.arange(0, count * step, step, dtype=dtype, device=device).view(1, -1, 1)
    key = (count, step, dtype, device)
    out = _shift_cache.get(key)
    if out is None:
        out = torch.arange(0, count * step, step, dtype=dtype, device=device).view(1, -1, 1)
        _shift_cache[key] = out
    return out


def _pack_blocks(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of whole blocks (a multiple of 64, any integer dtype) into the planar byte layout."""
    planes, byte_planes, length = block_geometry(bits)
    dtype = _word_dtype(bits)
    shifts = _shifts(planes, bits, dtype, codes.device)
    words = (codes.to(dtype).view(-1, planes, length) << shifts).sum(dim=1, dtype=dtype)
    if byte_planes == 1:
        return words.reshape(-1)
    byte_shifts = _shifts(byte_planes, 8, dtype, codes.device)
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unpack_blocks(packed: torch.Tensor, bits: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``_pack_blocks``: codes of whole blocks, as ``out_dtype``."""
    planes, byte_planes, length = block_geometry(bits)
    dtype = _word_dtype(bits)
    bytes_ = packed.view(-1, byte_planes, length).to(dtype)
    if byte_planes == 1:
        words = bytes_
    else:
        byte_shifts = _shifts(byte_planes, 8, dtype, packed.device)
        words = (bytes_ << byte_shifts).sum(dim=1, keepdim=True, dtype=dtype)
    shifts = _shifts(planes, bits, dtype, packed.device)
    return ((words >> shifts) & ((1 << bits) - 1)).to(out_dtype).reshape(-1)


def _pack_sequential(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Fewer than 64 codes in plain little-endian bit order: ``ceil(n * bits / 8)`` bytes."""
    n = codes.numel()
    bit_idx = _shifts(bits, 1, torch.uint8, codes.device).view(1, -1)
    stream = (codes.to(torch.uint8).view(-1, 1) >> bit_idx) & 1  # (n, bits), bit 0 first
    stream = stream.reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    byte_shifts = _shifts(8, 1, torch.uint8, codes.device).view(1, -1)
    return (stream.view(-1, 8) << byte_shifts).sum(dim=1, dtype=torch.uint8)[
        : packed_numel(n, bits)
    ]


def _unpack_sequential(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    byte_shifts = _shifts(8, 1, torch.uint8, packed.device).view(1, -1)
    stream = ((packed.view(-1, 1) >> byte_shifts) & 1).reshape(-1)[: n * bits]
    bit_idx = _shifts(bits, 1, torch.int32, packed.device).view(1, -1)
    return (stream.view(n, bits).to(torch.int32) << bit_idx).sum(dim=1, dtype=torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D tensor of integer codes in ``[0, 2**bits)`` densely.

    Args:
        codes: 1-D integer (or integral float) tensor of codes.
        bits: code width, 1..31.

    Returns:
        uint8 stream for ``bits <= 8`` (``ceil(n*bits/8)`` bytes, in the planar block layout
        the module docstring describes); int16 for 9..16 (the uint16 pattern); int32 for 17..31.
    """
    if not 1 <= bits <= 31:
        raise ValueError(f"bits={bits} cannot be packed; expected 1..31")
    if bits > 16:
        return codes.to(torch.int32)
    if bits > 8:
        # Codes up to 65535 do not fit int16: store the uint16 bit pattern.
        return codes.to(torch.int32).to(torch.uint16).view(torch.int16)
    codes = codes.reshape(-1)
    if bits == 8:
        return codes.to(torch.uint8)
    whole = codes.numel() - codes.numel() % BLOCK
    parts = []
    if whole:
        parts.append(_pack_blocks(codes[:whole], bits))
    if whole < codes.numel():
        parts.append(_pack_sequential(codes[whole:], bits))
    if not parts:
        return codes.new_empty(0, dtype=torch.uint8)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def unpack_codes(
    packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``n`` codes, as int32 or the ``dtype`` asked for
    (a float dtype saves the caller a conversion)."""
    if bits > 16:
        return packed[:n].to(dtype)
    if bits > 8:
        return packed[:n].view(torch.uint16).to(torch.int32).to(dtype)
    if bits == 8:
        return packed[:n].to(dtype)
    whole = n - n % BLOCK
    whole_bytes = whole * bits // 8
    parts = []
    if whole:
        parts.append(_unpack_blocks(packed[:whole_bytes], bits, dtype))
    if whole < n:
        parts.append(_unpack_sequential(packed[whole_bytes:], bits, n - whole).to(dtype))
    if not parts:
        return packed.new_empty(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
