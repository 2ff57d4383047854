#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one command, for a session lent a GPU (one
# H200 with JAX, optax and flax installed; no network). Run from the repository root:
#
#     bash benchmarks/gpu.sh [OUTDIR]            # OUTDIR defaults to $OUT, else ./gpu-results
#
# Each step has its own time limit so that the whole stays under ~9 minutes, and each writes its
# log to OUTDIR; copy the printed tables into benchmarks/RESULTS.md with the date, the GPU and the
# jax version (printed first).
#
# Dry run of the GPU modes on a CPU (kernels interpreted; times mean nothing), before spending
# GPU time: python benchmarks/bsr_matmul.py --device gpu --interpret --sizes 256
#           python benchmarks/attention.py --device gpu --interpret --seqs 512 --repeats 1
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

step env 60 python3 -c 'import jax, jaxlib, optax; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "optax", optax.__version__); print(jax.devices())'
step bsr_matmul 240 python3 benchmarks/bsr_matmul.py --device gpu
step attention 180 python3 benchmarks/attention.py --device gpu
step topology 90 python3 benchmarks/topology_update_cost.py --device gpu --method magnitude rigl set
