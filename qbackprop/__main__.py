"""``python -m qbackprop`` (and ``torchrun -m qbackprop``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
