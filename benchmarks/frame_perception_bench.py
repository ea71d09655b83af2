"""What a clip's close leaves to do: the CLIP tower per clip at its close, or per frame as the frames arrive.

The sidecar's ``--frame-perception``: "clip" runs a closing clip's 16 frames through the CLIP tower, then the pool
projector and the compact model's first pass; "arrival" has run each frame through the tower soon after it came,
so the close runs the tower over its last frame only, then the projector and the first pass; "prefill" has also run
the compact model's pass over the time prompt and each frame's raw tokens as they came, into the clip's cached
prefix, so the close runs the tower and that prefill for its last frame, then the pass's last 65 positions. At
real shapes (CLIP ViT-L/14-224, Qwen2-1.5B, random weights, bf16), uint8 320x240 frames preprocessed on the device
as the GPU sidecar takes them, in one run:

1. correctness (``--check-sizes``): N clips perceived the three ways, raw, M and T of "arrival" and "prefill"
   compared with "clip"'s (a pass: within ``--tolerance`` of the features' scale; bf16 products may sum in another
   order in other shapes);
2. the close (``--sizes``): N clips closing in one step, the encoder's work from their last frames to their M and
   T, host stacking included. "clip": ``encode`` of N clips of frames; "arrival": ``perceive_frames`` of the N last
   frames, then ``encode`` of N clips of tokens; "prefill": ``perceive_frames`` and ``prefill_frames`` of the N
   last frames (their prefixes hold the 15 before), then ``encode`` of the N clips with their prefixes. Medians of
   ``--reps`` after ``--warmup`` (graphs are captured in the warm-up), ``torch.cuda.synchronize`` around each;
3. the frames' own pass (``--frame-batches``): ``perceive_frames`` of F frames, per pass and per frame, alone and
   followed by ``prefill_frames`` (each frame the next of its own clip, the clips at every length): the work
   "arrival" and "prefill" do before the close instead of in it (the GPU does it either way). A pass of at most
   32 frames replays a CUDA graph (``graphed``); the same pass run eagerly (``pass_eager_ms``, timed in turns
   with the graphed one) is its baseline.

``--tiny`` runs tiny shapes on the CPU (a smoke test of this script, not a figure).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from graph_bench import device_info, guarded, sizes, write  # noqa: E402

from dispider_vllm.perception.clips import ClipWindow, make_frames_clip  # noqa: E402
from dispider_vllm.perception.encoder import PerceptionEncoder  # noqa: E402
from dispider_vllm.perception.frames import PreprocessorConfig  # noqa: E402
from dispider_vllm.perception.modules import PerceptionDecisionModules  # noqa: E402
from dispider_vllm.types import FRAMES_PER_CLIP, Clip, ClipPrefix  # noqa: E402
from dispider_vllm.video.synth import make_test_frames  # noqa: E402

FRAME_SIZE = (320, 240)


def log(message: str) -> None:
    print(f"[frame-perception-bench] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(device: torch.device, work: Callable[[], object]) -> float:
    sync(device)
    started = time.perf_counter()
    work()
    sync(device)
    return (time.perf_counter() - started) * 1000


def windows(count: int, seed: int) -> list[ClipWindow]:
    """``count`` clips of distinct generated 320x240 frames."""
    frames = make_test_frames(seconds=count * FRAMES_PER_CLIP, fps=1, size=FRAME_SIZE, seed=seed)
    return [ClipWindow(i, 16.0 * i, 16.0 * (i + 1), tuple(frames[i * FRAMES_PER_CLIP : (i + 1) * FRAMES_PER_CLIP]))
            for i in range(count)]


def clip_of_tokens(window: ClipWindow, tokens: Sequence[torch.Tensor]) -> Clip:
    """The clip as the sidecar makes it from its frames' tokens (make_perceived_clip)."""
    return Clip(window.index, window.start, window.end, torch.empty(0),
                tuple(f.timestamp for f in window.frames), features=torch.stack(list(tokens)))


def prefilled(encoder: PerceptionEncoder, cut: Sequence[ClipWindow],
              tokens: Sequence[Sequence[torch.Tensor]]) -> list[ClipPrefix]:
    """A prefix per clip holding its time prompt and ``tokens[i]``'s frames."""
    prefixes = [encoder.open_prefix(w.index, w.start, w.end) for w in cut]
    encoder.prefill_frames([(prefix, frames) for prefix, frames in zip(prefixes, tokens) if len(frames)])
    return prefixes


