"""Host syncs and leaf ops per training step (counts that do not depend on machine load).

One training step (forward, backward) of each variant under ``torch.profiler``, which sees ops
nested inside others: ``aten::_local_scalar_dense`` / ``aten::item`` / ``aten::nonzero`` calls
(host syncs on a GPU) and *leaf* aten ops (ops that call no other aten op; about the kernel
launches a GPU step makes), and their ratio to fp32's.

Example:
    python scripts/bench_ops.py --models efficientnetv2_rw_t,resnet18 --batch-size 16
"""

from __future__ import annotations

import argparse

import torch
from bench_common import build_model, header, quiet, table
from torch.profiler import profile

import qbackprop as qb

SYNCS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero")
VARIANTS = ["fp32", "2bit-stochastic", "4bit-nearest", "2/4-mix"]


def counts(model, x, y) -> tuple[int, int]:
    def run():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    run()  # first step outside the profile: nothing is learned, but allocations settle
    with profile() as prof:
        run()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    syncs = sum(e.name in SYNCS for e in events)
    leaves = sum(not any(c.name.startswith("aten::") for c in e.cpu_children) for e in events)
    return syncs, leaves


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="efficientnetv2_rw_t,resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    quiet()
    print(header("host syncs and leaf ops per training step"))
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        y = torch.randint(0, 10, (args.batch_size,))
        base = None
        for variant in VARIANTS:
            model = build_model(name)
            if variant != "fp32":
                model = qb.convert_model(model, variant)
            syncs, leaves = counts(model, x, y)
            base = base or leaves
            rows.append([name, variant, syncs, leaves, f"{leaves / base:.2f}x"])
    print(table(rows, ["model", "variant", "host syncs", "leaf ops", "vs fp32"]))


if __name__ == "__main__":
    main()
