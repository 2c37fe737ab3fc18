"""The ``qbackprop`` console script: one module per command, ``main`` in ``app.py``."""

from .app import main

__all__ = ["main"]
