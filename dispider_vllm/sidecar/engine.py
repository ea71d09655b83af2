"""The sidecar engine: perception and decision for every live stream, batched, never waiting on a reaction.

One ``step`` takes the clips that closed since the last step from all streams (fairly: round-robin over
tenants, least recently served first, then over each tenant's streams, up to ``max_batch_clips``; so with at
least as many clips per batch as tenants, every tenant with a closed clip has one in the next batch, however
many streams the others run), runs them through the CLIP tower and the
compact model's first pass as one batch, then decides every stream's new clips in one batched decision pass.
Frames are sampled and assembled into clips as they arrive (``handle``), so a step only sees whole clips. Each
sampled frame's preprocessing starts on a small thread pool as soon as it arrives (``preprocess_workers``; the
sidecar process runs one on the CPU), so when a clip closes only stacking its 16 frames is left (also on the pool):
the CPU work is spread over the clip's 16 seconds instead of sitting between its last frame and its step. With
``preprocess_on="device"`` (the sidecar's default on a GPU) the host does none of it: a closing clip stacks its
uint8 frames, and the encoder resizes and normalises them on the GPU, batched with the step's other clips.
With ``frame_perception="arrival"`` (on top of device preprocessing) each sampled frame also goes through the CLIP
tower soon after it arrives, batched with every stream's frames of that moment, so a closing clip is left with the
compact model's pass and the decision: about half the work between its last frame and its decision. A step does the
closed clips' work first and the other streams' frames after it, a short pass at a time (``ArrivalPolicy``).
With ``frame_perception="prefill"`` the compact model's pass also runs as the frames arrive, over the clip's time
prompt and each frame's raw tokens, into a K/V cache per clip in progress; a closing clip is left with its last
frame's tower and prefill, 65 positions of the pass, and the decision.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from contextlib import nullcontext
from concurrent.futures import ALL_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace

from dispider_vllm.decision.engine import DecisionConfig, DecisionEngine, clip_bytes_at_shapes
from dispider_vllm.fp8 import check_supported as check_fp8_supported
from dispider_vllm.perception.clips import (
    ClipAssembler,
    ClipWindow,
    PerceivedFrame,
    PreparedFrame,
    make_clip,
    make_frames_clip,
    make_perceived_clip,
    prepare_frame_pixels,
)
from dispider_vllm.perception.encoder import PerceptionEncoder
from dispider_vllm.perception.frames import (
    FrameError,
    FrameSampler,
    PreprocessorConfig,
    VideoError,
    decode_video,
    with_pixels,
)
from dispider_vllm.perception.modules import PerceptionDecisionModules
from dispider_vllm.sidecar.lanes import GpuLanes
from dispider_vllm.sidecar.protocol import (
    AskQuestion,
    ClipPerceived,
    CloseStream,
    Command,
    CountingHistogram,
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
from dispider_vllm.types import FRAMES_PER_CLIP, Clip, ClipPrefix, DecisionEvent, EncodedFrame, Frame, Trigger

log = logging.getLogger("dispider.sidecar")


# Buckets of the step statistics (SidecarStats): batch sizes, and seconds from 1 ms to a long backlog.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 0.8, 1.0, 1.25,
                   1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_PHASES = ("preprocess_wait", "perceive_frames", "prefill_frames", "perceive", "decide")
PREPROCESS_PLACES = ("host", "device")
FRAME_PERCEPTIONS = ("clip", "arrival", "prefill")
SCHEDULES = ("closes-first", "together")  # see ArrivalPolicy


@dataclass(frozen=True)
class ArrivalPolicy:
    """When frames that arrived go through the CLIP tower (``frame_perception="arrival"``): at once when a closed
    clip needs them; otherwise once ``batch_frames`` wait or the oldest has waited ``wait_s`` (so a few streams'
    frames still go in batches, and a pass never holds more than ``max_frames`` of them).

    ``closes_first`` (the default schedule, "closes-first"): a step passes only the closed clips' own waiting frames
    (most often their last one), then their compact-model pass and decisions, and only then the other frames, whose
    clips close up to 16 s later, when due: one pass of at most ``max_frames``, which on a GPU runs while the loop
    takes in the next commands, so the next closes wait behind one short pass at most (when such passes fall behind,
    every frame that has waited ``wait_s`` goes, up to ``catch_up_frames``). Otherwise ("together", the
    schedule before the twenty-first session) a step passes every waiting frame, up to ``max_frames``, and then
    decides the closed clips, which wait for that whole pass."""

    batch_frames: int = 32
    wait_s: float = 0.25
    max_frames: int = 32  # the largest pass replayed from a CUDA graph: 12.8 ms on an H200
    closes_first: bool = True
    catch_up_frames: int = 512  # closes first: a pass takes every frame that waited wait_s, up to this many

    @classmethod
    def named(cls, schedule: str) -> ArrivalPolicy:
        """The policy of a schedule of ``SCHEDULES``."""
        if schedule == "closes-first":
            return cls()
        if schedule == "together":
            return cls(batch_frames=64, max_frames=512, closes_first=False)
        raise ValueError(f"the sidecar's schedule is one of {SCHEDULES}, not {schedule!r}")


@dataclass
class PendingClip:
    """A closed clip waiting for perception. ``clip`` is the Future of its preprocessing until that is done."""

    clip: Clip | Future
    received_at: float  # wall clock of the frame that closed it
    index: int = -1  # the clip's index in its stream (taken from ``clip`` when that is a Clip)

    def __post_init__(self) -> None:
        if isinstance(self.clip, Clip):
            self.index = self.clip.index

    def done(self) -> bool:
        return not isinstance(self.clip, Future) or self.clip.done()

    def resolve(self) -> Clip:
        """The preprocessed clip (call once ``done``); raises what its preprocessing raised."""
        if isinstance(self.clip, Future):
            self.clip = self.clip.result()
        return self.clip


class StepStats:
    """What each batched step did, for diagnosing latency under load: its clips, the wall time of its phases
    (waiting for the preprocessing pool, perception, decision with triggers) and each clip's queue wait."""

    def __init__(self) -> None:
        self.batch_clips = CountingHistogram(BATCH_BUCKETS)
        self.step_seconds = {phase: CountingHistogram(SECONDS_BUCKETS) for phase in STEP_PHASES}
        self.queue_wait_seconds = CountingHistogram(SECONDS_BUCKETS)

    def snapshot(self) -> dict:
        """The SidecarStats fields."""
        return {
            "batch_clips": self.batch_clips.snapshot(),
            "step_seconds": {phase: h.snapshot() for phase, h in self.step_seconds.items()},
            "queue_wait_seconds": self.queue_wait_seconds.snapshot(),
        }


