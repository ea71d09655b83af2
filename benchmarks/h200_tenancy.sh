#!/usr/bin/env bash
# Two tenants on one GPU: a light tenant (4 live streams) alone, then next to a flood tenant (192 streams),
# through the real server with real model shapes (dummy weights). The benchmark starts and stops its own server
# (with its own tenants file): stop the sweep's server first (bash benchmarks/h200_streams.sh stop).
#
#   bash benchmarks/h200_tenancy.sh                                          # -> results/tenancy_h200.json
#   FLOOD_MODE=upload bash benchmarks/h200_tenancy.sh benchmarks/results/tenancy_h200_upload.json
#   bash benchmarks/h200_tenancy.sh OUT.json --light-streams 8              # more arguments for tenancy_bench.py
#
# Server flags as in h200_streams.sh; answers forced on a random quarter of the clips (RESPOND=... overrides):
# see the docstring of benchmarks/tenancy_bench.py for why not --respond-every.
set -euo pipefail
WORK=${WORK:-/tmp/dispider-streams}
OUT=${1:-benchmarks/results/tenancy_h200.json}
shift || true

[ -d "$WORK/split" ] || python3 -m dispider_vllm.checkpoint.dummy "$WORK/split" --shapes real
# shellcheck disable=SC2086
python3 benchmarks/tenancy_bench.py --flood-mode "${FLOOD_MODE:-push}" --frame-size 320x240 --drain-timeout 60 \
  --out "$OUT" "$@" -- \
  --checkpoint "$WORK/split" ${RESPOND:---respond-probability 0.25} --max-sessions 2048 \
  --gpu-memory-utilization 0.55 --max-batch-clips 64 --default-max-tokens 64
