"""Sidecar capacity: clips per second and real-time 1-fps streams, against the reference-style computation.

    python benchmarks/sidecar_bench.py --out benchmarks/results/sidecar_h200.json        # GPU, real shapes
    python benchmarks/sidecar_bench.py --tiny --streams 8 --rounds 2 --out /tmp/s.json   # CPU smoke run

Real shapes (CLIP ViT-L/14-224, Qwen2-1.5B) with random weights, bf16 on the GPU.

- ours: ``SidecarEngine`` (the code the server runs) with ``--streams`` live streams. Each round every stream
  closes one clip (16 preprocessed frames); the engine perceives and decides them in fair batches of
  ``--batch`` clips. A trigger every ``--respond-every`` clips per stream (staggered across streams) adds the
  summary, retrieval and global-memory work. Measured over ``--rounds`` rounds after a warm-up round.
- reference-style: the way the authors' code runs: Hugging Face transformers modules, one stream at a time, one
  clip at a time, no cache: CLIP + pool projector + first pass for the new clip, then one full forward of the
  whole decision sequence, plus the summary and global-memory passes at a trigger. Same clips, same policy.

A 1-fps stream closes one 16-frame clip every 16 s, so the number of real-time streams a system keeps up with
is clips/s x 16. Frame decoding and preprocessing (host CPU, in the sidecar's process) are not in these
figures: they are per-frame CPU work that scales with cores; ``--measure-preprocess`` reports their cost.
``--compare-frames`` runs ours again with clips that come as their uint8 320x240 frames, preprocessed by the
encoder on the GPU (the server's default there, ``--preprocess-on device``): that preprocessing is in its figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

from dispider_vllm.decision.engine import DecisionConfig
from dispider_vllm.perception.encoder import merge_neighbours, pool_tokens, time_prompt
from dispider_vllm.perception.modules import PerceptionDecisionModules
from dispider_vllm.sidecar.engine import SidecarEngine
from dispider_vllm.sidecar.protocol import OpenStream, Triggered
from dispider_vllm.types import Clip

CLIP_SECONDS = 16.0


def staggered_policy(every: int):
    """Respond every ``every`` clips, each stream at its own phase so triggers spread over the batches."""
    return lambda stream_id, clip_index: (clip_index + zlib.crc32(stream_id.encode())) % every == every - 1


def make_clip(index: int, pixels: torch.Tensor) -> Clip:
    return Clip(index=index, start=index * CLIP_SECONDS, end=(index + 1) * CLIP_SECONDS, pixels=pixels)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- ours
def run_ours(modules, pixels, args, device, *, fp8: bool = False, profile: bool = False) -> dict:
    engine = SidecarEngine(
        modules,
        max_batch_clips=args.batch,
        decision_config=DecisionConfig(
            max_kept_clips=args.kept_clips, initial_kv_slots=args.streams, initial_kv_tokens=2048
        ),
        respond_policy=staggered_policy(args.respond_every),
        fp8=fp8,
    )
    for s in range(args.streams):
        engine.handle(OpenStream(f"s{s}", "Tell me when something changes in the scene."))
    step_ms, triggers = [], 0
    timings = []
    warmup = args.history
    for round_index in range(warmup + args.rounds):  # warm-up rounds build each stream's history
        now = time.time()
        for stream_id in engine.streams:
            engine.submit_clip(stream_id, make_clip(round_index, pixels), now)
        sync(device)
        started = time.perf_counter()
        while engine.has_work():
            before = time.perf_counter()
            events = engine.step()
            sync(device)
            if round_index >= warmup:
                step_ms.append((time.perf_counter() - before) * 1000)
                triggers += sum(isinstance(e, Triggered) for e in events)
        elapsed = time.perf_counter() - started
        if round_index >= warmup:
            timings.append(elapsed)
        print(f"[sidecar-bench] ours: round {round_index}: {args.streams} clips in {elapsed:.3f} s", flush=True)
    if profile:
        profile_steps(engine, pixels, args, device)
    clips = args.streams * args.rounds
    seconds = sum(timings)
    result = {
        "streams_in_run": args.streams,
        "rounds": args.rounds,
        "history_clips": args.history,
        "kept_clips": args.kept_clips,
        "batch_clips": args.batch,
        "clips": clips,
        "seconds": seconds,
        "clips_per_s": clips / seconds,
        "realtime_streams": clips / seconds * CLIP_SECONDS,
        "step_ms_p50": statistics.median(step_ms),
        "step_ms_max": max(step_ms),
        "triggers": triggers,
        "fused_kernels": engine.encoder.lm.fused,
        "quantization": "fp8" if fp8 else None,
    }
    if device.type == "cuda":
        result["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_unfused(modules, pixels, args, device) -> dict:
    """Ours again with vLLM's fused kernels off: the same engine on plain-torch elementwise kernels."""
    os.environ["DISPIDER_FUSED_OPS"] = "0"
    try:
        fresh_peak_memory(device)
        result = run_ours(modules, pixels, args, device)
    finally:
        os.environ.pop("DISPIDER_FUSED_OPS")
    print(f"[sidecar-bench] ours, unfused kernels: {result}", flush=True)
    return result


