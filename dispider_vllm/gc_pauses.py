"""Python's garbage collector in a long-running process: freeze the startup heap, and time every collection.

A full collection walks every tracked object. After loading torch, transformers and (in the server) vLLM's
frontend, that is millions of objects, and the walk stops the process: the server's frames and the sidecar's
steps wait. vLLM's own API server freezes the heap once it is up for that reason (``vllm.utils.gc_utils``); the
sidecar and this project's server do the same, and report how long each collection took (``GcPauseMeter``).
"""

from __future__ import annotations

import gc
import time

from dispider_vllm.sidecar.protocol import CountingHistogram, HistogramCounts


def freeze_startup_heap() -> None:
    """Move everything alive now out of the collector's reach (startup objects live as long as the process)."""
    try:
        from vllm.utils.gc_utils import freeze_gc_heap
    except ImportError:  # a vLLM without it: the same two steps by hand
        gc.collect()
        gc.freeze()
    else:
        freeze_gc_heap()


# Young collections take well under a millisecond; a full one over millions of objects, tens to hundreds.
GC_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GcPauseMeter:
    """The wall time of every collection in this process, by generation ("0", "1", "2"), from the moment it is
    made until ``close``. A collection stops every thread of the process, so these are pauses of all its work."""

    def __init__(self) -> None:
        self.seconds = {str(generation): CountingHistogram(GC_PAUSE_BUCKETS) for generation in range(3)}
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def snapshot(self) -> dict[str, HistogramCounts]:
        return {generation: histogram.snapshot() for generation, histogram in self.seconds.items()}

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif phase == "stop" and self._started:
            histogram = self.seconds.get(str(info.get("generation")))
            if histogram is not None:
                histogram.observe(time.perf_counter() - self._started)
            self._started = 0.0
