#!/usr/bin/env bash
# The thesis's layer-sensitivity study: one block (stem, blocks.N, head, classifier) at a time
# at BITS (default 4), every other block at full precision, plus an all-fp32 reference; several
# seeds, then the plots. Meant for a machine with a GPU and the dataset on disk. Re-running it
# resumes unfinished runs and skips finished ones.
#
#   scripts/run_layer_sweep.sh [CONFIG] [SEEDS] [KEY=VALUE ...]
#   BITS=2,4 scripts/run_layer_sweep.sh configs/thesis_cifar10.yaml 2 quant.default.rounding=nearest
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/thesis_cifar10.yaml}
SEEDS=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
BITS=${BITS:-4}
OUT=${OUT:-runs/layer_sweep-$(basename "$CONFIG" .yaml)}
PY=${PY:-.venv/bin/python}

"$PY" -m qbackprop sweep "$CONFIG" --out "$OUT" --layers --bits "$BITS" --seeds "$SEEDS" "$@"
"$PY" -m qbackprop plot "$OUT"
echo "summary: $OUT/summary.csv  plots: $OUT/plots/"
