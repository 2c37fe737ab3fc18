"""qbackprop: train with the activations autograd saves stored as packed low-bit codes."""

from .quant import CompressedTensor, QuantSpec, compress

__version__ = "0.1.0"

__all__ = ["CompressedTensor", "QuantSpec", "__version__", "compress"]
