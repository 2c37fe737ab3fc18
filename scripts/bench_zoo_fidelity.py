"""Gradient fidelity and saved-activation memory of the model zoo on the digits, per spec.

Each model is trained briefly at fp32 (cached with --cache), then ``qb.measure_fidelity`` gives
the variance ratio (compression noise on one batch / fp32 minibatch noise), the relative error
of the mean of the draws (bias) against the unbiased ideal, and ``measure_saved_activations``
the memory ratio (fp32 saved bytes / converted), all at the batch size given.

Example:
    python scripts/bench_zoo_fidelity.py --cache /tmp/zoo --draws 8
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch
from bench_common import build_model, header, quiet, table
from bench_fidelity import SPECS, batches, pretrain
from tqdm import tqdm

import qbackprop as qb
from qbackprop.train.data import DataSpec, build_datasets

CNN_ZOO = (
    "efficientnetv2_rw_t",
    "tf_efficientnetv2_b0",
    "resnet18",
    "resnet50",
    "mobilenetv3_large_100",
    "convnext_atto",
    "regnetx_002",
)
ZOO = (*CNN_ZOO, "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224")
# Transformers at the digits' 32x32: 4x4 patches (64 tokens), Swin with 4x4 windows.
MODEL_KWARGS = {
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 4},
}
HEADERS = ["model", "spec", "variance ratio", "bias (mean of K)", "ideal bias", "memory"]


def zoo_model(name: str, train, cache: str | None, steps: int, batch_size: int):
    """The zoo's model ``name`` trained ``steps`` fp32 steps on the digits, or its weights
    from ``cache`` (written there when missing)."""
    torch.manual_seed(0)
    model = build_model(name, drop_rate=0.0, drop_path_rate=0.0, **MODEL_KWARGS.get(name, {}))
    path = os.path.join(cache, f"{name}.pt") if cache else None
    if path and os.path.exists(path):
        model.load_state_dict(torch.load(path))
    else:
        pretrain(model, train, steps, batch_size)
        if path:
            os.makedirs(cache, exist_ok=True)
            torch.save(model.state_dict(), path)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--specs", default=",".join(SPECS), help="labels of bench_fidelity.SPECS")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--minibatches", type=int, default=16)
    parser.add_argument("--cache", help="folder for the fp32-trained weights (read/written)")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    quiet()
    print(header("gradient fidelity and memory of the zoo on digits"))
    train, _ = build_datasets(DataSpec("digits", augment=False))
    data = list(batches(train, args.batch_size, args.minibatches + 1, 1234))
    rows, results = [], []
    for name in args.models.split(","):
        model = zoo_model(name, train, args.cache, args.train_steps, args.batch_size)
        for label in tqdm(args.specs.split(","), desc=name, leave=False):
            cfg = {"default": SPECS[label]}
            rep = qb.measure_fidelity(model, cfg, data, draws=args.draws, by=None)
            converted = qb.convert_model(copy.deepcopy(model), cfg, example_input=data[0][0][:2])
            mem = qb.measure_saved_activations(converted, data[0][0])
            row = [name, label, f"{rep.ratio:.4g}", f"{rep.bias:.3g}", f"{rep.ideal_bias:.3g}",
                   f"{mem.ratio:.2f}x"]  # fmt: skip
            rows.append(row)
            results.append(dict(zip(HEADERS, row, strict=True)))
            tqdm.write(table([row], HEADERS).splitlines()[-1])
    print(table(rows, HEADERS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
