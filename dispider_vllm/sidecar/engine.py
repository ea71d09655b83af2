"""The sidecar engine: perception and decision for every live stream, batched, never waiting on a reaction.

One ``step`` takes the clips that closed since the last step from all streams (fairly: round-robin over
tenants, least recently served first, then over each tenant's streams, up to ``max_batch_clips``; so with at
least as many clips per batch as tenants, every tenant with a closed clip has one in the next batch, however
many streams the others run), runs them through the CLIP tower and the
compact model's first pass as one batch, then decides every stream's new clips in one batched decision pass.
Frames are sampled and assembled into clips as they arrive (``handle``), so a step only sees whole clips.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dispider_vllm.decision.engine import DecisionConfig, DecisionEngine
from dispider_vllm.perception.clips import ClipAssembler
from dispider_vllm.perception.encoder import PerceptionEncoder
from dispider_vllm.perception.frames import FrameError, FrameSampler, PreprocessorConfig, VideoError, decode_video
from dispider_vllm.perception.modules import PerceptionDecisionModules
from dispider_vllm.sidecar.protocol import (
    AskQuestion,
    ClipPerceived,
    CloseStream,
    Command,
    Decision,
    Event,
    OpenStream,
    PushEncoded,
    PushFrames,
    StreamEnded,
    StreamError,
    StreamOptions,
    Triggered,
)
from dispider_vllm.types import Clip, DecisionEvent, Frame, Trigger

log = logging.getLogger("dispider.sidecar")


@dataclass
class PendingClip:
    clip: Clip
    received_at: float  # wall clock of the frame that closed it


@dataclass
class StreamState:
    stream_id: str
    tenant: str
    options: StreamOptions
    sampler: FrameSampler
    assembler: ClipAssembler
    ready: deque[PendingClip] = field(default_factory=deque)
    received_at: dict[int, float] = field(default_factory=dict)  # clip index -> when its last frame came
    end_requested: bool = False
    clips_closed: int = 0
    clips_decided: int = 0

    @property
    def finished(self) -> bool:
        return self.end_requested and not self.ready and self.clips_decided == self.clips_closed


def make_respond_policy(every: int | None, probability: float | None) -> Callable[[str, int], bool | None] | None:
    """Override the head's verdict for load tests with random weights: respond every N clips, or at random.

    ``None`` from the policy keeps the model's own decision (logit > 0)."""
    if every:
        return lambda stream_id, clip_index: (clip_index + 1) % every == 0
    if probability is not None:
        return lambda stream_id, clip_index: random.Random(f"{stream_id}:{clip_index}").random() < probability
    return None


def decode_push(command: PushEncoded) -> PushFrames | StreamError:
    """An encoded chunk -> its frames on the stream's timeline (or the stream's error)."""
    try:
        frames = tuple(
            Frame(frame.timestamp + command.time_offset, frame.pixels) for frame in decode_video(command.data)
        )
    except VideoError as error:
        return StreamError(command.stream_id, "invalid_video", str(error))
    return PushFrames(command.stream_id, frames, command.end_of_stream, command.received_at)


