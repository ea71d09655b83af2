"""The live-stream sweep with every system's largest real-time N beside it, and the three targets judged.

    python benchmarks/streams_summary.py --ours /tmp/h200/streams_mps_h200.json \\
        --blocking /tmp/h200/streams_mps_blocking_h200.json --plain /tmp/h200/plain_vllm_h200.json \\
        --reference /tmp/h200/reference_h200.json --out benchmarks/results/streams_h200.json

Reads the reports of one GPU session and measures nothing:

- ``--ours``: dispider-vllm's sweep (``load_streams.py --sweep``, N = 1 first for the idle server); several files
  (one server configuration on one machine, e.g. a sweep resumed on a fresh server at an N it skipped) are merged:
  their runs in order of N, each marked with its file, and the sweep judged again over all of them;
- ``--blocking``: the same server's sweep with sessions opened with ``"blocking_reaction": true``;
- ``--plain``: plain vLLM serving the reaction LLM alone under the answer load of N streams
  (``plain_vllm_bench.py``): a run keeps up when every answer came and its p99 time to first token is within the
  sweep's bound; the upper bound of the reaction path, with no perception or decision at all;
- ``--reference``: the reference-style computation with its blocking reaction (``reference_bench.py``): its
  real-time streams are 16 s over the cost of a clip, a fraction.

A file that is not the report its option expects (another benchmark's, one without a field the summary uses, not
JSON, missing) is refused in one line naming the option, the file and what it lacks, with exit status 2; so is an
``--out`` that cannot be written.

The output is the ``--ours`` report unchanged, plus ``systems`` (the largest real-time N of each, and the first N
that was not, where the sweep reached one), ``targets`` (>= 256 real-time streams, >= 10x the reference-style
capacity, decision latency at the largest real-time N within 1.5x of the idle server's), ``sidecar_busy`` (the
share of each run the sidecar spent in its steps: near 1, clips queue for the GPU whatever a step costs) and
``inputs`` (each file, its device and start: check they are one session's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_streams import latency_against_idle  # noqa: E402

CLIP_SECONDS = 16
TARGET_STREAMS = 256
TARGET_RATIO = 10.0
TARGET_LATENCY_FACTOR = 1.5
PER_SWEEP_CONFIG = ("stream_counts", "client_procs_by_streams")  # what may differ between merged sweeps


class ReportError(ValueError):
    """An input that is not the report its option expects: the user's mistake, told in one line, not a traceback."""


_ABSENT = object()


def lookup(report: dict, path: str) -> object:
    """The value at a dotted path (``"sweep.criteria"``), or ``_ABSENT`` where a part is missing or not an object."""
    value = report
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return _ABSENT
        value = value[key]
    return value


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(report: dict, what: str, fields: tuple[str, ...], numbers: tuple[str, ...] = (), prefix: str = "") -> None:
    """Refuse report (``what``: "--ours FILE is not a ...") without each of fields and numbers, or with one of numbers
    not a number; ``prefix`` places a run's fields in its report (``"runs[2]."``)."""
    for path in (*fields, *numbers):
        if lookup(report, path) is _ABSENT:
            raise ReportError(f"{what}: it has no {prefix + path!r}")
    for path in numbers:
        if not is_number(value := lookup(report, path)):
            raise ReportError(f"{what}: its {prefix + path!r} is not a number ({value!r})")


def require_runs(report: dict, what: str, fields: tuple[str, ...]) -> None:
    """Every run with fields, and its N a number (the runs are sorted and compared by it)."""
    if not isinstance(report["runs"], list):
        raise ReportError(f"{what}: its 'runs' is not a list")
    for index, run in enumerate(report["runs"]):
        require(run, what, fields, numbers=("streams",), prefix=f"runs[{index}].")


