"""The sidecar's step statistics on their way out: ``SidecarStats`` -> ``/metrics`` histograms -> the load report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from clients.server_metrics import MetricsSnapshot
from dispider_vllm.sidecar.engine import StepStats
from dispider_vllm.sidecar.protocol import SidecarStats
from serve.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[1]


def stats_after(steps: list[tuple[int, float, float, float, list[float]]]) -> SidecarStats:
    """A report after these steps: (clips, preprocess wait, perceive, decide, queue waits of its clips)."""
    step_stats = StepStats()
    for clips, waited, perceive, decide, queue_waits in steps:
        step_stats.batch_clips.observe(clips)
        for phase, seconds in zip(("preprocess_wait", "perceive", "decide"), (waited, perceive, decide)):
            step_stats.step_seconds[phase].observe(seconds)
        for seconds in queue_waits:
            step_stats.queue_wait_seconds.observe(seconds)
    return SidecarStats(streams=2, pending_frames=0, pending_clips=0, frames_total=0, clips_total=0,
                        batches_total=len(steps), **step_stats.snapshot())


def scrape(stats: SidecarStats | None) -> MetricsSnapshot:
    metrics = ServerMetrics()
    metrics.watch(lambda: True, lambda: True, lambda: stats)
    return MetricsSnapshot.parse(metrics.render().decode())


STEPS = [(1, 0.0, 0.2, 0.05, [0.3]), (4, 0.01, 0.6, 0.1, [0.5, 0.7, 0.9, 1.1]), (2, 0.002, 0.4, 0.08, [0.2, 0.4])]


def test_metrics_expose_the_sidecars_step_histograms():
    snapshot = scrape(stats_after(STEPS))
    batch = snapshot.histogram("dispider_sidecar_batch_clips")
    assert batch.count == 3 and batch.total == 7
    assert dict(batch.buckets)[1.0] == 1 and dict(batch.buckets)[2.0] == 2 and dict(batch.buckets)[4.0] == 3
    for phase, index in (("preprocess_wait", 1), ("perceive", 2), ("decide", 3)):
        assert snapshot.value("dispider_sidecar_step_seconds_count", phase=phase) == 3
        assert snapshot.value("dispider_sidecar_step_seconds_sum", phase=phase) == pytest.approx(
            sum(step[index] for step in STEPS))
    queue = snapshot.histogram("dispider_sidecar_queue_wait_seconds")
    assert queue.count == 7 and queue.total == pytest.approx(4.1)
    assert dict(queue.buckets)[0.25] == 1 and dict(queue.buckets)[float("inf")] == 7
    # Before the sidecar's first report: no sidecar histograms, the rest as before.
    assert scrape(None).histogram("dispider_sidecar_batch_clips") is None


def test_load_report_shows_the_steps_of_its_run():
    spec = importlib.util.spec_from_file_location("load_streams", ROOT / "benchmarks" / "load_streams.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up while being built
    spec.loader.exec_module(bench)

    before, after = scrape(stats_after(STEPS[:1])), scrape(stats_after(STEPS))
    steps = bench.server_metrics_delta(before, after)["sidecar_steps"]
    assert steps["batch_clips"]["count"] == 2 and steps["batch_clips"]["mean"] == 3.0
    assert steps["batch_clips"]["p50"] <= steps["batch_clips"]["p99"] <= 4
    assert set(steps["step_s"]) == {"preprocess_wait", "perceive", "decide"}
    assert steps["step_s"]["perceive"]["count"] == 2 and steps["step_s"]["perceive"]["mean"] == pytest.approx(0.5)
    assert steps["step_s"]["decide"]["mean"] == pytest.approx(0.09)
    assert steps["queue_wait_s"]["count"] == 6 and steps["queue_wait_s"]["mean"] == pytest.approx(3.8 / 6, abs=1e-4)
    # A server without the sidecar's histograms (older, or no report yet): the keys are there, empty.
    empty = bench.server_metrics_delta(None, scrape(None))["sidecar_steps"]
    assert empty == {"batch_clips": None, "step_s": dict.fromkeys(("preprocess_wait", "perceive", "decide")),
                     "queue_wait_s": None}
