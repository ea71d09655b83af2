#!/usr/bin/env bash
# The figures of one H200 session, one after the other, on one GPU (about 45 minutes with every step):
#   graphs:    the sidecar's small-batch steps with CUDA graphs vs eager, and their outputs compared (graph_bench.py);
#   sidecar:   sidecar capacity vs reference-style perception+decision, fused kernels on and off (sidecar_bench.py);
#   reference: the reference-style computation with its blocking reaction (reference_bench.py);
#   frames:    what a clip's close leaves to do with the CLIP tower run per clip at the close vs per frame as frames
#              arrive (--frame-perception clip / arrival), outputs compared (frame_perception_bench.py);
#   preprocess: the sidecar with clips preprocessed on the host vs as uint8 frames preprocessed on the GPU
#              (sidecar_bench.py --compare-frames; --preprocess-on device, the server's default on a GPU);
#   fp8:       the sidecar with and without FP8 matmuls (sidecar_bench.py --compare-fp8), plain vLLM's burst ceiling
#              in bf16 and with --quantization fp8, and the capacity bound of each pair (capacity_bound.py);
#   burst:     the reaction's throughput ceiling: plain vLLM, BURST_N answers at once (plain_vllm_bench.py --arrivals
#              burst), then the one-GPU capacity bound from it and the sidecar's ceiling (capacity_bound.py);
#   mps:       the same server and sweep (MPS_N) under a CUDA MPS daemon started for it and stopped after: the
#              sidecar's and vLLM's kernels run side by side, vLLM's at below-normal priority (--reaction-mps-priority);
#   ours:      the server (h200_streams.sh start) and the live sweep, N = 1 (the idle server) first, time-sliced;
#   blocking:  the same server, sessions opened with "blocking_reaction": true (input held while answering);
#   plain:     plain vLLM serving the reaction LLM alone, under the same answer load (plain_vllm_bench.py);
#   tenancy:   two tenants, one flooding (h200_tenancy.sh);
#   summary:   streams_h200.json: the sweep (mps's, else ours') with the largest real-time N of each system of this
#              run (blocking, plain vLLM, reference-style) and the three targets judged (streams_summary.py).
#
#   setsid nohup bash benchmarks/h200_all.sh /tmp/h200 > /tmp/h200.log 2>&1 &    # then poll the log
#   STEPS="ours blocking" OURS_N="1 256 384" bash benchmarks/h200_all.sh /tmp/h200   # some steps only
#
# Each step writes its JSON into the results folder as soon as it ends, so a run cut short keeps what finished.
# Stream counts and durations: OURS_N, MPS_N, BLOCKING_N, PLAIN_N, DURATION (ours, mps), BASE_DURATION (the others);
# MPS_SERVER_ARGS: more server options for the mps step (e.g. --reaction-mps-priority normal), MPS_OUT its report's
# name (default streams_mps_h200.json), MPS_BLOCKING_N a blocking sweep on the mps step's server after its own, as
# long as its (MPS_BLOCKING_OUT, default streams_mps_blocking_h200.json), MPS_LOAD_ARGS more load_streams.py options
# (e.g. --client-pool shared),
# SAMPLE_HOST=1 samples the GPU's and the host's use during its sweep (nvidia-smi
# dmon, vmstat, top, into samples_mps/ with host_samples.py's summary.json);
# MAX_TOKENS (answer length of ours and blocking, default 32).
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

STEPS=" ${STEPS:-sidecar reference mps ours blocking plain tenancy summary} "
wants() { [[ "$STEPS" == *" $1 "* ]]; }

if wants graphs; then
  say "graphs: the sidecar's small-batch steps, CUDA graphs vs eager"
  if ! python3 "$here/graph_bench.py" --out "$RESULTS/graph_h200.json"; then
    say "graphs: graph_bench failed (see above): the steps after this one run with DISPIDER_CUDA_GRAPHS=0"
    export DISPIDER_CUDA_GRAPHS=0
  fi
fi
if wants sidecar; then
  say "sidecar: capacity, fused kernels on and off, vs reference-style perception+decision"
  python3 "$here/sidecar_bench.py" --streams 512 --rounds 4 --history 8 --batch 64 --measure-preprocess \
    --compare-unfused --profile "$RESULTS/sidecar_profile_h200.txt" --out "$RESULTS/sidecar_h200.json"
