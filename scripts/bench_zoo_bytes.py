"""Saved-activation bytes at the 2-bit preset for the seven CNNs of the fidelity zoo.

Usage: ``.venv/bin/python scripts/bench_zoo_bytes.py`` (batch 16, 32 px, random init, one
thread; measured by ``qbackprop.measure_saved_activations``, the bytes autograd holds).
"""

import warnings

import timm
import torch
from bench_zoo_fidelity import CNN_ZOO

import qbackprop as qb


def main() -> None:
    torch.set_num_threads(1)
    for name in CNN_ZOO:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="convert_model:")
            qb.convert_model(model, "2bit-stochastic")
        x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        r = qb.measure_saved_activations(model, x)
        print(
            f"{name} fp32 {r.fp32_bytes / 2**20:.2f} MiB  2bit {r.stored_bytes / 2**20:.3f} MiB"
            f"  {r.ratio:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
