#!/usr/bin/env bash
# The CUDA checks in one pass, for a machine with a GPU (issues 6 and 12): the CUDA tests
# (Triton kernels compiled, not interpreted), a converted step under
# torch.cuda.set_sync_debug_mode("error"), training-step time and peak memory
# (efficientnetv2_s, batch 128, 224 px), the compiled step against compiled fp32, a profile
# of the 2-bit step, compress/decompress against clone().
# Each part has its own time limit and log; a failing part does not stop the next.
#
#   OUT=gpu_logs bash scripts/gpu_checks.sh         # logs under $OUT
#   SMALL=1 ...                                     # tiny sizes: check the script itself
set -u
OUT=${OUT:-gpu_logs}
PY=$(command -v "${PY:-python3}")
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute (not resolved: a venv's link)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${SMALL:-}" ]; then
  BIG="--batch-size 2 --image-size 64 --rounds 1"; SMALLM="--batch-size 4 --rounds 1"
  NUMEL=65536; PROFILE="--batch-size 2 --image-size 64"
else
  BIG="--batch-size 128 --image-size 224 --rounds 5"; SMALLM="--rounds 5"
  NUMEL=16777216; PROFILE="--batch-size 128 --image-size 224"
fi

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name: rc $?"
  tail -n 25 "$OUT/$name.log"
}

{ nvidia-smi; "$PY" -c "import torch, timm, brevitas; print(torch.__version__, timm.__version__,
  brevitas.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} >"$OUT/env.log" 2>&1
tail -n 1 "$OUT/env.log"
part cuda_tests 150 env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider -k cuda tests
part sync_debug 60 "$PY" -c "
import torch, timm, qbackprop as qb
m = qb.convert_model(timm.create_model('efficientnetv2_rw_t', num_classes=10), '2bit-stochastic').cuda()
x = torch.randn(32, 3, 128, 128, device='cuda')
m(x).sum().backward()  # warm-up (allocations, kernel compiles)
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode('error')
for _ in range(2):
    m(x).sum().backward()
torch.cuda.set_sync_debug_mode(0)
print('sync debug mode error: silent through 2 converted steps')"
cd scripts
part step_effnetv2_s 150 "$PY" bench_step.py --models efficientnetv2_s $BIG
part compile_effnetv2_s 200 "$PY" bench_compile.py --models efficientnetv2_s $BIG
part profile_effnetv2_s 70 "$PY" profile_step.py --model efficientnetv2_s $PROFILE --rows 30
part compress 45 "$PY" bench_compress.py --numel $NUMEL --bits 2 4
cd ..
echo "=== done $(date +%T)"