def check_sweep(report: dict, what: str) -> None:
    """What the summary reads of a load_streams sweep; the decisions' latency, to judge merged sweeps again."""
    if report.get("sweep") is None:  # load_streams.py writes a sweep only with --sweep
        raise ReportError(f"{what}: it has no 'sweep' (run load_streams.py with --sweep)")
    require(report, what, ("device", "config.duration_s", "config.stream_counts", "runs", "sweep.max_realtime_streams",
                           "sweep.first_not_realtime", "sweep.criteria"))
    require_runs(report, what, ("realtime.ok", "decisions.count", "decisions.latency_server_s.p50",
                                "decisions.latency_server_s.p99"))
    if report["sweep"].get("latency_vs_idle") is not None:  # None: no idle run, the latency target unjudged
        require(report["sweep"]["latency_vs_idle"], what, ("idle_p50_s", "runs", "largest_streams_within_factor_p50"),
                prefix="sweep.latency_vs_idle.")


def check_plain(report: dict, what: str) -> None:
    require(report, what, ("config.max_p99_ttft_s", "runs"))
    require_runs(report, what, ("within_ttft_bound", "requests.planned", "requests.completed", "requests.failed",
                                "requests.unfinished"))


def check_reference(report: dict, what: str) -> None:
    require(report, what, ("with_reaction.seconds_per_clip",),
            numbers=("with_reaction.realtime_streams", "perception_decision.realtime_streams"))


# Each benchmark's report as the summary reads it, and its check.
REPORT_KINDS = {"load_streams": ("a load_streams sweep", check_sweep),
                "plain_vllm": ("a plain_vllm report", check_plain),
                "reference": ("a reference report", check_reference)}


def load_report(path: Path, option: str, benchmark: str) -> dict:
    """The report given to option, refused with a ReportError unless it is benchmark's with what the summary reads."""
    where = f"{option} {path}"
    try:
        report = json.loads(path.read_text())
    except OSError as error:
        raise ReportError(f"{where}: cannot read it ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{where} is not a JSON report ({error})") from None
    kind, check = REPORT_KINDS[benchmark]
    what = f"{where} is not {kind}"
    if not isinstance(report, dict):
        raise ReportError(f"{what}: it is a JSON {type(report).__name__}, not an object")
    if report.get("benchmark") != benchmark:
        raise ReportError(f"{what}: its benchmark is {report.get('benchmark')!r}")
    check(report, what)
    return report


def judge_sweep(runs: list[dict], criteria: dict, idle_factor: float) -> dict:
    """load_streams.py's verdict over runs in order of N: the largest real-time N below the first that was not."""
    first_not = next((run["streams"] for run in runs if not run["realtime"]["ok"]), None)
    passing = [run["streams"] for run in runs
               if run["realtime"]["ok"] and (first_not is None or run["streams"] < first_not)]
    return {"max_realtime_streams": max(passing, default=None), "first_not_realtime": first_not,
            "criteria": criteria, "latency_vs_idle": latency_against_idle(runs, idle_factor)}


def merge_sweeps(reports: list[dict], paths: list[Path], option: str) -> dict:
    """One report of several sweeps of one server configuration on one device."""
    first = reports[0]
    same = {key: value for key, value in first["config"].items() if key not in PER_SWEEP_CONFIG}
    for report, path in zip(reports[1:], paths[1:]):
        differing = sorted(key for key, value in same.items() if report["config"].get(key) != value)
        if differing or report["device"] != first["device"]:
            raise ReportError(f"{option} {path}: not the configuration of {paths[0]} (differs in "
                              f"{', '.join(differing) or 'device'}): sweeps merge only when they differ in N alone")
    runs = sorted(({**run, "source": str(path)} for report, path in zip(reports, paths) for run in report["runs"]),
                  key=lambda run: run["streams"])
    if len({run["streams"] for run in runs}) < len(runs):
        raise ReportError(f"{option} {', '.join(map(str, paths))}: the same N in two sweeps: which one counts is "
                          "not clear")
    factor = (first["sweep"].get("latency_vs_idle") or {}).get("factor", TARGET_LATENCY_FACTOR)
    return {**first, "config": {**first["config"], "stream_counts": [run["streams"] for run in runs]},
            "merged_from": [{"file": str(path), "started": report.get("started"),
                             "streams": report["config"]["stream_counts"]} for report, path in zip(reports, paths)],
            "runs": runs, "sweep": judge_sweep(runs, first["sweep"]["criteria"], factor)}


