"""Dense packing of b-bit codes round-trips exactly and uses exactly ceil(n*b/8) bytes."""

import pytest
import torch

from qbackprop.quant.packing import code_dtype, pack_codes, packed_numel, unpack_codes


@pytest.mark.parametrize("bits", list(range(1, 17)) + [20, 31])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_pack_roundtrip_exact(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    high = 2**bits
    codes = torch.randint(0, high, (n,), generator=gen, dtype=torch.int64)
    codes[0] = high - 1  # the top code must survive too
    packed = pack_codes(codes, bits)
    assert packed.dtype == code_dtype(bits)
    assert packed.numel() == packed_numel(n, bits)
    torch.testing.assert_close(unpack_codes(packed, bits, n), codes.to(torch.int32), rtol=0, atol=0)


def test_three_bit_codes_are_dense():
    # 8 codes of 3 bits fill exactly 3 bytes: no wasted bits.
    codes = torch.arange(8)
    packed = pack_codes(codes, 3)
    assert packed.numel() == 3
    assert packed_numel(80, 3) == 30
    assert packed_numel(5, 2) == 2


def test_pack_rejects_out_of_range_width():
    with pytest.raises(ValueError, match="bits=32"):
        pack_codes(torch.zeros(4), 32)