def rewind(encoder: PerceptionEncoder, prefixes: Sequence[ClipPrefix], lengths: Sequence[int], frames: int) -> None:
    """Back to ``lengths`` positions and ``frames`` frames (the timed work appended one frame)."""
    for prefix, length in zip(prefixes, lengths):
        encoder.prefix_pool.truncate(prefix.slot, length)
        prefix.frames = frames


def check(encoder: PerceptionEncoder, count: int, tolerance: float) -> dict:
    cut = windows(count, seed=count)
    by_clip = encoder.encode([make_frames_clip(w, encoder.preprocessor) for w in cut])
    tokens = encoder.perceive_frames([f.pixels for w in cut for f in w.frames])
    per_clip = [tokens[i * FRAMES_PER_CLIP : (i + 1) * FRAMES_PER_CLIP] for i in range(count)]
    of_tokens = [clip_of_tokens(w, frames) for w, frames in zip(cut, per_clip)]
    prefixes = prefilled(encoder, cut, per_clip)
    ways = {"arrival": encoder.encode(of_tokens),
            "prefill": encoder.encode([dataclasses.replace(c, prefix=p) for c, p in zip(of_tokens, prefixes)])}
    for prefix in prefixes:
        encoder.release_prefix(prefix)
    result: dict = {"clips": count}
    for way, features in ways.items():
        result[way] = {}
        for name in ("raw", "memory", "indicator"):
            want = torch.stack([getattr(f, name) for f in by_clip]).float()
            got = torch.stack([getattr(f, name) for f in features]).float()
            scale = want.abs().max().item()
            result[way][name] = {"max_abs_diff": (got - want).abs().max().item(), "scale": scale}
    result["ok"] = all(diff["max_abs_diff"] <= tolerance * max(diff["scale"], 1.0)
                       for way in ways for diff in result[way].values())
    return result


def time_close(encoder: PerceptionEncoder, count: int, args: argparse.Namespace) -> dict:
    """Medians of the close of ``count`` clips, both ways, on the same clips."""
    device = encoder.modules.device
    cut = windows(count, seed=100 + count)
    earlier = [encoder.perceive_frames([f.pixels for f in w.frames[:-1]]) for w in cut]  # before the close

    def by_clip() -> None:
        encoder.encode([make_frames_clip(w, encoder.preprocessor) for w in cut])

    def on_arrival() -> None:
        last = encoder.perceive_frames([w.frames[-1].pixels for w in cut])
        encoder.encode([clip_of_tokens(w, [*tokens, t]) for w, tokens, t in zip(cut, earlier, last)])

    prefixes = prefilled(encoder, cut, earlier)
    lengths = [encoder.prefix_pool.length(prefix.slot) for prefix in prefixes]

    def on_prefill() -> None:
        last = encoder.perceive_frames([w.frames[-1].pixels for w in cut])
        encoder.prefill_frames([(prefix, [t]) for prefix, t in zip(prefixes, last)])
        encoder.encode([dataclasses.replace(clip_of_tokens(w, [*tokens, t]), prefix=prefix)
                        for w, tokens, t, prefix in zip(cut, earlier, last, prefixes)])
        rewind(encoder, prefixes, lengths, FRAMES_PER_CLIP - 1)

    times: dict[str, list[float]] = {"clip": [], "arrival": [], "prefill": []}
    for rep in range(args.warmup + args.reps):
        for mode, work in (("clip", by_clip), ("arrival", on_arrival), ("prefill", on_prefill)):
            elapsed = timed_ms(device, work)
            if rep >= args.warmup:
                times[mode].append(elapsed)
    for prefix in prefixes:
        encoder.release_prefix(prefix)
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    return {"clips": count, "close_ms": medians, "ratio_clip_over_arrival": medians["clip"] / medians["arrival"],
            "ratio_arrival_over_prefill": medians["arrival"] / medians["prefill"]}


