"""Lay a load run's slowest decisions against what the sidecar was doing then.

    dispider-serve ... --sidecar-turn-log /tmp/turns.jsonl        # the server, writing the sidecar's timeline
    python benchmarks/load_streams.py ... --streams 256 --out run.json
    python benchmarks/turn_timeline.py run.json /tmp/turns.jsonl --streams 256

For the chosen run of a ``load_streams.py`` report it prints the sidecar's turns over the run (how long steps
and command handling took, the longest gaps between turns) and then, for each of the run's slowest decisions,
what the sidecar did while that decision waited: how many steps went by and how long they took, how many
commands it handled, whether it stopped turning at all. ``--out`` writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from bisect import bisect_left, bisect_right
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_streams import distribution  # noqa: E402

from dispider_vllm.sidecar.turn_log import Turn, read_turns  # noqa: E402


def pick_run(report: dict, streams: int | None) -> dict:
    runs = report.get("runs") or []
    if not runs:
        raise SystemExit("the report has no runs")
    if streams is None:
        return max(runs, key=lambda run: run["streams"])
    for run in runs:
        if run["streams"] == streams:
            return run
    raise SystemExit(f"no run with {streams} streams (runs: {[run['streams'] for run in runs]})")


def ends(turn: Turn) -> float:
    return turn.started + turn.handle_s + turn.step_s


def with_total(values: list[float]) -> dict:
    """load_streams' distribution, and the sum (how much of the run the loop spent on it)."""
    return {**distribution(values), "total": round(sum(values), 3)}


def run_turns(turns: list[Turn], run: dict) -> list[Turn]:
    if "started_unix" not in run:
        raise SystemExit("the run has no started_unix (a load_streams.py report from before the turn log)")
    t0 = run["started_unix"]
    return [t for t in turns if t0 <= t.started <= t0 + run["wall_s"]]


def overview(in_run: list[Turn], run: dict, top_gaps: int = 5) -> dict:
    t0 = run["started_unix"]
    gaps = sorted(((ends(a), b.started - ends(a)) for a, b in zip(in_run, in_run[1:])), key=lambda g: -g[1])
    return {"streams": run["streams"], "turns": len(in_run), "clips": sum(t.clips for t in in_run),
            "step_s": with_total([t.step_s for t in in_run if t.clips]),
            "handle_s": with_total([t.handle_s for t in in_run]),
            "longest_gaps": [{"at_s": round(at - t0, 3), "gap_s": round(gap, 4)} for at, gap in gaps[:top_gaps]]}


def answer_cost(in_run: list[Turn], after_s: float = 0.3) -> dict:
    """One-clip steps (the same work but for answers): those that emitted a trigger against those that did not,
    and those that began within ``after_s`` of an earlier trigger (its answer's prefill then shares the GPU)."""
    one_clip = [t for t in in_run if t.clips == 1]
    triggered_at = [t.started for t in in_run if t.events.get("Triggered")]

    def soon_after_trigger(turn: Turn) -> bool:  # a trigger in (started - after_s, started)
        return bisect_left(triggered_at, turn.started) > bisect_right(triggered_at, turn.started - after_s)

    quiet = [t for t in one_clip if not t.events.get("Triggered")]
    return {"one_clip_steps_s": {
        "emitting_a_trigger": distribution([t.step_s for t in one_clip if t.events.get("Triggered")]),
        "without_a_trigger": distribution([t.step_s for t in quiet]),
        f"within_{after_s:g}_s_after_a_trigger": distribution([t.step_s for t in quiet if soon_after_trigger(t)]),
        "not_after_a_trigger": distribution([t.step_s for t in quiet if not soon_after_trigger(t)]),
    }}


def while_waiting(decision: dict, in_run: list[Turn], t0: float) -> dict:
    """What the sidecar did from the client's sending of the clip's last frame to its receipt of the decision."""
    start, end = t0 + decision["at_s"] - decision["client_s"], t0 + decision["at_s"]
    during = [t for t in in_run if start <= t.started <= end]
    commands: Counter = Counter()
    for turn in during:
        commands.update(turn.commands)
    return {**{k: decision[k] for k in ("stream", "clip", "at_s", "server_s", "client_s")},
            "turns": len(during), "handle_s": round(sum(t.handle_s for t in during), 4),
            "steps": [{"at_s": round(t.started - t0, 3), "clips": t.clips, "step_s": round(t.step_s, 4)}
                      for t in during if t.clips],
            "commands": dict(commands)}


def summarize(turns: list[Turn], run: dict) -> dict:
    in_run = run_turns(turns, run)
    slowest = run["decisions"].get("slowest") or []
    return {"run": overview(in_run, run), "answers": answer_cost(in_run),
            "slowest": [while_waiting(decision, in_run, run["started_unix"]) for decision in slowest]}


def print_summary(summary: dict) -> None:
    run = summary["run"]
    print(f"{run['streams']} streams: {run['turns']} sidecar turns, {run['clips']} clips; steps {run['step_s']}; "
          f"command handling {run['handle_s']}")
    print("longest gaps between turns: " + ", ".join(f"{g['gap_s']:.3f} s at {g['at_s']:.1f} s"
                                                     for g in run["longest_gaps"]))
    print("one-clip steps, median s (count): " + ", ".join(
        f"{name.replace('_', ' ')} {dist['p50']} ({dist['count']})"
        for name, dist in summary["answers"]["one_clip_steps_s"].items()))
    print("\nthe slowest decisions, and the sidecar's steps while each waited (at s: clips in step_s):")
    for item in summary["slowest"]:
        steps = ", ".join(f"{s['at_s']:.2f}: {s['clips']} in {s['step_s']:.3f}" for s in item["steps"])
        print(f"  stream {item['stream']:>4} clip {item['clip']:>3} at {item['at_s']:7.2f} s  server {item['server_s']:.3f} s"
              f"  {item['turns']:>4} turns, handling {item['handle_s']:.3f} s  steps [{steps}]  {item['commands']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("report", type=Path, help="a load_streams.py JSON report")
    parser.add_argument("turns", type=Path, help="the sidecar's turn log (dispider-serve --sidecar-turn-log)")
    parser.add_argument("--streams", type=int, help="the run with this many streams (default: the largest)")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path in (args.report, args.turns):
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
    try:
        report = json.loads(args.report.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"{args.report}: not a load_streams.py JSON report ({error})") from None
    run = pick_run(report, args.streams)
    turns = read_turns(args.turns)
    if not turns:
        raise SystemExit(f"{args.turns}: no turns (not a sidecar turn log, or the sidecar did no work)")
    summary = summarize(turns, run)
    if args.out:  # first: a reader that stops early (| head) still gets the file
        args.out.write_text(json.dumps(summary, indent=1))
    print_summary(summary)
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the reader stopped early (| head): the JSON, if asked for, is written already
        sys.stdout = None
        sys.exit(0)
