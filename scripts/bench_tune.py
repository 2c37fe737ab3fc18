"""``qb.tune`` against uniform widths at the same measured bytes, on the digits (32 px).

For each model (trained briefly at fp32, cached with --cache) and each uniform spec: the bytes
the uniform spec keeps (``measure_saved_activations``) become the budget; ``qb.tune`` chooses
per-layer bits within it; both are measured with ``qb.measure_fidelity`` (same batches, draws).
Columns: the uniform and tuned variance ratios, tuned/uniform, the tuned bytes against the
budget, the tune's wall and CPU seconds (the whole process; other jobs on the machine slow
the wall clock, not the CPU seconds).

Example:
    python scripts/bench_tune.py --cache /work/cache --models resnet18,efficientnetv2_rw_t
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from bench_common import header, quiet, table
from bench_fidelity import batches
from bench_zoo_fidelity import zoo_model

import qbackprop as qb
from qbackprop.train.data import DataSpec, build_datasets
from qbackprop.tune import Budget, MiB

SPECS = {"2-bit stochastic": "2bit-stochastic", "4-bit stochastic": "4bit-stochastic"}
HEADERS = ["model", "bytes of", "uniform ratio", "tuned ratio", "tuned/uniform",
           "predicted (stored widths)", "predicted (GACT 4^-b)", "tuned MiB / budget",
           "tune wall s", "tune CPU s"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="efficientnetv2_rw_t,resnet18,mobilenetv3_large_100")
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--draws", type=int, default=8, help="draws of each measured ratio")
    parser.add_argument("--cache", help="folder of fp32-trained weights (bench_zoo_fidelity's)")
    parser.add_argument("--tune-draws", type=int, default=1, help="qb.tune's draws per layer")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    quiet()
    print(header("qb.tune vs uniform widths at the same bytes, digits"))
    train, _ = build_datasets(DataSpec("digits", augment=False))
    data = list(batches(train, args.batch_size, 17, 1234))
    rows = []
    for name in args.models.split(","):
        model = zoo_model(name, train, args.cache, 150, args.batch_size)
        for label in args.specs.split(","):
            preset = SPECS[label]
            uniform = qb.convert_model(copy.deepcopy(model), preset, example_input=data[0][0][:2])
            budget = qb.measure_saved_activations(uniform, data[0][0]).stored_bytes
            ref = qb.measure_fidelity(model, preset, data, draws=args.draws, by=None)
            wall, cpu = time.perf_counter(), time.process_time()
            result = qb.tune(
                model,
                preset,
                data,
                Budget("mib", budget / MiB),
                draws=args.tune_draws,
                fidelity_draws=0,
            )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            tuned = qb.measure_fidelity(model, result.config, data, draws=args.draws, by=None)
            # the two noise models: widths read off the measured bytes (what tune uses) and
            # GACT's closed form on the spec's bits
            var = tuned.minibatch_variance
            stored = sum(c.predicted_noise for c in result.layers) / var
            gact = sum(c.sensitivity * 4.0 ** (2 - c.average_bits) for c in result.layers) / var
            row = [name, label, f"{ref.ratio:.4g}", f"{tuned.ratio:.4g}",
                   f"{tuned.ratio / ref.ratio:.2f}", f"{stored:.3g}", f"{gact:.3g}",
                   f"{result.measured_bytes / budget:.3f}",
                   f"{wall:.0f}", f"{cpu:.0f}"]  # fmt: skip
            rows.append(row)
            print(table([row], HEADERS).splitlines()[-1], flush=True)
    print(table(rows, HEADERS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(HEADERS, r, strict=True)) for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
