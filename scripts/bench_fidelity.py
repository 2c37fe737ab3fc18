"""Gradient fidelity of compressed backward on real data (scikit-learn digits, 32x32, 3 ch).

A timm model is trained briefly at fp32, then for one batch the gradient of the converted
model is drawn several times (stochastic rounding) and compared with the exact gradient:

    ratio = E||g_q - g||^2 (compression noise on one batch)
            / E||g_b - mean(g)||^2 (fp32 gradient noise across minibatches of the same size)

A ratio of 0.1 means compression adds a tenth of the noise SGD already lives with.
bias/noise = ||mean_k g_q - g||^2 / (E||g_q - g||^2 / K) is ~1 for an unbiased estimator
(the mean of K draws approaches g) and >> 1 for a biased one; "rel. error of the mean" is
||mean_k g_q - g|| / ||g|| (with --draws 32: how close the mean of 32 draws comes to g).

Example:
    python scripts/bench_fidelity.py --train-steps 150 --draws 16 --families
    python scripts/bench_fidelity.py --zoo --cache /tmp/zoo   # every model of the zoo
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time

import torch
from bench_common import build_model, header, quiet, table
from tqdm import tqdm

import qbackprop as qb
from qbackprop.config import FAMILIES
from qbackprop.train.data import DataSpec, build_datasets

SPECS = {
    "8-bit nearest": {"bits": 8, "rounding": "nearest"},
    "4-bit nearest": {"bits": 4, "rounding": "nearest"},
    "4-bit stochastic": {"bits": 4, "rounding": "stochastic"},
    "2-bit stochastic": {"bits": 2, "rounding": "stochastic"},
}
VARIANTS = {  # --variants: other layouts at 2 bits, for the design notes
    "2-bit stochastic, channel buckets": {"bits": 2, "bucket_layout": "channel"},
    "2-bit stochastic, bucket 128": {"bits": 2, "bucket_size": 128},
    "2/4 mix p=0.5": {"bits": 2, "mix_bits": 4, "mix_prob": 0.5},
    "2-bit stochastic, share off": {"bits": 2, "share": False},
}


def flat_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def batches(dataset, batch_size: int, count: int, seed: int):
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    for i in range(count):
        idx = order[i * batch_size : (i + 1) * batch_size]
        xs, ys = zip(*(dataset[int(j)] for j in idx), strict=True)
        yield torch.stack(xs), torch.tensor(ys)


def pretrain(model, dataset, steps: int, batch_size: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    epochs = steps * batch_size // len(dataset) + 1
    it = (
        b
        for e in range(epochs)
        for b in batches(dataset, batch_size, len(dataset) // batch_size, e)
    )
    for _ in tqdm(range(steps), desc="fp32 pre-training", leave=False):
        x, y = next(it)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def as_config(spec: dict) -> dict:
    """A ``quant:`` section from a spec whose optional ``share`` key is a config flag."""
    spec = dict(spec)
    share = spec.pop("share", True)
    return {"default": spec, "share": share}


def family_only(spec: dict, family: str | None) -> dict:
    """Compress only one layer family (or only the fallback when family is None)."""
    others = [f for f in FAMILIES if f != family]
    rules = [{"match": "*", "type": others, "enabled": False}] if others else []
    return {"default": spec, "layers": rules, "fallback": family is None, "allow_unmatched": True}


def measure(model, cfg, x, y, exact, draws: int, minibatch_var: float) -> dict:
    qmodel = qb.convert_model(copy.deepcopy(model), cfg)
    # The first step learns which BatchNorm outputs are shared (as in training): not counted.
    flat_grad(qmodel, x, y)
    total_sq, mean = 0.0, torch.zeros_like(exact)
    for _ in range(draws):
        g = flat_grad(qmodel, x, y)
        total_sq += (g - exact).square().sum().item()
        mean += g / draws
    noise = total_sq / draws
    bias_sq = (mean - exact).square().sum().item()
    return {
        "ratio": noise / minibatch_var,
        "rel_error": (noise / exact.square().sum().item()) ** 0.5,
        "bias_over_noise": bias_sq / (noise / draws) if noise else float("nan"),
        "mean_rel_error": (bias_sq / exact.square().sum().item()) ** 0.5,
        "cosine": (
            mean.double() @ exact.double() / (mean.double().norm() * exact.double().norm())
        ).item(),
    }


def main() -> None:
    if "--zoo" in sys.argv:  # the zoo table: bench_zoo_fidelity.py takes the other options
        import bench_zoo_fidelity

        sys.argv.remove("--zoo")
        bench_zoo_fidelity.main()
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="efficientnetv2_rw_t")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--draws", type=int, default=16, help="stochastic draws per spec")
    parser.add_argument("--minibatches", type=int, default=16, help="for the fp32 variance")
    parser.add_argument("--families", action="store_true", help="also per-family contributions")
    parser.add_argument("--family-specs", default="2-bit stochastic,4-bit stochastic")
    parser.add_argument("--variants", action="store_true", help="also other 2-bit layouts")
    parser.add_argument("--pretrained", help="cache of the fp32-trained weights (read/written)")
    parser.add_argument("--csv", help="write the table as CSV")
    parser.add_argument("--json", help="write the results as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    print(header("gradient fidelity on digits"))
    torch.manual_seed(args.seed)
    train, _ = build_datasets(DataSpec("digits", augment=False))
    model = build_model(args.model, drop_rate=0.0, drop_path_rate=0.0)
    start = time.perf_counter()
    if args.pretrained and os.path.exists(args.pretrained):
        model.load_state_dict(torch.load(args.pretrained))
    else:
        pretrain(model, train, args.train_steps, args.batch_size)
        if args.pretrained:
            torch.save(model.state_dict(), args.pretrained)

    grads = [
        flat_grad(model, x, y) for x, y in batches(train, args.batch_size, args.minibatches, 99)
    ]
    stacked = torch.stack(grads)
    minibatch_var = (stacked - stacked.mean(0)).square().sum(1).mean().item()
    del stacked, grads
    x, y = next(batches(train, args.batch_size, 1, 1234))
    exact = flat_grad(model, x, y)

    specs = {**SPECS, **(VARIANTS if args.variants else {})}
    jobs = [(label, "all", as_config(spec)) for label, spec in specs.items()]
    if args.families:
        for label in args.family_specs.split(","):
            for fam in [*FAMILIES, None]:
                jobs.append((label, fam or "fallback", family_only(SPECS[label], fam)))
    rows, results = [], []
    for label, scope, cfg in tqdm(jobs, desc="specs", leave=False):
        r = measure(model, cfg, x, y, exact, args.draws, minibatch_var)
        results.append({"spec": label, "compressed": scope, **r})
        rows.append([label, scope, f"{r['ratio']:.4g}", f"{r['rel_error']:.3g}",
                     f"{r['bias_over_noise']:.2f}", f"{r['mean_rel_error']:.3g}",
                     f"{r['cosine']:.5f}"])  # fmt: skip
        tqdm.write(table(rows[-1:], HEADERS).splitlines()[-1])
    print(f"\nmodel {args.model}, batch {args.batch_size}, {args.train_steps} fp32 steps, "
          f"{args.draws} draws, minibatch variance {minibatch_var:.4g}, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    print(table(rows, HEADERS))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HEADERS)
            writer.writerows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


HEADERS = [
    "spec",
    "compressed",
    "variance ratio",
    "rel. error (1 draw)",
    "bias/noise",
    "rel. error of the mean",
    "cosine(mean, exact)",
]

if __name__ == "__main__":
    main()
