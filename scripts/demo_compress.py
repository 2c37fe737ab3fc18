"""Compress the activations EfficientNetV2 saves for backward and report bytes and error.

One training-mode forward pass of a randomly initialised timm model collects every tensor
autograd saves for backward (parameters, buffers and non-float tensors left out, one entry per
storage); each is then compressed with ``qb.compress`` at several bit widths, with nearest and
stochastic rounding, and decompressed to measure the error against the original.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import timm
import torch
from tqdm import tqdm

import qbackprop as qb

MIB = 2**20
EPILOG = """columns:
  fp32 MiB      bytes of the distinct saved storages as autograd holds them (fp32)
  packed MiB    CompressedTensor.nbytes summed: codes + per-bucket metadata (+ side tables)
  ratio         fp32 bytes / packed bytes
  bits/elem     8 * packed bytes / elements
  mean err      sum |x~ - x| / sum |x|, over every saved element
  max err       max |x~ - x| / max |x|, worst saved tensor
  bias          sum (x~ - x) / sum |x|; stochastic: mean over --draws independent draws

examples:
  python scripts/demo_compress.py
  python scripts/demo_compress.py --batch-size 8 --image-size 64 --bits 2 4
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the line breaks of the description and epilog; shows defaults."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run one training-mode forward pass of a timm model (random init), collect\n"
        "the activations autograd saves for backward, compress them with qbackprop at\n"
        "several bit widths (nearest and stochastic rounding), and print bytes, ratio\n"
        "and error of each.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", default="efficientnetv2_rw_t", help="timm model name")
    parser.add_argument("--num-classes", type=int, default=10, help="classifier outputs")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--image-size", type=int, default=32, help="square input side, pixels")
    parser.add_argument(
        "--bits", type=int, nargs="+", default=[1, 2, 3, 4, 8], help="bit widths to compare"
    )
    parser.add_argument("--bucket-size", type=int, default=512, help="elements per scale")
    parser.add_argument(
        "--draws", type=int, default=3, help="stochastic draws averaged for the bias column"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, input, rounding")
    parser.add_argument(
        "--threads",
        type=int,
        default=argparse.SUPPRESS,
        help="torch intra-op threads (default: torch's own choice; 1 is faster on a busy machine)",
    )
    args = parser.parse_args(argv)
    for name in ("batch_size", "image_size", "bucket_size", "draws", "num_classes", "threads"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(not 1 <= b <= 32 for b in args.bits):
        parser.error(f"--bits {args.bits}: each must be in 1..32 (32 = full precision)")
    return args


def collect_saved_activations(model: torch.nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """The float tensors autograd saves for backward in one forward pass, one per storage.

    Parameters and buffers are left out (they are kept for the optimizer anyway); when several
    saved tensors share a storage, the largest view stands for it.
    """
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    by_storage: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in excluded and t.is_floating_point():
            kept = by_storage.get(key)
            if kept is None or t.numel() > kept.numel():
                by_storage[key] = t.detach()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs)
    return list(by_storage.values())


@dataclass
class Row:
    """One line of the table: a spec's totals over every saved tensor."""

    bits: int
    rounding: str
    fp32_bytes: int
    packed_bytes: int
    numel: int
    mean_err: float
    max_err: float
    bias: float

    def cells(self) -> list[str]:
        return [
            str(self.bits),
            self.rounding,
            f"{self.fp32_bytes / MIB:.2f}",
            f"{self.packed_bytes / MIB:.2f}",
            f"{self.fp32_bytes / self.packed_bytes:.2f}x",
            f"{8 * self.packed_bytes / self.numel:.3f}",
            f"{self.mean_err:.2e}",
            f"{self.max_err:.2e}",
            f"{self.bias:+.2e}",
        ]


HEADER = ["bits", "rounding", "fp32 MiB", "packed MiB", "ratio", "bits/elem"]
HEADER += ["mean err", "max err", "bias"]


def measure(
    tensors: list[torch.Tensor],
    spec: qb.QuantSpec,
    draws: int,
    generator: torch.Generator,
    progress: tqdm,
) -> Row:
    """Compress every tensor ``draws`` times with ``spec`` and total bytes and errors."""
    abs_sum = sum(float(t.abs().sum(dtype=torch.float64)) for t in tensors)
    peaks = [float(t.abs().max()) for t in tensors]
    packed_bytes = 0
    err_sum = signed_sum = max_err = 0.0
    for draw in range(draws):
        for t, peak in zip(tensors, peaks, strict=True):
            ct = qb.compress(t, spec, generator=generator)
            if draw == 0:
                packed_bytes += ct.nbytes
            err = ct.decompress() - t  # out of place: bits=32 hands back ``t`` itself
            signed_sum += float(err.sum(dtype=torch.float64))
            err = err.abs_()
            err_sum += float(err.sum(dtype=torch.float64))
            if peak > 0:
                max_err = max(max_err, float(err.max()) / peak)
        progress.update(1)
    return Row(
        bits=spec.bits,
        rounding=spec.rounding.value,
        fp32_bytes=sum(t.numel() * t.element_size() for t in tensors),
        packed_bytes=packed_bytes,
        numel=sum(t.numel() for t in tensors),
        mean_err=err_sum / draws / abs_sum,
        max_err=max_err,
        bias=signed_sum / draws / abs_sum,
    )


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Rows as aligned columns: text left, numbers right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        text, numbers = cells[:2], cells[2:]
        left = [c.ljust(w) for c, w in zip(text, widths[:2], strict=True)]
        right = [c.rjust(w) for c, w in zip(numbers, widths[2:], strict=True)]
        return "  ".join(left + right)

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    model.train()
    inputs = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    saved = collect_saved_activations(model, inputs)
    numel = sum(t.numel() for t in saved)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"{args.model} (random init, {args.num_classes} classes), training-mode forward on "
        f"{tuple(inputs.shape)}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print(
        f"saved for backward: {len(saved)} float storages, {numel:,} elements, "
        f"{saved_bytes / MIB:.2f} MiB as fp32"
    )
    print(f"(parameters, {param_bytes / MIB:.2f} MiB, are held anyway and not counted)")
    print(f"bucket {args.bucket_size}, minmax scale; stochastic bias over {args.draws} draws\n")

    generator = torch.Generator().manual_seed(args.seed)
    specs = [
        qb.QuantSpec(bits=b, rounding=r, bucket_size=args.bucket_size)
        for b in args.bits
        for r in ("nearest", "stochastic")
    ]
    # Nearest rounding is deterministic: one pass; stochastic: --draws passes for the bias.
    draws = [args.draws if s.rounding.value == "stochastic" else 1 for s in specs]
    rows = []
    # Shown only on a terminal and only once it has run for 2 s.
    bar = tqdm(total=sum(draws), desc="compress", unit="pass", delay=2, leave=False, disable=None)
    with bar:
        for spec, n in zip(specs, draws, strict=True):
            rows.append(measure(saved, spec, n, generator, bar).cells())
    print(format_table(HEADER, rows))
    print(f"\n({time.perf_counter() - start:.1f} s; see --help for what each column means)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
