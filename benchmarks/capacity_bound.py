"""How many live streams one GPU could serve at best, from the throughput ceilings of its two engines.

    python benchmarks/capacity_bound.py \\
        --sidecar benchmarks/results/sidecar_h200.json \\
        --reaction benchmarks/results/plain_vllm_burst_h200.json \\
        --reference benchmarks/results/reference_h200.json \\
        --ours benchmarks/results/streams_h200.json \\
        --out benchmarks/results/capacity_bound_h200.json

A live stream asks the GPU for two kinds of work: perception and decision of one clip every 16 s, and one answer
every ``respond_every`` clips. Each has a measured ceiling on the GPU, reached only with the engine to itself and
fully batched:

- ``--sidecar``: ``sidecar_bench.py``'s clips/s (batches of 64 clips, perception + decision + trigger work), of
  its run ``--sidecar-run`` (``ours``, or ``ours_fp8`` from ``--compare-fp8``);
- ``--reaction``: ``plain_vllm_bench.py --arrivals burst``'s ``completed_per_s`` (vLLM's own Qwen2-7B, every
  answer's prompt and decode batched as the engine likes; our reaction model is this decoder plus projectors, so
  it is no faster).

However the two are scheduled on one GPU, the fractions of the GPU they use add up to at most 1:

    N / 16 / sidecar_clips_per_s + N / (16 * respond_every) / reaction_answers_per_s <= 1

which gives the largest N any design built on these two engines can reach on this GPU, before any latency bound.
Against the reference-style capacity (``reference_bench.py``, with its blocking reaction) that is the largest
capacity ratio within reach; the report also gives the sidecar throughput a ratio target would need (none is
enough when the answers alone need more than the GPU). ``--ours`` adds the measured largest real-time N.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CLIP_SECONDS = 16.0


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"capacity_bound: cannot read {path}: {error}") from error


def reaction_ceiling(report: dict) -> float:
    """The best answers/s of a burst run (the largest burst is the best-batched one)."""
    runs = [run for run in report.get("runs", []) if run.get("completed_per_s")]
    if report.get("config", {}).get("arrivals") != "burst" or not runs:
        raise SystemExit("capacity_bound: --reaction needs a plain_vllm_bench.py --arrivals burst report")
    return max(run["completed_per_s"] for run in runs)


def max_streams(sidecar_clips_per_s: float, answers_per_s: float, respond_every: int) -> float:
    """The N at which the two engines' shares of the GPU add up to one."""
    gpu_share_per_stream = 1 / (CLIP_SECONDS * sidecar_clips_per_s) + 1 / (
        CLIP_SECONDS * respond_every * answers_per_s)
    return 1 / gpu_share_per_stream


def sidecar_needed(streams: float, answers_per_s: float, respond_every: int) -> float | None:
    """Sidecar clips/s that would let ``streams`` fit beside their answers; None when the answers alone overflow."""
    left_for_sidecar = 1 - streams / (CLIP_SECONDS * respond_every * answers_per_s)
    return None if left_for_sidecar <= 0 else streams / CLIP_SECONDS / left_for_sidecar


