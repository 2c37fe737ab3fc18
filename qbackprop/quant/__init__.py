"""Tensor-level compression of saved activations: specs, packing, rounding, CompressedTensor."""

from .compressed import CompressedTensor, compress
from .spec import PRESETS, QuantSpec

__all__ = ["PRESETS", "CompressedTensor", "QuantSpec", "compress"]
