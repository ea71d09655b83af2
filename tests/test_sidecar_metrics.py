"""The sidecar's step statistics on their way out: ``SidecarStats`` -> ``/metrics`` histograms -> the load report."""

from __future__ import annotations

import gc
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from clients.server_metrics import MetricsSnapshot
from dispider_vllm.gc_pauses import GC_PAUSE_BUCKETS, GcPauseMeter
from dispider_vllm.sidecar.engine import SECONDS_BUCKETS, StepStats
from dispider_vllm.sidecar.protocol import CountingHistogram, SidecarStats
from serve.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[1]


def stats_after(steps: list[tuple[int, float, float, float, list[float]]]) -> SidecarStats:
    """A report after these steps: (clips, preprocess wait, perceive, decide, queue waits of its clips); each step
    also had one frame push in transit for 10 ms, and the sidecar one full collection of 30 ms."""
    step_stats = StepStats()
    transit, full_collections = CountingHistogram(SECONDS_BUCKETS), CountingHistogram(GC_PAUSE_BUCKETS)
    for clips, waited, perceive, decide, queue_waits in steps:
        step_stats.batch_clips.observe(clips)
        for phase, seconds in zip(("preprocess_wait", "perceive", "decide"), (waited, perceive, decide)):
            step_stats.step_seconds[phase].observe(seconds)
        for seconds in queue_waits:
            step_stats.queue_wait_seconds.observe(seconds)
        transit.observe(0.01)
        full_collections.observe(0.03)
    return SidecarStats(streams=2, pending_frames=0, pending_clips=0, frames_total=0, clips_total=0,
                        batches_total=len(steps), **step_stats.snapshot(), transit_seconds=transit.snapshot(),
                        gc_pause_seconds={"2": full_collections.snapshot()})


def scrape(stats: SidecarStats | None, server_gc: dict | None = None) -> MetricsSnapshot:
    metrics = ServerMetrics()
    metrics.watch(lambda: True, lambda: True, lambda: stats, server_gc_pauses=(lambda: server_gc) if server_gc else None)
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
    transit = snapshot.histogram("dispider_sidecar_transit_seconds")
    assert transit.count == 3 and transit.total == pytest.approx(0.03)
    assert snapshot.value("dispider_gc_pause_seconds_count", process="sidecar", generation="2") == 3
    # Before the sidecar's first report: no sidecar histograms, the rest as before.
    assert scrape(None).histogram("dispider_sidecar_batch_clips") is None
    assert scrape(None).histogram("dispider_gc_pause_seconds") is None


def test_metrics_expose_the_kept_clips_against_their_budget():
    stats = replace(stats_after(STEPS), kept_clips=3, kept_clip_bytes=3 * 8_588_288, kept_clips_evicted_total=2,
                    kept_clip_budget_bytes=4 * 8_588_288)
    snapshot = scrape(stats)
    assert snapshot.value("dispider_sidecar_kept_clips") == 3
    assert snapshot.value("dispider_sidecar_kept_clip_bytes") == 3 * 8_588_288
    assert snapshot.value("dispider_sidecar_kept_clips_evicted_total") == 2
    assert snapshot.value("dispider_sidecar_kept_clip_budget_bytes") == 4 * 8_588_288
    # A sidecar without a budget (a library user's): the kept clips, no budget series.
    unbounded = scrape(stats_after(STEPS))
    assert unbounded.value("dispider_sidecar_kept_clips") == 0
    assert unbounded.value("dispider_sidecar_kept_clip_budget_bytes") is None


def test_load_report_shows_the_steps_of_its_run():
    spec = importlib.util.spec_from_file_location("load_streams", ROOT / "benchmarks" / "load_streams.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up while being built
    spec.loader.exec_module(bench)

    young = CountingHistogram(GC_PAUSE_BUCKETS)
    young.observe(0.0002)
    before = scrape(stats_after(STEPS[:1]), {"0": young.snapshot()})
    young.observe(0.0003)
    young.observe(0.07)
    after = scrape(stats_after(STEPS), {"0": young.snapshot()})
    steps = bench.server_metrics_delta(before, after)["sidecar_steps"]
    assert steps["batch_clips"]["count"] == 2 and steps["batch_clips"]["mean"] == 3.0
    assert steps["batch_clips"]["p50"] <= steps["batch_clips"]["p99"] <= 4
    assert set(steps["step_s"]) == {"preprocess_wait", "perceive_frames", "prefill_frames", "perceive", "decide"}
    assert steps["step_s"]["perceive"]["count"] == 2 and steps["step_s"]["perceive"]["mean"] == pytest.approx(0.5)
    assert steps["step_s"]["decide"]["mean"] == pytest.approx(0.09)
    assert steps["queue_wait_s"]["count"] == 6 and steps["queue_wait_s"]["mean"] == pytest.approx(3.8 / 6, abs=1e-4)
    assert steps["transit_s"]["count"] == 2 and steps["transit_s"]["mean"] == pytest.approx(0.01)
    # Garbage collections of this run, by process and generation: two young ones in the server (the longer
    # 70 ms, in the bucket up to 0.1 s) and two full ones in the sidecar.
    pauses = bench.server_metrics_delta(before, after)["gc_pauses_s"]
    assert pauses["server"]["0"]["count"] == 2 and pauses["server"]["0"]["total_s"] == pytest.approx(0.0703)
    assert pauses["server"]["0"]["longest_at_most_s"] == 0.1
    assert pauses["sidecar"]["2"]["count"] == 2 and pauses["sidecar"]["2"]["total_s"] == pytest.approx(0.06)
    assert pauses["sidecar"]["2"]["longest_at_most_s"] == 0.05
    # A server without the sidecar's histograms (older, or no report yet): the keys are there, empty.
    empty = bench.server_metrics_delta(None, scrape(None))
    assert empty["sidecar_steps"] == {"batch_clips": None, "step_s": dict.fromkeys((
                                          "preprocess_wait", "perceive_frames", "prefill_frames", "perceive", "decide")),
                                      "queue_wait_s": None, "transit_s": None, "frame_decode_batch_s": None}
    assert empty["gc_pauses_s"] == {}


def test_gc_pause_meter_times_collections_by_generation():
    meter = GcPauseMeter()
    try:
        gc.collect(1)
        gc.collect()
    finally:
        meter.close()
    gc.collect()  # after close: not counted
    pauses = meter.snapshot()
    assert sum(pauses["1"].counts) >= 1 and sum(pauses["2"].counts) >= 1
    assert pauses["2"].total > 0 and set(pauses) == {"0", "1", "2"}
