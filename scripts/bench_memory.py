"""Measured saved-activation memory: fp32 vs qbackprop vs per-stage checkpointing.

Columns: fp32 / qbackprop MiB: saved-activation bytes (saved-tensor hooks); checkpoint MiB:
what per-stage checkpointing saves; allocator: bytes the allocator still holds after a forward
(hook-independent). For the first model only, training steps (SGD) of fp32 and of each spec,
each in a fresh Python process of its own, from the very first step, as the OS sees them:
  CPU:  step peak RSS       the process's peak resident set size over the first --step-steps
                            steps (VmHWM, reset before the first step): imports (~0.7 GiB for
                            torch and timm), model and steps together
        RSS added by steps  that peak minus the RSS just before the first step
  CUDA: max allocated       torch.cuda.max_memory_allocated over those steps (model included)
        max reserved        torch.cuda.max_memory_reserved: what the caching allocator holds
Each as "fp32 / qbackprop = ratio". The converted processes run with the host allocator
tuning convert_model applies (qbackprop.allocator); fp32 with glibc's defaults, as a user's
fp32 run has them.

Example:
    python scripts/bench_memory.py                      # efficientnetv2_rw_t, batch 128, 32 px
    python scripts/bench_memory.py --batch-size 64 --image-size 96   # the peak-RSS issue's run
    python scripts/bench_memory.py --zoo  # + resnet18/50, mobilenetv3, ... at 32 and 224 px
"""

from __future__ import annotations

import argparse
import copy
import functools

import torch
from bench_common import (
    build_model,
    checkpoint_stages,
    header,
    quiet,
    ratio_cell,
    step_memory,
    table,
)
from torch.profiler import ProfilerActivity, profile

import qbackprop as qb

ZOO = ["resnet18", "resnet50", "mobilenetv3_large_100", "tf_efficientnetv2_b0", "convnext_atto"]
SPECS = {"2bit-stochastic": "2bit-stochastic", "4bit-stochastic": "4bit-stochastic"}
MiB = 2**20


def allocator_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Second, hook-independent measurement: memory the allocator still holds after a forward.

    On CUDA from ``torch.cuda.memory_allocated``; on CPU from the profiler's memory events (the
    net bytes allocated and not freed during the forward). Includes the (small) output.
    """
    model.train()
    if x.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(x)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model(x)
        held = sum(e.self_cpu_memory_usage for e in prof.key_averages())
    del out
    return held


def _alloc(fp32: int | None, conv: int | None) -> str:
    if fp32 is None:
        return ""
    return f"{fp32 / MiB:.1f} / {conv / MiB:.2f} = {fp32 / conv:.2f}x"


def checkpoint_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    ckpt = checkpoint_stages(copy.deepcopy(model))
    return qb.measure_saved_activations(ckpt, x).fp32_bytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="efficientnetv2_rw_t")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--zoo", action="store_true", help="also the model zoo at 32 and 224 px")
    parser.add_argument("--zoo-batch-size", type=int, default=16)
    parser.add_argument("--zoo-models", default=",".join(ZOO), help="comma-separated timm names")
    parser.add_argument("--skip-main", action="store_true", help="only the zoo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--step-steps",
        type=int,
        default=2,
        help="training steps per fresh process for the step-memory columns (0: skip them)",
    )
    args = parser.parse_args()
    quiet()
    HEADERS.extend(
        ["step max allocated CUDA MiB", "step max reserved CUDA MiB"]
        if args.device.startswith("cuda")
        else ["step peak RSS MiB", "RSS added by steps MiB"]
    )
    print(header("saved-activation memory, measured"))
    runs = [] if args.skip_main else [(args.model, args.batch_size, args.image_size)]
    if args.zoo:
        zoo = args.zoo_models.split(",")
        zoo = zoo if args.skip_main else [args.model, *zoo]
        runs += [(m, args.zoo_batch_size, s) for m in zoo for s in (32, 224)]
    rows = []
    for name, batch, size in runs:
        torch.manual_seed(0)
        model = build_model(name).to(args.device)
        x = torch.randn(batch, 3, size, size, device=args.device)
        ckpt = checkpoint_bytes(model, x)
        main_run = (name, batch, size) == runs[0] and args.step_steps > 0
        steps = functools.partial(step_memory, name, batch_size=batch, image_size=size,
                                  device=args.device, steps=args.step_steps)  # fmt: skip
        fp32_steps = steps(None) if main_run else None
        for label, spec in SPECS.items():
            qb.convert_model(model, spec)
            report = qb.measure_saved_activations(model, x)
            alloc_fp32 = alloc_conv = None
            if (name, batch, size) == runs[0]:
                with qb.surgery.temporarily_unconverted(model):
                    alloc_fp32 = allocator_bytes(model, x)
                alloc_conv = allocator_bytes(model, x)
            rows.append([
                name, batch, size, label,
                f"{report.fp32_bytes / MiB:.1f}",
                f"{report.stored_bytes / MiB:.2f}",
                f"{report.ratio:.2f}x",
                f"{100 * report.compressed_fraction:.1f}%",
                f"{ckpt / MiB:.1f} ({report.fp32_bytes / ckpt:.1f}x)",
                _alloc(alloc_fp32, alloc_conv),
                *_step_cells(fp32_steps, steps(spec) if main_run else None),
            ])  # fmt: skip
            print(table(rows[-1:], HEADERS).splitlines()[-1], flush=True)
        qb.revert_model(model)
    print()
    print(table(rows, HEADERS))


def _step_cells(fp32, conv) -> list[str]:
    if fp32 is None or conv is None:
        return ["", ""]
    if fp32.cuda_max_allocated is not None:
        return [
            ratio_cell(fp32.cuda_max_allocated, conv.cuda_max_allocated),
            ratio_cell(fp32.cuda_max_reserved, conv.cuda_max_reserved),
        ]
    return [ratio_cell(fp32.peak_rss, conv.peak_rss), ratio_cell(fp32.added, conv.added)]


HEADERS = [
    "model", "batch", "px", "spec", "fp32 MiB", "qbackprop MiB", "ratio",
    "compressed", "checkpoint MiB (ratio)", "allocator fp32 / qbackprop",
]  # fmt: skip

if __name__ == "__main__":
    main()
