"""Drop-in layers; importing this package registers every swap in the registry."""

from . import activation, conv, linear, norm, squeeze_excite  # noqa: F401