def run_fp8(modules, pixels, args, device) -> dict:
    """Ours again with --sidecar-quantization fp8: the same engine, its matmuls in FP8 (dispider_vllm/fp8.py)."""
    fresh_peak_memory(device)
    result = run_ours(modules, pixels, args, device, fp8=True)
    print(f"[sidecar-bench] ours, fp8: {result}", flush=True)
    return result


def run_frames(modules, args, device) -> dict:
    """Ours again with clips of uint8 320x240 frames: the encoder copies them and preprocesses them on its device."""
    fresh_peak_memory(device)
    frames = torch.randint(0, 256, (16, 240, 320, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = {**run_ours(modules, frames, args, device), "clip_input": "uint8 frames 320x240, preprocessed on device"}
    print(f"[sidecar-bench] ours, clips as frames: {result}", flush=True)
    return result


def fresh_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def profile_steps(engine, pixels, args, device) -> None:
    """One more round under torch.profiler: where a batched step's time goes (kernels and host ops)."""
    from torch.profiler import ProfilerActivity, profile

    now = time.time()
    for stream_id in engine.streams:
        engine.submit_clip(stream_id, make_clip(10_000, pixels), now)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        while engine.has_work():
            engine.step()
        sync(device)
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    tables = [prof.key_averages().table(sort_by=key, row_limit=40) for key in (sort, "cpu_time_total")]
    args.profile.write_text("\n\n".join(tables))
    print(f"[sidecar-bench] profile of one round written to {args.profile}", flush=True)


# ----------------------------------------------------------------------------------------------- reference-style
class ReferenceStyleStream:
    """One stream, Hugging Face modules, everything recomputed the way the released code does it."""

    def __init__(self, modules: PerceptionDecisionModules, question: str):
        self.m = modules
        self.embed = modules.language_model.get_input_embeddings()
        ids = lambda text: torch.tensor(modules.token_ids(text), device=modules.device)  # noqa: E731
        self.ans, self.todo = self.embed(ids("<has_answer>")), self.embed(ids("<to_do>"))
        self.question = self.embed(ids(question + "<to_do>"))
        self.memory, self.indicators, self.summaries = [], [], []
        self.last_answer = 0

    def hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.m.language_model(inputs_embeds=embeds[None]).last_hidden_state[0]

    def perceive(self, clip: Clip) -> None:
        m = self.m
        out = m.vision_tower(pixel_values=clip.pixels.to(m.device, m.dtype), output_hidden_states=True)
        patches = out.hidden_states[m.select_layer][:, 1:]
        merged = merge_neighbours(patches, m.merge_factor)  # [16, 64, 4C]
        raw = merged.reshape(1, -1, merged.shape[-1])
        tokens = m.mm_projector(torch.cat([raw, pool_tokens(merged[None], m.pool_num)], dim=1))[0]
        before, after = time_prompt(clip).split("<image>")
        text = lambda t: self.embed(torch.tensor(m.token_ids(t), device=m.device, dtype=torch.long))  # noqa: E731
        hidden = self.hidden(torch.cat([text(before), tokens, text(after)]))
        start = len(m.token_ids(before)) + raw.shape[1]
        self.memory.append(hidden[start : start + 64])
        self.indicators.append(hidden[start + 64])
        self.raw_host = raw.to("cpu")  # the released code keeps raw for the reaction as well

    def decide(self) -> bool:
        """One full uncached forward of [ANS Q (S ANS)* M... Q TODO]; the trigger work when it responds."""
        parts = [self.ans, self.question]
        for summary in self.summaries:
            parts += [summary, self.ans]
        parts += self.memory[self.last_answer :] + [self.question, self.todo]
        hidden = self.hidden(torch.cat(parts))
        return float(self.m.silent_head(hidden[-1])) > 0

    def trigger(self) -> None:
        t = len(self.memory)
        window = slice(self.last_answer, t)
        summary_in = torch.cat(self.memory[window] + [torch.stack(self.indicators[window])])
        self.summaries.append(self.hidden(summary_in)[-(t - self.last_answer) :])
        global_in = torch.cat(self.memory + [torch.stack(self.indicators)])
        self.global_memory = self.hidden(global_in)[-t:]
        self.last_answer = t


@torch.inference_mode()
def run_reference(modules, pixels, args, device) -> dict:
    policy = staggered_policy(args.respond_every)
    stream = ReferenceStyleStream(modules, "Tell me when something changes in the scene.")
    per_clip = []
    for index in range(args.history + args.rounds):
        sync(device)
        started = time.perf_counter()
        stream.perceive(make_clip(index, pixels))
        stream.decide()
        if policy("s0", index):  # the same forced policy as ours, so both do the same trigger work
            stream.trigger()
        sync(device)
        if index >= args.history:
            per_clip.append(time.perf_counter() - started)
    seconds_per_clip = statistics.mean(per_clip)
    return {
        "clips": len(per_clip),
        "history_clips": args.history,
        "seconds_per_clip": seconds_per_clip,
        "clips_per_s": 1 / seconds_per_clip,
        "realtime_streams": CLIP_SECONDS / seconds_per_clip,
    }


# ----------------------------------------------------------------------------------------------- driver
def measure_preprocess(pixels_shape=(240, 320)) -> dict:
    import numpy as np

    from dispider_vllm.perception.frames import PreprocessorConfig, preprocess_with_config

    frames = [np.random.randint(0, 255, (*pixels_shape, 3), dtype=np.uint8) for _ in range(16)]
    preprocess_with_config(frames, PreprocessorConfig())
    started = time.perf_counter()
    for _ in range(5):
        preprocess_with_config(frames, PreprocessorConfig())
    per_clip = (time.perf_counter() - started) / 5
    return {"frame_size": list(pixels_shape), "ms_per_clip": per_clip * 1000, "threads": torch.get_num_threads()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sidecar_h200.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke run, not a figure)")
    parser.add_argument("--streams", type=int, default=512, help="live streams in the run (default 512)")
    parser.add_argument("--rounds", type=int, default=4, help="measured clips per stream (default 4)")
    parser.add_argument("--batch", type=int, default=64, help="clips per perception batch (default 64)")
    parser.add_argument("--respond-every", type=int, default=8, help="a trigger every N clips per stream")
    parser.add_argument("--history", type=int, default=8, help="unmeasured clips per stream first (default 8)")
    parser.add_argument("--kept-clips", type=int, default=16,
                        help="clips per stream kept for retrieval (raw is 8 MB a clip in host memory; default 16)")
    parser.add_argument("--measure-preprocess", action="store_true")
    parser.add_argument("--compare-unfused", action="store_true",
                        help="also run ours with vLLM's fused kernels off (DISPIDER_FUSED_OPS=0): the plain-torch "
                             "elementwise baseline, in the same run")
    parser.add_argument("--compare-fp8", action="store_true",
                        help="also run ours with its matmuls in FP8 (dispider-serve --sidecar-quantization fp8)")
    parser.add_argument("--compare-frames", action="store_true",
                        help="also run ours with clips of uint8 frames preprocessed on the device "
                             "(dispider-serve --preprocess-on device)")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="after the measured rounds, profile one more round and write the op tables here")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"[sidecar-bench] building {'tiny' if args.tiny else 'real-shape'} modules on {device}", flush=True)
    modules = PerceptionDecisionModules.random(real_shapes=not args.tiny, device=device, dtype=dtype)
    pixels = torch.randn(16, 3, 224, 224)

    reference = run_reference(modules, pixels, args, device)
    print(f"[sidecar-bench] reference-style: {reference}", flush=True)
    ours = run_ours(modules, pixels, args, device, profile=args.profile is not None)
    print(f"[sidecar-bench] ours: {ours}", flush=True)
    unfused = run_unfused(modules, pixels, args, device) if args.compare_unfused else None
    fp8 = run_fp8(modules, pixels, args, device) if args.compare_fp8 else None
    frames = run_frames(modules, args, device) if args.compare_frames else None
    report = {
        "benchmark": "sidecar",
        "device": device_name(device),
        "shapes": "tiny" if args.tiny else "CLIP ViT-L/14-224 + Qwen2-1.5B (random weights, bf16)",
        "command": "python benchmarks/sidecar_bench.py " + " ".join(sys.argv[1:]),
        "ours": ours,
        "reference_style": reference,
        "capacity_ratio": ours["realtime_streams"] / reference["realtime_streams"],
        "fused_kernels": ours["fused_kernels"],
        "targets": {"realtime_streams": 800, "capacity_ratio": 5},
    }
    if unfused is not None:
        report["ours_unfused"] = unfused
        report["fused_speedup"] = ours["clips_per_s"] / unfused["clips_per_s"]
    if fp8 is not None:
        report["ours_fp8"] = fp8
        report["fp8_speedup"] = fp8["clips_per_s"] / ours["clips_per_s"]
        report["fp8_capacity_ratio"] = fp8["realtime_streams"] / reference["realtime_streams"]
    if frames is not None:
        report["ours_frames"] = frames
        report["frames_speedup"] = frames["clips_per_s"] / ours["clips_per_s"]
    if args.measure_preprocess:
        report["host_preprocess"] = measure_preprocess()
    report["meets_targets"] = report["capacity_ratio"] >= 5 and ours["realtime_streams"] >= 800
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nSidecar on {report['device']} ({report['shapes']})")
    print(f"{'system':18} {'clips/s':>9} {'1-fps streams':>14}")
    print(f"{'reference-style':18} {reference['clips_per_s']:9.2f} {reference['realtime_streams']:14.1f}")
    print(f"{'dispider-vllm':18} {ours['clips_per_s']:9.2f} {ours['realtime_streams']:14.1f}")
    if unfused is not None:
        print(f"{'  unfused kernels':18} {unfused['clips_per_s']:9.2f} {unfused['realtime_streams']:14.1f}")
    if fp8 is not None:
        print(f"{'  fp8':18} {fp8['clips_per_s']:9.2f} {fp8['realtime_streams']:14.1f}")
    if frames is not None:
        print(f"{'  frames on device':18} {frames['clips_per_s']:9.2f} {frames['realtime_streams']:14.1f}")
    print(f"capacity ratio {report['capacity_ratio']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
