#!/usr/bin/env bash
# The live-stream sweep on a 2-GPU H200 host, three placements one after the other (about 18 minutes):
#   one_gpu:      reaction and sidecar both on GPU 0 (--sidecar-device cuda:0), as on a one-GPU machine;
#   tp2:          the reaction over both GPUs with tensor parallelism 2, the sidecar beside rank 0;
#   sidecar_gpu1: the reaction on GPU 0, the sidecar on GPU 1 (the default placement on a 2-GPU host).
#
#   setsid nohup bash benchmarks/h200_two_gpu.sh /tmp/two > /tmp/two.log 2>&1 &    # then poll the log
#
# Each placement: start the server (h200_streams.sh start ARGS), sweep N, stop. N: TWO_GPU_N (default "384"), or
# per placement N_one_gpu, N_tp2, N_sidecar_gpu1 (e.g. N_sidecar_gpu1="384 512"); DURATION (default 64 s).
# Then the three sweeps are merged into RESULTS/two_gpu_h200.json. NVLink multicast stays off (the host's rule).
set -uo pipefail
RESULTS=${1:-/tmp/two-gpu-results}
mkdir -p "$RESULTS"
here=$(cd "$(dirname "$0")" && pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
say() { echo "[h200_two_gpu $(date +%T)] $*"; }

run_placement() {  # run_placement NAME [server args...]
  local name=$1; shift
  local counts_var="N_$name"
  local counts=${!counts_var:-${TWO_GPU_N:-384}}
  say "$name: starting the server ($*)"
  if bash "$here/h200_streams.sh" start "$@"; then
    curl -s "http://127.0.0.1:${PORT:-8000}/health" > "$RESULTS/health_$name.json" || true
    say "$name: sweep $counts"
    # shellcheck disable=SC2086
    python3 "$here/load_streams.py" --url "http://127.0.0.1:${PORT:-8000}" --duration "${DURATION:-64}" --stagger 16 \
      --frame-size 320x240 --drain-timeout 60 --out "$RESULTS/two_gpu_$name.json" --sweep $counts
  else
    say "$name: the server did not start"
  fi
  bash "$here/h200_streams.sh" stop
  for _ in $(seq 60); do  # the next placement needs the GPUs free (tensor-parallel workers exit last)
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ] && break
    sleep 1
  done
}

run_placement one_gpu --sidecar-device cuda:0
run_placement tp2 --tensor-parallel-size 2
run_placement sidecar_gpu1 --sidecar-device cuda:1

python3 - "$RESULTS" <<'PY'
import json, sys
from pathlib import Path
results = Path(sys.argv[1])
placements = {}
for name in ("one_gpu", "tp2", "sidecar_gpu1"):
    sweep_file, health_file = results / f"two_gpu_{name}.json", results / f"health_{name}.json"
    if not sweep_file.exists():
        placements[name] = {"error": "no sweep (the server did not start, or the run was cut short)"}
        continue
    sweep = json.loads(sweep_file.read_text())
    health = json.loads(health_file.read_text()) if health_file.exists() and health_file.stat().st_size else {}
    placements[name] = {"placement": health.get("placement"), "sweep": sweep["sweep"], "runs": sweep["runs"],
                        "config": sweep["config"]}
first = next((json.loads((results / f"two_gpu_{n}.json").read_text()) for n in placements
              if (results / f"two_gpu_{n}.json").exists()), {})
report = {"benchmark": "two_gpu", "device": first.get("device"), "gpus": first.get("environment", {}).get("gpus"),
          "placements": placements,
          "largest_realtime": {n: p.get("sweep", {}).get("max_realtime_streams") for n, p in placements.items()}}
(results / "two_gpu_h200.json").write_text(json.dumps(report, indent=2) + "\n")
print("largest real-time N per placement:", report["largest_realtime"])
PY
say "done"
