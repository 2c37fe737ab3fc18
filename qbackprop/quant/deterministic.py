"""Nearest rounding via Brevitas's integer quantizer, with our per-bucket scale and zero-point."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def brevitas_int_quant() -> torch.nn.Module:
    """The Brevitas unsigned, full-range integer quantizer that produces our nearest codes.

    ``IntQuant.to_int(scale, zero_point, bit_width, x)`` computes
    ``clamp(round(x / scale + zero_point), 0, 2**bit_width - 1)`` (round half to even): exactly
    the nearest code of the affine map ``x ≈ scale * (q - zero_point)``.
    """
    # Imported here: brevitas takes seconds to import, which `qbackprop --help` should not pay.
    from brevitas.core.function_wrapper import RoundSte, TensorClamp
    from brevitas.core.quant import IntQuant

    return IntQuant(
        narrow_range=False,
        signed=False,
        input_view_impl=torch.nn.Identity(),
        float_to_int_impl=RoundSte(),
        tensor_clamp_impl=TensorClamp(),
    )


def nearest_codes(
    values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: torch.Tensor
) -> torch.Tensor:
    """Nearest integer codes of ``values`` from Brevitas, per bucket.

    Args:
        values: ``(buckets, bucket_len)`` matrix.
        scale: ``(buckets, 1)`` step size, strictly positive.
        zero_point: ``(buckets, 1)`` real zero-point in code units (``-min / scale``).
        bits: bit width, a scalar tensor or ``(buckets, 1)``.

    Returns:
        Integral-valued codes in ``[0, 2**bits - 1]``, dtype of ``values``.
    """
    with torch.no_grad():
        return brevitas_int_quant().to_int(scale, zero_point, bits, values)
