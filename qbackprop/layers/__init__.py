"""Drop-in layers; importing this package registers every swap in the registry."""

from . import activation, conv, layer_norm, linear, norm, pool, squeeze_excite  # noqa: F401
