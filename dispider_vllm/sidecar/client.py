"""The server's handle on the sidecar process: start it, send commands, receive events in asyncio.

    sidecar = SidecarClient(SidecarConfig(part_dir=...))
    await sidecar.start()                       # spawns the process, waits for SidecarReady
    queue = sidecar.subscribe("s1")             # asyncio.Queue of that stream's events
    sidecar.send(OpenStream("s1", "What happens?"))
    sidecar.send(PushFrames("s1", frames))     # pixels (or JPEG bytes) through the frame ring (shared memory)
    ...
    await sidecar.stop()
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import torch.multiprocessing as mp

from dispider_vllm.sidecar.frame_ring import EncodedFrameInRing, FrameInRing, FrameRing
from dispider_vllm.sidecar.protocol import (
    ClipPerceived,
    Command,
    Decision,
    Event,
    PushFrames,
    PushSharedFrames,
    Shutdown,
    SidecarReady,
    SidecarStats,
    StreamEnded,
    StreamError,
    Triggered,
)

log = logging.getLogger(__name__)


@dataclass
class SidecarConfig:
    part_dir: str  # the checkpoint's perception_decision part (see dispider_vllm.checkpoint.split)
    device: str = "cpu"
    dtype: str = "float32"
    max_batch_clips: int = 32  # clips of all streams encoded in one batch
    max_kept_clips: int = 32  # per stream: clips whose features stay retrievable (raw is 8 MiB a clip)
    kept_clips_budget_bytes: int | None = None  # all streams' kept clips together (None: unbounded); see DecisionConfig
    max_context_clips: int = 64  # per stream: pending clips in the decision context
    respond_every: int | None = None  # force a trigger every N clips (load tests with random weights)
    respond_probability: float | None = None  # or with this probability per clip (seeded per stream)
    threads: int | None = None  # torch CPU threads in the sidecar process
    preprocess_on: str = "auto"  # "device": frames resized and normalised on the sidecar's GPU; "host": on threads
    preprocess_workers: int = 4  # host: threads preprocessing frames as they arrive, beside the GPU's work (0: inline)
    # "arrival": each frame through the CLIP tower as it comes; "prefill": and through the compact model's pass into
    # its clip's cached prefix; "clip": the tower at the clip's close
    frame_perception: str = "auto"
    kv_slots: int = 16  # streams whose decision KV caches are allocated up front (the pool doubles past them)
    # Share of its GPU's memory the sidecar may take, when vLLM takes the rest (None: what is free at its start)
    memory_share: float | None = None
    cuda_graphs: bool = True  # small steps replayed from CUDA graphs on a GPU (dispider_vllm/cuda_graphs.py)
    lanes: bool = False  # on a GPU: frames' passes on a low-priority CUDA stream (dispider_vllm/sidecar/lanes.py)
    schedule: str = "closes-first"  # or "together": when arrived frames go through the tower (see ArrivalPolicy)
    turn_log: str | None = None  # a JSON line per turn of the loop here (dispider_vllm/sidecar/turn_log.py)
    quantization: str | None = None  # "fp8": both models' matmuls in FP8 (dispider_vllm/fp8.py)
    frame_ring_mb: int = 256  # shared memory carrying frame pixels to the sidecar (0: pickled through the pipe)
    # The decision gate's shared-memory name (dispider_vllm/decision_gate.py): held while closed clips wait, so that
    # the reaction's next vLLM step waits for their decisions. None: no gate.
    decision_gate: str | None = None
    extra: dict = field(default_factory=dict)


class SidecarClient:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self._ctx = mp.get_context("spawn")
        self._commands = self._ctx.Queue()
        self._events = self._ctx.Queue()
        self._process = None
        self._reader: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, asyncio.Queue] = {}
        self._ready = threading.Event()
        self.ready_info: SidecarReady | None = None
        self.last_stats: SidecarStats | None = None
        self.started_at = 0.0
        self.startup_error: str | None = None
        self.frame_ring: FrameRing | None = None
        self._ring_lock = threading.Lock()  # one writer at a time: the ring's position is the writer's own
        self.frames_sent = {"ring": 0, "pipe": 0}  # frames by the way their pixels went to the sidecar

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self, timeout: float = 600.0) -> SidecarReady:
        from dispider_vllm.sidecar.process import run_sidecar

        self._loop = asyncio.get_running_loop()
        if self.config.frame_ring_mb > 0:
            self.frame_ring = _frame_ring(self.config.frame_ring_mb)
        ring_name = self.frame_ring.name if self.frame_ring is not None else None
        self._process = self._ctx.Process(
            target=run_sidecar, args=(self.config, self._commands, self._events, ring_name), name="dispider-sidecar",
            daemon=True,
        )
        self._process.start()
        self.started_at = time.monotonic()
        self._reader = threading.Thread(target=self._read_events, name="sidecar-events", daemon=True)
        self._reader.start()
        ready = await asyncio.to_thread(self._ready.wait, timeout)
        if not ready or self.ready_info is None:
            raise RuntimeError(f"the sidecar did not start: {self.startup_error or 'timed out'}")
        return self.ready_info

    async def stop(self, timeout: float = 10.0) -> None:
        if self._process is None:
            return
        self.send(Shutdown())
        await asyncio.to_thread(self._process.join, timeout)
        if self._process.is_alive():
            self._process.terminate()
        self._events.put(None)  # wakes the reader thread
        self._process = None
        if self.frame_ring is not None:
            self.frame_ring.close()
            self.frame_ring = None

    @property
    def pid(self) -> int | None:
        """The sidecar process's id while it runs (to find it in ``top`` or attach a profiler)."""
        return self._process.pid if self._process is not None else None

    @property
    def frame_ring_mib(self) -> float:
        """The frame ring's size (0 without one: frames pickled through the pipe)."""
        return self.frame_ring.capacity / (1 << 20) if self.frame_ring is not None else 0.0

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    # -- commands and events ------------------------------------------------------------------------------
    def send(self, command: Command) -> None:
        if isinstance(command, PushFrames) and command.frames:
            command = self._through_ring(command)
        self._commands.put(command)

    def _through_ring(self, command: PushFrames) -> PushFrames | PushSharedFrames:
        """The frames' pixels into the ring, their places on the pipe (whole frames where the ring is full)."""
        if self.frame_ring is None:
            self.frames_sent["pipe"] += len(command.frames)
            return command
        with self._ring_lock:
            frames = tuple(self.frame_ring.put(frame) for frame in command.frames)
        shared = sum(isinstance(frame, (FrameInRing, EncodedFrameInRing)) for frame in frames)
        self.frames_sent["ring"] += shared
        self.frames_sent["pipe"] += len(frames) - shared
        return PushSharedFrames(command.stream_id, frames, command.end_of_stream, command.received_at)

    def subscribe(self, stream_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers[stream_id] = queue
        return queue

    def unsubscribe(self, stream_id: str) -> None:
        self._subscribers.pop(stream_id, None)

    def _read_events(self) -> None:
        while True:
            try:
                event = self._events.get()
            except (EOFError, OSError):
                break
            if event is None:
                break
            if isinstance(event, SidecarReady):
                self.ready_info = event
                self._ready.set()
                continue
            if isinstance(event, str):  # a startup failure, sent as text
                self.startup_error = event
                self._ready.set()
                continue
            if isinstance(event, SidecarStats):
                self.last_stats = event
                continue
            stream_id = _stream_of(event)
            queue = self._subscribers.get(stream_id) if stream_id is not None else None
            if queue is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(queue.put_nowait, event)


def _frame_ring(mib: int) -> FrameRing | None:
    """The frame ring, or None (frames through the pipe) where shared memory cannot be had: serving goes on."""
    try:
        ring = FrameRing.create(mib << 20)
    except OSError as error:
        log.warning("no frame ring (%s): frames go to the sidecar through its pipe", error)
        return None
    if ring is None:
        log.warning("no frame ring (/dev/shm has no room): frames go to the sidecar through its pipe")
    return ring


def _stream_of(event: Event) -> str | None:
    if isinstance(event, (ClipPerceived, StreamError, StreamEnded)):
        return event.stream_id
    if isinstance(event, Decision):
        return event.event.stream_id
    if isinstance(event, Triggered):
        return event.trigger.event.stream_id
    return None
