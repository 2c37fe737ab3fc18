"""Test-session setup shared by every module."""

from __future__ import annotations

import os

import torch

# Triton fixes its interpret mode when it is first imported, and other tests (torch.compile)
# import it early: on a machine without CUDA the Triton kernels can only run interpreted, so
# the mode is set before any test module loads (tests/test_triton_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
