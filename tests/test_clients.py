"""The clients against the real server (the session-scoped ``dispider_server`` fixture of conftest.py, which
answers every 2nd clip): ``dispider-stream`` over HTTP and WebSocket, the OpenAI SDK example, and the load
benchmark's report. Plus the small pure pieces they are built from (no server needed).

Random weights may answer a trigger with silence, so answer counts are checked against the triggers and the
client's own summary, never fixed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clients.local_server import free_port
from clients.server_metrics import Histogram, MetricsSnapshot
from clients.stream_video import (
    EXIT_BAD_INPUT,
    EXIT_UNREACHABLE,
    Pacer,
    StreamSettings,
    TimelinePrinter,
    _parse_sse,
    main as stream_main,
    stream_session,
    thin,
    video_file_frames,
    video_time,
)
from dispider_vllm.types import Frame

ROOT = Path(__file__).resolve().parents[1]
CLIP_SECONDS = 16
LABEL = r"\[(\d\d:\d\d)-(\d\d:\d\d)\]"


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("load_streams", ROOT / "benchmarks" / "load_streams.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[int, Path]:
    from dispider_vllm.video.synth import make_test_video

    folder = tmp_path_factory.mktemp("client-videos")
    return {s: make_test_video(folder / f"v{s}.mp4", seconds=s, fps=2, scenes=s // CLIP_SECONDS, seed=s)
            for s in (32, 64)}


def triggered_labels(seconds: int, every: int) -> set[str]:
    """The ``[mm:ss-mm:ss]`` labels of the clips the server is forced to answer."""
    return {f"[{video_time(i * CLIP_SECONDS)}-{video_time((i + 1) * CLIP_SECONDS)}]"
            for i in range(seconds // CLIP_SECONDS) if (i + 1) % every == 0}


def run_python(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ---- pure pieces ------------------------------------------------------------------------------------------------
def test_thin_keeps_a_grid_and_skips_gaps():
    frames = [Frame(t / 4, None) for t in range(12)] + [Frame(10.1, None), Frame(10.3, None), Frame(10.6, None)]
    assert [f.timestamp for f in thin(iter(frames), 2.0)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 10.1, 10.6]
    assert len(list(thin(iter(frames), math.inf))) == len(frames)


def test_pacer_and_video_time():
    async def lags():
        pacer = Pacer(speed=20.0)
        return [await pacer.wait_for(t) for t in (0.0, 1.0, 2.0)]

    assert all(0 <= lag < 0.5 for lag in asyncio.run(lags()))
    assert (video_time(75), video_time(3725), video_time(0.4)) == ("01:15", "1:02:05", "00:00")


def test_sse_parser_reads_ids_names_and_skips_keepalives():
    async def parse(lines):
        async def source():
            for line in lines:
                yield line

        return [item async for item in _parse_sse(source())]

    lines = ["id: 3", "event: decision", 'data: {"clip": 0}', "", ": keep-alive", "", 'data: {"a": 1}', ""]
    assert asyncio.run(parse(lines)) == [("3", "decision", {"clip": 0}), (None, "message", {"a": 1})]


def test_histogram_quantiles_and_deltas():
    text = "\n".join([
        "# TYPE x_seconds histogram",
        'x_seconds_bucket{le="0.1"} 2', 'x_seconds_bucket{le="1.0"} 4', 'x_seconds_bucket{le="+Inf"} 4',
        "x_seconds_count 4", "x_seconds_sum 1.3", "",
    ])
    histogram = MetricsSnapshot.parse(text).histogram("x_seconds")
    assert histogram.count == 4 and histogram.quantile(0.5) == pytest.approx(0.1)
    assert histogram.quantile(0.75) == pytest.approx(0.55)
    empty = histogram.minus(histogram)
    assert empty.count == 0 and empty.quantile(0.5) is None
    assert Histogram(((math.inf, 1.0),), 1, 3.0).quantile(0.5) == 0.0


def test_benchmark_statistics():
    bench = load_benchmark_module()
    spread = bench.distribution([float(v) for v in range(1, 101)])
    assert spread["count"] == 100 and spread["p50"] == pytest.approx(50.5) and spread["max"] == 100
    assert bench.distribution([])["p99"] is None
    assert bench.rise_over_run([(0, 1.0), (10, 2.0), (20, 3.0)]) == pytest.approx(2.0)
    assert bench.rise_over_run([(0, 1.0), (10, 1.0), (20, 1.0)]) == 0.0


def test_stream_client_errors_have_exit_codes(videos, tmp_path):
    unused = f"http://127.0.0.1:{free_port()}"
    for argv, code in (([str(tmp_path / "missing.mp4"), "--url", unused], EXIT_BAD_INPUT),
                       ([str(videos[32]), "--url", unused], EXIT_UNREACHABLE)):
        with pytest.raises(SystemExit) as exited:
            stream_main(argv)
        assert exited.value.code == code, argv
    if not Path("/dev/video97").exists():
        with pytest.raises(SystemExit) as exited:
            stream_main(["--camera", "97", "--url", unused])
        assert exited.value.code == EXIT_BAD_INPUT


# ---- against the server -----------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_stream_client_prints_answers_with_video_times(dispider_server, videos):
    done = run_python("-m", "clients.stream_video", str(videos[64]), "--url", dispider_server.url, "--speed", "8",
                      "--show-decisions", "--max-tokens", "4", "--question", "What changes?")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    decisions = [line for line in lines if re.match(LABEL + " decision: ", line)]
    answers = [line for line in lines if re.match(LABEL + " ", line) and line not in decisions]
    assert [d[:13] for d in decisions] == ["[00:00-00:16]", "[00:16-00:32]", "[00:32-00:48]", "[00:48-01:04]"]
    assert ["respond" in d for d in decisions] == [False, True, False, True]
    summary = re.search(r"session sess-\S+: (\d+) frames, 4 clips, 4 decisions, (\d+) answers \(end_of_stream",
                        done.stderr)
    assert summary, done.stderr
    assert int(summary.group(1)) == 128  # 64 s pushed at the default 2 frames/s
    # An answer cut by a decision line goes on under its label again: count labels, not lines.
    assert len({answer[:13] for answer in answers}) == int(summary.group(2)) <= 2
    for answer in answers:
        assert answer[:13] in triggered_labels(64, dispider_server.respond_every) and answer[14:].strip()


@pytest.mark.timeout(300)
def test_stream_session_over_websocket(dispider_server, videos, capsys):
    settings = StreamSettings(url=dispider_server.url, question="And now?", speed=math.inf, via="ws", max_tokens=4)
    report = asyncio.run(stream_session(settings, video_file_frames(videos[32]), TimelinePrinter()))
    assert report.ended_normally and not report.errors
    assert [d.clip for d in report.decisions] == [0, 1] and report.end["clips"] == 2
    for response in report.responses.values():
        assert (response.clip, response.start, response.end) == (1, 16, 32) and response.text
        assert response.finish_reason in ("stop", "length")
    printed = capsys.readouterr().out
    assert printed.count("[00:16-00:32] ") == len(report.responses)


@pytest.mark.timeout(300)
def test_openai_sdk_example_runs(dispider_server, videos):
    done = run_python("clients/chat_example.py", "--base-url", dispider_server.openai_base_url,
                      "--video", str(videos[32]), "--max-tokens", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    *lines, summary = done.stdout.strip().splitlines()
    found = re.fullmatch(r"-- (\d+) answers, 2 clips decided \(finish reason: (stop|length)\)", summary)
    assert found, done.stdout
    answers = [line for line in lines if re.match(LABEL + " ", line)]  # an answer may hold newlines of its own
    assert len(answers) == int(found.group(1)) <= 1
    assert all(line.startswith("[00:16-00:32] ") for line in answers)


@pytest.mark.timeout(300)
def test_load_benchmark_report_is_well_formed(dispider_server, tmp_path):
    out = tmp_path / "load.json"
    done = run_python("benchmarks/load_streams.py", "--url", dispider_server.url, "--streams", "2",
                      "--duration", "32", "--speed", "2", "--stagger", "2", "--max-tokens", "4",
                      "--frame-size", "320x240", "--respond-every", str(dispider_server.respond_every),
                      "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert {"benchmark", "version", "config", "server", "environment", "runs"} <= set(report)
    assert report["config"]["client_pool"] == "per-stream"  # each stream on connections of its own
    (run,) = report["runs"]
    assert {"streams", "wall_s", "frames", "decisions", "responses", "errors", "server_backlog", "server_metrics",
            "gpu_memory", "client_loop_lag_s", "realtime"} <= set(run)
    assert run["streams"] == 2 and run["frames"]["sent"] + run["frames"]["dropped"] == 64
    assert run["decisions"]["count"] == run["decisions"]["expected"] == 4
    assert run["decisions"]["respond"] == 2 and run["responses"]["triggers"] == 2
    assert not run["errors"]["failed_streams"] and not run["errors"]["events"]
    for name in ("latency_server_s", "latency_client_s"):
        assert run["decisions"][name]["count"] == 4
    for dist in (run["decisions"]["latency_server_s"], run["decisions"]["latency_client_s"], run["frames"]["push_lag_s"],
                 run["responses"]["ttft_s"], run["responses"]["itl_s"], run["responses"]["tokens_per_s_per_answer"]):
        assert {"count", "mean", "p50", "p90", "p99", "max"} <= set(dist)
        if dist["count"]:
            assert dist["p50"] <= dist["p90"] <= dist["p99"] <= dist["max"]
    assert run["responses"]["ttft_s"]["count"] == run["responses"]["answered"]
    assert isinstance(run["realtime"]["ok"], bool) and isinstance(run["realtime"]["reasons"], list)
    assert run["server_metrics"]["decision_latency_s"]["count"] >= 4
    # The slowest decisions, slowest first: when in the run, which stream and clip (here: all four).
    slowest = run["decisions"]["slowest"]
    assert sorted((d["stream"], d["clip"]) for d in slowest) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [d["server_s"] for d in slowest] == sorted((d["server_s"] for d in slowest), reverse=True)
    assert all(0 < d["at_s"] < run["wall_s"] and d["server_s"] > 0 for d in slowest)
    # Both processes' garbage collections over the run are in the report, by generation (whether one happened in
    # so short a run depends on allocations; tests/test_sidecar_metrics.py times real collections).
    gc_pauses = run["server_metrics"]["gc_pauses_s"]
    assert set(gc_pauses) == {"server", "sidecar"} and all(set(by_gen) == {"0", "1", "2"} for by_gen in gc_pauses.values())
    assert all(pauses["count"] >= 0 and pauses["total_s"] >= 0 for by_gen in gc_pauses.values() for pauses in by_gen.values())
    loop_lag = run["server_metrics"]["server_loop_lag_s"]  # the server's event loop ticked all along the run
    assert loop_lag["count"] > 0 and loop_lag["stalls_over_0.5_s"] >= 0
    pushes = run["server_metrics"]["frame_push_s"]  # every pushed frame timed in the server, by phase
    assert set(pushes) == {"read", "decode", "handled"}
    assert all(pushes[phase]["count"] == run["frames"]["sent"] for phase in pushes)
    # Each push's round trip is split by the server's own time (its Server-Timing header): both parts of every push.
    frames = run["frames"]
    assert frames["push_in_server_s"]["count"] == frames["push_outside_server_s"]["count"] == frames["sent"]
    assert 0 < frames["push_in_server_s"]["p50"] <= frames["push_rtt_s"]["p50"]
    assert frames["push_outside_server_s"]["max"] <= frames["push_rtt_s"]["max"]
    # ... and by the client's trace of each request: before it went out, and awaiting the response's headers.
    assert frames["push_before_sending_s"]["count"] == frames["push_awaiting_response_s"]["count"] == frames["sent"]
    assert 0 < frames["push_awaiting_response_s"]["p50"] < frames["push_rtt_s"]["max"]
    slow = frames["slow_pushes"]
    assert slow["over_s"] == 0.5 and len(slow["slowest"]) == min(slow["count"], 12)
    assert sum(second["pushes"] for second in slow["busiest_seconds"]) <= slow["count"]
    assert_numbers_finite(report)
    # The sidecar's turn log (--sidecar-turn-log) lines up with the run: its turns over the run stepped the run's
    # four clips, and the timeline tool lists the turns around the slowest decisions.
    timeline = tmp_path / "timeline.json"
    done = run_python("benchmarks/turn_timeline.py", str(out), str(dispider_server.turn_log), "--streams", "2",
                      "--out", str(timeline))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(timeline.read_text())
    assert summary["run"]["clips"] == 4 and summary["run"]["step_s"]["count"] >= 1
    one_clip = summary["answers"]["one_clip_steps_s"]  # every one-clip step in exactly one of each split
    one_clip_steps = one_clip["emitting_a_trigger"]["count"] + one_clip["without_a_trigger"]["count"]
    assert one_clip_steps <= summary["run"]["step_s"]["count"]
    assert one_clip["without_a_trigger"]["count"] == (one_clip["within_0.3_s_after_a_trigger"]["count"]
                                                      + one_clip["not_after_a_trigger"]["count"])
    assert sorted((d["stream"], d["clip"]) for d in summary["slowest"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for waited in summary["slowest"]:  # its own step and the frame that closed its clip fall in its wait
        assert sum(step["clips"] for step in waited["steps"]) >= 1 and waited["commands"].get("PushFrames"), waited


@pytest.mark.timeout(300)
def test_load_benchmark_merges_client_processes(dispider_server, tmp_path):
    """--client-procs 2: each stream in its own spawned client process, the logs merged into one report; the
    streams of a process share one connection pool (--client-pool shared)."""
    out = tmp_path / "load.json"
    done = run_python("benchmarks/load_streams.py", "--url", dispider_server.url, "--streams", "2",
                      "--client-procs", "2", "--duration", "16", "--speed", "2", "--stagger", "2",
                      "--max-tokens", "4", "--frame-size", "320x240", "--no-warmup", "--keepalive-expiry", "5",
                      "--client-pool", "shared", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "client procs 2" in done.stdout
    report = json.loads(out.read_text())
    assert report["config"]["client_procs"] == 2 and report["config"]["keepalive_expiry_s"] == 5
    assert report["config"]["client_pool"] == "shared"
    (run,) = report["runs"]
    assert run["client_procs"] == 2 and len(run["client_loop_lag_by_proc_s"]) == 2
    assert run["frames"]["sent"] + run["frames"]["dropped"] == 32
    assert run["decisions"]["count"] == run["decisions"]["expected"] == 2  # one clip from each stream
    assert run["decisions"]["latency_client_s"]["count"] == 2  # both streams' send times line up with their events
    assert not run["errors"]["failed_streams"] and not run["errors"]["events"]
    assert_numbers_finite(report)


@pytest.mark.timeout(400)
def test_load_sweeps_and_their_summary(dispider_server, tmp_path):
    """A sweep with the idle run first, a blocking sweep on the same server, and streams_summary.py over both: the
    largest real-time N of each system and the targets judged (the CPU's figures are not a speed)."""
    common = ["--url", dispider_server.url, "--duration", "32", "--speed", "2", "--stagger", "2", "--max-tokens", "4",
              "--frame-size", "320x240", "--respond-every", str(dispider_server.respond_every), "--no-warmup"]
    ours, blocking, summary_path = tmp_path / "ours.json", tmp_path / "blocking.json", tmp_path / "streams.json"
    for out, extra in ((ours, ["--sweep", "1", "2"]), (blocking, ["--sweep", "2", "--blocking-reaction"])):
        done = run_python("benchmarks/load_streams.py", *common, *extra, "--out", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
    done = run_python("benchmarks/streams_summary.py", "--ours", str(ours), "--blocking", str(blocking),
                      "--out", str(summary_path))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(summary_path.read_text())
    assert [run["streams"] for run in summary["runs"]] == [1, 2] and summary["sweep"]["latency_vs_idle"]["idle_p50_s"] > 0
    for name, runs in (("dispider-vllm", [1, 2]), ("blocking", [2])):
        system = summary["systems"][name]
        assert system["streams_run"] == runs and system["max_realtime_streams"] in (None, *runs)
    assert json.loads(blocking.read_text())["config"]["blocking_reaction"] is True
    latency = summary["targets"]["latency_under_full_load"]
    assert latency["met"] in (True, False, None) and summary["targets"]["capacity_over_reference"]["met"] is None
    assert [row["streams"] for row in summary["sidecar_busy"]] == [1, 2]
    assert all(0 < row["busy_s"] < row["wall_s"] for row in summary["sidecar_busy"])


def test_load_benchmark_rates_each_runs_decision_latency_against_the_idle_run():
    bench = load_benchmark_module()

    def run(streams, p50, p99, realtime=True):
        return {"streams": streams, "realtime": {"ok": realtime},
                "decisions": {"count": 6 * streams, "latency_server_s": {"p50": p50, "p99": p99}}}

    runs = [run(1, 0.02, 0.1), run(64, 0.025, 0.14), run(128, 0.029, 0.2), run(256, 0.04, 0.12), run(512, 0.02, 0.1, False)]
    rated = bench.latency_against_idle(runs, 1.5)
    assert rated["idle_p50_s"] == 0.02 and rated["idle_decisions"] == 6
    assert [row["p50_over_idle"] for row in rated["runs"]] == [1.0, 1.25, 1.45, 2.0, 1.0]
    assert rated["largest_streams_within_factor_p50"] == 128  # 512 is within, but not real-time
    assert rated["largest_streams_within_factor_p50_p99"] == 64  # 128's p99 is 2x the idle run's
    assert bench.latency_against_idle(runs[1:], 1.5) is None  # no idle run to compare with


def test_load_benchmark_counts_answers_that_never_came_against_real_time():
    """A run whose few answers were fast but most never came (a reaction engine that stopped) is not real-time."""
    bench = load_benchmark_module()
    fine = {"count": 10, "p50": 0.1, "p99": 0.2}
    summary = {"frames": {"dropped": 0, "push_lag_growth_s": 0.0},
               "decisions": {"count": 10, "expected": 10, "latency_growth_s": 0.0, "latency_client_s": fine},
               "responses": {"triggers": 10, "answered": 10, "silent_or_lost": 0, "ttft_s": fine},
               "errors": {"events": {}, "failed_streams": []}, "client_loop_lag_s": {"p99": 0.01}}
    assert bench.judge_realtime(summary, [], bench.LoadConfig())["ok"]
    summary["responses"].update(answered=1, silent_or_lost=9)
    judged = bench.judge_realtime(summary, [], bench.LoadConfig())
    assert not judged["ok"] and judged["reasons"] == ["9 of 10 answers never came"]


def test_load_benchmark_refuses_a_keepalive_expiry_of_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark_module().main(["--url", "http://127.0.0.1:9", "--keepalive-expiry", "0"])
    assert exit_info.value.code == 2 and "--keepalive-expiry must be > 0" in capsys.readouterr().err


def test_load_benchmark_client_procs_auto():
    bench = load_benchmark_module()
    cap = max(1, (os.cpu_count() or 2) // 2)
    assert [bench.resolve_client_procs("auto", n) for n in (1, 64)] == [1, 1]
    assert bench.resolve_client_procs("auto", 256) == min(4, cap)
    assert bench.resolve_client_procs("auto", 320) == min(5, cap)
    assert bench.resolve_client_procs(3, 256) == 3 and bench.resolve_client_procs(8, 2) == 2


def assert_numbers_finite(value, path="report") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert_numbers_finite(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            assert_numbers_finite(item, f"{path}[{index}]")
    elif isinstance(value, float):
        assert math.isfinite(value), path


@pytest.mark.parametrize("broken", ["report", "turns"])
def test_turn_timeline_refuses_what_it_cannot_read(tmp_path, broken):
    """A report that is not JSON, or a turn log with no turns, is a one-line error, not a traceback."""
    report, turns = tmp_path / "run.json", tmp_path / "turns.jsonl"
    report.write_text("{" if broken == "report" else json.dumps({"runs": [{"streams": 2, "started_unix": 0.0,
                                                                             "wall_s": 1.0, "decisions": {}}]}))
    turns.write_text("not a turn\n" if broken == "turns" else '{"started": 0.5, "clips": 1, "step_s": 0.01}\n')
    done = run_python("benchmarks/turn_timeline.py", str(report), str(turns))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert ("not a load_streams.py JSON report" if broken == "report" else "no turns") in done.stderr