@dataclass
class StreamState:
    stream_id: str
    tenant: str
    options: StreamOptions
    sampler: FrameSampler
    assembler: ClipAssembler
    ready: deque[PendingClip] = field(default_factory=deque)
    perceives_on_arrival: bool = False  # its frames go through the CLIP tower as they come
    prefix: ClipPrefix | None = None  # the clip in progress's cached prefix ("prefill")
    received_at: dict[int, float] = field(default_factory=dict)  # clip index -> when its last frame came
    end_requested: bool = False
    clips_closed: int = 0
    clips_decided: int = 0

    @property
    def finished(self) -> bool:
        return self.end_requested and not self.ready and self.clips_decided == self.clips_closed


def mps_daemon_running() -> bool:
    """Whether a CUDA MPS control daemon listens where this process's CUDA looks for one (its control pipe)."""
    return os.path.exists(os.path.join(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"), "control"))


def make_respond_policy(every: int | None, probability: float | None) -> Callable[[str, int], bool | None] | None:
    """Override the head's verdict for load tests with random weights: respond every N clips, or at random.

    ``None`` from the policy keeps the model's own decision (logit > 0)."""
    if every:
        return lambda stream_id, clip_index: (clip_index + 1) % every == 0
    if probability is not None:
        return lambda stream_id, clip_index: random.Random(f"{stream_id}:{clip_index}").random() < probability
    return None


def _failed(pending: PendingClip) -> bool:
    """Whether a done clip's preprocessing raised (or was cancelled)."""
    return isinstance(pending.clip, Future) and (pending.clip.cancelled() or pending.clip.exception() is not None)


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
        preprocess_workers: int = 0,
        preprocess_wait_s: float = 0.1,
        preprocess_on: str = "host",
        cuda_graphs: bool = True,
        fp8: bool = False,
        frame_perception: str = "clip",
        arrival_policy: ArrivalPolicy | None = None,
        lanes: bool = False,
        max_graph_frames: int = 32,
    ) -> None:
        """``preprocess_on``: "host" (the CPU resizes and normalises each frame) or "device" (the encoder does,
        on the model's device; the host only stacks a clip's uint8 frames, inline, and no pool runs).
        ``frame_perception``: "clip" (the CLIP tower runs over a clip's 16 frames when it closes), "arrival"
        (over each frame soon after it arrives, when ``arrival_policy`` says, closed clips' frames first; needs
        ``preprocess_on="device"``; clips cut by scene still go whole, as their 16 frames are chosen only when the
        scene ends) or "prefill" (as
        "arrival", and each frame's raw tokens through the compact model too, into its clip's cached prefix; the
        prefix pool has as many slots as the decision's, ``decision_config.initial_kv_slots``, to start with).
        ``preprocess_workers``: threads preprocessing frames on the host; 0 (the default): inline, in
        ``handle``, so which clips a step finds ready does not depend on timing (the sidecar process uses a pool).
        ``preprocess_wait_s``: how long a step waits at most for clips still being preprocessed (see ``step``).
        ``cuda_graphs``: perception of a few clips from CUDA graphs on a GPU (the decision's: ``decision_config``).
        ``fp8``: both models' matmuls with FP8 weights and activations (dispider_vllm/fp8.py).
        ``lanes``: on a GPU, the frames' CLIP passes no closing clip waits on go on a low-priority CUDA stream, the
        rest of the work on a high-priority one (dispider_vllm/sidecar/lanes.py; off by default: measured no faster).
        ``max_graph_frames``: passes of arrived frames up to this many replay a CUDA graph (0: all eager)."""
        if fp8:
            check_fp8_supported(modules.device)
        if preprocess_on not in PREPROCESS_PLACES:
            raise ValueError(f"preprocess_on is one of {PREPROCESS_PLACES}, not {preprocess_on!r}")
        if frame_perception not in FRAME_PERCEPTIONS:
            raise ValueError(f"frame_perception is one of {FRAME_PERCEPTIONS}, not {frame_perception!r}")
        if frame_perception != "clip" and preprocess_on != "device":
            raise ValueError(f"frame_perception={frame_perception!r} takes the frames as they came: it needs "
                             "preprocess_on='device'")
        self.frame_perception = frame_perception
        self.arrival_policy = arrival_policy or ArrivalPolicy()
        self._arrived: deque[tuple[float, StreamState, PerceivedFrame]] = deque()  # (monotonic, ...), oldest first
        self._closing: deque[tuple[StreamState, ClipWindow, Future]] = deque()  # windows waiting for their tokens
        self.frames_perceived_total = 0
        self.modules = modules
        self.preprocessor = preprocessor or PreprocessorConfig()
        self.preprocess_on = preprocess_on
        decision_config = replace(decision_config or DecisionConfig(), fp8=fp8)
        prefix_slots = decision_config.initial_kv_slots if frame_perception == "prefill" else 0
        self.encoder = PerceptionEncoder(modules, cuda_graphs=cuda_graphs, fp8=fp8, preprocessor=self.preprocessor,
                                         prefix_slots=prefix_slots, max_graph_frames=max_graph_frames)
        self.decision = DecisionEngine(modules, decision_config, force_respond=respond_policy)
        self.lanes = GpuLanes(modules.device, enabled=lanes)
        self.max_batch_clips = max_batch_clips
        self.streams: OrderedDict[str, StreamState] = OrderedDict()
        self._ready_clips = 0  # closed clips waiting in the streams' queues (``ready``), all streams together
        self._turn = 0
        self._last_turn: dict[str, int] = {}  # tenant -> the turn its last clip was taken in
        self.frames_total = 0
        self.clips_total = 0
        self.batches_total = 0
        self.step_stats = StepStats()
        self.graphs_captured: dict | None = None  # set by capture_graphs
        self.preprocess_workers = preprocess_workers if preprocess_on == "host" else 0
        self.preprocess_wait_s = preprocess_wait_s
        # torch's resize and PIL release the GIL, so a few threads preprocess clips in parallel, beside the GPU.
        self._pool = (
            ThreadPoolExecutor(self.preprocess_workers, thread_name_prefix="sidecar-preprocess")
            if self.preprocess_workers > 0 else None
        )

    def capture_graphs(self) -> dict:
        """Capture the CUDA graphs of every small-step shape now (a GPU sidecar does it at start, as vLLM does for
        decode), so no live step stalls on a capture; what was captured and how long it took."""
        started = time.monotonic()
        clip_shape = (FRAMES_PER_CLIP, 3, self.preprocessor.crop_height, self.preprocessor.crop_width)
        with self.lanes.urgent():  # the lane the graphs then replay on
            captured = {"perception": self.encoder.capture_graphs(clip_shape,
                                                                  perceived=self.frame_perception != "clip"),
                        "decision": self.decision.capture_graphs()}
            if self.frame_perception != "clip":
                captured["frames"] = self.encoder.capture_frame_graphs()
            if self.frame_perception == "prefill":
                captured["prefill"] = self.encoder.capture_prefill_graphs()
        self.graphs_captured = {**captured, "seconds": round(time.monotonic() - started, 2)}
        return self.graphs_captured

    def features(self) -> dict:
        """What this engine runs with (``/health``'s ``sidecar_features``)."""
        return {"device": str(self.modules.device), "fused_ops": self.decision.lm.fused,
                "cuda_graphs": {"perception": self.encoder.graphs.graphed, "frames": self.encoder.frame_graphs.graphed,
                                "decision": self.decision.lm.graphs.graphed},
                "max_batch_clips": self.max_batch_clips, "preprocess_on": self.preprocess_on,
                "frame_perception": self.frame_perception, "lanes": self.lanes.enabled,
                "arrival_policy": asdict(self.arrival_policy),
                "preprocess_workers": self.preprocess_workers,
                "kv_slots": self.decision.pool.num_slots, "graphs_captured_at_start": self.graphs_captured,
                "prefix_slots": self.encoder.prefix_pool.num_slots if self.encoder.prefix_pool else 0,
                "max_kept_clips": self.decision.config.max_kept_clips,
                "kept_clips_budget_bytes": self.decision.config.kept_clips_budget_bytes,
                "kept_clip_bytes": clip_bytes_at_shapes(self.modules),  # one 16-frame clip: raw + M + T
                "mps_daemon": self.modules.device.type == "cuda" and mps_daemon_running(),
                "quantization": "fp8" if self.encoder.lm.fp8 else None}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- commands -----------------------------------------------------------------------------------------
    def handle(self, command: Command) -> list[Event]:
        with self.lanes.urgent():  # a question's or a prefix's device work is read by the steps, on that lane
            return self._handle(command)

    def _handle(self, command: Command) -> list[Event]:
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
            # Scene clips pick their 16 frames when the scene ends, out of however many it had: each frame through
            # the tower as it came would cost more and hold GPU memory for the whole scene.
            perceives_on_arrival=self.frame_perception != "clip" and options.clip_mode == "uniform",
        )
        self.decision.open(command.stream_id, command.question)
        return []

    def _push(self, stream_id: str, frames, end_of_stream: bool, received_at: float | None) -> list[Event]:
        stream = self.streams[stream_id]
        received_at = received_at or time.time()
        events: list[Event] = []
        for frame in frames:
            try:
                for window in self._assemble(stream, frame):
                    self._enqueue(stream, PendingClip(self._preprocess(stream, window), received_at, window.index))
            except FrameError as error:
                events.append(StreamError(stream_id, "invalid_frame", str(error)))
        if end_of_stream and not stream.end_requested:
            stream.end_requested = True
            for window in stream.assembler.flush_windows():
                self._enqueue(stream, PendingClip(self._preprocess(stream, window), received_at, window.index))
                stream.clips_closed += 1
        # Only this stream's state changed: looking at every open stream here cost O(streams) a push (115 us of a
        # push's 130 at 768 streams, on one CPU core), hence O(streams^2) a second.
        events.extend(self._finished_streams([stream]))
        return events

    def _assemble(self, stream: StreamState, frame: Frame | EncodedFrame) -> list[ClipWindow]:
        if stream.end_requested:
            raise FrameError("the stream has ended; no more frames are taken")
        frame = with_pixels(frame)  # the process's intake decodes ahead; one that failed there fails here, in its place
        self.frames_total += 1
        sampled_frames = stream.sampler.push(frame)
        if stream.assembler.start is None:
            stream.assembler.start = stream.sampler.start  # windows start where the stream's time starts
        windows: list[ClipWindow] = []
        for sampled in sampled_frames:
            prepared = self._prepare(stream, sampled)
            windows += stream.assembler.push_windows(prepared)
            if isinstance(prepared, PerceivedFrame):  # taken by its window: now the tower (and prefill) may have it
                self._arrived.append((time.monotonic(), stream, prepared))
        stream.clips_closed += len(windows)
        return windows

    def _prepare(self, stream: StreamState, frame: Frame) -> Frame:
        """The sampled frame, its preprocessing started (on the pool, or done here without one); as it is when the
        device preprocesses it; for the CLIP tower when the stream's frames go there as they come (with the prefix
        of the clip it goes into, when that is cached as well)."""
        if stream.perceives_on_arrival:
            prefix = self._prefix_in_progress(stream) if self.frame_perception == "prefill" else None
            return PerceivedFrame(frame.timestamp, frame.pixels, Future(), prefix)
        if self.preprocess_on == "device":
            return frame
        return PreparedFrame(frame.timestamp, frame.pixels, self._run(prepare_frame_pixels, frame, self.preprocessor))

    def _prefix_in_progress(self, stream: StreamState) -> ClipPrefix:
        """The cached prefix of the clip the stream's next frame goes into, opened with its first frame (the previous
        clip's stays with that clip until its step)."""
        index, start, end = stream.assembler.window_in_progress()
        if stream.prefix is None or stream.prefix.clip_index != index:
            stream.prefix = self.encoder.open_prefix(index, start, end)
        return stream.prefix

    def _preprocess(self, stream: StreamState, window: ClipWindow) -> Future:
        """The window's Clip, made on the pool (or here, done already, without one); a failure stays in the Future.
        Its frames' jobs went into the pool's queue before this one, so waiting for them here cannot deadlock.
        A window of frames perceived on arrival becomes its Clip in the step that has all their tokens."""
        if stream.perceives_on_arrival:
            clip: Future = Future()
            self._closing.append((stream, window, clip))
            return clip
        return self._run(make_frames_clip if self.preprocess_on == "device" else make_clip, window, self.preprocessor)

    def _run(self, function, *args) -> Future:
        if self._pool is not None:
            return self._pool.submit(function, *args)
        future: Future = Future()
        try:
            future.set_result(function(*args))
        except Exception as error:  # noqa: BLE001 - reported as the stream's error when the clip's turn comes
            future.set_exception(error)
        return future

    def _push_encoded(self, command: PushEncoded) -> list[Event]:
        decoded = decode_push(command)
        if isinstance(decoded, StreamError):
            return [decoded]
        return self._push(decoded.stream_id, decoded.frames, decoded.end_of_stream, decoded.received_at)

    def _close(self, stream_id: str) -> list[Event]:
        stream = self.streams.pop(stream_id)
        self._ready_clips -= len(stream.ready)
        for pending in stream.ready:
            if isinstance(pending.clip, Future) and not pending.clip.done():
                pending.clip.cancel()  # nobody will take it
            elif pending.done() and not _failed(pending) and pending.resolve().prefix is not None:
                self.encoder.release_prefix(pending.clip.prefix)
        if stream.prefix is not None:  # the clip in progress's; windows still closing give theirs back in their turn
            self.encoder.release_prefix(stream.prefix)
        self.decision.close(stream_id)
        return [StreamEnded(stream_id, "closed", stream.clips_decided)]

    # -- batched work -------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Closed clips wait, preprocessed or not (``step`` waits briefly for the ones in preprocessing), or
        arrived frames are due for the CLIP tower."""
        return self._ready_clips > 0 or self._frames_due()

    def _frames_due(self) -> bool:
        """Whether the arrived frames are due for a pass by the ``ArrivalPolicy`` (a closed clip's go at once)."""
        if not self._arrived:
            return False
        policy = self.arrival_policy
        return len(self._arrived) >= policy.batch_frames or time.monotonic() - self._arrived[0][0] >= policy.wait_s

    def pending_clips(self) -> int:
        return self._ready_clips

    def submit_clip(self, stream_id: str, clip: Clip, received_at: float) -> None:
        """A closed clip straight into an open stream's queue, as if its frames had closed it (benchmarks)."""
        stream = self.streams[stream_id]
        self._enqueue(stream, PendingClip(clip, received_at))
        stream.clips_closed += 1

    def _enqueue(self, stream: StreamState, pending: PendingClip) -> None:
        # A count beside the queues: the loop asks for it every turn, and counting the streams' queues cost
        # O(streams) a turn.
        stream.ready.append(pending)
        self._ready_clips += 1

    def _dequeue(self, stream: StreamState) -> PendingClip:
        self._ready_clips -= 1
        return stream.ready.popleft()

    def step(self) -> list[Event]:
        """Perceive and decide one fair batch of preprocessed clips across all streams.

        Clips close between steps (while commands are handled), so most of a busy turn's clips are still in the
        pool when the step starts. Taking only the finished ones would put the others a whole batch later; so
        unless the finished ones fill a batch, the step first waits for those in preprocessing, at most
        ``preprocess_wait_s`` (which also keeps the loop from spinning while the only work is in the pool).
        """
        with self.lanes.urgent():
            return self._step()

    def _step(self) -> list[Event]:
        closes_first = self._closes_first()
        if self._closing or (self._frames_due() and not closes_first):
            self._perceive_arrived_frames()
        events = self._decide_ready_clips()
        if closes_first and self._frames_due():
            # After the closed clips' decisions, so they never wait for it: on a GPU it runs while the loop takes
            # in the next commands, and the next step's work queues behind at most this one short pass.
            self._tower_pass(self._take_arrived(limit=self._other_frames_pass()))
        events.extend(self._finished_streams())
        return events

    def _closes_first(self) -> bool:
        return self.arrival_policy.closes_first and not self.lanes.enabled

    def _other_frames_pass(self) -> int:
        """How many frames no closed clip waits for go in this step's pass (closes first, or with lanes):
        ``max_frames``, or every frame that has waited ``wait_s`` (up to ``catch_up_frames``) when short passes fell
        behind (a GPU shared with vLLM, steps of many clips), so the frames keep up and the closes do not end up
        passing their clips' frames themselves."""
        policy = self.arrival_policy
        aged_before = time.monotonic() - policy.wait_s
        aged = 0
        for arrived_at, _, _ in self._arrived:
            if arrived_at > aged_before or aged >= policy.catch_up_frames:
                break
            aged += 1
        return max(policy.max_frames, aged)

    def _decide_ready_clips(self) -> list[Event]:
        """One fair batch of the closed clips that are ready, perceived and decided; the events, with those of clips
        whose preprocessing failed."""
        waited = self._wait_for_preprocessing()
        failed: list[Event] = []
        batch = self._take_fair_batch(failed)
        events: list[Event] = []
        if batch:
            self.batches_total += 1
            self._observe_batch(batch, waited)
            try:
                events = self._perceive_and_decide(batch)
            except Exception as error:  # noqa: BLE001 - a failed batch must not stop the other streams' work
                log.exception("sidecar batch of %d clips failed", len(batch))
                events = self._batch_failed(batch, error)
            finally:
                for _, pending in batch:
                    if pending.clip.prefix is not None:
                        self.encoder.release_prefix(pending.clip.prefix)
        return events + failed

    def _perceive_arrived_frames(self) -> None:
        """Arrived frames through the CLIP tower as one batch (oldest first): closes first, only those the closed
        clips wait for; otherwise up to the policy's ``max_frames``. Then each closed window whose frames all have
        their tokens becomes its Clip. A failed pass fails the clips of its frames (each stream's error). With
        lanes, see ``_perceive_in_lanes``."""
        if self.lanes.enabled:
            self._perceive_in_lanes()
        elif self._closes_first():
            self._tower_pass(self._take_arrived(self._frames_of_closed_windows()))
        else:
            self._tower_pass(self._take_arrived(limit=self.arrival_policy.max_frames))
        self._close_perceived_windows()

    def _perceive_in_lanes(self) -> None:
        """The closed clips' frames first, as a batch of their own, and the others when the policy says they are due,
        as another batch in the background lane, which this step's clips do not wait for."""
        self._tower_pass(self._take_arrived(self._frames_of_closed_windows()))
        if self._frames_due():
            frames = self._take_arrived(limit=self._other_frames_pass())
            # The prefill's graphs share their inputs: its passes stay on one lane.
            background = self.frame_perception == "arrival"
            with self.lanes.background([frame.features for frame in frames]) if background else nullcontext():
                self._tower_pass(frames, graphed=not background)  # the graphs' buffers are the urgent lane's

    def _frames_of_closed_windows(self) -> set[int]:
        """The ids of the closed windows' frames still waiting for their pass."""
        return {id(frame) for _, window, _ in self._closing for frame in window.frames if not frame.features.done()}

    def _take_arrived(self, only: set[int] | None = None, limit: int | None = None) -> list[PerceivedFrame]:
        """Arrived frames out of the queue, oldest first: those in ``only`` (all of them), or up to ``limit``;
        frames of streams closed since are dropped on the way."""
        if only is not None and not only:
            return []
        wanted = len(only) if only is not None else limit
        taken: list[PerceivedFrame] = []
        kept: deque[tuple[float, StreamState, PerceivedFrame]] = deque()
        while self._arrived and (wanted is None or len(taken) < wanted):
            arrival = self._arrived.popleft()
            _, stream, frame = arrival
            if not self._is_open(stream):
                frame.features.cancel()  # its stream was closed: nobody will take it
            elif only is None or id(frame) in only:
                taken.append(frame)
            else:
                kept.append(arrival)
        if kept:  # the frames passed over go back in front, in their order
            kept.extend(self._arrived)
            self._arrived = kept
        return taken

    def _tower_pass(self, frames: list[PerceivedFrame], *, graphed: bool = True) -> None:
        """The frames through the CLIP tower as one batch (and into their prefixes, with prefill); their Futures
        hold their tokens, or the pass's error. ``graphed``: a small pass may replay the encoder's frame graphs."""
        if not frames:
            return
        started = time.monotonic()
        try:
            tokens = self.encoder.perceive_frames([frame.pixels for frame in frames], graphed=graphed)
        except Exception as error:  # noqa: BLE001 - reported by each of these frames' clips
            log.exception("the CLIP tower's pass over %d arrived frames failed", len(frames))
            for frame in frames:
                frame.features.set_exception(error)
        else:
            for frame, frame_tokens in zip(frames, tokens):
                frame.features.set_result(frame_tokens)
        self.frames_perceived_total += len(frames)
        self.step_stats.step_seconds["perceive_frames"].observe(time.monotonic() - started)
        self._prefill(frames)

    def _prefill(self, frames: list[PerceivedFrame]) -> None:
        """The frames' tokens into their clips' cached prefixes, each prefix's frames in the order they came. A
        frame whose tower pass failed breaks its prefix; a failed prefill breaks those of its pass: those clips
        then go whole at their close."""
        by_prefix: dict[int, tuple[ClipPrefix, list]] = {}
        for frame in frames:
            if frame.prefix is None:
                continue
            if frame.features.exception() is not None:
                frame.prefix.broken = True
                continue
            by_prefix.setdefault(id(frame.prefix), (frame.prefix, []))[1].append(frame.features.result())
        if not by_prefix:
            return
        started = time.monotonic()
        try:
            self.encoder.prefill_frames(list(by_prefix.values()))
        except Exception:  # noqa: BLE001 - the prefixes are broken; their clips still have their frames' tokens
            log.exception("the compact model's prefill of %d streams' frames failed", len(by_prefix))
        self.step_stats.step_seconds["prefill_frames"].observe(time.monotonic() - started)

    def _close_perceived_windows(self) -> None:
        waiting: deque[tuple[StreamState, ClipWindow, Future]] = deque()
        for stream, window, clip in self._closing:
            if not self._is_open(stream):
                clip.cancel()
                self._release_window_prefix(window)
            elif all(frame.features.done() for frame in window.frames):
                try:
                    self.lanes.take(frame.features for frame in window.frames)
                    clip.set_result(self._with_prefix(make_perceived_clip(window), window))
                except Exception as error:  # noqa: BLE001 - the stream's error when the clip's turn comes
                    self._release_window_prefix(window)
                    clip.set_exception(error)
            else:
                waiting.append((stream, window, clip))
        self._closing = waiting

    def _with_prefix(self, clip: Clip, window: ClipWindow) -> Clip:
        """The clip with its cached prefix when that holds the clip's whole prefix (the last frame's prefill is
        done by now); otherwise the prefix goes back and the clip takes the whole first pass (a partial last
        window, a broken prefix)."""
        prefix = getattr(window.frames[-1], "prefix", None)
        if prefix is None:
            return clip
        if prefix.holds(window.index, window.start, window.end, len(window.frames)):
            return replace(clip, prefix=prefix)
        self.encoder.release_prefix(prefix)
        return clip

    def _release_window_prefix(self, window: ClipWindow) -> None:
        prefix = getattr(window.frames[-1], "prefix", None)
        if prefix is not None:
            self.encoder.release_prefix(prefix)

    def _is_open(self, stream: StreamState) -> bool:
        """Still this engine's stream (not closed, nor closed and its id opened again)."""
        return self.streams.get(stream.stream_id) is stream

    def _wait_for_preprocessing(self) -> float:
        """Seconds waited for clips still being preprocessed (none when the finished ones fill a batch, and none
        without a pool: then nothing finishes while the step waits)."""
        if self._pool is None:
            return 0.0
        pending = [p for stream in self.streams.values() for p in stream.ready]
        in_flight = [p.clip for p in pending if not p.done()]
        if not in_flight or len(pending) - len(in_flight) >= self.max_batch_clips:
            return 0.0
        started = time.monotonic()
        wait(in_flight, timeout=self.preprocess_wait_s, return_when=ALL_COMPLETED)
        return time.monotonic() - started

    def _observe_batch(self, batch: list[tuple[StreamState, PendingClip]], waited: float) -> None:
        stats, now = self.step_stats, time.time()
        stats.batch_clips.observe(len(batch))
        stats.step_seconds["preprocess_wait"].observe(waited)
        for _, pending in batch:
            stats.queue_wait_seconds.observe(max(0.0, now - pending.received_at))

    def _perceive_and_decide(self, batch: list[tuple[StreamState, PendingClip]]) -> list[Event]:
        started = time.monotonic()
        features = self.encoder.encode([pending.clip for _, pending in batch])
        perceived = time.monotonic()
        self.step_stats.step_seconds["perceive"].observe(perceived - started)
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
        self.step_stats.step_seconds["decide"].observe(time.monotonic() - perceived)
        return events

    def _batch_failed(self, batch: list[tuple[StreamState, PendingClip]], error: Exception) -> list[Event]:
        events: list[Event] = []
        for stream, pending in batch:
            stream.clips_decided += 1  # counted as done, so the stream can still end
            events.append(StreamError(stream.stream_id, "internal_error",
                                      f"clip {pending.index} could not be processed: {type(error).__name__}: {error}"))
        return events

    def _head_ready(self, stream: StreamState, failed: list[Event]) -> bool:
        """Whether the stream's oldest clip is preprocessed; a later clip never goes before it. A clip whose
        preprocessing failed is dropped as that stream's error (counted as decided, so the stream can still end)."""
        while stream.ready and stream.ready[0].done():
            pending = stream.ready[0]
            try:
                pending.resolve()
                return True
            except Exception as error:  # noqa: BLE001
                log.error("preprocessing clip %d of stream %s failed", pending.index, stream.stream_id, exc_info=error)
                self._dequeue(stream)
                stream.clips_decided += 1
                failed.append(StreamError(stream.stream_id, "internal_error", f"clip {pending.index} could not be "
                                          f"preprocessed: {type(error).__name__}: {error}"))
        return False

    def _take_fair_batch(self, failed: list[Event]) -> list[tuple[StreamState, PendingClip]]:
        """Round-robin over tenants, then over each tenant's streams: one clip per turn, oldest first, taking
        only preprocessed clips (clips that failed it go to ``failed``)."""
        ready: dict[str, deque[StreamState]] = {}
        for stream in self.streams.values():
            if self._head_ready(stream, failed):
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
                batch.append((stream, self._dequeue(stream)))
                if self._head_ready(stream, failed):
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

    def _finished_streams(self, candidates: list[StreamState] | None = None) -> list[Event]:
        """End the streams (of ``candidates``, or all) whose end was asked for and whose clips are all decided."""
        events: list[Event] = []
        for stream in list(self.streams.values()) if candidates is None else candidates:
            if stream.finished and self._is_open(stream):
                stream_id = stream.stream_id
                self.streams.pop(stream_id)
                if stream.prefix is not None:  # opened for a frame that was then refused: no window took it
                    self.encoder.release_prefix(stream.prefix)
                self.decision.close(stream_id)
                events.append(StreamEnded(stream_id, "end_of_stream", stream.clips_decided))
        return events
