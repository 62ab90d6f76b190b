#!/usr/bin/env bash
# The prepared device check: one command, no Ray, no network, no checkpoint (serve_app/bench/gpu_check.py says what
# each section measures). Results go to $OUT (else ./gpu_check_out) as gpu_check.json and gpu_check.md, rewritten
# with every figure; the run budgets itself (--budget-s, 420 s by default) and skips what no longer fits, and the
# timeout below sends SIGTERM, which the check answers by writing what it has and exiting 124 (SIGKILL 15 s later).
#
#   scripts/gpu_check.sh                 # on the GPU machine (needs torch with CUDA and triton)
#   scripts/gpu_check.sh --tiny-cpu      # every section on CPU with the tiny preset (what the tests run)
#   scripts/gpu_check.sh --sections smoke,decode_fp16
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec timeout -k 15 -s TERM "${GPU_CHECK_TIMEOUT_S:-470}" "$PYTHON" -m serve_app.bench.gpu_check "$@"
