"""CUDA graphs for the sidecar's small-batch steps: graphed vs eager, outputs compared, then steps timed.

Under live load the sidecar runs steps of 1-4 clips, bound by the host's kernel launches (docs/benchmarks.md, "Where
a decision's time goes under load"). This measures what CUDA graphs change there, at real shapes (CLIP ViT-L/14-224,
Qwen2-1.5B) with random weights, bf16, in one run:

1. correctness, per batch size (``--check-sizes``): the graphed and the eager path on the same inputs, twice (the
   second time from a replay of an already captured graph): decision hidden states and silent-head logits of N
   streams with a history in the KV cache, and perception M and T of N clips. Each difference is reported with
   the eager path's own noise floor: the largest difference between eager runs of the same rows in other shapes
   (one at a time; beside an extra, longer row; suffixes padded to the graph's length bucket), where bf16 matrix
   products may pick other kernels and sum in another order, as a padded batch may; a check passes within
   max(tolerance, 4 x noise floor).
   The eager reference attends over its K/V with the masked SDPA path (``CompactLM.paged`` off); on a GPU with
   vLLM's FlashAttention the graphed one reads the pool in place (paged), so the check covers that path too.
2. timing, per number of clips N (``--sizes``): a sidecar step's perception of N clips and its decision round of
   N streams (each stream with ``--history-clips`` clips of M already in its KV cache, no triggers), eager then
   graphed, medians of ``--reps`` steps after ``--warmup`` (the first graphed step captures; its time is reported
   apart), ``torch.cuda.synchronize`` around each phase. ``--compare-paged`` times the graphed steps once more
   with the decision's attention on the masked SDPA path, for the paged path's ratio.

The report goes to ``--out`` as soon as each part ends, so a run cut short keeps what finished; a part that fails
is recorded under ``errors`` and the run goes on. ``--tiny`` runs tiny shapes on the CPU (a smoke test of this
script: no graphs there, the padded path runs eagerly).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dispider_vllm import kernels
from dispider_vllm.decision.compact_lm import CompactLM
from dispider_vllm.decision.engine import TODO_TOKEN, DecisionConfig, DecisionEngine
from dispider_vllm.perception.encoder import PerceptionEncoder
from dispider_vllm.perception.modules import PerceptionDecisionModules
from dispider_vllm.types import Clip, ClipFeatures

CLIP_SECONDS = 16.0
QUESTION = "Tell me when something changes in the scene."
NOISE_FACTOR = 4.0


# ----------------------------------------------------------------------------------------------- setup
@dataclasses.dataclass(frozen=True)
class Setup:
    modules: PerceptionDecisionModules
    device: torch.device
    pixels: list[torch.Tensor]  # a few distinct clips' pixels, reused round-robin
    template: ClipFeatures  # one perceived clip: the M/T of every stream's history
    tolerance: float  # absolute, for bf16 / fp32 outputs of order one


def build_setup(args: argparse.Namespace) -> Setup:
    device = torch.device("cpu" if args.tiny else args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    log(f"building {'tiny' if args.tiny else 'real-shape'} modules on {device} ({dtype})")
    modules = PerceptionDecisionModules.random(real_shapes=not args.tiny, device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    pixels = [torch.randn(16, 3, 224, 224, generator=generator) for _ in range(4)]
    template = PerceptionEncoder(modules, cuda_graphs=False).encode([make_clip(0, pixels[0])])[0]
    return Setup(modules, device, pixels, template, tolerance=1e-3 if dtype == torch.float32 else 5e-2)


def make_clip(index: int, pixels: torch.Tensor) -> Clip:
    return Clip(index=index, start=index * CLIP_SECONDS, end=(index + 1) * CLIP_SECONDS, pixels=pixels)


def clips_for(setup: Setup, count: int, index: int) -> list[Clip]:
    """``count`` clips of clip index ``index`` (one per stream), distinct pixels."""
    return [make_clip(index, setup.pixels[(index + i) % len(setup.pixels)]) for i in range(count)]


def feature(setup: Setup, index: int) -> ClipFeatures:
    return dataclasses.replace(setup.template, index=index, start=index * CLIP_SECONDS,
                               end=(index + 1) * CLIP_SECONDS)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- correctness
def difference(got: torch.Tensor, want: torch.Tensor) -> dict:
    delta = (got.float() - want.float()).abs()
    return {"max_abs_diff": float(delta.max()), "mean_abs_diff": float(delta.mean()),
            "max_abs_value": float(want.float().abs().max())}


def judged(diff: dict, noise: dict, tolerance: float) -> dict:
    allowed = max(tolerance, NOISE_FACTOR * noise["max_abs_diff"])
    return {**diff, "noise_floor": noise["max_abs_diff"], "allowed": allowed, "ok": diff["max_abs_diff"] <= allowed}


def check_decision(setup: Setup, batch: int, args: argparse.Namespace) -> dict:
    """N streams, each with a history in its cache; two decision forwards graphed vs eager (hidden, logits)."""
    modules = setup.modules
    eager = CompactLM(modules.language_model, cuda_graphs=False)
    eager.paged = False  # the reference: K/V read or gathered, a mask, SDPA
    graphed = CompactLM(modules.language_model, max_graph_batch=args.max_graph_batch)
    capacity = (args.history_clips + 4) * 64 + 512
    pools = [lm.new_pool(slots=batch + 1, capacity=capacity) for lm in (eager, graphed)]
    slots = [[pool.allocate() for _ in range(batch)] for pool in pools][0]
    extra = pools[0].allocate()  # an eager-only row that changes the batch's shapes, for the noise floor
    with torch.inference_mode():
        tail = eager.embed(modules.token_ids(QUESTION + TODO_TOKEN + TODO_TOKEN))
        history = [torch.cat([feature(setup, i).memory for i in range(args.history_clips)]) for _ in slots]
        for lm, pool in zip((eager, graphed), pools):  # long suffixes: both eager, the same cache in both pools
            lm.forward_cached(pool, slots, history, [len(h) for h in history])
        worst: dict[str, dict] = {}
        for step in range(2):  # the second from a replay of the graph the first captured
            memory = [setup.template.memory.roll(step + row, dims=0) for row in range(batch)]
            suffixes = [torch.cat([m, tail]) for m in memory]
            keep = [len(m) for m in memory]
            length = suffixes[0].shape[0]
            noise_runs = eager_in_other_shapes(eager, pools[0], slots, extra, suffixes,
                                               graphed.graph_shapes.length(length) or length)
            want = eager.forward_cached(pools[0], slots, suffixes, keep)
            got = graphed.forward_cached(pools[1], slots, suffixes, keep)
            parts = {"decision_hidden": (got, want, noise_runs),
                     "decision_logits": (modules.silent_head(got[:, -1]), modules.silent_head(want[:, -1]),
                                         [modules.silent_head(h[:, -1]) for h in noise_runs])}
            for name, (g, w, others) in parts.items():
                noise = max((difference(o, w) for o in others), key=lambda d: d["max_abs_diff"])
                result = judged(difference(g, w), noise, setup.tolerance)
                if name not in worst or result["max_abs_diff"] >= worst[name]["max_abs_diff"]:
                    worst[name] = result
    worst["decision_graphs"] = dataclasses.asdict(graphed.graphs.stats)
    return worst


def eager_in_other_shapes(lm: CompactLM, pool, slots: list[int], extra: int, suffixes: list[torch.Tensor],
                          padded_length: int) -> list[torch.Tensor]:
    """Hidden states of the same rows (all of one length) from eager forwards of other shapes, keeping nothing."""
    length = suffixes[0].shape[0]
    nothing = [0] * len(slots)
    alone = torch.cat([lm.forward_cached(pool, [s], [x], [0]) for s, x in zip(slots, suffixes)])
    longer = torch.cat([suffixes[0], suffixes[0][:17]])
    beside = lm.forward_cached(pool, [*slots, extra], [*suffixes, longer], [*nothing, 0])[: len(slots), :length]
    padding = suffixes[0].new_zeros(padded_length - length, suffixes[0].shape[1])
    padded = lm.forward_cached(pool, slots, [torch.cat([x, padding]) for x in suffixes], nothing)[:, :length]
    return [alone, beside, padded]


def check_perception(setup: Setup, batch: int, args: argparse.Namespace) -> dict:
    """N clips perceived graphed vs eager, twice (new pixels and time prompts the second time): M and T."""
    modules = setup.modules
    eager = PerceptionEncoder(modules, cuda_graphs=False)
    graphed = PerceptionEncoder(modules, max_graph_clips=args.max_graph_clips)
    worst: dict[str, dict] = {}
    for step in range(2):
        clips = clips_for(setup, batch, index=7 + 113 * step)  # time prompts of different lengths
        want, got = eager.encode(clips), graphed.encode(clips)
        alone = [eager.encode([clip])[0] for clip in clips]
        for name, field in (("perception_memory", "memory"), ("perception_indicator", "indicator")):
            stack = lambda features: torch.stack([getattr(f, field) for f in features])  # noqa: E731
            result = judged(difference(stack(got), stack(want)), difference(stack(alone), stack(want)),
                            setup.tolerance)
            if name not in worst or result["max_abs_diff"] >= worst[name]["max_abs_diff"]:
                worst[name] = result
    worst["perception_graphs"] = dataclasses.asdict(graphed.graphs.stats)
    return worst


def check(setup: Setup, batch: int, args: argparse.Namespace) -> dict:
    result = {"batch": batch, "tolerance": setup.tolerance, **check_decision(setup, batch, args),
              **check_perception(setup, batch, args)}
    result["ok"] = all(part["ok"] for part in result.values() if isinstance(part, dict) and "ok" in part)
    release_memory(setup.device)
    return result


# ----------------------------------------------------------------------------------------------- timing
@dataclasses.dataclass
class StepTimes:
    perceive_ms: list[float] = dataclasses.field(default_factory=list)
    decide_ms: list[float] = dataclasses.field(default_factory=list)

    def medians(self) -> dict:
        perceive, decide = statistics.median(self.perceive_ms), statistics.median(self.decide_ms)
        steps = [p + d for p, d in zip(self.perceive_ms, self.decide_ms)]
        return {"perceive_ms": perceive, "decide_ms": decide, "step_ms": statistics.median(steps)}


def timed_ms(device: torch.device, work: Callable[[], object]) -> tuple[float, object]:
    sync(device)
    started = time.perf_counter()
    result = work()
    sync(device)
    return (time.perf_counter() - started) * 1000, result


def run_steps(setup: Setup, count: int, graphs: bool, args: argparse.Namespace, *, paged: bool = True) -> dict:
    """A fresh encoder and decision engine of ``count`` streams with a history; warm-up, then timed steps
    (``paged``: False puts the decision's cached attention on the masked SDPA path)."""
    modules, device = setup.modules, setup.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    encoder = PerceptionEncoder(modules, cuda_graphs=graphs, max_graph_clips=args.max_graph_clips)
    # Capacity for every step of the run from the start: a pool growth (and recapture) would land in a timed step.
    tokens = (args.history_clips + args.warmup + args.reps + 2) * 64 + 512
    config = DecisionConfig(cuda_graphs=graphs, max_graph_batch=args.max_graph_batch, initial_kv_slots=count,
                            initial_kv_tokens=tokens, max_context_clips=max(64, args.history_clips + args.warmup
                                                                            + args.reps + 2))
    engine = DecisionEngine(modules, config, force_respond=lambda stream_id, index: False)
    engine.lm.paged = engine.lm.paged and paged
    streams = [f"s{i}" for i in range(count)]
    for stream in streams:
        engine.open(stream, QUESTION)
    for index in range(args.history_clips):
        engine.step({stream: [feature(setup, index)] for stream in streams})
    times = StepTimes()
    first_step_ms = None
    for rep in range(args.warmup + args.reps):
        index = args.history_clips + rep
        perceive_ms, features = timed_ms(device, lambda: encoder.encode(clips_for(setup, count, index)))
        decide_ms, _ = timed_ms(device, lambda: engine.step(dict(zip(streams, ([f] for f in features)))))
        if rep == 0:
            first_step_ms = perceive_ms + decide_ms
        if rep >= args.warmup:
            times.perceive_ms.append(perceive_ms)
            times.decide_ms.append(decide_ms)
    result = {**times.medians(), "first_step_ms": first_step_ms, "kv_capacity": engine.pool.capacity,
              "paged_attention": engine.lm.paged,
              "perception_graphs": dataclasses.asdict(encoder.graphs.stats),
              "decision_graphs": dataclasses.asdict(engine.lm.graphs.stats)}
    if device.type == "cuda":  # weights, the KV pool and the graphs' memory pools included
        result["gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    del encoder, engine
    release_memory(device)
    return result


def time_size(setup: Setup, count: int, args: argparse.Namespace) -> dict:
    eager = run_steps(setup, count, graphs=False, args=args)
    graphed = run_steps(setup, count, graphs=True, args=args)
    phases = {"perceive": "perceive_ms", "decide": "decide_ms", "step": "step_ms"}
    return {"clips": count, "eager": {k: eager[k] for k in phases.values()},
            "graphs": {k: graphed[k] for k in phases.values()},
            "speedup": {name: eager[key] / graphed[key] for name, key in phases.items()},
            "graphs_first_step_ms": graphed["first_step_ms"], "kv_capacity": graphed["kv_capacity"],
            "gpu_peak_gb": {"eager": eager.get("gpu_peak_gb"), "graphs": graphed.get("gpu_peak_gb")},
            "graph_stats": {"perception": graphed["perception_graphs"], "decision": graphed["decision_graphs"]},
            "paged_attention": graphed["paged_attention"], **compare_paged(setup, count, args, graphed)}


def compare_paged(setup: Setup, count: int, args: argparse.Namespace, graphed: dict) -> dict:
    """With ``--compare-paged``: the graphed steps again, the decision's attention masked, and the ratios."""
    if not args.compare_paged:
        return {}
    masked = run_steps(setup, count, graphs=True, args=args, paged=False)
    return {"graphs_masked_attention": {k: masked[k] for k in ("perceive_ms", "decide_ms", "step_ms")},
            "paged_speedup": {"decide": masked["decide_ms"] / graphed["decide_ms"],
                              "step": masked["step_ms"] / graphed["step_ms"]}}


# ----------------------------------------------------------------------------------------------- report
def device_info(device: torch.device) -> dict:
    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # noqa: BLE001 - the report says so instead of failing
        vllm_version = "not importable"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"name": name, "torch": torch.__version__, "vllm": vllm_version, "cuda": torch.version.cuda,
            "fused_kernels": kernels.fused_ops_available()}


def guarded(report: dict, part: str, work: Callable[[], dict]) -> dict | None:
    """Run one part; a failure is recorded (and printed) and the run goes on."""
    try:
        return work()
    except Exception as error:  # noqa: BLE001 - GPU time is scarce: keep whatever else can be measured
        traceback.print_exc()
        report["errors"].append({"part": part, "error": f"{type(error).__name__}: {error}"})
        if torch.cuda.is_available():
            release_memory(torch.device("cuda"))
        return None


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    print(f"\nCUDA graphs on {report['device']['name']} ({report['shapes']})")
    for check_result in report["correctness"]:
        parts = {k: v for k, v in check_result.items() if isinstance(v, dict) and "max_abs_diff" in v}
        summary = ", ".join(f"{k} {v['max_abs_diff']:.2e} (noise {v['noise_floor']:.2e})" for k, v in parts.items())
        print(f"check N={check_result['batch']}: {'ok' if check_result['ok'] else 'MISMATCH'}: {summary}")
    print(f"{'clips':>5} {'perceive eager/graphs ms':>26} {'decide eager/graphs ms':>24} {'step eager/graphs ms':>22} "
          f"{'speedup':>8}")
    for row in report["timings"]:
        e, g = row["eager"], row["graphs"]
        print(f"{row['clips']:5d} {e['perceive_ms']:12.2f} / {g['perceive_ms']:9.2f} {e['decide_ms']:10.2f} / "
              f"{g['decide_ms']:9.2f} {e['step_ms']:9.2f} / {g['step_ms']:8.2f} {row['speedup']['step']:7.2f}x")
    for error in report["errors"]:
        print(f"error in {error['part']}: {error['error']}")


def sizes(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, not {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/graph_h200.json"))
    parser.add_argument("--device", default="cuda", help="torch device for real shapes (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke run, not a figure)")
    parser.add_argument("--sizes", type=sizes, default=[1, 2, 4, 8], help="clips per timed step (default 1,2,4,8)")
    parser.add_argument("--check-sizes", type=sizes, default=[1, 2, 4],
                        help="batch sizes of the correctness checks (default 1,2,4)")
    parser.add_argument("--reps", type=int, default=20, help="timed steps per size and mode (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3; captures graphs)")
    parser.add_argument("--history-clips", type=int, default=8,
                        help="clips of M in every stream's KV cache before timing (default 8: 512 tokens)")
    parser.add_argument("--max-graph-batch", type=int, default=16, help="decision rows graphed at most (default 16)")
    parser.add_argument("--max-graph-clips", type=int, default=8, help="clips perceived by a graph at most (default 8)")
    parser.add_argument("--compare-paged", action="store_true",
                        help="time the graphed steps again with the decision's attention on the masked SDPA path")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 1 or args.history_clips < 1:
        parser.error("--reps, --warmup and --history-clips must be at least 1")
    return args


def log(message: str) -> None:
    print(f"[graph-bench] {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("graph_bench: no CUDA device here; use --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    setup = build_setup(args)
    report = {
        "benchmark": "cuda_graphs",
        "device": device_info(setup.device),
        "shapes": "tiny" if args.tiny else "CLIP ViT-L/14-224 + Qwen2-1.5B (random weights, bf16)",
        "command": "python benchmarks/graph_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {"reps": args.reps, "warmup": args.warmup, "history_clips": args.history_clips,
                   "compare_paged": args.compare_paged,
                   "max_graph_batch": args.max_graph_batch, "max_graph_clips": args.max_graph_clips},
        "correctness": [], "timings": [], "errors": [],
    }
    for batch in args.check_sizes:
        log(f"correctness, N = {batch}")
        result = guarded(report, f"correctness N={batch}", lambda: check(setup, batch, args))
        if result is not None:
            report["correctness"].append(result)
            log(f"correctness, N = {batch}: {'ok' if result['ok'] else 'MISMATCH'}")
        write(report, args.out)
    for count in args.sizes:
        log(f"timing, N = {count}")
        result = guarded(report, f"timing N={count}", lambda: time_size(setup, count, args))
        if result is not None:
            report["timings"].append(result)
            log(f"timing, N = {count}: eager {result['eager']['step_ms']:.2f} ms, graphs "
                f"{result['graphs']['step_ms']:.2f} ms a step ({result['speedup']['step']:.2f}x)")
        write(report, args.out)
    report["all_ok"] = not report["errors"] and all(c["ok"] for c in report["correctness"])
    write(report, args.out)
    print_table(report)
    log(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
