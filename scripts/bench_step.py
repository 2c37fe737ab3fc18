"""Training-step time and memory: fp32 vs qbackprop vs per-stage checkpointing.

One full step (forward, backward, AdamW step) per variant, the variants interleaved round by
round so that they share the machine's state; medians and ratios to fp32. They also share the
process's allocator settings: once a variant is converted, convert_model has tuned glibc malloc
for every variant (qbackprop.allocator; its page faults cost the fp32 step time too). Run with
QBACKPROP_TUNE_MALLOC=0 to time every variant under glibc's defaults instead.

Memory columns:
  saved activations MiB    what autograd holds for backward (measure_saved_activations)
  On CPU, each variant measured again in a fresh Python process of its own (so that one
  variant's heap cannot inflate another's), over its first --warmup + 1 steps from the very
  first one, as the OS sees the process:
    peak RSS MiB           the process's peak resident set size during those steps (VmHWM,
                           reset before the first step); includes imports (~0.7 GiB for torch
                           and timm), the model and its optimizer state
    RSS added MiB          peak RSS minus the RSS just before the first step: what the steps
                           add; its ratio to fp32 in brackets
  On CUDA, each variant built afresh alone, after one warm-up step:
    peak CUDA MiB          torch.cuda.max_memory_allocated of one steady-state step
    CUDA reserved MiB      torch.cuda.max_memory_reserved of that step (what the caching
                           allocator holds from the driver: allocated + its free cache)
    peak above resident    peak CUDA MiB minus what the variant holds between steps
                           (parameters, gradients, optimizer state)

Example:
    python scripts/bench_step.py --models efficientnetv2_rw_t,resnet18 --batch-size 64 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from bench_common import build_model, header, make_variant, quiet, step_memory, table

import qbackprop as qb

VARIANTS = {
    "fp32": None,
    "2-bit stochastic": "2bit-stochastic",
    "4-bit nearest": "4bit-nearest",
    "2/4 mix": "2/4-mix",
    "checkpoint per stage": "checkpoint",
}
MiB = 2**20


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


def peak_cuda_step(base: torch.nn.Module, how: str | None, x, y) -> tuple[int, int, int]:
    """(peak, resident, reserved) CUDA bytes of one steady-state step of this variant alone.

    The variant is built afresh with nothing else on the device: ``resident`` is what it holds
    between steps (parameters, gradients, optimizer state), ``peak`` the step's
    ``max_memory_allocated`` (resident + activations + temporaries), ``reserved`` its
    ``max_memory_reserved`` (peak plus what the caching allocator keeps cached)."""
    gc.collect()
    torch.cuda.empty_cache()
    model = make_variant(base, how)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step(model, opt, x, y)  # optimizer state, and what a first step learns
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(model, opt, x, y)
    return torch.cuda.max_memory_allocated(), resident, torch.cuda.max_memory_reserved()


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
        help="untimed steps first (allocations and caches settle; the sharing plan is made "
        "by convert_model, not by these steps)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--no-rss",
        action="store_true",
        help="CPU: skip the peak RSS columns (one fresh process per variant and model)",
    )
    args = parser.parse_args()
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header("training-step time, interleaved"))
    headers = CUDA_HEADERS if args.device.startswith("cuda") else CPU_HEADERS
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
        if x.is_cuda:
            mem = {k: peak_cuda_step(base, how, x, y) for k, how in VARIANTS.items()}
        elif not args.no_rss:
            mem = {k: rss_of(name, how, args) for k, how in VARIANTS.items()}
        else:
            mem = {}
        for k in VARIANTS:
            rows.append([
                name, k, f"{medians[k] * 1e3:.0f}", f"{medians[k] / medians['fp32']:.2f}x",
                f"{saved[k] / MiB:.1f}",
                *memory_cells(mem.get(k), None if k == "fp32" else mem.get("fp32"), x.is_cuda),
            ])  # fmt: skip
            print(table(rows[-1:], headers).splitlines()[-1], flush=True)
    print()
    print(table(rows, headers))


def rss_of(name: str, how: str | None, args) -> tuple[int, int] | None:
    """(peak RSS, RSS added) of the variant's first warmup + 1 steps, in a fresh process."""
    found = step_memory(
        name, how, args.batch_size, args.image_size, device=args.device, optimizer="adamw",
        steps=args.warmup + 1, threads=args.threads,
    )  # fmt: skip
    return None if found is None else (found.peak_rss, found.added)


def memory_cells(mem: tuple | None, fp32: tuple | None, cuda: bool) -> list[str]:
    if mem is None:
        return ["", ""] if not cuda else ["", "", ""]
    if cuda:
        peak, resident, reserved = mem
        return [f"{peak / MiB:.0f}", f"{reserved / MiB:.0f}", f"{(peak - resident) / MiB:.0f}"]
    peak, added = mem
    ratio = f" ({fp32[1] / max(added, 1):.1f}x less)" if fp32 is not None else ""
    return [f"{peak / MiB:.0f}", f"{added / MiB:.0f}{ratio}"]


HEADERS = ["model", "variant", "step ms (median)", "vs fp32", "saved activations MiB"]
CPU_HEADERS = [*HEADERS, "peak RSS MiB", "RSS added MiB"]
CUDA_HEADERS = [*HEADERS, "peak CUDA MiB", "CUDA reserved MiB", "peak above resident MiB"]

if __name__ == "__main__":
    main()
