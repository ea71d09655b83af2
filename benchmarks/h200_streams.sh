#!/usr/bin/env bash
# Live-stream sweep on one GPU: the real server with real model shapes (dummy weights) and the load generator.
#
#   bash benchmarks/h200_streams.sh start              # shapes-only split + dispider-serve in the background
#   bash benchmarks/h200_streams.sh sweep OUT.json 64 128 256
#   bash benchmarks/h200_streams.sh stop
#
# The server forces an answer every 8th clip of each stream (--respond-every 8): random weights would otherwise
# answer at random. Frames are 320x240 JPEG at 1 fps of video time, paced in real time, 160 s (10 clips) a
# stream, so each stream gets an answer at its 8th clip.
set -euo pipefail
WORK=${WORK:-/tmp/dispider-streams}
PORT=${PORT:-8000}
URL="http://127.0.0.1:$PORT"
mkdir -p "$WORK"

case "${1:-}" in
  start)
    python3 -m dispider_vllm.checkpoint.dummy "$WORK/split" --shapes real
    setsid nohup python3 -m serve --checkpoint "$WORK/split" --port "$PORT" --respond-every 8 \
      --max-sessions 2048 --gpu-memory-utilization 0.55 --max-batch-clips 64 --default-max-tokens 64 \
      > "$WORK/server.log" 2>&1 < /dev/null &
    for _ in $(seq 600); do
      if curl -sf "$URL/health" > /dev/null; then echo "server up at $URL"; exit 0; fi
      sleep 1
    done
    tail -50 "$WORK/server.log"; exit 1 ;;
  sweep)
    out=$2; shift 2
    python3 benchmarks/load_streams.py --url "$URL" --sweep "$@" --duration "${DURATION:-160}" --stagger 16 \
      --frame-size 320x240 --drain-timeout 60 --out "$out" ;;
  stop)
    pkill -f "python3 -m serve --checkpoint $WORK/split" || true ;;
  *)
    sed -n 2,9p "$0"; exit 2 ;;
esac
