#!/usr/bin/env bash
# Live-stream sweep on one GPU: the real server with real model shapes (dummy weights) and the load generator.
#
#   bash benchmarks/h200_streams.sh start [SERVER ARGS]  # shapes-only split + dispider-serve in the background
#   bash benchmarks/h200_streams.sh sweep OUT.json 1 64 128 256
#   bash benchmarks/h200_streams.sh stop
#   bash benchmarks/h200_streams.sh start --blocking-reaction   # the blocking baseline, same sweep after it
#
# Random weights decide at random, so the server forces answers: each clip answers with probability 1/8
# (--respond-probability 0.125), independently per stream, as independent cameras would. (--respond-every 8 makes
# streams started within one clip all answer in the same 16 s, a burst of N reactions every 128 s; RESPOND=...
# overrides.) Frames are 320x240 JPEG at 1 fps of video time, paced in real time, DURATION s (default 160) a stream.
set -euo pipefail
WORK=${WORK:-/tmp/dispider-streams}
PORT=${PORT:-8000}
URL="http://127.0.0.1:$PORT"
mkdir -p "$WORK"

case "${1:-}" in
  start)
    shift
    [ -d "$WORK/split" ] || python3 -m dispider_vllm.checkpoint.dummy "$WORK/split" --shapes real
    # shellcheck disable=SC2086
    setsid nohup python3 -m serve --checkpoint "$WORK/split" --port "$PORT" ${RESPOND:---respond-probability 0.125} \
      --max-sessions 2048 --gpu-memory-utilization 0.55 --max-batch-clips 64 --default-max-tokens 64 \
      --sidecar-kv-slots 512 "$@" \
      > "$WORK/server.log" 2>&1 < /dev/null &
    for _ in $(seq 600); do
      sleep 1
      if curl -sf "$URL/health" > /dev/null; then echo "server up at $URL"; exit 0; fi
      pgrep -f "[p]ython3 -m serve --checkpoint $WORK/split" > /dev/null \
        || { echo "the server exited before it was up"; break; }  # instead of waiting out the 10 minutes
    done
    tail -50 "$WORK/server.log"; exit 1 ;;
  sweep)
    out=$2; shift 2
    python3 benchmarks/load_streams.py --url "$URL" --sweep "$@" --duration "${DURATION:-160}" --stagger 16 \
      --frame-size 320x240 --drain-timeout 60 --out "$out" ;;
  stop)
    pkill -f "python3 -m serve --checkpoint $WORK/split" || true ;;
  *)
    sed -n 2,12p "$0"; exit 2 ;;
esac
