"""The sidecar's process: load the perception/decision part, then loop over commands and batched steps."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from collections import OrderedDict, deque
from pathlib import Path

import torch

from dispider_vllm.decision_gate import DecisionGate
from dispider_vllm.gc_pauses import GcPauseMeter, freeze_startup_heap
from dispider_vllm.sidecar.client import SidecarConfig
from dispider_vllm.sidecar.engine import SECONDS_BUCKETS, decode_push
from dispider_vllm.perception.frames import decode_frames
from dispider_vllm.sidecar.frame_ring import EncodedFrameInRing, FrameInRing, FrameRing
from dispider_vllm.sidecar.protocol import (
    CountingHistogram,
    PushEncoded,
    PushFrames,
    PushSharedFrames,
    Shutdown,
    SidecarReady,
    SidecarStats,
    StreamError,
)
from dispider_vllm.sidecar.turn_log import NO_CLOCK, TurnClock, TurnLog
from dispider_vllm.types import EncodedFrame

log = logging.getLogger("dispider.sidecar")
STATS_INTERVAL_S = 1.0
IDLE_WAIT_S = 0.02
MAX_COMMANDS_PER_TURN = 4096
# The intake takes what waits on the pipe together (up to this many commands), to decode its images in one call.
MAX_INTAKE_BATCH = 256
# A decoded upload is handed to the engine a few pieces per turn, with a batched step in between, so assembling
# one tenant's long video cannot hold up the clips of live streams that arrive meanwhile.
DECODED_FRAMES_PER_PIECE = 32
DECODED_PIECES_PER_TURN = 4


def run_sidecar(config: SidecarConfig, commands, events, frame_ring: str | None = None) -> None:
    """Process entry point (``frame_ring``: the name of the server's FrameRing). Startup failures are sent back as
    a string so the server can say why."""
    # Under CUDA MPS the sidecar's kernels go first: the reaction's run at the priority the server gave them.
    os.environ["CUDA_MPS_CLIENT_PRIORITY"] = "0"  # before this process's first CUDA call
    try:
        ring = FrameRing.attach(frame_ring) if frame_ring else None
        gate = DecisionGate.attach(config.decision_gate) if config.decision_gate else None
        engine = _build_engine(config)
        captured = engine.capture_graphs()  # on a GPU: before the first stream, not during its steps
        log.info("sidecar CUDA graphs captured at start: %s", captured)
        turn_log = TurnLog(config.turn_log) if config.turn_log else None
    except Exception as error:  # noqa: BLE001 - report any startup failure to the parent, then exit
        events.put(f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}")
        return
    freeze_startup_heap()  # the models' objects live as long as the process: no collection walks them again
    gc_pauses = GcPauseMeter()
    events.put(SidecarReady(device=config.device, model=config.part_dir, features=engine.features()))
    try:
        _serve(engine, CommandIntake(commands, ring), events, gc_pauses, turn_log, gate)
    finally:
        gc_pauses.close()
        if gate is not None:
            gate.hold(False)
            gate.close()
        if turn_log is not None:
            turn_log.close()
        engine.close()
        if ring is not None:
            ring.close()


def _build_engine(config: SidecarConfig):
    from dispider_vllm.decision.engine import KVPoolTooLarge
    from dispider_vllm.perception.modules import PerceptionDecisionModules

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(config.device))  # streams and events then live on the sidecar's GPU
    dtype = getattr(torch, config.dtype)
    modules = PerceptionDecisionModules.load(config.part_dir, device=config.device, dtype=dtype)
    budget, budget_source = kv_memory_budget(torch.device(config.device), config.memory_share)
    try:
        return _sidecar_engine(config, modules, budget)
    except KVPoolTooLarge as error:
        raise ValueError(f"--sidecar-kv-slots {config.kv_slots}: {error} ({budget_source}); lower "
                         "--sidecar-kv-slots (past it the pool grows as streams come) or, on a GPU shared with vLLM, "
                         "--gpu-memory-utilization") from None


def _sidecar_engine(config: SidecarConfig, modules, kv_memory_budget_bytes: int):
    from dispider_vllm.decision.engine import DecisionConfig
    from dispider_vllm.perception.frames import load_preprocessor_config
    from dispider_vllm.sidecar.engine import ArrivalPolicy, SidecarEngine, make_respond_policy

    return SidecarEngine(
        modules,
        preprocessor=load_preprocessor_config(Path(config.part_dir) / "vision_tower"),
        max_batch_clips=config.max_batch_clips,
        decision_config=DecisionConfig(max_kept_clips=config.max_kept_clips, max_context_clips=config.max_context_clips,
                                       kept_clips_budget_bytes=config.kept_clips_budget_bytes,
                                       initial_kv_slots=config.kv_slots, cuda_graphs=config.cuda_graphs,
                                       kv_memory_budget_bytes=kv_memory_budget_bytes),
        cuda_graphs=config.cuda_graphs,
        respond_policy=make_respond_policy(config.respond_every, config.respond_probability),
        preprocess_on=preprocess_place(config),
        frame_perception=frame_perception(config),
        # On the host, frames are preprocessed on threads as they arrive (~1 ms of CPU each at 320x240).
        preprocess_workers=config.preprocess_workers,
        fp8=config.quantization == "fp8",
        lanes=config.lanes,
        arrival_policy=ArrivalPolicy.named(config.schedule),
    )


def kv_memory_budget(device: torch.device, memory_share: float | None) -> tuple[int, str]:
    """Bytes the decision KV pool may take at the start on ``device`` (its models loaded), and whence the figure."""
    if device.type != "cuda":
        import psutil

        return psutil.virtual_memory().available, "the host's available memory"
    free, total = torch.cuda.mem_get_info(device)
    return shared_gpu_budget(free, total, memory_share, torch.cuda.memory_reserved(device), str(device))


def shared_gpu_budget(free: int, total: int, memory_share: float | None, taken: int, device: str) -> tuple[int, str]:
    """A GPU the sidecar shares with vLLM: its share of the GPU less what its models took (vLLM may not have taken
    its own yet, so what is free says nothing); a GPU of its own: what is free."""
    if memory_share is None:
        return free, f"free on {device}"
    return int(total * memory_share) - taken, (f"the {memory_share:.2f} of {device}'s {total / 2**30:.0f} GiB that "
                                               f"vLLM leaves the sidecar, less {taken / 2**30:.1f} GiB its models took")


def preprocess_place(config: SidecarConfig) -> str:
    """auto: on the GPU when the sidecar has one (the host's threads and the loop share one interpreter, which
    limited the live streams past 512 on an H200: docs/benchmarks.md); on the host on the CPU, where the threads
    overlap the CPU's model work."""
    if config.preprocess_on != "auto":
        return config.preprocess_on
    return "device" if config.device.startswith("cuda") or config.frame_perception in ("arrival", "prefill") else "host"


def frame_perception(config: SidecarConfig) -> str:
    """auto: each frame through the CLIP tower as it arrives wherever the frames are preprocessed on the device
    (a closing clip is then left with the compact model's pass: docs/benchmarks.md); otherwise at the clip's close."""
    if config.frame_perception != "auto":
        return config.frame_perception
    return "arrival" if preprocess_place(config) == "device" else "clip"


class VideoDecoder:
    """Decodes ``PushEncoded`` chunks on a thread, so a long upload does not stall the other streams' clips.

    A stream's later commands wait behind its chunk while it is being decoded, so its frames, questions and end
    stay in the order they were sent. Decoded pieces are handed out round-robin over streams: several long
    uploads advance side by side instead of one after the other.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._ready: OrderedDict[str, deque] = OrderedDict()  # stream id -> its commands (and errors), in order
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._work, name="sidecar-decoder", daemon=True).start()

    def takes(self, command) -> bool:
        """Whether this command must go through the decoder (an upload, or anything queued behind one)."""
        if isinstance(command, PushEncoded):
            return True
        stream_id = getattr(command, "stream_id", None)
        with self._lock:
            return self._pending.get(stream_id, 0) > 0 or stream_id in self._ready

    def submit(self, command) -> None:
        with self._lock:
            self._pending[command.stream_id] = self._pending.get(command.stream_id, 0) + 1
        self._jobs.put(command)

    def decoding(self) -> bool:
        """Whether some upload (or a command behind one) is still being decoded."""
        with self._lock:
            return bool(self._pending)

    def has_ready(self) -> bool:
        with self._lock:
            return bool(self._ready)

    def take(self, limit: int) -> list:
        """Up to ``limit`` ready commands, one per stream in turn; a served stream goes to the back of the line."""
        taken = []
        with self._lock:
            while self._ready and len(taken) < limit:
                stream_id, pieces = self._ready.popitem(last=False)
                taken.append(pieces.popleft())
                if pieces:
                    self._ready[stream_id] = pieces
        return taken

    def _work(self) -> None:
        while True:
            command = self._jobs.get()
            pieces = _pieces(decode_push(command)) if isinstance(command, PushEncoded) else [command]
            with self._lock:
                self._ready.setdefault(command.stream_id, deque()).extend(pieces)
                self._pending[command.stream_id] -= 1
                if not self._pending[command.stream_id]:
                    del self._pending[command.stream_id]


class CommandIntake:
    """Reads the server's commands off the process pipe on a thread of its own, into an in-process queue; copies
    shared frames out of the frame ring and decodes the images the server left encoded, as they come; times each
    frame push from the server's receipt to here (``transit_seconds``) and the decoding of each batch of images
    (``decode_seconds``: what waited on the pipe together is decoded in one call).

    The pipe holds less than one 320x240 frame, and the server's feeder thread writes the next command only after
    the previous one has been read; a loop that read the pipe only between batched steps took about one frame per
    step and fell behind at a few hundred frames/s while clips waited upstream. This thread keeps the pipe
    flowing during steps (the main thread waits on the GPU with the GIL released), and a drain takes it all.
    Decoding here, not in the main loop, overlaps it with the steps too; one call for a batch takes the GIL back
    once, where Pillow, image by image, waited for it at each step while the main loop held it (tried on a 2-core
    CPU: the frames fell behind by seconds).
    """

    def __init__(self, commands, ring: FrameRing | None = None) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.transit_seconds = CountingHistogram(SECONDS_BUCKETS)
        self.decode_seconds = CountingHistogram(SECONDS_BUCKETS)
        self._ring = ring
        threading.Thread(target=self._pump, args=(commands,), name="sidecar-intake", daemon=True).start()

    def _pump(self, commands) -> None:
        while True:
            waiting = _waiting(commands)
            for command in waiting:
                if isinstance(command, (PushSharedFrames, PushFrames, PushEncoded)) and command.received_at:
                    self.transit_seconds.observe(max(0.0, time.time() - command.received_at))
            for command in self._taken_in(waiting):
                self.queue.put(command)
                if isinstance(command, Shutdown):
                    return

    def _taken_in(self, commands: list) -> list:
        """The commands with their frames out of the ring, and the images among them decoded all at once."""
        pushes = [i for i, command in enumerate(commands) if isinstance(command, (PushSharedFrames, PushFrames))]
        frames = [[self._ring.take(frame) if isinstance(frame, (FrameInRing, EncodedFrameInRing)) else frame
                   for frame in commands[i].frames] for i in pushes]
        flat = [frame for push in frames for frame in push]
        if any(isinstance(frame, EncodedFrame) for frame in flat):
            started = time.perf_counter()
            try:
                flat = decode_frames(flat)
            except Exception:  # noqa: BLE001 - this thread must live on; the engine decodes them one by one
                log.exception("decoding %d pushed frames together failed", len(flat))
            self.decode_seconds.observe(time.perf_counter() - started)
        taken, position = list(commands), 0
        for i, push in zip(pushes, frames):
            command = commands[i]
            taken[i] = PushFrames(command.stream_id, tuple(flat[position : position + len(push)]),
                                  command.end_of_stream, command.received_at)
            position += len(push)
        return taken


def _waiting(commands, limit: int = MAX_INTAKE_BATCH) -> list:
    """The next command (waiting for it), and those already queued behind it, up to ``limit`` or a Shutdown."""
    waiting = [commands.get()]
    while len(waiting) < limit and not isinstance(waiting[-1], Shutdown):
        try:
            waiting.append(commands.get_nowait())
        except queue.Empty:
            break
    return waiting


def _serve(engine, intake: CommandIntake, events, gc_pauses: GcPauseMeter, turn_log: TurnLog | None = None,
           gate: DecisionGate | None = None) -> None:
    decoder = VideoDecoder()
    hold = gate.hold if gate is not None else _no_gate
    last_stats = 0.0
    while True:
        idle = not engine.has_work() and not decoder.has_ready()
        taken = _drain(intake.queue, block=idle)
        clock = TurnClock() if turn_log else NO_CLOCK  # after the drain: an idle wait is not part of a turn
        for command in taken:
            if isinstance(command, Shutdown):
                return
            clock.took(command)
            if decoder.takes(command):
                decoder.submit(command)
                continue
            _send_all(events, _safely(engine.handle, command), clock)
        for decoded in decoder.take(DECODED_PIECES_PER_TURN):
            _send_all(events, [decoded] if isinstance(decoded, StreamError) else _safely(engine.handle, decoded), clock)
        clock.handled(engine.clips_total)
        hold(engine.pending_clips() > 0)  # the reaction's next step waits while closed clips do
        if engine.has_work():  # clips still in preprocessing count: the step waits for them briefly
            with torch.inference_mode():
                outgoing = engine.step()
            hold(engine.pending_clips() > 0)  # before the events go: a decision out is one no longer waited for
            _send_all(events, outgoing, clock)
        if turn_log is not None:
            turn_log.record(clock.stepped(engine.clips_total, engine.pending_clips()))
        if time.monotonic() - last_stats >= STATS_INTERVAL_S:
            last_stats = time.monotonic()
            events.put(_stats(engine, intake, gc_pauses))


def _no_gate(closes_waiting: bool) -> None:
    pass


def _send_all(events, outgoing, clock) -> None:
    for event in outgoing:
        clock.sent(event)
        events.put(event)


def _pieces(decoded):
    """A decoded chunk as pushes of at most DECODED_FRAMES_PER_PIECE frames; the end of stream rides on the last."""
    if not isinstance(decoded, PushFrames) or len(decoded.frames) <= DECODED_FRAMES_PER_PIECE:
        return [decoded]
    starts = range(0, len(decoded.frames), DECODED_FRAMES_PER_PIECE)
    return [
        PushFrames(decoded.stream_id, decoded.frames[i : i + DECODED_FRAMES_PER_PIECE],
                   decoded.end_of_stream and i == starts[-1], decoded.received_at)
        for i in starts
    ]


def _drain(commands, *, block: bool, limit: int = MAX_COMMANDS_PER_TURN) -> list:
    """What is queued now, up to ``limit``; when idle, wait briefly for the first command instead of spinning."""
    drained = []
    try:
        drained.append(commands.get(timeout=IDLE_WAIT_S) if block else commands.get_nowait())
        while len(drained) < limit:
            drained.append(commands.get_nowait())
    except queue.Empty:
        pass
    return drained


def _safely(handle, command) -> list:
    """A command that breaks on its stream's data must not take the other streams down."""
    try:
        return handle(command)
    except Exception as error:  # noqa: BLE001
        log.exception("sidecar command %s failed", type(command).__name__)
        stream_id = getattr(command, "stream_id", "")
        return [StreamError(stream_id, "internal_error", f"{type(error).__name__}: {error}")]


def _stats(engine, intake: CommandIntake, gc_pauses: GcPauseMeter) -> SidecarStats:
    kept = engine.decision.kept_clips_usage()
    return SidecarStats(
        streams=len(engine.streams),
        pending_frames=0,
        pending_clips=engine.pending_clips(),
        frames_total=engine.frames_total,
        clips_total=engine.clips_total,
        batches_total=engine.batches_total,
        **engine.step_stats.snapshot(),
        transit_seconds=intake.transit_seconds.snapshot(),
        frame_decode_seconds=intake.decode_seconds.snapshot(),
        gc_pause_seconds=gc_pauses.snapshot(),
        kept_clips=kept.clips,
        kept_clip_bytes=kept.bytes,
        kept_clips_evicted_total=kept.evicted_total,
        kept_clip_budget_bytes=kept.budget_bytes,
    )