def sweep_system(report: dict, path: Path) -> dict:
    """A load_streams sweep's largest real-time N, the first N that was not, the N it ran and for how long."""
    sweep = report["sweep"]
    first_not = sweep["first_not_realtime"]
    return {"max_realtime_streams": sweep["max_realtime_streams"], "first_not_realtime": first_not,
            "streams_run": [run["streams"] for run in report["runs"]], "bounded_above": first_not is not None,
            "duration_s": report["config"]["duration_s"], "source": path}


def plain_keeps_up(run: dict) -> bool:
    requests = run["requests"]
    return bool(run["within_ttft_bound"]) and requests["failed"] == 0 and requests["unfinished"] == 0 \
        and requests["completed"] == requests["planned"]


def plain_system(report: dict, path: Path) -> dict:
    """Plain vLLM's largest N that kept up, runs in ascending N, stopping at the first that did not."""
    runs = sorted(report["runs"], key=lambda run: run["streams"])
    first_not = next((run["streams"] for run in runs if not plain_keeps_up(run)), None)
    below_first_miss = [run for run in runs if first_not is None or run["streams"] < first_not]
    return {"max_realtime_streams": max((run["streams"] for run in below_first_miss), default=None),
            "first_not_realtime": first_not,
            "streams_run": [run["streams"] for run in runs], "bounded_above": first_not is not None,
            "criteria": {"max_p99_ttft_s": report["config"]["max_p99_ttft_s"], "every_answer_completed": True},
            "what": "the reaction LLM alone (no perception, no decision): the upper bound of the reaction path",
            "source": str(path)}


def reference_system(report: dict, path: Path) -> dict:
    return {"max_realtime_streams": round(report["with_reaction"]["realtime_streams"], 3),
            "perception_decision_only_streams": round(report["perception_decision"]["realtime_streams"], 1),
            "seconds_per_clip": report["with_reaction"]["seconds_per_clip"],
            "what": "transformers, one stream at a time, perception -> decision -> blocking reaction: "
                    f"{CLIP_SECONDS} s over the cost of a clip", "source": str(path)}


def sidecar_busy(run: dict) -> dict | None:
    """Seconds the sidecar spent in its steps (every phase), and their share of the run's wall time."""
    phases = ((run.get("server_metrics") or {}).get("sidecar_steps") or {}).get("step_s") or {}
    if not phases or not run.get("wall_s"):
        return None
    busy = sum(phase["count"] * phase["mean"] for phase in phases.values() if phase and phase.get("mean") is not None)
    return {"streams": run["streams"], "busy_s": round(busy, 2), "wall_s": run["wall_s"],
            "share_of_wall": round(busy / run["wall_s"], 3)}


def busy_shares(report: dict) -> list[dict]:
    return [row for run in report["runs"] if (row := sidecar_busy(run)) is not None]


def latency_target(report: dict, at_streams: int | None) -> dict:
    against_idle = report["sweep"].get("latency_vs_idle")
    if against_idle is None or at_streams is None:
        return {"target_factor": TARGET_LATENCY_FACTOR, "met": None,
                "why_unjudged": "no idle run (N = 1) in the sweep" if against_idle is None else "no real-time N"}
    row = next(row for row in against_idle["runs"] if row["streams"] == at_streams)
    return {"target_factor": TARGET_LATENCY_FACTOR, "at_streams": at_streams,
            "idle_p50_s": against_idle["idle_p50_s"], "p50_s": row["p50_s"], "p99_s": row["p99_s"],
            "p50_over_idle": row["p50_over_idle"], "p99_over_idle": row["p99_over_idle"],
            "met": row["p50_over_idle"] is not None and row["p50_over_idle"] <= TARGET_LATENCY_FACTOR,
            "largest_streams_within_factor_p50": against_idle["largest_streams_within_factor_p50"],
            "judged_on": "the server's decision latency at the median, at the sweep's largest real-time N"}