def time_frames(encoder: PerceptionEncoder, frames: int, args: argparse.Namespace) -> dict:
    device = encoder.modules.device
    pixels = [f.pixels for f in make_test_frames(seconds=frames, fps=1, size=FRAME_SIZE, seed=7)]
    graphed, eager = [], []
    for _ in range(args.warmup + args.reps):  # in turns, so that a drift of the GPU's clocks falls on both
        graphed.append(timed_ms(device, lambda: encoder.perceive_frames(pixels)))
        eager.append(timed_ms(device, lambda: encoder.perceive_frames(pixels, graphed=False)))
    median, eager_median = statistics.median(graphed[args.warmup :]), statistics.median(eager[args.warmup :])
    # Each frame the next of its own clip, the clips holding 0..15 frames already (as live streams' clips do).
    cut = windows(1, seed=8) * frames
    tokens = encoder.perceive_frames(pixels)
    prefixes = prefilled(encoder, [dataclasses.replace(w, index=i) for i, w in enumerate(cut)],
                         [[tokens[i]] * (i % FRAMES_PER_CLIP) for i in range(frames)])
    lengths = [encoder.prefix_pool.length(prefix.slot) for prefix in prefixes]
    held = [prefix.frames for prefix in prefixes]

    def with_prefill() -> None:
        new = encoder.perceive_frames(pixels)
        encoder.prefill_frames([(prefix, [t]) for prefix, t in zip(prefixes, new)])
        for prefix, length, count in zip(prefixes, lengths, held):
            rewind(encoder, [prefix], [length], count)

    with_values = [timed_ms(device, with_prefill) for _ in range(args.warmup + args.reps)]
    for prefix in prefixes:
        encoder.release_prefix(prefix)
    with_median = statistics.median(with_values[args.warmup :])
    return {"frames": frames, "pass_ms": median, "ms_per_frame": median / frames,
            "graphed": encoder.frame_shapes.batch(frames) is not None and encoder.frame_graphs.graphed,
            "pass_eager_ms": eager_median, "ratio_eager_over_pass": eager_median / median,
            "pass_with_prefill_ms": with_median, "ms_per_frame_with_prefill": with_median / frames}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/frame_perception_h200.json"))
    parser.add_argument("--device", default="cuda", help="torch device for real shapes (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke run, not a figure)")
    parser.add_argument("--check-sizes", type=sizes, default=[1, 3, 12],
                        help="clips compared both ways (default 1,3,12: 12 is past the graphs' 8)")
    parser.add_argument("--sizes", type=sizes, default=[1, 2, 4, 8], help="clips closing in one step (default 1,2,4,8)")
    parser.add_argument("--frame-batches", type=sizes, default=[1, 8, 32, 64, 128],
                        help="frames per pass of the tower (default 1,8,32,64,128)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default 3)")
    parser.add_argument("--tolerance", type=float, default=5e-2,
                        help="a check passes within this fraction of the features' scale (default 0.05, bf16)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 1:
        parser.error("--reps and --warmup must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("frame_perception_bench: no CUDA device here; use --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    log(f"building {'tiny' if args.tiny else 'real-shape'} modules on {device} ({dtype})")
    modules = PerceptionDecisionModules.random(real_shapes=not args.tiny, device=device, dtype=dtype)
    prefix_slots = max([*args.check_sizes, *args.sizes, *args.frame_batches])  # no pool growth while timed
    encoder = PerceptionEncoder(modules, preprocessor=PreprocessorConfig(), prefix_slots=prefix_slots)
    report = {
        "benchmark": "frame_perception",
        "device": device_info(device),
        "shapes": "tiny" if args.tiny else "CLIP ViT-L/14-224 + Qwen2-1.5B (random weights, bf16)",
        "frames": f"uint8 {FRAME_SIZE[0]}x{FRAME_SIZE[1]}, preprocessed on {device.type}",
        "command": "python benchmarks/frame_perception_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {"reps": args.reps, "warmup": args.warmup, "tolerance": args.tolerance,
                   "cuda_graphs": encoder.graphs.graphed, "prefix_slots": prefix_slots},
        "correctness": [], "close": [], "frame_passes": [], "errors": [],
    }
    parts = ([("correctness", n, lambda n=n: check(encoder, n, args.tolerance)) for n in args.check_sizes]
             + [("close", n, lambda n=n: time_close(encoder, n, args)) for n in args.sizes]
             + [("frame_passes", n, lambda n=n: time_frames(encoder, n, args)) for n in args.frame_batches])
    for part, n, work in parts:
        result = guarded(report, f"{part} {n}", work)
        if result is not None:
            report[part].append(result)
            log(f"{part} {n}: {result}")
        write(report, args.out)
    report["ok"] = not report["errors"] and all(c["ok"] for c in report["correctness"])
    write(report, args.out)
    log(f"report written to {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
