"""Training-step time and saved-activation memory: fp32 vs qbackprop vs per-stage checkpointing.

One full step (forward, backward, AdamW step) per variant, the variants interleaved round by
round so that they share the machine's state; medians and ratios to fp32.

Example:
    python scripts/bench_step.py --models efficientnetv2_rw_t,resnet18 --batch-size 64 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
from bench_common import build_model, checkpoint_stages, header, quiet, table

import qbackprop as qb
from qbackprop.quant import fused

VARIANTS = {
    "fp32": None,
    "2-bit stochastic": "2bit-stochastic",
    "4-bit nearest": "4bit-nearest",
    "2/4 mix": "2/4-mix",
    "checkpoint per stage": "checkpoint",
}
MiB = 2**20


def make_variant(base: torch.nn.Module, how: str | None) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if how == "checkpoint":
        return checkpoint_stages(model)
    if how is not None:
        qb.convert_model(model, how)
    return model


def step(model, opt, x, y) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_cuda_step(base: torch.nn.Module, how: str | None, x, y) -> tuple[int, int]:
    """(peak, resident) CUDA bytes of one steady-state step of this variant alone.

    The variant is built afresh with nothing else on the device: ``resident`` is what it holds
    between steps (parameters, gradients, optimizer state), ``peak`` the step's
    ``max_memory_allocated`` (resident + activations + temporaries)."""
    gc.collect()
    torch.cuda.empty_cache()
    model = make_variant(base, how)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step(model, opt, x, y)  # optimizer state, and what a first step learns
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(model, opt, x, y)
    return torch.cuda.max_memory_allocated(), resident


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="efficientnetv2_rw_t,resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps first: the first learns which BatchNorm outputs are shared, the "
        "second runs (and compiles) the kernels every later step uses",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--fused",
        choices=["on", "off", "auto"],
        default="on",
        help="compiled compress kernels: on (default: the steady state of a training run; "
        "auto mode compiles them within its first steps), off (eager) or auto (the library "
        "default, as a short run sees it)",
    )
    args = parser.parse_args()
    fused.set_enabled({"on": True, "off": False, "auto": None}[args.fused])
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header(f"training-step time, interleaved; fused kernels {args.fused}"))
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = build_model(name).to(args.device)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
        y = torch.randint(0, 10, (args.batch_size,), device=args.device)
        models = {k: make_variant(base, v) for k, v in VARIANTS.items()}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
        for _ in range(args.warmup):
            for k in models:
                step(models[k], opts[k], x, y)
        times = {k: [] for k in models}
        for _ in range(args.rounds):
            for k in models:
                times[k].append(step(models[k], opts[k], x, y))
        medians = {k: statistics.median(v) for k, v in times.items()}
        saved = {}
        for k, model in models.items():
            report = qb.measure_saved_activations(model, x)
            # Checkpointing keeps only stage inputs, which the hooks see as the "fp32" run.
            saved[k] = report.fp32_bytes if k == "checkpoint per stage" else report.stored_bytes
        del models, opts
        peaks = (
            {k: peak_cuda_step(base, how, x, y) for k, how in VARIANTS.items()} if x.is_cuda else {}
        )
        for k in VARIANTS:
            peak, resident = peaks.get(k, (None, None))
            rows.append([
                name, k, f"{medians[k] * 1e3:.0f}", f"{medians[k] / medians['fp32']:.2f}x",
                f"{saved[k] / MiB:.1f}",
                "" if peak is None else f"{peak / MiB:.0f}",
                "" if peak is None else f"{(peak - resident) / MiB:.0f}",
            ])  # fmt: skip
            print(table(rows[-1:], HEADERS).splitlines()[-1], flush=True)
    print()
    print(table(rows, HEADERS))


HEADERS = [
    "model", "variant", "step ms (median)", "vs fp32", "saved activations MiB",
    "peak CUDA MiB", "peak above resident MiB",
]  # fmt: skip

if __name__ == "__main__":
    main()
