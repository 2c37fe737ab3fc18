"""Drop-in layers; importing this package registers every swap in the registry."""

from . import activation, conv, linear, norm, pool, squeeze_excite  # noqa: F401
