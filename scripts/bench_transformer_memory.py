"""Saved-activation memory of transformers at 224 px: fp32 vs the 2-bit preset vs 8-bit.

Random init (memory does not depend on the weights), ``qb.convert_model`` with the planning
forward on two images of the batch, ``qb.measure_saved_activations`` (saved-tensor hooks: the
bytes autograd really holds, every distinct storage once) and, for the 2-bit preset, the
allocator's view (``bench_memory.allocator_bytes``: the profiler's net bytes allocated and not
freed during a forward, fp32 / converted; it includes the output).

Example:
    python scripts/bench_transformer_memory.py
"""

from __future__ import annotations

import argparse
import copy
import warnings

import timm
import torch
from bench_common import header, quiet, table
from bench_memory import allocator_bytes

import qbackprop as qb

MODELS = "vit_tiny_patch16_224:16,swin_tiny_patch4_window7_224:4,deit_small_patch16_224:8"
PRESETS = ("2bit-stochastic", "8bit-nearest")
HEADERS = ["model", "batch", "fp32 MiB", *PRESETS, "allocator MiB, 2-bit"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=MODELS, help="name:batch,...")
    args = parser.parse_args()
    quiet()
    print(header("transformer saved-activation memory, 224 px"))
    rows = []
    for item in args.models.split(","):
        name, batch = item.split(":")
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, drop_path_rate=0.0)
        x = torch.randn(int(batch), 3, 224, 224)
        row = [name, batch]
        for preset in PRESETS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = qb.convert_model(copy.deepcopy(model), preset, example_input=x[:2])
            report = qb.measure_saved_activations(converted, x)
            if len(row) == 2:
                row.append(f"{report.fp32_bytes / 2**20:.1f}")
            row.append(f"{report.ratio:.2f}x")
            if preset == PRESETS[0]:
                with qb.surgery.temporarily_unconverted(converted):
                    fp32 = allocator_bytes(converted, x)
                held = allocator_bytes(converted, x)
                alloc = f"{fp32 / 2**20:.1f} / {held / 2**20:.1f} = {fp32 / held:.2f}x"
        rows.append([*row, alloc])
        print(table([rows[-1]], HEADERS).splitlines()[-1], flush=True)
    print(table(rows, HEADERS))


if __name__ == "__main__":
    main()
