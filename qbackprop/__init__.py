"""qbackprop: train with the activations autograd saves stored as packed low-bit codes."""

from .config import QuantConfig, load_config
from .fidelity import FidelityReport, measure_fidelity
from .memory import LayerMemory, MemoryReport, measure_saved_activations
from .quant import CompressedTensor, QuantSpec, compress
from .surgery import conversion_report, convert_model, revert_model
from .tune import TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    "CompressedTensor",
    "FidelityReport",
    "LayerMemory",
    "MemoryReport",
    "QuantConfig",
    "QuantSpec",
    "TuneResult",
    "__version__",
    "compress",
    "conversion_report",
    "convert_model",
    "load_config",
    "measure_fidelity",
    "measure_saved_activations",
    "revert_model",
    "tune",
]
