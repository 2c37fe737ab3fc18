#!/usr/bin/env bash
# The thesis's bit-width sweep (1..32 bits, nearest and stochastic rounding), several seeds,
# then the plots. Meant for a machine with a GPU and the dataset on disk; 24 settings x SEEDS
# runs of 50 epochs each. Re-running it resumes unfinished runs and skips finished ones.
#
#   scripts/run_bit_sweep.sh [CONFIG] [SEEDS] [KEY=VALUE ...]
#   scripts/run_bit_sweep.sh configs/thesis_cifar100.yaml 3 train.amp=bf16
#   BITS=2,4,32 scripts/run_bit_sweep.sh configs/thesis_cifar10.yaml 1 train.epochs=5  # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/thesis_cifar10.yaml}
SEEDS=${2:-3}
shift $(( $# > 2 ? 2 : $# ))
BITS=${BITS:-1,2,3,4,5,6,7,8,12,16,24,32}
OUT=${OUT:-runs/bit_sweep-$(basename "$CONFIG" .yaml)}
PY=${PY:-.venv/bin/python}

"$PY" -m qbackprop sweep "$CONFIG" --out "$OUT" --bits "$BITS" \
    --rounding nearest,stochastic --seeds "$SEEDS" "$@"
"$PY" -m qbackprop plot "$OUT"
echo "summary: $OUT/summary.csv  plots: $OUT/plots/"
