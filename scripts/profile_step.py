"""Where one training step's time goes: torch.profiler tables for one model and variant.

Runs warm-up steps, then profiles one step and prints the
operators by self time (CUDA time first on a GPU), the view to read before optimizing.

Example:
    python scripts/profile_step.py --model efficientnetv2_rw_t --variant 2bit-stochastic
"""

from __future__ import annotations

import argparse

import torch
from bench_common import build_model, header, quiet
from bench_step import make_variant, step
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="efficientnetv2_rw_t")
    parser.add_argument(
        "--variant", default="2bit-stochastic", help="a preset, 'checkpoint' or 'fp32'"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="steps before the profiled one")
    parser.add_argument("--rows", type=int, default=25, help="operators per table")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header(f"profile of one step: {args.model}, {args.variant}"))
    torch.manual_seed(0)
    base = build_model(args.model).to(args.device)
    model = make_variant(base, None if args.variant == "fp32" else args.variant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 10, (args.batch_size,), device=args.device)
    for _ in range(args.warmup):
        step(model, opt, x, y)
    cuda = x.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        seconds = step(model, opt, x, y)
    print(f"step: {seconds * 1e3:.0f} ms (profiled)")
    averages = prof.key_averages()
    for key in (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        print(f"\n## by {key}")
        print(averages.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
