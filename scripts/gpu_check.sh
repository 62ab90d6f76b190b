#!/usr/bin/env bash
# The prepared device check: one command, no Ray, no network, no checkpoint. On one H100/H200 it runs correctness
# (GPU fp16/bf16 vs CPU fp32, engine under concurrency vs alone), single-stream decode per precision against the HBM
# roofline, throughput at concurrency 1/8/32/64/128 (greedy and top_p 0.7) vs one request at a time, and GPU memory
# per precision, within 8 minutes. Results go to $OUT (else ./gpu_check_out) as gpu_check.json and gpu_check.md,
# rewritten after every section, so a failing or slow section does not lose the others.
#
#   scripts/gpu_check.sh                 # on the GPU machine (needs torch with CUDA; numpy/triton as torch wants)
#   scripts/gpu_check.sh --tiny-cpu      # every section on CPU with the tiny preset (what the tests run)
#   scripts/gpu_check.sh --sections decode,throughput
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PYTHON" -m serve_app.bench.gpu_check "$@"
