"""Drop-in layers; importing this package registers every swap in the registry."""

from . import (  # noqa: F401
    activation,
    attention,
    conv,
    layer_norm,
    linear,
    norm,
    pool,
    regularize,
    squeeze_excite,
)
