"""Whole-model ``torch.compile``: fp32 vs converted, compiled side by side.

For each model: ``torch.compile(model, fullgraph=True)`` of the fp32 model and of the converted
one (a graph break fails the compile), then the bytes the compiled graph saves for backward
(counted by a saved-tensor hook around the compiled step: what AOTAutograd keeps) and the step
time (forward, backward, SGD), the two variants interleaved round by round, medians and the
ratio to compiled fp32. Compile seconds are printed too (Dynamo traces every converted layer's
Python once).

Example:
    python scripts/bench_compile.py --models resnet18,efficientnetv2_rw_t --backend inductor
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_common import build_model, header, quiet, table

import qbackprop as qb

MiB = 2**20


def saved_bytes(model, x, y) -> int:
    """Bytes of the activations the compiled graph saves (parameters and the input excluded,
    as in ``qbackprop.measure_saved_activations``), each storage once. Inductor on CPU saves
    re-laid-out copies of conv weights for backward: tensors shaped like a parameter are
    counted as parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    params.add(x.untyped_storage().data_ptr())
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() > 1}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and tuple(t.shape) not in shapes:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return sum(seen.values())


def step(model, opt, x, y) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet18,efficientnetv2_rw_t")
    parser.add_argument("--preset", default="2bit-stochastic")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    quiet()
    print(header(f"compiled step: {args.preset} vs fp32, backend {args.backend}"))
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        y = torch.randint(0, 10, (args.batch_size,))
        variants = {}
        for label in ("fp32", args.preset):
            model = build_model(name)
            if label != "fp32":
                model = qb.convert_model(model, label)
            compiled = torch.compile(model, fullgraph=True, backend=args.backend)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            start = time.perf_counter()
            step(compiled, opt, x, y)
            variants[label] = (compiled, opt, time.perf_counter() - start)
        times = {label: [] for label in variants}
        saved = {label: saved_bytes(v[0], x, y) for label, v in variants.items()}
        for _ in range(args.rounds):
            for label, (compiled, opt, _) in variants.items():
                times[label].append(step(compiled, opt, x, y))
        fp32_time = statistics.median(times["fp32"])
        for label, (_, _, compile_s) in variants.items():
            t = statistics.median(times[label])
            rows.append([
                name, label, f"{compile_s:.0f}", f"{t * 1e3:.0f}", f"{t / fp32_time:.2f}x",
                f"{saved[label] / MiB:.1f}", f"{saved['fp32'] / saved[label]:.1f}x",
            ])  # fmt: skip
    print(table(rows, ["model", "variant", "compile s", "step ms", "vs fp32",
                       "saved MiB", "fewer bytes"]))  # fmt: skip


if __name__ == "__main__":
    main()