fi
if wants reference; then
  say "reference: reference-style computation with its blocking reaction"
  python3 "$here/reference_bench.py" --out "$RESULTS/reference_h200.json"
fi
if wants frames; then
  say "frames: a clip's close with the CLIP tower per clip vs per frame on arrival"
  python3 "$here/frame_perception_bench.py" --out "$RESULTS/frame_perception_h200.json"
fi
if wants preprocess; then
  say "preprocess: the sidecar with preprocessed clips vs clips of frames preprocessed on the GPU"
  python3 "$here/sidecar_bench.py" --streams 512 --rounds 4 --history 8 --batch 64 --compare-frames \
    --measure-preprocess --out "$RESULTS/sidecar_frames_h200.json"
fi
if wants fp8; then
  say "fp8: the sidecar in bf16 and fp8; plain vLLM's burst ceiling in bf16 and fp8 (${BURST_N:-64 256} answers)"
  python3 "$here/sidecar_bench.py" --streams 512 --rounds 4 --history 8 --batch 64 --compare-fp8 \
    --out "$RESULTS/sidecar_fp8_h200.json"
  for precision in bf16 fp8; do
    quantization=(); [[ $precision == fp8 ]] && quantization=(--quantization fp8)
    # shellcheck disable=SC2086
    python3 "$here/plain_vllm_bench.py" --arrivals burst --streams ${BURST_N:-64 256} "${quantization[@]}" \
      --out "$RESULTS/plain_vllm_burst_${precision}_h200.json"
  done
  reference=$RESULTS/reference_h200.json; [[ -f $reference ]] || reference=$here/results/reference_h200.json
  python3 "$here/capacity_bound.py" --sidecar "$RESULTS/sidecar_fp8_h200.json" --sidecar-run ours \
    --reaction "$RESULTS/plain_vllm_burst_bf16_h200.json" --reference "$reference" \
    --out "$RESULTS/capacity_bound_bf16_h200.json"
  python3 "$here/capacity_bound.py" --sidecar "$RESULTS/sidecar_fp8_h200.json" --sidecar-run ours_fp8 \
    --reaction "$RESULTS/plain_vllm_burst_fp8_h200.json" --reference "$reference" \
    --out "$RESULTS/capacity_bound_fp8_h200.json"
fi
if wants burst; then
  say "burst: the reaction's throughput ceiling, ${BURST_N:-64 256} answers at once"
  # shellcheck disable=SC2086
  python3 "$here/plain_vllm_bench.py" --arrivals burst --streams ${BURST_N:-64 256} \
    --out "$RESULTS/plain_vllm_burst_h200.json"
  # The sidecar's and the reference's figures of this run where it made them, else the committed ones.
  pick() { if [[ -f "$RESULTS/$1" ]]; then echo "$RESULTS/$1"; else echo "$here/results/$1"; fi; }
  python3 "$here/capacity_bound.py" --sidecar "$(pick sidecar_h200.json)" --reaction "$RESULTS/plain_vllm_burst_h200.json" \
    --reference "$(pick reference_h200.json)" --ours "$(pick streams_mps_h200.json)" --out "$RESULTS/capacity_bound_h200.json"