class SidecarEngine:
    def __init__(
        self,
        modules: PerceptionDecisionModules,
        *,
        preprocessor: PreprocessorConfig | None = None,
        max_batch_clips: int = 32,
        decision_config: DecisionConfig | None = None,
        respond_policy: Callable[[str, int], bool | None] | None = None,
    ) -> None:
        self.modules = modules
        self.preprocessor = preprocessor or PreprocessorConfig()
        self.encoder = PerceptionEncoder(modules)
        self.decision = DecisionEngine(modules, decision_config or DecisionConfig(), force_respond=respond_policy)
        self.max_batch_clips = max_batch_clips
        self.streams: OrderedDict[str, StreamState] = OrderedDict()
        self._turn = 0
        self._last_turn: dict[str, int] = {}  # tenant -> the turn its last clip was taken in
        self.frames_total = 0
        self.clips_total = 0
        self.batches_total = 0

    # -- commands -----------------------------------------------------------------------------------------
    def handle(self, command: Command) -> list[Event]:
        if isinstance(command, OpenStream):
            return self._open(command)
        if isinstance(command, (PushFrames, PushEncoded, AskQuestion, CloseStream)):
            if command.stream_id not in self.streams:
                return [StreamError(command.stream_id, "unknown_stream", f"no open stream {command.stream_id!r}")]
        if isinstance(command, PushFrames):
            return self._push(command.stream_id, command.frames, command.end_of_stream, command.received_at)
        if isinstance(command, PushEncoded):
            return self._push_encoded(command)
        if isinstance(command, AskQuestion):
            self.decision.ask(command.stream_id, command.question)
            return []
        if isinstance(command, CloseStream):
            return self._close(command.stream_id)
        raise TypeError(f"unknown sidecar command {type(command).__name__}")

    def _open(self, command: OpenStream) -> list[Event]:
        if command.stream_id in self.streams:
            return [StreamError(command.stream_id, "stream_exists", f"stream {command.stream_id!r} is already open")]
        options = command.options
        self.streams[command.stream_id] = StreamState(
            stream_id=command.stream_id,
            tenant=command.tenant,
            options=options,
            sampler=FrameSampler(options.sample_fps),
            assembler=ClipAssembler(
                options.frames_per_clip, options.sample_fps, options.clip_mode, preprocessor=self.preprocessor
            ),
        )
        self.decision.open(command.stream_id, command.question)
        return []

    def _push(self, stream_id: str, frames, end_of_stream: bool, received_at: float | None) -> list[Event]:
        stream = self.streams[stream_id]
        received_at = received_at or time.time()
        events: list[Event] = []
        for frame in frames:
            try:
                for clip in self._assemble(stream, frame):
                    stream.ready.append(PendingClip(clip, received_at))
            except FrameError as error:
                events.append(StreamError(stream_id, "invalid_frame", str(error)))
        if end_of_stream and not stream.end_requested:
            stream.end_requested = True
            for clip in stream.assembler.flush():
                stream.ready.append(PendingClip(clip, received_at))
                stream.clips_closed += 1
        events.extend(self._finished_streams())
        return events

    def _assemble(self, stream: StreamState, frame: Frame) -> list[Clip]:
        if stream.end_requested:
            raise FrameError("the stream has ended; no more frames are taken")
        self.frames_total += 1
        sampled_frames = stream.sampler.push(frame)
        if stream.assembler.start is None:
            stream.assembler.start = stream.sampler.start  # windows start where the stream's time starts
        clips = [clip for sampled in sampled_frames for clip in stream.assembler.push(sampled)]
        stream.clips_closed += len(clips)
        return clips

    def _push_encoded(self, command: PushEncoded) -> list[Event]:
        decoded = decode_push(command)
        if isinstance(decoded, StreamError):
            return [decoded]
        return self._push(decoded.stream_id, decoded.frames, decoded.end_of_stream, decoded.received_at)

    def _close(self, stream_id: str) -> list[Event]:
        stream = self.streams.pop(stream_id)
        self.decision.close(stream_id)
        return [StreamEnded(stream_id, "closed", stream.clips_decided)]

    # -- batched work -------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return any(stream.ready for stream in self.streams.values())

    def pending_clips(self) -> int:
        return sum(len(stream.ready) for stream in self.streams.values())

    def step(self) -> list[Event]:
        """Perceive and decide one fair batch of closed clips across all streams."""
        batch = self._take_fair_batch()
        if not batch:
            return []
        self.batches_total += 1
        try:
            events = self._perceive_and_decide(batch)
        except Exception as error:  # noqa: BLE001 - a failed batch must not stop the other streams' work
            log.exception("sidecar batch of %d clips failed", len(batch))
            events = self._batch_failed(batch, error)
        events.extend(self._finished_streams())
        return events

    def _perceive_and_decide(self, batch: list[tuple[StreamState, PendingClip]]) -> list[Event]:
        features = self.encoder.encode([pending.clip for _, pending in batch])
        now = time.time()
        events: list[Event] = []
        features_by_stream: dict[str, list] = {}
        for (stream, pending), feature in zip(batch, features):
            stream.received_at[feature.index] = pending.received_at
            features_by_stream.setdefault(stream.stream_id, []).append(feature)
            events.append(ClipPerceived(stream.stream_id, feature.index, feature.start, feature.end, now - pending.received_at))
        self.clips_total += len(batch)
        for outcome in self.decision.step(features_by_stream):
            events.append(self._timed(outcome))
        return events

    def _batch_failed(self, batch: list[tuple[StreamState, PendingClip]], error: Exception) -> list[Event]:
        events: list[Event] = []
        for stream, pending in batch:
            stream.clips_decided += 1  # counted as done, so the stream can still end
            events.append(StreamError(stream.stream_id, "internal_error",
                                      f"clip {pending.clip.index} could not be processed: {type(error).__name__}: {error}"))
        return events

    def _take_fair_batch(self) -> list[tuple[StreamState, PendingClip]]:
        """Round-robin over tenants, then over each tenant's streams: one clip per turn, oldest first."""
        ready: dict[str, deque[StreamState]] = {}
        for stream in self.streams.values():
            if stream.ready:
                ready.setdefault(stream.tenant, deque()).append(stream)
        # Least recently served tenants first: when a batch holds fewer clips than there are tenants, the
        # tenants left out go first next time, whatever their number of streams.
        by_tenant = OrderedDict(
            (tenant, ready[tenant]) for tenant in sorted(ready, key=lambda t: self._last_turn.get(t, -1))
        )
        batch: list[tuple[StreamState, PendingClip]] = []
        while by_tenant and len(batch) < self.max_batch_clips:
            for tenant in list(by_tenant):
                streams = by_tenant[tenant]
                stream = streams.popleft()
                batch.append((stream, stream.ready.popleft()))
                if stream.ready:
                    streams.append(stream)
                if not streams:
                    del by_tenant[tenant]
                if len(batch) >= self.max_batch_clips:
                    break
        # Streams served this time go to the back, so the next batch starts with the others.
        for stream, _ in batch:
            self._turn += 1
            self._last_turn[stream.tenant] = self._turn
            if stream.stream_id in self.streams:
                self.streams.move_to_end(stream.stream_id)
        return batch

    def _timed(self, outcome: DecisionEvent | Trigger) -> Event:
        event = outcome.event if isinstance(outcome, Trigger) else outcome
        stream = self.streams[event.stream_id]
        stream.clips_decided += 1
        latency = time.time() - stream.received_at.pop(event.clip_index, time.time())
        if isinstance(outcome, Trigger):
            return Triggered(outcome, latency)
        return Decision(outcome, latency)

    def _finished_streams(self) -> list[Event]:
        events: list[Event] = []
        for stream_id, stream in list(self.streams.items()):
            if stream.finished:
                self.streams.pop(stream_id)
                self.decision.close(stream_id)
                events.append(StreamEnded(stream_id, "end_of_stream", stream.clips_decided))
        return events
