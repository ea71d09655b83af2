"""The sidecar loop's host cost per pushed frame, and per turn, against the number of open streams.

    python benchmarks/push_cost_bench.py --out benchmarks/results/push_cost_cpu.json
    git worktree add /tmp/before <commit>
    python benchmarks/push_cost_bench.py --baseline /tmp/before --out /tmp/push_cost.json   # same run, two checkouts

Every live frame is one command in the sidecar's loop (``SidecarEngine.handle``), and every turn of the loop
asks the engine whether it has work; both run on the one core of the sidecar's interpreter, beside the step
that drives the GPU. A cost that grows with the open streams grows as streams x frames/s overall: at 768
1-fps streams a push of 100 us is 77 ms of every second of that loop.

Each measurement opens ``--streams`` streams on the embedded tiny checkpoint (the CPU; a push's path does not
touch the models), then pushes ``--frames`` frames into each, one frame a push, round-robin, timing ``handle``;
then times ``has_work`` and ``pending_clips`` (what the loop asks every turn). The frames come as the GPU
sidecar takes them by default (uint8, preprocessed on the device, the CLIP tower on arrival), and 15 of them
close no clip, so no step runs. The collector is paused while timing, so the figures are the code's own.
``--baseline DIR`` measures another checkout (its ``dispider_vllm``) the same way, one after the other, each in
a process of its own, and reports the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(streams: int, frames: int) -> dict:
    """In this process: the mean seconds of one push's ``handle`` and of one turn's questions."""
    import gc

    import numpy as np

    from dispider_vllm.checkpoint.random import ensure_default_checkpoint
    from dispider_vllm.decision.engine import DecisionConfig
    from dispider_vllm.perception.frames import load_preprocessor_config
    from dispider_vllm.perception.modules import PerceptionDecisionModules
    from dispider_vllm.sidecar.engine import SidecarEngine
    from dispider_vllm.sidecar.protocol import OpenStream, PushFrames
    from dispider_vllm.types import Frame

    part_dir = Path(ensure_default_checkpoint().split.perception_decision_dir)
    engine = SidecarEngine(PerceptionDecisionModules.load(part_dir),
                           preprocessor=load_preprocessor_config(part_dir / "vision_tower"),
                           decision_config=DecisionConfig(initial_kv_slots=8),
                           preprocess_on="device", frame_perception="arrival")
    for index in range(streams):
        engine.handle(OpenStream(f"s{index}", "Tell me when something changes."))
    pixels = np.zeros((240, 320, 3), np.uint8)
    pushes = [PushFrames(f"s{index}", (Frame(float(second), pixels),), False, time.time())
              for second in range(frames) for index in range(streams)]
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        for push in pushes:
            engine.handle(push)
        push_s = (time.perf_counter() - started) / len(pushes)
        turns = 2000
        started = time.perf_counter()
        for _ in range(turns):
            engine.has_work()
            engine.pending_clips()
        turn_s = (time.perf_counter() - started) / turns
    finally:
        gc.enable()
    return {"streams": streams, "pushes": len(pushes), "push_us": round(push_s * 1e6, 2),
            "turn_questions_us": round(turn_s * 1e6, 2)}


def run_checkout(checkout: Path, streams: list[int], frames: int) -> list[dict]:
    """Each stream count in a fresh process importing ``dispider_vllm`` from ``checkout``."""
    results = []
    for count in streams:
        env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        output = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(count), "--frames", str(frames)],
            env=env, cwd=checkout, capture_output=True, text=True, check=False,
        )
        if output.returncode != 0:
            raise SystemExit(f"measuring {count} streams with {checkout} failed:\n{output.stderr[-3000:]}")
        result = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"[push-cost] {checkout}: {count} streams: a push {result['push_us']} us, a turn's questions "
              f"{result['turn_questions_us']} us", flush=True)
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 256, 768],
                        help="open streams, one measurement each (default 16 256 768)")
    parser.add_argument("--frames", type=int, default=15, help="frames pushed into each stream (default 15: "
                        "fewer than a clip, so no step runs)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="another checkout of this project, measured the same way, for the ratios")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.frames)))
        return
    if args.frames < 1 or min(args.streams) < 1:
        parser.error("--streams and --frames must be at least 1")
    report = {"benchmark": "push_cost", "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
              "python": platform.python_version(), "frames_per_stream": args.frames,
              "ours": run_checkout(ROOT, args.streams, args.frames)}
    if args.baseline is not None:
        if not (args.baseline / "dispider_vllm").is_dir():
            parser.error(f"--baseline {args.baseline}: no dispider_vllm/ there")
        report["baseline"] = {"checkout": str(args.baseline),
                              "results": run_checkout(args.baseline.resolve(), args.streams, args.frames)}
        report["ratios"] = [
            {"streams": ours["streams"], "push": round(base["push_us"] / ours["push_us"], 2),
             "turn_questions": round(base["turn_questions_us"] / ours["turn_questions_us"], 2)}
            for ours, base in zip(report["ours"], report["baseline"]["results"])
        ]
        for ratio in report["ratios"]:
            print(f"[push-cost] {ratio['streams']} streams: baseline / ours: a push {ratio['push']}x, "
                  f"a turn's questions {ratio['turn_questions']}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[push-cost] wrote {args.out}")


if __name__ == "__main__":
    main()
