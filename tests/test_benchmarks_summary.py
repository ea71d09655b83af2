"""benchmarks/streams_summary.py: every system's largest real-time N beside the sweep, and the targets judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import streams_summary  # noqa: E402


def stream_run(streams: int, realtime: bool, perceive_s: float = 0.05, steps: int = 100, p50: float = 0.02) -> dict:
    phase = {"count": steps, "mean": perceive_s}
    return {"streams": streams, "wall_s": 100.0, "realtime": {"ok": realtime},
            "decisions": {"count": 6 * streams, "latency_server_s": {"p50": p50, "p99": 5 * p50}},
            "server_metrics": {"sidecar_steps": {"step_s": {
                "perceive": phase, "decide": {"count": steps, "mean": 0.01},
                "prefill_frames": {"count": 0, "mean": None}}}}}


def sweep_report(runs: list[dict], *, blocking: bool = False, idle_p50: float = 0.02, p50s=None) -> dict:
    first_not = next((run["streams"] for run in runs if not run["realtime"]["ok"]), None)
    passing = [run["streams"] for run in runs
               if run["realtime"]["ok"] and (first_not is None or run["streams"] < first_not)]
    p50s = p50s or {}
    rows = [{"streams": run["streams"], "p50_s": p50s.get(run["streams"], idle_p50), "p99_s": 0.1,
             "p50_over_idle": round(p50s.get(run["streams"], idle_p50) / idle_p50, 4), "p99_over_idle": 2.0}
            for run in runs]
    within = [row["streams"] for row in rows if row["p50_over_idle"] <= 1.5 and row["streams"] in passing]
    return {"benchmark": "load_streams", "device": "test GPU", "started": "today",
            "config": {"blocking_reaction": blocking, "duration_s": 96, "stream_counts": [r["streams"] for r in runs]},
            "runs": runs,
            "sweep": {"max_realtime_streams": max(passing, default=None), "first_not_realtime": first_not,
                      "criteria": {"max_p99_decision_s": 2.0},
                      "latency_vs_idle": {"factor": 1.5, "idle_p50_s": idle_p50, "idle_p99_s": 0.05, "runs": rows,
                                          "largest_streams_within_factor_p50": max(within, default=None)}}}


def plain_run(streams: int, p99_ttft: float, completed: int = 10, planned: int = 10) -> dict:
    return {"streams": streams, "within_ttft_bound": p99_ttft <= 1.5,
            "requests": {"planned": planned, "completed": completed, "failed": 0, "unfinished": planned - completed}}


def write(tmp_path: Path, name: str, content: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def inputs(tmp_path):
    ours = sweep_report([stream_run(1, True), stream_run(320, True), stream_run(640, True), stream_run(704, False)],
                        p50s={320: 0.028, 640: 0.2, 704: 0.9})
    blocking = sweep_report([stream_run(320, True), stream_run(640, False)], blocking=True)
    # 1024 missed its TTFT bound; 1152 kept up again, but a sweep ends at its first miss.
    plain = {"benchmark": "plain_vllm", "device": "test GPU", "started": "today", "config": {"max_p99_ttft_s": 1.5},
             "runs": [plain_run(1152, 0.4), plain_run(768, 0.3), plain_run(1024, 2.0)]}
    reference = {"benchmark": "reference", "device": "test GPU",
                 "with_reaction": {"realtime_streams": 60.04, "seconds_per_clip": 0.266},
                 "perception_decision": {"realtime_streams": 100.0}}
    return {name: write(tmp_path, name, content) for name, content in
            (("ours", ours), ("blocking", blocking), ("plain", plain), ("reference", reference))}


def summarize(inputs: dict, tmp_path: Path, **only) -> dict:
    chosen = only or inputs
    args = [arg for name, path in chosen.items() for arg in (f"--{name}", str(path))]
    args += ["--out", str(tmp_path / "o.json")]
    return streams_summary.summarize(streams_summary.build_parser().parse_args(args))


def test_each_systems_largest_real_time_n_and_the_first_that_was_not(inputs, tmp_path):
    summary = summarize(inputs, tmp_path)
    systems = summary["systems"]
    assert systems["dispider-vllm"]["max_realtime_streams"] == 640
    assert systems["dispider-vllm"]["first_not_realtime"] == 704 and systems["dispider-vllm"]["bounded_above"]
    assert systems["blocking"]["max_realtime_streams"] == 320 and systems["blocking"]["first_not_realtime"] == 640
    assert systems["plain vLLM"]["max_realtime_streams"] == 768  # in ascending N, 1024 missed: 1152 does not count
    assert systems["plain vLLM"]["first_not_realtime"] == 1024
    assert systems["plain vLLM"]["streams_run"] == [768, 1024, 1152]
    assert systems["reference-style"]["max_realtime_streams"] == 60.04
    assert summary["runs"] == json.loads(inputs["ours"].read_text())["runs"]  # the sweep itself, unchanged
    benchmarks = [item["benchmark"] for item in summary["inputs"]]
    assert benchmarks == ["load_streams", "load_streams", "plain_vllm", "reference"]


def test_targets_are_judged_at_the_largest_real_time_n(inputs, tmp_path):
    targets = summarize(inputs, tmp_path)["targets"]
    assert targets["realtime_streams"] == {"target": 256, "value": 640, "met": True}
    assert targets["capacity_over_reference"]["value"] == pytest.approx(640 / 60.04, abs=0.01)
    assert targets["capacity_over_reference"]["met"] is True
    latency = targets["latency_under_full_load"]
    assert latency["at_streams"] == 640 and latency["p50_over_idle"] == 10.0 and latency["met"] is False
    assert latency["largest_streams_within_factor_p50"] == 320


def test_a_plain_run_with_an_answer_missing_does_not_keep_up(tmp_path):
    report = {"config": {"max_p99_ttft_s": 1.5}, "runs": [plain_run(256, 0.2), plain_run(512, 0.3, completed=9)]}
    plain = streams_summary.plain_system(report, tmp_path / "plain.json")
    assert plain["max_realtime_streams"] == 256 and plain["first_not_realtime"] == 512


def test_the_sidecars_busy_share_of_each_run():
    busy = streams_summary.busy_shares(sweep_report([stream_run(1, True, 0.01, 5), stream_run(640, True, 0.7, 100)]))
    assert busy == [{"streams": 1, "busy_s": 0.1, "wall_s": 100.0, "share_of_wall": 0.001},
                    {"streams": 640, "busy_s": 71.0, "wall_s": 100.0, "share_of_wall": 0.71}]


def test_without_a_reference_or_an_idle_run_the_targets_say_what_they_lack(tmp_path):
    no_idle = sweep_report([stream_run(256, True)])
    no_idle["sweep"]["latency_vs_idle"] = None
    targets = summarize({}, tmp_path, ours=write(tmp_path, "ours", no_idle))["targets"]
    assert targets["capacity_over_reference"] == {"target": 10.0, "value": None, "met": None}
    assert targets["latency_under_full_load"]["met"] is None
    assert "no idle run" in targets["latency_under_full_load"]["why_unjudged"]


def test_the_command_line_writes_json_and_refuses_mixed_up_inputs(inputs, tmp_path):
    out = tmp_path / "streams.json"
    command = [sys.executable, str(ROOT / "benchmarks/streams_summary.py")]
    all_inputs = [arg for name, path in inputs.items() for arg in (f"--{name}", str(path))]
    done = subprocess.run([*command, *all_inputs, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["systems"]["blocking"]["max_realtime_streams"] == 320
    assert "dispider-vllm    largest real-time N 640, first not: 704" in done.stdout
    for args, message in (((["--ours", inputs["blocking"]]), "a blocking sweep"),
                          ((["--ours", inputs["ours"], "--blocking", inputs["ours"]]), "did not block"),
                          ((["--ours", inputs["plain"]]), "not a load_streams sweep"),
                          ((["--ours", tmp_path / "missing.json"]), "cannot read")):
        refused = subprocess.run([*command, *map(str, args), "--out", str(out)], capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr


def test_sweeps_of_one_configuration_merge_in_order_of_n(tmp_path):
    """A sweep that missed at 832 after 320, and 768 run on a fresh server after it: judged together."""
    first = write(tmp_path, "first", sweep_report([stream_run(1, True), stream_run(320, True, p50=0.028),
                                                   stream_run(832, False, p50=0.4)]))
    resumed = write(tmp_path, "resumed", sweep_report([stream_run(768, True, p50=0.25)]))
    summary = summarize({}, tmp_path, ours=first)  # the first alone: 320
    assert summary["systems"]["dispider-vllm"]["max_realtime_streams"] == 320
    args = streams_summary.build_parser().parse_args(["--ours", str(first), str(resumed), "--out", str(tmp_path / "o")])
    merged = streams_summary.summarize(args)
    assert [(run["streams"], Path(run["source"]).name) for run in merged["runs"]] == \
        [(1, "first.json"), (320, "first.json"), (768, "resumed.json"), (832, "first.json")]
    assert merged["sweep"]["max_realtime_streams"] == 768 and merged["sweep"]["first_not_realtime"] == 832
    assert merged["config"]["stream_counts"] == [1, 320, 768, 832] and len(merged["merged_from"]) == 2
    latency = merged["targets"]["latency_under_full_load"]
    assert latency["at_streams"] == 768 and latency["p50_over_idle"] == 12.5
    assert latency["largest_streams_within_factor_p50"] == 320  # 0.028 / 0.02 = 1.4
    assert [item["file"] for item in merged["inputs"]] == [str(first), str(resumed)]


def test_sweeps_of_different_configurations_or_the_same_n_do_not_merge(tmp_path):
    first = write(tmp_path, "first", sweep_report([stream_run(1, True), stream_run(320, True)]))
    longer = sweep_report([stream_run(768, True)])
    longer["config"]["duration_s"] = 64
    again = write(tmp_path, "again", sweep_report([stream_run(320, True)]))
    for other, message in ((write(tmp_path, "longer", longer), "differs in duration_s"), (again, "the same N")):
        args = streams_summary.build_parser().parse_args(["--ours", str(first), str(other), "--out", str(tmp_path)])
        with pytest.raises(streams_summary.ReportError, match=message):
            streams_summary.summarize(args)


def without(report: dict, path: str) -> dict:
    """report with the field at a dotted path (a run's: ``"runs.1.realtime"``) deleted."""
    *parents, last = path.split(".")
    parent = report
    for key in parents:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    del parent[last]
    return report


def refused(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks/streams_summary.py"), *map(str, args), "--out",
               str(tmp_path / "o.json")]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def assert_refused_in_one_line(done: subprocess.CompletedProcess, *parts: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("streams_summary: ") and all(part in done.stderr for part in parts), done.stderr


def test_a_missing_or_non_json_file_is_refused_in_one_line(inputs, tmp_path):
    missing = tmp_path / "missing.json"
    assert_refused_in_one_line(refused(["--ours", missing], tmp_path), f"--ours {missing}: cannot read it")
    text = tmp_path / "notes.txt"
    text.write_text("largest real-time N: 768\n")
    assert_refused_in_one_line(refused(["--ours", inputs["ours"], "--plain", text], tmp_path),
                               f"--plain {text} is not a JSON report")
    assert not (tmp_path / "o.json").exists()


def test_an_out_path_that_cannot_be_written_is_refused_in_one_line(inputs, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "summary.json"  # a folder that is a file
    command = [sys.executable, str(ROOT / "benchmarks/streams_summary.py"), "--ours", str(inputs["ours"]),
               "--out", str(out)]
    assert_refused_in_one_line(subprocess.run(command, capture_output=True, text=True, timeout=60),
                               f"cannot write --out {out}")


def test_another_benchmarks_report_is_refused_in_one_line(inputs, tmp_path):
    assert_refused_in_one_line(refused(["--ours", inputs["plain"]], tmp_path),
                               f"--ours {inputs['plain']} is not a load_streams sweep: its benchmark is 'plain_vllm'")
    assert_refused_in_one_line(refused(["--ours", inputs["ours"], "--reference", inputs["ours"]], tmp_path),
                               f"--reference {inputs['ours']} is not a reference report")
    listed = write(tmp_path, "listed", [json.loads(inputs["ours"].read_text())])
    assert_refused_in_one_line(refused(["--ours", listed], tmp_path), f"--ours {listed}",
                               "it is a JSON list, not an object")


@pytest.mark.parametrize(("name", "field", "message"), [
    ("ours", "runs", "it has no 'runs'"),
    ("ours", "runs.1.realtime", "it has no 'runs[1].realtime.ok'"),
    ("ours", "runs.2.streams", "it has no 'runs[2].streams'"),
    ("ours", "config", "it has no 'config.duration_s'"),
    ("ours", "sweep", "it has no 'sweep' (run load_streams.py with --sweep)"),
    ("blocking", "device", "it has no 'device'"),
    ("plain", "runs.0.requests", "it has no 'runs[0].requests.planned'"),
    ("reference", "perception_decision", "it has no 'perception_decision.realtime_streams'"),
])
def test_a_report_without_a_field_the_summary_reads_is_refused_in_one_line(inputs, tmp_path, name, field, message):
    broken = write(tmp_path, f"broken_{name}", without(json.loads(inputs[name].read_text()), field))
    args = [arg for option, path in inputs.items() for arg in (f"--{option}", broken if option == name else path)]
    assert_refused_in_one_line(refused(args, tmp_path), f"--{name} {broken} is not a ", message)


def test_a_number_that_is_not_one_is_refused(inputs, tmp_path):
    ours = json.loads(inputs["ours"].read_text())
    ours["runs"][1]["streams"] = "320"
    with pytest.raises(streams_summary.ReportError, match=r"its 'runs\[1\].streams' is not a number \('320'\)"):
        summarize({}, tmp_path, ours=write(tmp_path, "ours_text_n", ours))
    reference = json.loads(inputs["reference"].read_text())
    reference["with_reaction"]["realtime_streams"] = None
    with pytest.raises(streams_summary.ReportError, match="its 'with_reaction.realtime_streams' is not a number"):
        summarize({}, tmp_path, ours=inputs["ours"], reference=write(tmp_path, "reference_no_n", reference))
