"""The server's event-loop watch: a loop held up by a blocking call shows as lag, counts a stall, and the log says
where the loop was stuck."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from serve.loop_watch import LoopWatch
from serve.metrics import SHORT_WAIT_BUCKETS


def a_blocking_call_on_the_loop(seconds: float) -> None:
    time.sleep(seconds)


def test_a_blocked_loop_is_measured_and_named(caplog):
    registry = CollectorRegistry()
    lag = Histogram("lag_seconds", "", buckets=SHORT_WAIT_BUCKETS, registry=registry)
    stalls = Counter("stalls", "", registry=registry)

    async def scenario():
        watch = LoopWatch(lag, stalls, stall_s=0.3)
        watch.start()
        await asyncio.sleep(0.3)  # a few ticks of an idle loop
        a_blocking_call_on_the_loop(0.8)
        await asyncio.sleep(0.2)
        watch.stop()

    with caplog.at_level(logging.WARNING, logger="dispider.serve"):
        asyncio.run(scenario())
    assert registry.get_sample_value("stalls_total") == 1  # one stall, logged once however long it lasted
    (warning,) = [record.getMessage() for record in caplog.records if "event loop" in record.getMessage()]
    assert "a_blocking_call_on_the_loop" in warning
    assert registry.get_sample_value("lag_seconds_count") >= 5
    late = registry.get_sample_value("lag_seconds_count") - registry.get_sample_value("lag_seconds_bucket", {"le": "0.5"})
    assert late == 1  # the tick that waited behind the blocking call, and only it
