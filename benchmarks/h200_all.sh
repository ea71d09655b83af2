#!/usr/bin/env bash
# Every live-stream figure of one H200 session, one after the other, on one GPU (about 27 minutes):
#   1. ours: the server (h200_streams.sh start) and the sweep, N = 1 (the idle server) first;
#   2. blocking: the same server, sessions opened with "blocking_reaction": true (input held while answering);
#   3. plain vLLM serving the reaction LLM alone, under the same answer load (plain_vllm_bench.py);
#   4. two tenants, one flooding (h200_tenancy.sh).
#
#   setsid nohup bash benchmarks/h200_all.sh /tmp/h200 > /tmp/h200.log 2>&1 &    # then poll the log
#
# Each step writes its JSON into the results folder as soon as it ends, so a run cut short keeps what finished.
# Stream counts and durations: OURS_N, BLOCKING_N, PLAIN_N, DURATION (ours), BASE_DURATION (the others).
set -uo pipefail
RESULTS=${1:-/tmp/h200-results}
PORT=${PORT:-8000}
URL="http://127.0.0.1:$PORT"
mkdir -p "$RESULTS"
here=$(cd "$(dirname "$0")" && pwd)

say() { echo "[h200_all $(date +%T)] $*"; }
sweep() {  # sweep OUT DURATION [load_streams args...]
  local out=$1 duration=$2; shift 2
  python3 "$here/load_streams.py" --url "$URL" --duration "$duration" --stagger 16 --frame-size 320x240 \
    --drain-timeout 60 --out "$out" "$@"
}

say "ours: starting the server"
bash "$here/h200_streams.sh" start || exit 1
say "ours: sweep ${OURS_N:-1 128 256 320}"
# shellcheck disable=SC2086
sweep "$RESULTS/streams_h200.json" "${DURATION:-96}" --sweep ${OURS_N:-1 128 256 320}
say "blocking: sweep ${BLOCKING_N:-64 128 256} on the same server"
# shellcheck disable=SC2086
sweep "$RESULTS/streams_blocking_h200.json" "${BASE_DURATION:-64}" --blocking-reaction --no-warmup \
  --sweep ${BLOCKING_N:-64 128 256}
bash "$here/h200_streams.sh" stop
sleep 5
say "plain vLLM: ${PLAIN_N:-256 320} streams' answer load"
# shellcheck disable=SC2086
python3 "$here/plain_vllm_bench.py" --streams ${PLAIN_N:-256 320} --duration "${BASE_DURATION:-64}" \
  --out "$RESULTS/plain_vllm_h200.json"
say "tenancy: a light tenant alone, then beside a flooding one"
bash "$here/h200_tenancy.sh" "$RESULTS/tenancy_h200.json" --duration "${BASE_DURATION:-64}"
say "done"
