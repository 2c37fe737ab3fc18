"""Dense packing of b-bit integer codes: 1..8 bits into a uint8 bit stream, wider codes widened."""

from __future__ import annotations

import torch

# Widths that divide 8 pack by shifting whole codes into a byte; the others (3, 5, 6, 7) go
# through a bit plane so that 8 codes take exactly b bytes, with no wasted bits.
_DIVIDES_BYTE = (1, 2, 4, 8)


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


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D tensor of integer codes in ``[0, 2**bits)`` densely.

    Args:
        codes: 1-D integer (or integral float) tensor of codes.
        bits: code width, 1..31.

    Returns:
        uint8 bit stream for ``bits <= 8`` (``ceil(n*bits/8)`` bytes, little-endian bit order);
        int16 for 9..16 (the uint16 pattern); int32 for 17..31.
    """
    if not 1 <= bits <= 31:
        raise ValueError(f"bits={bits} cannot be packed; expected 1..31")
    if bits > 16:
        return codes.to(torch.int32)
    if bits > 8:
        # Codes up to 65535 do not fit int16: store the uint16 bit pattern.
        return codes.to(torch.int32).to(torch.uint16).view(torch.int16)
    n = codes.numel()
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    per_group = 8 if bits not in _DIVIDES_BYTE else 8 // bits
    pad = (-n) % per_group
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    if bits in _DIVIDES_BYTE:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        groups = codes.view(-1, per_group) << shifts
        return groups.sum(dim=1, dtype=torch.uint8)[: packed_numel(n, bits)]
    # 8 codes -> 8*bits bits -> bits bytes.
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    planes = (codes.view(-1, 8, 1) >> bit_idx) & 1  # (groups, 8, bits)
    planes = planes.reshape(-1, bits, 8)  # consecutive 8 bits form one byte
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    packed = (planes << byte_shifts).sum(dim=2, dtype=torch.uint8).reshape(-1)
    return packed[: packed_numel(n, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``n`` codes as an int32 tensor."""
    if bits > 16:
        return packed.to(torch.int32)[:n]
    if bits > 8:
        return packed.view(torch.uint16).to(torch.int32)[:n]
    if bits == 8:
        return packed.to(torch.int32)[:n]
    mask = (1 << bits) - 1
    if bits in _DIVIDES_BYTE:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.view(-1, 1) >> shifts) & mask
        return codes.reshape(-1)[:n].to(torch.int32)
    pad = (-packed.numel()) % bits
    if pad:
        packed = torch.cat([packed, packed.new_zeros(pad)])
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    planes = (packed.view(-1, bits, 1) >> byte_shifts) & 1  # (groups, bits, 8)
    planes = planes.reshape(-1, 8, bits).to(torch.int32)
    bit_idx = torch.arange(bits, dtype=torch.int32, device=packed.device)
    codes = (planes << bit_idx).sum(dim=2, dtype=torch.int32)
    return codes.reshape(-1)[:n]