def judge_targets(ours_report: dict, systems: dict) -> dict:
    ours = systems["dispider-vllm"]["max_realtime_streams"]
    reference = systems.get("reference-style", {}).get("max_realtime_streams")
    ratio = ours / reference if ours is not None and reference else None
    return {
        "realtime_streams": {"target": TARGET_STREAMS, "value": ours,
                             "met": ours is not None and ours >= TARGET_STREAMS},
        "capacity_over_reference": {"target": TARGET_RATIO, "value": None if ratio is None else round(ratio, 2),
                                    "met": None if ratio is None else ratio >= TARGET_RATIO},
        "latency_under_full_load": latency_target(ours_report, ours),
    }


def describe_input(report: dict, path: Path) -> dict:
    return {"file": str(path), "benchmark": report["benchmark"], "device": report.get("device"),
            "started": report.get("started")}


def summarize(args: argparse.Namespace) -> dict:
    ours_reports = [load_report(path, "--ours", "load_streams") for path in args.ours]
    ours = ours_reports[0] if len(ours_reports) == 1 else merge_sweeps(ours_reports, args.ours, "--ours")
    if ours["config"].get("blocking_reaction"):
        raise ReportError(f"--ours {args.ours[0]}: a blocking sweep, not dispider-vllm's own (pass it as --blocking)")
    systems = {"dispider-vllm": sweep_system(ours, ", ".join(map(str, args.ours)))}
    inputs = [describe_input(report, path) for report, path in zip(ours_reports, args.ours)]
    if args.blocking:
        blocking = load_report(args.blocking, "--blocking", "load_streams")
        if not blocking["config"].get("blocking_reaction"):
            raise ReportError(f"--blocking {args.blocking}: its sessions did not block (run load_streams.py "
                              "--blocking-reaction)")
        systems["blocking"] = sweep_system(blocking, str(args.blocking))
        inputs.append(describe_input(blocking, args.blocking))
    if args.plain:
        plain = load_report(args.plain, "--plain", "plain_vllm")
        systems["plain vLLM"] = plain_system(plain, args.plain)
        inputs.append(describe_input(plain, args.plain))
    if args.reference:
        reference = load_report(args.reference, "--reference", "reference")
        systems["reference-style"] = reference_system(reference, args.reference)
        inputs.append(describe_input(reference, args.reference))
    return {**ours, "systems": systems, "targets": judge_targets(ours, systems), "sidecar_busy": busy_shares(ours),
            "inputs": inputs}


def print_summary(summary: dict) -> None:
    devices = sorted({str(item["device"]) for item in summary["inputs"]})
    print(f"on {', '.join(devices)}" + ("" if len(devices) == 1 else " (inputs from more than one device!)"))
    for name, system in summary["systems"].items():
        above = f", first not: {system['first_not_realtime']}" if system.get("first_not_realtime") else ""
        print(f"  {name:16} largest real-time N {system['max_realtime_streams']}{above}")
    durations = {system["duration_s"] for system in summary["systems"].values() if "duration_s" in system}
    if len(durations) > 1:
        print(f"  (the live sweeps streamed for different durations: {sorted(durations)} s; a longer run shows a "
              "backlog sooner)")
    for name, target in summary["targets"].items():
        value = target.get("value", target.get("p50_over_idle"))
        print(f"  target {name}: {value} (met: {target['met']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", type=Path, nargs="+", required=True, metavar="FILE",
                        help="dispider-vllm's load_streams sweep (several: merged, as above)")
    parser.add_argument("--blocking", type=Path, metavar="FILE", help="the blocking sweep on the same server")
    parser.add_argument("--plain", type=Path, metavar="FILE", help="plain_vllm_bench.py's report")
    parser.add_argument("--reference", type=Path, metavar="FILE", help="reference_bench.py's report")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the summary JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = summarize(args)
    except ReportError as error:  # a wrong input: one line and argparse's status, not a traceback
        print(f"streams_summary: {error}", file=sys.stderr)
        return 2
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    except OSError as error:
        print(f"streams_summary: cannot write --out {args.out} ({error.strerror or error})", file=sys.stderr)
        return 2
    print_summary(summary)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
