"""The typed messages between the server and the sidecar process.

Commands go in (server -> sidecar), events come out (sidecar -> server); nothing flows back into perception
from the reaction, so the sidecar never waits on it. Tensors travel through ``torch.multiprocessing`` queues,
which move their storage through shared memory instead of pickling the bytes; pushed frames' pixels go through
the frame ring (``frame_ring.py``) and only their place through the queue (``PushSharedFrames``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Union

from dispider_vllm.sidecar.frame_ring import EncodedFrameInRing, FrameInRing
from dispider_vllm.types import DecisionEvent, EncodedFrame, Frame, Trigger


# ---- commands -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamOptions:
    clip_mode: str = "uniform"  # "uniform" (16 frames at 1 fps) or "scene"
    sample_fps: float = 1.0
    frames_per_clip: int = 16


@dataclass(frozen=True)
class OpenStream:
    stream_id: str
    question: str
    options: StreamOptions = field(default_factory=StreamOptions)
    tenant: str = "default"


@dataclass(frozen=True)
class PushFrames:
    """Frames of one stream, in time order. ``end_of_stream`` closes the last partial clip. An ``EncodedFrame``
    is decoded in the sidecar's process (its intake thread, as it arrives)."""

    stream_id: str
    frames: tuple[Frame | EncodedFrame, ...]
    end_of_stream: bool = False
    received_at: float | None = None  # time.time() when the server got them; latencies count from here


@dataclass(frozen=True)
class PushSharedFrames:
    """``PushFrames`` on the pipe when its pixels lie in the frame ring (``frame_ring.py``; a frame that did not fit
    comes along whole). The sidecar's intake turns it back into ``PushFrames`` as it arrives."""

    stream_id: str
    frames: tuple[FrameInRing | EncodedFrameInRing | Frame | EncodedFrame, ...]
    end_of_stream: bool = False
    received_at: float | None = None


@dataclass(frozen=True)
class PushEncoded:
    """A chunk of an encoded video (a whole file, or a self-contained segment) to decode in the sidecar."""

    stream_id: str
    data: bytes
    time_offset: float = 0.0
    end_of_stream: bool = False
    received_at: float | None = None


@dataclass(frozen=True)
class AskQuestion:
    stream_id: str
    question: str


@dataclass(frozen=True)
class CloseStream:
    stream_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


Command = Union[OpenStream, PushFrames, PushSharedFrames, PushEncoded, AskQuestion, CloseStream, Shutdown]


# ---- events ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SidecarReady:
    device: str
    model: str
    features: dict = field(default_factory=dict)  # what the engine runs with (SidecarEngine.features), for /health


@dataclass(frozen=True)
class ClipPerceived:
    """A clip closed and went through perception (for metrics and timelines)."""

    stream_id: str
    clip_index: int
    start: float
    end: float
    latency_s: float  # clip's last frame received -> features ready


@dataclass(frozen=True)
class Decision:
    """A decision with its latency: clip's last frame received -> decision emitted."""

    event: DecisionEvent
    latency_s: float


@dataclass(frozen=True)
class Triggered:
    """Sent instead of ``Decision`` for a clip whose decision is to respond; ``trigger.event`` is that decision."""

    trigger: Trigger
    latency_s: float


@dataclass(frozen=True)
class StreamError:
    """Bad input for one stream (``code`` is a short machine-readable word). The stream stays open."""

    stream_id: str
    code: str
    message: str


@dataclass(frozen=True)
class StreamEnded:
    """Every pushed frame of the stream has been decided (after ``end_of_stream``), or it was closed."""

    stream_id: str
    reason: str  # "end_of_stream" | "closed"
    clips: int


@dataclass(frozen=True)
class HistogramCounts:
    """A histogram of what the sidecar observed since it started: observations per bucket and their sum.

    Cumulative, not the samples since the last report: the server keeps only the latest ``SidecarStats`` and
    exposes it when scraped, so a report it never looked at loses nothing."""

    bounds: tuple[float, ...]  # upper bounds (inclusive), ascending; a last bucket above them is implied
    counts: tuple[int, ...]  # observations per bucket, len(bounds) + 1, not cumulative
    total: float  # the sum of the observations


class CountingHistogram:
    """Observations per bucket (a value goes in the first bucket whose upper bound is >= it) and their sum."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramCounts:
        return HistogramCounts(tuple(float(b) for b in self.bounds), tuple(self.counts), self.total)


@dataclass(frozen=True)
class SidecarStats:
    streams: int
    pending_frames: int
    pending_clips: int
    frames_total: int
    clips_total: int
    batches_total: int
    # Per batched step, since the sidecar started (see SidecarEngine.step):
    batch_clips: HistogramCounts | None = None  # clips in the batch
    step_seconds: dict[str, HistogramCounts] = field(default_factory=dict)  # phases: STEP_PHASES in engine.py
    queue_wait_seconds: HistogramCounts | None = None  # per clip: its last frame received -> its batch started
    transit_seconds: HistogramCounts | None = None  # per frame push: received by the server -> taken in by the sidecar
    frame_decode_seconds: HistogramCounts | None = None  # per intake batch of images the server left encoded
    gc_pause_seconds: dict[str, HistogramCounts] = field(default_factory=dict)  # the sidecar's collections, by generation
    # The clips kept for retrieval and G over all open streams (DecisionEngine.kept_clips_usage):
    kept_clips: int = 0
    kept_clip_bytes: int = 0  # their raw + M + T
    kept_clips_evicted_total: int = 0  # evicted to stay within the budget, since the sidecar started
    kept_clip_budget_bytes: int | None = None  # None: unbounded


Event = Union[SidecarReady, ClipPerceived, Decision, Triggered, StreamError, StreamEnded, SidecarStats]
