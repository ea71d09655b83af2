"""Live sessions: one video stream in the sidecar, its decisions, and its answers from the reaction engine.

Asynchrony as the paper means it: a session runs two tasks.

- The *pump* reads the sidecar's events for the stream (decisions, triggers, errors, the end) and never waits
  for the reaction, so perception and decision go on while an answer streams.
- The *reactor* answers triggers one at a time, in order: a trigger arriving while an answer is running waits
  behind it (and is counted), so answers stay in order and each one can see the ones before it.

A *blocking* session (``blocking_reaction``, a baseline for the benchmarks) gives that up, as VideoLLM-online
does: from a trigger until every answer it started is done, the session's input is held here instead of
reaching the sidecar, then sent on in order. Held frames keep the time they were received, so the decision
latencies show the wait.

Everything a session produces goes into its :class:`EventLog`, a bounded buffer that readers (SSE, WebSocket,
a chat completion) follow from any point: events produced before a reader connects are not lost.

Every session belongs to the tenant that opened it: to any other tenant it does not exist (the same 404 as an
unknown id). Opening one is checked against the tenant's quotas (429) and the server's capacity (503), and each
answer against the tenant's token budget (:mod:`serve.quotas`, :mod:`serve.admission`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Union

from dispider_vllm.reaction.engine import ReactionEngine
from dispider_vllm.sidecar.client import SidecarClient
from dispider_vllm.sidecar.protocol import (
    AskQuestion,
    ClipPerceived,
    CloseStream,
    Decision,
    OpenStream,
    PushEncoded,
    PushFrames,
    StreamEnded,
    StreamError,
    StreamOptions,
    Triggered,
)
from dispider_vllm.types import DecisionEvent, EncodedFrame, Frame

from serve.admission import Admission
from serve.errors import APIError
from serve.metrics import ServerMetrics
from serve.quotas import TenantUsage

log = logging.getLogger("dispider.serve.sessions")

CLIP_MODES = ("uniform", "scene")
MAX_PREVIOUS_ANSWERS = 8  # earlier answers put in the reaction prompt: bounds its length on long streams
ENDED_SESSION_TTL_S = 300.0  # an ended session stays readable this long, then it is dropped


# ---- settings ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionOptions:
    question: str
    clip_mode: str = "uniform"
    max_tokens: int = 256  # per answer
    temperature: float = 0.0  # greedy, as the paper generates
    stop: tuple[str, ...] = ()
    include_previous_answers: bool = True  # the paper: the k-th answer sees the k-1 before it
    priority: int = 0  # the tenant's, for vLLM's priority scheduling (lower first)
    blocking_reaction: bool = False  # baseline: input waits while the session answers (see the module doc)


@dataclass(frozen=True)
class SessionLimits:
    idle_timeout_s: float = 600.0
    event_buffer: int = 4096


# ---- events -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipSpan:
    """The clip whose decision opened an answer, and its span of video time (seconds)."""

    clip: int
    start: float
    end: float

    @classmethod
    def of(cls, event: DecisionEvent) -> ClipSpan:
        return cls(event.clip_index, event.start, event.end)

    def as_dict(self) -> dict:
        return {"clip": self.clip, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class DecisionMade:
    event: DecisionEvent
    latency_s: float
    respond: bool  # a trigger: the head's verdict, or a forced one (``--respond-every``)


@dataclass(frozen=True)
class AnswerDelta:
    response: int  # the session's answer number, from 0
    span: ClipSpan
    text: str
    first: bool  # the answer's first piece of text


@dataclass(frozen=True)
class AnswerEnded:
    response: int
    span: ClipSpan
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class SessionProblem:
    """An error for one session. ``source`` says whose: "stream" (the video or frames, from the sidecar),
    "media" (the server could not read the video), "reaction" (one answer failed; the session goes on), or
    "quota" (one answer skipped: the tenant is over its token budget; the session goes on)."""

    error: APIError
    source: str


@dataclass(frozen=True)
class SessionEnded:
    reason: str  # "end_of_stream" | "deleted" | "idle_timeout" | "shutdown" | "sidecar_closed"
    clips: int
    responses: int
    decisions: int


SessionEvent = Union[DecisionMade, AnswerDelta, AnswerEnded, SessionProblem, SessionEnded]


# ---- the event buffer ---------------------------------------------------------------------------------------
class EventLog:
    """Numbered events in a bounded buffer; any number of readers follow it from their own position."""

    def __init__(self, capacity: int) -> None:
        self._events: deque[tuple[int, SessionEvent]] = deque(maxlen=capacity)
        self._next = 0
        self._changed = asyncio.Event()
        self.closed = False  # no event comes after the last one

    def append(self, event: SessionEvent) -> None:
        self._events.append((self._next, event))
        self._next += 1
        if isinstance(event, SessionEnded):
            self.closed = True
        # Wake every waiting reader, and give later waiters a fresh event to wait on.
        self._changed.set()
        self._changed = asyncio.Event()

    def since(self, after: int) -> list[tuple[int, SessionEvent]]:
        """Buffered events numbered above ``after`` (the oldest may have been dropped when the buffer is full)."""
        return [(seq, event) for seq, event in self._events if seq > after]

    async def follow(
        self, after: int = -1, keepalive_s: float | None = None
    ) -> AsyncIterator[tuple[int, SessionEvent] | None]:
        """Every event numbered above ``after``, then each new one until the log closes.

        Yields None after ``keepalive_s`` without events, so a stream writer can send a keep-alive."""
        while True:
            new = self.since(after)
            for item in new:
                after = item[0]
                yield item
            if new:
                continue
            if self.closed:
                return
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), keepalive_s)
            except asyncio.TimeoutError:
                yield None


# ---- a session ------------------------------------------------------------------------------------------------
class Session:
    """One stream: frames to the sidecar, its decisions and triggers back, answers from the engine."""

    def __init__(
        self,
        session_id: str,
        options: SessionOptions,
        *,
        sidecar: SidecarClient,
        engine: ReactionEngine,
        metrics: ServerMetrics,
        usage: TenantUsage,
        model: str,
        public: bool,
        event_buffer: int,
    ) -> None:
        self.id = session_id
        self.tenant = usage.name
        self.options = options
        self.question = options.question
        self.model = model
        self.public = public  # False for the sessions behind chat completions
        self.created = int(time.time())
        self.completion_id = f"chatcmpl-{session_id}"
        self.status = "active"  # -> "ending" (end requested) -> "ended"; or "closed" when deleted
        self.events = EventLog(event_buffer)
        self.frames = self.clips = self.decisions = self.responses = 0
        self.skipped_answers = 0  # triggers not answered: the tenant was over its token budget
        self.last_timestamp: float | None = None
        self.last_activity = time.monotonic()
        self.readers = 0
        self._sidecar, self._engine, self._metrics, self._usage = sidecar, engine, metrics, usage
        self._answers: dict[int, list[str]] = {}  # question id -> the answers given to it
        self._triggers: asyncio.Queue = asyncio.Queue()
        self._reacting = False
        self._unanswered = 0  # triggers received whose answer has not ended (answered, failed or skipped)
        self._held: list = []  # sidecar commands of a blocking session, waiting for its answers to end
        self._stream_open = False
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        events = self._sidecar.subscribe(self.id)
        stream_options = StreamOptions(clip_mode=self.options.clip_mode)
        self._sidecar.send(OpenStream(self.id, self.options.question, stream_options, tenant=self.tenant))
        self._stream_open = True
        self._tasks = [
            asyncio.create_task(self._pump(events), name=f"pump-{self.id}"),
            asyncio.create_task(self._react_in_order(), name=f"react-{self.id}"),
        ]

    @property
    def accepts_input(self) -> bool:
        return self.status == "active"

    def end(self) -> None:
        """End of stream: the last partial clip is decided, running answers finish, then ``end`` is sent."""
        if self.status != "active":
            return
        self.status = "ending"
        self._send(PushFrames(self.id, (), end_of_stream=True, received_at=time.time()))

    async def close(self, reason: str) -> None:
        """Stop now: the stream leaves the sidecar and a running answer is aborted."""
        if self.status == "closed":
            return
        self._held.clear()  # first: the cancelled reactor must find nothing to send on
        if self._stream_open:
            self._sidecar.send(CloseStream(self.id))
            self._stream_open = False
        self._sidecar.unsubscribe(self.id)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._drop_queued_triggers()
        if not self.events.closed:
            self._emit(SessionEnded(reason, self.clips, self.responses, self.decisions))
        self.status = "closed"

    def _drop_queued_triggers(self) -> None:
        while not self._triggers.empty():
            if isinstance(self._triggers.get_nowait(), _QueuedTrigger):
                self._metrics.reaction_queue_depth.dec()

    # -- input ----------------------------------------------------------------------------------------------------
    def push_frames(self, frames: Sequence[Frame | EncodedFrame]) -> None:
        self._check_order([frame.timestamp for frame in frames])
        self.frames += len(frames)
        self._metrics.frames_received.inc(len(frames))
        if frames:
            self.last_timestamp = frames[-1].timestamp
        self._send(PushFrames(self.id, tuple(frames), received_at=time.time()))

    def push_encoded(self, data: bytes, time_offset: float, duration: float | None, *, end: bool = False) -> None:
        """A self-contained video chunk starting at ``time_offset`` seconds of the stream's time."""
        self._check_order([time_offset])
        self._metrics.videos_received.inc()
        self.last_timestamp = time_offset + (duration or 0.0)
        if end:
            self.status = "ending"
        self._send(PushEncoded(self.id, data, time_offset, end_of_stream=end, received_at=time.time()))

    def ask(self, question: str) -> None:
        self.question = question
        self._send(AskQuestion(self.id, question))

    def _check_order(self, times: Sequence[float]) -> None:
        """Refuse time going back here, with a 400, rather than later as an error event from the sidecar."""
        previous = self.last_timestamp
        for timestamp in times:
            if previous is not None and timestamp < previous:
                raise APIError(
                    400, f"timestamp {timestamp:.3f}s goes back from {previous:.3f}s", "timestamp_out_of_order",
                    "timestamp",
                )
            previous = timestamp

    def _send(self, command) -> None:
        self.last_activity = time.monotonic()
        if self._holding:  # every command is held, so frames, chunks, questions and the end keep their order
            self._held.append(command)
            return
        self._sidecar.send(command)

    # -- blocking reaction (the baseline): input held while the session answers --------------------------------
    @property
    def _holding(self) -> bool:
        return self.options.blocking_reaction and self._unanswered > 0

    @property
    def held_frames(self) -> int:
        """Decoded frames held (a held video chunk counts none: the sidecar decodes it)."""
        return sum(len(command.frames) for command in self._held if isinstance(command, PushFrames))

    def _trigger_done(self) -> None:
        """An answer ended (or failed, or was skipped); with none left to give, the held input goes on."""
        self._unanswered -= 1
        if self._holding:
            return
        held, self._held = self._held, []
        for command in held:  # each keeps its received_at: the decision latency counts the wait
            self._sidecar.send(command)

    # -- the pump: sidecar events -> session events --------------------------------------------------------------
    async def _pump(self, events: asyncio.Queue) -> None:
        while True:
            event = await events.get()
            if isinstance(event, ClipPerceived):
                self.clips += 1
                self._metrics.clips_perceived.inc()
                self._metrics.perception_latency.observe(event.latency_s)
            elif isinstance(event, Decision):
                self._decided(event.event, event.latency_s, respond=False)
            elif isinstance(event, Triggered):
                self._decided(event.trigger.event, event.latency_s, respond=True)
                self._queue_trigger(event)
            elif isinstance(event, StreamError):  # bad input, or the sidecar failing on this stream's data
                status = 500 if event.code == "internal_error" else 400
                self._emit(SessionProblem(APIError(status, event.message, event.code), "stream"))
            elif isinstance(event, StreamEnded):
                self._stream_open = False
                self._sidecar.unsubscribe(self.id)
                self._triggers.put_nowait(_StreamDone(event.reason))
                return

    def _decided(self, event: DecisionEvent, latency_s: float, *, respond: bool) -> None:
        self.decisions += 1
        self._metrics.decisions.labels(respond=str(respond).lower()).inc()
        self._metrics.decision_latency.observe(latency_s)
        self._metrics.tenant_decision_latency.labels(tenant=self.tenant).observe(latency_s)
        self._emit(DecisionMade(event, latency_s, respond))

    def _queue_trigger(self, triggered: Triggered) -> None:
        self._unanswered += 1  # a blocking session holds its input from now on
        if self._reacting or not self._triggers.empty():
            self._metrics.reaction_queued.inc()
        self._metrics.reaction_queue_depth.inc()
        self._triggers.put_nowait(_QueuedTrigger(triggered, time.monotonic()))

    # -- the reactor: triggers -> answers, one at a time --------------------------------------------------------
    async def _react_in_order(self) -> None:
        while not isinstance(item := await self._triggers.get(), _StreamDone):
            self._metrics.reaction_queue_depth.dec()
            self._metrics.queue_wait.observe(time.monotonic() - item.queued_at)
            try:
                await self._react(item.triggered)
            finally:
                self._trigger_done()
        self.status = "ended"
        self._emit(SessionEnded(item.reason, self.clips, self.responses, self.decisions))

    async def _react(self, triggered: Triggered) -> None:
        try:
            self._usage.check_answer()
        except APIError as refusal:  # over the tenant's token budget: skip this answer, tell the session
            self.skipped_answers += 1
            self._metrics.reactions.labels(outcome="skipped").inc()
            self._emit(SessionProblem(refusal, "quota"))
            return
        trigger = triggered.trigger
        span = ClipSpan.of(trigger.event)
        earlier = self._answers.setdefault(trigger.event.question_id, [])
        previous = earlier[-MAX_PREVIOUS_ANSWERS:] if self.options.include_previous_answers else []
        answer = _Answer(span)
        self._reacting = True
        self._metrics.running_reactions.inc()
        outcome = "error"
        try:
            deltas = self._engine.respond(
                trigger,
                max_tokens=self.options.max_tokens,
                temperature=self.options.temperature,
                stop=self.options.stop,
                previous_answers=previous,
                priority=self.options.priority,
            )
            async for delta in deltas:
                self._spend(delta.num_tokens - answer.tokens_spent)
                answer.tokens_spent = delta.num_tokens
                if delta.text:
                    self._answer_text(answer, delta.text)
                if delta.finished:
                    answer.finish(delta)
            outcome = "answered" if answer.response is not None else "silent"
        except asyncio.CancelledError:
            outcome = "aborted"
            raise
        except ValueError as error:  # a bad clip bundle: this answer fails, the session goes on
            self._reaction_failed(f"the reaction input was rejected: {error}", "invalid_bundle", 500)
        except Exception as error:  # noqa: BLE001 - the engine failed this request (or died)
            log.exception("reaction failed in session %s", self.id)
            alive = self._engine.is_alive()
            self._reaction_failed(f"the reaction failed: {type(error).__name__}: {error}",
                                  "reaction_failed" if alive else "engine_dead", 500 if alive else 503)
        finally:
            self._reacting = False
            self._metrics.running_reactions.dec()
            self._metrics.reactions.labels(outcome=outcome).inc()
        if answer.response is not None:
            self._answer_done(answer, earlier)

    def _spend(self, tokens: int) -> None:
        """Tokens count against the tenant's budget as they are generated, so an aborted answer counts too."""
        if tokens > 0:
            self._usage.spend_tokens(tokens)
            self._metrics.tenant_reaction_tokens.labels(tenant=self.tenant).inc(tokens)

    def _answer_text(self, answer: _Answer, text: str) -> None:
        if answer.response is None:
            answer.response = self.responses
            self.responses += 1
            self._metrics.time_to_first_token.observe(time.monotonic() - answer.submitted)
        self._emit(AnswerDelta(answer.response, answer.span, text, first=not answer.parts))
        answer.parts.append(text)

    def _answer_done(self, answer: _Answer, earlier: list[str]) -> None:
        text = "".join(answer.parts)
        earlier.append(text)
        self._metrics.reaction_tokens.inc(answer.completion_tokens)
        self._metrics.prompt_tokens.inc(answer.prompt_tokens)
        self._emit(AnswerEnded(answer.response, answer.span, text, answer.finish_reason,
                               answer.prompt_tokens, answer.completion_tokens))

    def _reaction_failed(self, message: str, code: str, status: int) -> None:
        self._emit(SessionProblem(APIError(status, message, code), "reaction"))

    def _emit(self, event: SessionEvent) -> None:
        if isinstance(event, SessionProblem):
            self._metrics.errors.labels(code=event.error.code).inc()
        self.events.append(event)

    # -- for the routes ----------------------------------------------------------------------------------------
    def fail(self, error: APIError, source: str) -> None:
        """Report an error found outside the session's tasks (e.g. a video the server could not decode)."""
        self._emit(SessionProblem(error, source))

    def describe(self) -> dict:
        return {
            "id": self.id,
            "object": "session",
            "created": self.created,
            "model": self.model,
            "status": self.status,
            "question": self.question,
            "clip_mode": self.options.clip_mode,
            "max_tokens": self.options.max_tokens,
            "temperature": self.options.temperature,
            "include_previous_answers": self.options.include_previous_answers,
            "blocking_reaction": self.options.blocking_reaction,
            "held_frames": self.held_frames,
            "frames": self.frames,
            "clips": self.clips,
            "decisions": self.decisions,
            "responses": self.responses,
            "skipped_answers": self.skipped_answers,
            "last_timestamp": self.last_timestamp,
            "events_url": f"/v1/sessions/{self.id}/events",
            "websocket_url": f"/v1/sessions/{self.id}/ws",
        }