def bound_report(args: argparse.Namespace) -> dict:
    sidecar, reaction, reference = load(args.sidecar), load(args.reaction), load(args.reference)
    if args.sidecar_run not in sidecar:
        raise SystemExit(f"capacity_bound: {args.sidecar} has no run {args.sidecar_run!r} "
                         f"(runs: {', '.join(k for k in sidecar if k.startswith('ours'))})")
    clips_per_s = sidecar[args.sidecar_run]["clips_per_s"]
    answers_per_s = reaction_ceiling(reaction)
    respond_every = reference["config"]["respond_every"]
    reference_streams = reference["with_reaction"]["realtime_streams"]
    bound = max_streams(clips_per_s, answers_per_s, respond_every)
    target_streams = args.target_ratio * reference_streams
    needed = sidecar_needed(target_streams, answers_per_s, respond_every)
    report = {
        "benchmark": "capacity_bound",
        "device": sidecar.get("device"),
        "inputs": {"sidecar": str(args.sidecar), "sidecar_run": args.sidecar_run, "reaction": str(args.reaction),
                   "reference": str(args.reference)},
        "reaction_quantization": reaction.get("config", {}).get("quantization"),
        "respond_every": respond_every,
        "sidecar_clips_per_s": round(clips_per_s, 3),
        "sidecar_alone_streams": round(CLIP_SECONDS * clips_per_s, 1),
        "reaction_answers_per_s": round(answers_per_s, 3),
        "reaction_alone_streams": round(CLIP_SECONDS * respond_every * answers_per_s, 1),
        "reaction_prompt_tokens": reaction["config"]["prompt_tokens"],
        "reaction_answer_tokens": reaction["config"]["max_tokens"],
        "reference_streams": round(reference_streams, 1),
        "bound_streams": round(bound, 1),
        "bound_ratio": round(bound / reference_streams, 2),
        "target_ratio": args.target_ratio,
        "target_streams": round(target_streams, 1),
        "sidecar_clips_per_s_needed": None if needed is None else round(needed, 1),
        "sidecar_speedup_needed": None if needed is None else round(needed / clips_per_s, 2),
    }
    if args.ours:
        measured = load(args.ours)["sweep"]["max_realtime_streams"]
        report["measured_streams"] = measured
        report["measured_source"] = str(args.ours)
        report["measured_ratio"] = round(measured / reference_streams, 2) if measured else None
        report["measured_share_of_bound"] = round(measured / bound, 3) if measured else None
    return report


def describe(report: dict) -> str:
    lines = [
        f"one GPU ({report['device']}), one answer every {report['respond_every']} clips "
        f"({report['reaction_prompt_tokens']}-token prompts, {report['reaction_answer_tokens']} tokens out):",
        f"  sidecar alone      {report['sidecar_clips_per_s']:8.2f} clips/s   = {report['sidecar_alone_streams']:7.1f} streams",
        f"  reaction alone     {report['reaction_answers_per_s']:8.2f} answers/s = {report['reaction_alone_streams']:7.1f} streams",
        f"  both on one GPU    at most {report['bound_streams']:.1f} streams = {report['bound_ratio']:.2f}x the "
        f"reference-style {report['reference_streams']:.1f}",
    ]
    if "measured_streams" in report:
        lines.append(f"  measured (live)    {report['measured_streams']} streams = {report['measured_ratio']}x, "
                     f"{100 * report['measured_share_of_bound']:.0f}% of the bound")
    needed = report["sidecar_speedup_needed"]
    lines.append(f"  {report['target_ratio']:g}x ({report['target_streams']:.0f} streams) would need "
                 + ("more than the whole GPU for the answers alone" if needed is None else
                    f"a sidecar {needed:.2f}x faster ({report['sidecar_clips_per_s_needed']} clips/s) with the "
                    "reaction at its ceiling and perfect packing"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/capacity_bound.py",
        description="The most live streams one GPU could serve, from the measured ceilings of the sidecar and "
                    "the reaction engine, against the reference-style capacity.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    parser.add_argument("--sidecar", type=Path, required=True, help="sidecar_bench.py JSON")
    parser.add_argument("--sidecar-run", default="ours", metavar="RUN",
                        help="which run of the sidecar report: ours (default), ours_fp8 (--compare-fp8), ours_unfused")
    parser.add_argument("--reaction", type=Path, required=True, help="plain_vllm_bench.py --arrivals burst JSON")
    parser.add_argument("--reference", type=Path, required=True, help="reference_bench.py JSON")
    parser.add_argument("--ours", type=Path, help="load_streams.py sweep JSON (the measured largest real-time N)")
    parser.add_argument("--target-ratio", type=float, default=10.0, help="capacity ratio to test (default 10)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = bound_report(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(describe(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
