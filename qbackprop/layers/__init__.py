"""Drop-in layers; importing this package registers every swap in the registry."""

from . import norm  # noqa: F401