@dataclass(frozen=True)
class _QueuedTrigger:
    triggered: Triggered
    queued_at: float


@dataclass(frozen=True)
class _StreamDone:
    """Last in the trigger queue: every clip of the stream is decided."""

    reason: str


class _Answer:
    """One answer in the making."""

    def __init__(self, span: ClipSpan) -> None:
        self.span = span
        self.submitted = time.monotonic()
        self.response: int | None = None
        self.parts: list[str] = []
        self.finish_reason = "stop"
        self.prompt_tokens = self.completion_tokens = 0
        self.tokens_spent = 0  # generated tokens already counted against the tenant's budget

    def finish(self, delta) -> None:
        self.finish_reason = delta.finish_reason or "stop"
        self.prompt_tokens, self.completion_tokens = delta.prompt_tokens, delta.num_tokens


# ---- all sessions -------------------------------------------------------------------------------------------------
class SessionManager:
    def __init__(
        self, sidecar: SidecarClient, engine: ReactionEngine, metrics: ServerMetrics, *, model: str,
        limits: SessionLimits, admission: Admission,
    ) -> None:
        self._sidecar, self._engine, self._metrics = sidecar, engine, metrics
        self.model = model
        self.limits = limits
        self.admission = admission
        self._sessions: dict[str, Session] = {}
        self._ended_at: dict[str, float] = {}
        metrics.active_sessions.set_function(self.count_active)
        metrics.held_frames.set_function(self.count_held_frames)
        metrics.watch_tenants(self.count_by_tenant, admission.capacity)

    def _running(self) -> list[Session]:
        return [session for session in self._sessions.values() if session.status in ("active", "ending")]

    def count_active(self) -> int:
        return len(self._running())

    def count_held_frames(self) -> int:
        return sum(session.held_frames for session in self._sessions.values())

    def count_by_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for session in self._running():
            counts[session.tenant] = counts.get(session.tenant, 0) + 1
        return counts

    def admit(self, usage: TenantUsage) -> None:
        """Raise unless the tenant may open one more stream: its own quota (429), then the server's capacity (503).
        Running streams are never touched."""
        usage.check_sessions(self.count_by_tenant().get(usage.name, 0))
        try:
            self.admission.admit(self.count_active())
        except APIError:
            self._metrics.admission_rejections.labels(tenant=usage.name).inc()
            raise

    def open(self, options: SessionOptions, usage: TenantUsage, *, public: bool = True) -> Session:
        self.admit(usage)
        prefix = "sess" if public else "chat"
        session = Session(
            f"{prefix}-{uuid.uuid4().hex[:24]}", dataclasses.replace(options, priority=usage.priority),
            sidecar=self._sidecar, engine=self._engine, metrics=self._metrics, usage=usage, model=self.model,
            public=public, event_buffer=self.limits.event_buffer,
        )
        self._sessions[session.id] = session
        session.start()
        log.info("%s %s opened for tenant %s: %r", "session" if public else "chat stream", session.id, usage.name,
                 options.question[:80])
        return session

    def get(self, session_id: str, tenant: str) -> Session:
        """A public session of this tenant; 404 when unknown, deleted, or another tenant's (the very same reply,
        so ids of other tenants cannot be probed)."""
        session = self._sessions.get(session_id)
        if session is None or not session.public or session.tenant != tenant:
            raise APIError(404, f"no session {session_id!r} (unknown, deleted or expired)", "session_not_found")
        session.last_activity = time.monotonic()
        return session

    async def remove(self, session: Session, reason: str) -> None:
        self._sessions.pop(session.id, None)
        self._ended_at.pop(session.id, None)
        await session.close(reason)
        log.info("session %s removed (%s)", session.id, reason)

    async def close_all(self, reason: str = "shutdown") -> None:
        for session in list(self._sessions.values()):
            await self.remove(session, reason)

    async def reap_forever(self, interval_s: float = 5.0) -> None:
        """Drop sessions idle too long, and ended ones nobody read for a while; end them all if the sidecar died."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._reap(time.monotonic())
            except Exception:  # noqa: BLE001 - the reaper must outlive any one bad session
                log.exception("reaping sessions failed")

    async def _reap(self, now: float) -> None:
        sidecar_dead = not self._sidecar.is_alive()
        for session in list(self._sessions.values()):
            if sidecar_dead and session.status in ("active", "ending"):
                session.fail(APIError(503, "the sidecar (perception and decision) stopped", "sidecar_dead"), "stream")
                await session.close("sidecar_dead")  # readers get `error` then `end`
            elif reason := self._expiry(session, now):
                await self.remove(session, reason)

    def _expiry(self, session: Session, now: float) -> str | None:
        if session.readers:
            return None
        if session.status in ("ended", "closed"):
            ended = self._ended_at.setdefault(session.id, now)
            return "expired" if now - ended > ENDED_SESSION_TTL_S else None
        if session.public and now - session.last_activity > self.limits.idle_timeout_s:
            return "idle_timeout"
        return None