fi
if wants mps; then
  if ! command -v nvidia-cuda-mps-control > /dev/null; then
    say "mps: no nvidia-cuda-mps-control on this host: skipped"
  else
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/dispider-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/dispider-mps/log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    stop_mps() { echo quit | nvidia-cuda-mps-control; }
    trap stop_mps EXIT  # a daemon left behind would put every later CUDA process of this host under MPS
    nvidia-cuda-mps-control -d
    say "mps: MPS daemon up; server and sweep ${MPS_N:-1 256 384 448 512}"
    # shellcheck disable=SC2086
    if bash "$here/h200_streams.sh" start ${MPS_SERVER_ARGS:-}; then
      nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv || true
      samplers=()
      if [[ -n "${SAMPLE_HOST:-}" ]]; then  # one line a second (top: every 10 s), for the whole sweep
        nvidia-smi dmon -s u -d 1 > "$RESULTS/dmon_mps.txt" 2>&1 & samplers+=($!)
        vmstat -t 1 > "$RESULTS/vmstat_mps.txt" 2>&1 & samplers+=($!)
        top -b -d 10 -w 200 > "$RESULTS/top_mps.txt" 2>&1 & samplers+=($!)
      fi
      # shellcheck disable=SC2086
      sweep "$RESULTS/${MPS_OUT:-streams_mps_h200.json}" "${DURATION:-96}" --max-tokens "${MAX_TOKENS:-32}" ${MPS_LOAD_ARGS:-} --sweep ${MPS_N:-1 256 384 448 512}
      if [[ -n "${MPS_BLOCKING_N:-}" ]]; then
        say "mps: blocking sweep $MPS_BLOCKING_N on the same server"
        # shellcheck disable=SC2086
        sweep "$RESULTS/${MPS_BLOCKING_OUT:-streams_mps_blocking_h200.json}" "${DURATION:-96}" \
          --max-tokens "${MAX_TOKENS:-32}" ${MPS_LOAD_ARGS:-} --blocking-reaction --no-warmup --sweep $MPS_BLOCKING_N
      fi
      if [[ ${#samplers[@]} -gt 0 ]]; then
        kill "${samplers[@]}" 2> /dev/null || true
        mkdir -p "$RESULTS/samples_mps"
        mv "$RESULTS/dmon_mps.txt" "$RESULTS/vmstat_mps.txt" "$RESULTS/top_mps.txt" "$RESULTS/samples_mps/"
        python3 "$here/host_samples.py" "$RESULTS/samples_mps" --out "$RESULTS/samples_mps/summary.json" || true
      fi
      bash "$here/h200_streams.sh" stop
      sleep 5
    fi
    tail -5 "$CUDA_MPS_LOG_DIRECTORY/server.log" 2>/dev/null || true
    stop_mps; trap - EXIT
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    sleep 2
  fi
fi
if wants ours || wants blocking; then
  say "ours: starting the server"
  bash "$here/h200_streams.sh" start || exit 1
fi
if wants ours; then
  say "ours: sweep ${OURS_N:-1 128 256 320}"
  # shellcheck disable=SC2086
  sweep "$RESULTS/streams_timesliced_h200.json" "${DURATION:-96}" --max-tokens "${MAX_TOKENS:-32}" --sweep ${OURS_N:-1 128 256 320}
fi
if wants blocking; then
  say "blocking: sweep ${BLOCKING_N:-64 128 256} on the same server"
  # shellcheck disable=SC2086
  sweep "$RESULTS/streams_blocking_h200.json" "${BASE_DURATION:-64}" --max-tokens "${MAX_TOKENS:-32}" \
    --blocking-reaction --no-warmup --sweep ${BLOCKING_N:-64 128 256}
fi
if wants ours || wants blocking; then
  bash "$here/h200_streams.sh" stop
  sleep 5
fi
if wants plain; then
  say "plain vLLM: ${PLAIN_N:-256 320} streams' answer load"
  # shellcheck disable=SC2086
  python3 "$here/plain_vllm_bench.py" --streams ${PLAIN_N:-256 320} --duration "${BASE_DURATION:-64}" \
    --out "$RESULTS/plain_vllm_h200.json"
fi
if wants tenancy; then
  say "tenancy: a light tenant alone, then beside a flooding one"
  bash "$here/h200_tenancy.sh" "$RESULTS/tenancy_h200.json" --duration "${BASE_DURATION:-64}"
fi
if wants summary; then
  # The sweep (MPS's where this run made one, else the time-sliced one) with each system's largest real-time N.
  ours=$RESULTS/${MPS_OUT:-streams_mps_h200.json}; [[ -f $ours ]] || ours=$RESULTS/streams_timesliced_h200.json
  blocking=$RESULTS/${MPS_BLOCKING_OUT:-streams_mps_blocking_h200.json}
  [[ -f $blocking ]] || blocking=$RESULTS/streams_blocking_h200.json
  others=()
  [[ -f $blocking ]] && others+=(--blocking "$blocking")
  [[ -f $RESULTS/plain_vllm_h200.json ]] && others+=(--plain "$RESULTS/plain_vllm_h200.json")
  [[ -f $RESULTS/reference_h200.json ]] && others+=(--reference "$RESULTS/reference_h200.json")
  say "summary: $ours ${others[*]}"
  python3 "$here/streams_summary.py" --ours "$ours" "${others[@]}" --out "$RESULTS/streams_h200.json"
fi
say "done"
