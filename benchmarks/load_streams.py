"""Live streams per server: N concurrent live sessions at real-time pace against ``dispider-serve``.

    # a running server
    python benchmarks/load_streams.py --url http://127.0.0.1:8000 --streams 8 --duration 120 --out load.json
    # 256 streams pushed from 4 client processes (the default, auto, picks 4 as well: one per 64 streams)
    python benchmarks/load_streams.py --url http://127.0.0.1:8000 --streams 256 --client-procs 4 --out load256.json
    # start the server too (its arguments after --); with random weights force an answer every 4th clip
    python benchmarks/load_streams.py --start-server --respond-every 4 --sweep 8 16 32 64 --duration 160 \\
        --out benchmarks/results/load_h200.json -- --checkpoint /models/Dispider

Each stream opens a live session, reads its SSE events, and pushes JPEG frames of a generated video (or
``--video``) at 1 frame per second of video time, paced in real time, for ``--duration`` seconds; then it ends
the session, waits for its last answers and deletes it. Stream starts are spread over one clip (``--stagger``),
as independent cameras would be. A frame the client could not push within ``--drop-after`` seconds of its time
is dropped, as a live source would.

Recorded, with p50/p90/p99:

- decision latency: the server's (``latency_s`` of ``decision`` events: clip's last frame received -> decision)
  and the client's (clip's closing frame sent -> ``decision`` event received);
- time to first token: the trigger (the decision to respond, taken at closing frame sent + the server's
  ``latency_s``) -> the answer's first ``chunk`` received, including any wait behind the session's previous
  answer; also from the ``decision`` event's arrival, and from /metrics (engine submit -> first text);
- answer latency: clip's closing frame sent -> the answer's first ``chunk`` (what a viewer waits);
- inter-token latency (per answer: first to last chunk / (tokens - 1)), gaps between chunks, tokens/s;
- each push's round trip, split into the server's own time (its ``Server-Timing`` header), the wait before the
  request went out (httpx's trace: the connection pool, connecting) and the wait for the response's headers; the
  pushes over 0.5 s with when they happened (the run's busiest seconds), and the host's TCP counters over the run;
- frames late or dropped, push lag and its growth, the server's backlog (sidecar pending clips, reaction queue)
  sampled from /metrics, GPU memory (/metrics if the server exports it, else nvidia-smi, else null).

A run is *real-time* when nothing backs up and latencies hold: no frame dropped, neither the push lag nor the
decision latency grows over the run (least-squares rise over the run <= ``--growth-tolerance``), p99 decision
latency <= 2 s, p99 time to first token <= 1.5 s, every session decided every clip with no errors.
``--sweep N1 N2 ...`` runs each N in increasing order, stops after the first that is not real-time, and reports
the largest that was. Needs ``--respond-every`` on the server for a steady answer rate with random weights.
With N = 1 in the sweep (the idle server), ``sweep.latency_vs_idle`` rates each run's decision latency against
it and names the largest real-time N within ``--idle-factor`` (1.5) of it.
Before the first run, one short stream warms the server up (first batches, compilation); ``--no-warmup`` skips it.

One client process cannot push 256 streams in real time (its event loop lags and frames go late), so
``--client-procs K`` spreads each run's streams over K spawned client processes (round-robin), each with its own
event loop and HTTP client; ``auto`` (the default) is 1 up to 64 streams, else one per 64 streams, at most half
the cores. Every stream keeps its start (stream i at i * stagger / N) from one time origin that all processes
share; this process samples the server, the GPU and /metrics, and merges the streams' logs before the statistics.
Each stream talks through an HTTP client of its own (``--client-pool per-stream``: two connections, as a camera
would have); ``--client-pool shared`` gives the streams of a client process one connection pool instead.
``client_loop_lag_s`` is the worst client process's (``client_loop_lag_by_proc_s``: each one's); a p99 over
0.25 s is noted in the verdict: use more client processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from clients.local_server import LocalServer, ServerStartError, option_value
from clients.server_metrics import (
    DECISION_LATENCY,
    PERCEPTION_LATENCY,
    QUEUE_WAIT,
    TIME_TO_FIRST_TOKEN,
    Histogram,
    MetricsSnapshot,
    decision_gate_delta,
)
from clients.stream_video import (
    EventRecorder,
    StreamClientError,
    StreamReport,
    StreamSettings,
    TimelinePrinter,
    auth_headers,
    delete_session,
    encode_jpeg,
    open_session,
    raise_for_api_error,
    sse_events,
    thin,
    video_file_frames,
)

CLIP_SECONDS = 16  # uniform clips: 16 frames sampled at 1 fps
SAMPLE_FPS = 1.0  # the server's sampling rate
MAX_P99_DECISION_S = 2.0
MAX_P99_TTFT_S = 1.5
LOOP_LAG_LIMIT_S = 0.25  # above this (p99), the load generator itself could not keep up
SAMPLE_METRICS_EVERY_S = 2.0
SAMPLE_GPU_EVERY_S = 5.0
REPORT_VERSION = 1
STREAMS_PER_CLIENT_PROC = 64  # --client-procs auto: one client process per this many streams
CLIENT_START_TIMEOUT_S = 120.0  # a client process imports and reports ready within this
CLIENT_START_MARGIN_S = 0.5  # the common time origin lies this far after the "start" message is sent
CLIENT_POOLS = ("per-stream", "shared")
# Forget idle connections well before the server's keep-alive timeout (dispider-serve --keep-alive, 30 s): reusing
# one the server is closing at that moment fails the request with a ReadError (seen once among 128 streams on the
# H200 against uvicorn's 5 s). Long enough that the pool keeps the connections a burst of pushes opened instead of
# closing them after 2 s and opening new ones at the next burst (tenth session: a push on a new connection waited
# up to 20 s on a loaded server).
KEEPALIVE_EXPIRY_S = 20.0
# The sidecar's step histograms (serve/metrics.py).
SIDECAR_BATCH_CLIPS = "dispider_sidecar_batch_clips"
SIDECAR_STEP_SECONDS = "dispider_sidecar_step_seconds"
SIDECAR_QUEUE_WAIT = "dispider_sidecar_queue_wait_seconds"
SIDECAR_TRANSIT = "dispider_sidecar_transit_seconds"
SIDECAR_FRAME_DECODE = "dispider_sidecar_frame_decode_seconds"  # per intake batch (--decode-frames-in sidecar)
GC_PAUSES = "dispider_gc_pause_seconds"
SERVER_LOOP_LAG = "dispider_server_loop_lag_seconds"  # serve/loop_watch.py
SERVER_LOOP_STALLS = "dispider_server_loop_stalls_total"
FRAME_PUSH = "dispider_frame_push_seconds"
SLOWEST_DECISIONS = 12  # the report lists this many of a run's slowest decisions, to see when the tail happens
SLOW_PUSH_S = 0.5  # a push whose round trip took longer is listed (when, which stream, how much in the server)
SLOWEST_PUSHES = 12
SIDECAR_STEP_PHASES = ("preprocess_wait", "perceive_frames", "prefill_frames", "perceive", "decide")


# ---- settings ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadConfig:
    duration_s: float = 120.0  # video seconds per stream
    fps: float = 1.0  # frames pushed per second of video
    speed: float = 1.0  # video seconds per wall second (1: real time; more only for smoke tests)
    stagger_s: float = CLIP_SECONDS  # stream starts spread evenly over this
    max_tokens: int = 32
    question: str = "Tell me whenever something changes in the video."
    drop_after_s: float = 2.0
    drain_timeout_s: float = 120.0
    growth_tolerance_s: float = 0.5
    max_p99_decision_s: float = MAX_P99_DECISION_S
    max_p99_ttft_s: float = MAX_P99_TTFT_S
    jpeg_quality: int = 85
    api_key: str | None = None  # for a server run with --tenants
    blocking_reaction: bool = False  # the baseline: each session's input held from a trigger to its answer's end
    keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S  # the client pool keeps an idle connection this long
    client_pool: str = "per-stream"  # CLIENT_POOLS: each stream's own connections, or one pool per client process

    @property
    def late_after_s(self) -> float:
        return 0.5 / self.fps  # half a frame interval

    @property
    def expected_clips(self) -> int:
        return math.ceil(self.duration_s * SAMPLE_FPS / CLIP_SECONDS)


@dataclass(frozen=True)
class EncodedFrame:
    timestamp: float
    jpeg: bytes


# ---- what one stream records ----------------------------------------------------------------------------------------
@dataclass
class StreamLog:
    index: int
    session_id: str | None = None
    frames_sent: int = 0
    frames_late: int = 0
    frames_dropped: int = 0
    push_lag: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, lag)
    push_rtt_s: list[float] = field(default_factory=list)
    push_server_s: list[float] = field(default_factory=list)  # the server's own time, as its Server-Timing says
    slow_pushes: list[tuple[float, float, float, dict]] = field(default_factory=list)  # (s into the run, rtt,
    # the server's own time, the client's phases: PushPhases.split)
    push_waits: list[tuple[float, float]] = field(default_factory=list)  # per push: (before sending, for the response)
    sent_at: list[tuple[float, float]] = field(default_factory=list)  # (video timestamp, monotonic send time)
    end_sent_at: float | None = None
    events: StreamReport | None = None
    failure: str | None = None
    open_status: int | None = None  # the HTTP status that refused the session (503: at capacity, 429: quota)

    def closing_sent_at(self, clip: int) -> float | None:
        """When the frame that closed ``clip`` was sent: the first one at or past its last sampling target."""
        if not self.sent_at:
            return None
        threshold = self.sent_at[0][0] + (clip + 1) * CLIP_SECONDS / SAMPLE_FPS - 0.5 / SAMPLE_FPS
        for timestamp, sent in self.sent_at:
            if timestamp >= threshold - 1e-6:
                return sent
        return self.end_sent_at  # the last, partial clip closes at the end of the stream


class QuietPrinter(TimelinePrinter):
    """The benchmark records events; it prints none of them."""

    def decision(self, decision) -> None: ...

    def answer_text(self, response, text) -> None: ...

    def answer_end(self, response) -> None: ...

    def error(self, error) -> None: ...


# ---- one stream ------------------------------------------------------------------------------------------------------
async def run_stream(index: int, count: int, http: httpx.AsyncClient, url: str, frames: list[EncodedFrame],
                     config: LoadConfig, run_start: float) -> StreamLog:
    log = StreamLog(index)
    await asyncio.sleep(config.stagger_s * index / max(count, 1) / config.speed)
    async with stream_client(http, config) as own:
        return await stream_session(own, url, frames, config, run_start, log)


@contextlib.asynccontextmanager
async def stream_client(shared: httpx.AsyncClient, config: LoadConfig):
    """The HTTP client one stream talks through. ``per-stream``: a client of its own with two connections, one
    for its event stream and one for its pushes, as a camera of its own would have; ``shared``: the client
    process's one pool, shared by all of its streams (the only mode before the thirteenth session)."""
    if config.client_pool == "shared":
        yield shared
        return
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2, keepalive_expiry=config.keepalive_expiry_s)
    async with httpx.AsyncClient(base_url=shared.base_url, timeout=shared.timeout, headers=shared.headers,
                                 limits=limits, verify=shared_ssl_context()) as own:
        yield own


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context for every per-stream client of a process: building one loads the CA bundle (milliseconds,
    and memory), which hundreds of streams need not do each."""
    return httpx.create_ssl_context()


async def stream_session(http: httpx.AsyncClient, url: str, frames: list[EncodedFrame], config: LoadConfig,
                         run_start: float, log: StreamLog) -> StreamLog:
    """Open a session, read its events while pushing the frames at pace, end it, wait for its last answers."""
    session = await open_logged(http, url, config, log)
    if session is None:
        return log
    reader = asyncio.create_task(_read(http, session["events_url"], EventRecorder(log.events, QuietPrinter())))
    try:
        await push_paced(http, session["id"], frames, config, log, run_start, stop=reader.done)
        log.end_sent_at = time.monotonic()
        raise_for_api_error(await http.post(f"/v1/sessions/{session['id']}/end"))
        await asyncio.wait_for(asyncio.shield(reader), config.drain_timeout_s)
        if not log.events.ended_normally:
            log.failure = f"the session ended early: {log.events.end}"
    except asyncio.TimeoutError:
        log.failure = f"no end event within {config.drain_timeout_s:g} s of the last frame"
    except (StreamClientError, httpx.HTTPError) as error:
        log.failure = reader_failure(reader) or f"{type(error).__name__}: {error}"
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await delete_session(http, session["id"])
    return log


async def open_logged(http: httpx.AsyncClient, url: str, config: LoadConfig, log: StreamLog) -> dict | None:
    """Open the stream's session and note it in ``log``; None (and the failure, with any refusing status) if refused."""
    settings = StreamSettings(url=url, question=f"[stream {log.index}] {config.question}",
                              max_tokens=config.max_tokens, api_key=config.api_key,
                              blocking_reaction=config.blocking_reaction or None)
    try:
        session = await open_session(http, settings)
    except (StreamClientError, httpx.HTTPError) as error:
        log.failure = f"open: {error}"
        log.open_status = getattr(error, "status", None)
        return None
    log.session_id = session["id"]
    log.events = StreamReport(session["id"])
    return session


def reader_failure(reader: asyncio.Task) -> str | None:
    """Why the event reader stopped, when it failed (its error explains more than the pusher's)."""
    if reader.done() and not reader.cancelled() and (error := reader.exception()) is not None:
        return f"event stream: {type(error).__name__}: {error}"
    return None


async def _read(http: httpx.AsyncClient, path: str, recorder: EventRecorder) -> None:
    async for name, data in sse_events(http, path):
        recorder.handle(name, data)


async def push_paced(http: httpx.AsyncClient, session_id: str, frames: list[EncodedFrame], config: LoadConfig,
                     log: StreamLog, run_start: float, stop) -> None:
    """Frame k is due k / fps seconds (of video, / speed) after the stream's start; late ones past
    ``drop_after_s`` are dropped so that the stream stays live."""
    total = int(round(config.duration_s * config.fps))
    interval = 1.0 / (config.fps * config.speed)
    started = time.monotonic()
    path = f"/v1/sessions/{session_id}/frames"
    for k in range(total):
        if stop():
            raise StreamClientError("the session ended before its last frame")
        due = started + k * interval
        if (delay := due - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        lag = time.monotonic() - due
        if lag > config.drop_after_s:
            log.frames_dropped += 1
            continue
        frame = frames[k % len(frames)]
        timestamp = k / config.fps  # looping the video: time keeps going forward
        sent = time.monotonic()
        phases = PushPhases(sent)
        response = await http.post(path, params={"timestamp": f"{timestamp:.3f}"}, content=frame.jpeg,
                                   headers={"content-type": "image/jpeg"}, extensions={"trace": phases.trace})
        raise_for_api_error(response)
        rtt, in_server, split = time.monotonic() - sent, server_timing_s(response), phases.split()
        log.push_rtt_s.append(rtt)
        log.push_server_s.append(in_server)
        log.push_waits.append((split["before_sending_s"], split["awaiting_response_s"]))
        if rtt > SLOW_PUSH_S:
            log.slow_pushes.append((sent - run_start, rtt, in_server, split))
        log.sent_at.append((timestamp, sent))
        log.push_lag.append((sent - run_start, lag))
        log.frames_sent += 1
        log.frames_late += lag > config.late_after_s


class PushPhases:
    """A push's time on the client's side, from httpx's trace events: before its request went out (waiting for a
    connection of the pool, or connecting) and between its body sent and the response's headers received (the
    network stack and the server). The rest is the client's own work."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.at: dict[str, float] = {}

    async def trace(self, event: str, info: dict) -> None:
        self.at.setdefault(event, time.monotonic())

    def split(self) -> dict:
        at, nan = self.at, math.nan
        sending = at.get("http11.send_request_headers.started", nan)
        waiting = at.get("http11.receive_response_headers.started", nan)
        received = at.get("http11.receive_response_headers.complete", nan)
        return {"before_sending_s": sending - self.started, "awaiting_response_s": received - waiting,
                "new_connection": "connection.connect_tcp.started" in at}


def server_timing_s(response: httpx.Response) -> float:
    """The ``handled;dur=MS`` of the response's Server-Timing header, in seconds (NaN without one)."""
    for metric in response.headers.get("server-timing", "").split(","):
        name, _, params = metric.strip().partition(";")
        if name == "handled" and params.startswith("dur="):
            try:
                return float(params[4:]) / 1000
            except ValueError:
                break
    return math.nan


# Kernel counters of connections refused or retried (Linux /proc/net/netstat and /proc/net/snmp): a push that
# waits seconds outside the server's handler could be a SYN dropped from a full accept queue (retried after 1 s,
# then 3 s) or a segment retransmitted after a timeout.
TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPSynRetrans", "TCPTimeouts", "TCPLossProbes",
                "TCPBacklogDrop", "TCPReqQFullDrop", "RetransSegs", "ActiveOpens", "PassiveOpens")


def tcp_counters() -> dict[str, int] | None:
    """This host's TCP counters of TCP_COUNTERS (the server's too when it runs here); None off Linux."""
    counters: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return None
        # Each table is two lines with the same prefix: the names, then the values.
        for names, values in zip(lines[::2], lines[1::2]):
            for name, value in zip(names.split()[1:], values.split()[1:]):
                if name in TCP_COUNTERS and value.lstrip("-").isdigit():
                    counters[name] = int(value)
    return counters


def tcp_counters_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {name: after[name] - before.get(name, 0) for name in sorted(after)}


def slow_push_report(logs: list[StreamLog]) -> dict:
    """Pushes slower than SLOW_PUSH_S: how many, how much of their time was spent outside the server's handler,
    the seconds of the run that had the most of them (a burst at one moment points at a stall shared by all
    streams; spread out, at single connections), and the slowest ones."""
    slow = [(at, rtt, server, split, log.index) for log in logs for at, rtt, server, split in log.slow_pushes]
    by_second: dict[int, int] = {}
    for at, *_ in slow:
        by_second[int(at)] = by_second.get(int(at), 0) + 1
    busiest = sorted(by_second.items(), key=lambda item: (-item[1], item[0]))[:SLOWEST_PUSHES]
    slowest = sorted(slow, key=lambda push: push[1], reverse=True)[:SLOWEST_PUSHES]
    return {
        "over_s": SLOW_PUSH_S,
        "count": len(slow),
        "outside_server_s": distribution([rtt - server for _, rtt, server, _, _ in slow]),
        "before_sending_s": distribution([split["before_sending_s"] for *_, split, _ in slow]),
        "awaiting_response_s": distribution([split["awaiting_response_s"] for *_, split, _ in slow]),
        "new_connections": sum(split["new_connection"] for *_, split, _ in slow),
        "seconds_with_any": len(by_second),
        "busiest_seconds": [{"at_s": second, "pushes": count} for second, count in busiest],
        "slowest": [{"at_s": _r(at), "stream": stream, "rtt_s": _r(rtt), "server_s": _r(server),
                     "before_sending_s": _r(split["before_sending_s"]),
                     "awaiting_response_s": _r(split["awaiting_response_s"]), "new_connection": split["new_connection"]}
                    for at, rtt, server, split, stream in slowest],
    }


# ---- samplers running beside the streams -------------------------------------------------------------------------------
@dataclass
class Samples:
    pending_clips: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, value)
    reaction_queue: list[tuple[float, float]] = field(default_factory=list)
    running_reactions: list[float] = field(default_factory=list)
    gpu_used_mib: list[list[float]] = field(default_factory=list)  # per sample, per GPU
    gpu_total_mib: list[float] | None = None
    gpu_source: str | None = None
    loop_lag_s: list[float] = field(default_factory=list)


async def sample_server(http: httpx.AsyncClient, samples: Samples, run_start: float) -> None:
    while True:
        try:
            snapshot = MetricsSnapshot.parse((await http.get("/metrics", timeout=10)).text)
        except (httpx.HTTPError, ValueError):
            snapshot = None
        if snapshot is not None:
            at = time.monotonic() - run_start
            if (value := snapshot.value("dispider_sidecar_pending_clips")) is not None:
                samples.pending_clips.append((at, value))
            if (value := snapshot.value("dispider_reaction_queue_depth")) is not None:
                samples.reaction_queue.append((at, value))
            if (value := snapshot.value("dispider_reactions_running")) is not None:
                samples.running_reactions.append(value)
            if (used := gpu_memory_from_metrics(snapshot)) is not None:
                samples.gpu_source = "metrics"
                samples.gpu_used_mib.append(used)
        await asyncio.sleep(SAMPLE_METRICS_EVERY_S)


def gpu_memory_from_metrics(snapshot: MetricsSnapshot) -> list[float] | None:
    """Per-GPU used MiB, if the server exports a ``*gpu_memory_used_bytes`` gauge (dispider-serve may not)."""
    used = [(labels.get("gpu", labels.get("device", "0")), value) for name, labels, value in snapshot.samples
            if name.endswith("gpu_memory_used_bytes")]
    return [value / 2**20 for _, value in sorted(used)] if used else None


async def sample_gpu(samples: Samples) -> None:
    """nvidia-smi every few seconds, unless /metrics already gives GPU memory or there is no nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return
    while True:
        if samples.gpu_source != "metrics":
            reading = await asyncio.to_thread(nvidia_smi_memory)
            if reading is not None:
                samples.gpu_source = "nvidia-smi"
                samples.gpu_used_mib.append(reading[0])
                samples.gpu_total_mib = reading[1]
        await asyncio.sleep(SAMPLE_GPU_EVERY_S)


def nvidia_smi_memory() -> tuple[list[float], list[float]] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        rows = [[float(x) for x in line.split(",")] for line in out.strip().splitlines()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return [r[0] for r in rows], [r[1] for r in rows]


async def sample_loop_lag(samples: Samples, every_s: float = 0.1) -> None:
    """How late this process's event loop wakes up: large values mean the client, not the server, is the limit."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(every_s)
        samples.loop_lag_s.append(max(0.0, time.monotonic() - before - every_s))


# ---- one run of N streams ------------------------------------------------------------------------------------------------
@dataclass
class LoadRun:
    """What one run recorded, before it is summarized (benchmarks/tenancy_bench.py reads the logs too)."""

    streams: int
    logs: list[StreamLog]
    samples: Samples
    before: MetricsSnapshot | None
    after: MetricsSnapshot | None
    run_start: float
    wall_s: float
    client_procs: int = 1
    loop_lag_by_proc: list[list[float]] = field(default_factory=list)  # per client process, when there are several
    tcp_before: dict[str, int] | None = None  # this host's TCP counters (tcp_counters) around the run
    tcp_after: dict[str, int] | None = None

    def summary(self, config: LoadConfig) -> dict:
        summary = summarize_run(self.streams, self.logs, self.samples, self.before, self.after, self.run_start,
                                self.wall_s, config)
        summary["client_procs"] = self.client_procs
        summary["host_tcp"] = tcp_counters_delta(self.tcp_before, self.tcp_after)
        if len(self.loop_lag_by_proc) > 1:  # client_loop_lag_s holds the worst process's samples
            summary["client_loop_lag_by_proc_s"] = [distribution(lags) for lags in self.loop_lag_by_proc]
        return summary


def resolve_client_procs(setting: int | str, streams: int) -> int:
    """``--client-procs``: "auto" is one process up to 64 streams, else one per 64 (rounded up), at most half the
    cores; a number is taken as given. Never more processes than streams."""
    if setting == "auto":
        procs = 1 if streams <= STREAMS_PER_CLIENT_PROC else math.ceil(streams / STREAMS_PER_CLIENT_PROC)
        procs = min(procs, (os.cpu_count() or 2) // 2)
    else:
        procs = int(setting)
    return max(1, min(procs, streams))


def client_procs_arg(text: str) -> int | str:
    """argparse type of ``--client-procs``: "auto" or an integer >= 1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'auto' or an integer >= 1, not {text!r}")
    return value


async def run_load(url: str, streams: int, frames: list[EncodedFrame], config: LoadConfig,
                   client_procs: int = 1) -> dict:
    return (await collect_load(url, streams, frames, config, client_procs=client_procs)).summary(config)


async def collect_load(url: str, streams: int, frames: list[EncodedFrame], config: LoadConfig,
                       stream=run_stream, client_procs: int = 1) -> LoadRun:
    """Run ``streams`` streams (``stream``: run_stream's signature) with the samplers beside them; with
    ``client_procs`` > 1 the streams run in that many spawned client processes (``stream`` must then pickle)."""
    procs = max(1, min(client_procs, streams))
    if procs > 1:
        return await collect_load_in_procs(url, streams, frames, config, stream, procs)
    limits = httpx.Limits(max_connections=2 * streams + 16, max_keepalive_connections=2 * streams + 16,
                          keepalive_expiry=config.keepalive_expiry_s)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, headers=auth_headers(config.api_key)) as http:
        before, tcp_before = await scrape(http), tcp_counters()
        samples = Samples()
        run_start = time.monotonic()
        helpers = [asyncio.create_task(sample_server(http, samples, run_start)),
                   asyncio.create_task(sample_gpu(samples)), asyncio.create_task(sample_loop_lag(samples))]
        try:
            logs = await asyncio.gather(*(stream(i, streams, http, url, frames, config, run_start)
                                          for i in range(streams)))
        finally:
            await stop_helpers(helpers)
        wall = time.monotonic() - run_start
        after = await scrape(http)
    return LoadRun(streams, list(logs), samples, before, after, run_start, wall, tcp_before=tcp_before,
                   tcp_after=tcp_counters())


async def collect_load_in_procs(url: str, streams: int, frames: list[EncodedFrame], config: LoadConfig, stream,
                                procs: int) -> LoadRun:
    """The streams split round-robin over ``procs`` client processes, each with its own event loop and HTTP
    client; this process samples the server and the GPU. Stream i still starts i * stagger / N after the one
    time origin that every process shares (a wall-clock instant sent with the start)."""
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=auth_headers(config.api_key)) as http:
        clients = ClientProcesses(url, streams, procs, frames, config, stream)
        graceful = False
        try:
            await clients.collect("ready", CLIENT_START_TIMEOUT_S)
            before, tcp_before = await scrape(http), tcp_counters()
            run_start = time.monotonic() + CLIENT_START_MARGIN_S
            clients.start(time.time() + CLIENT_START_MARGIN_S)
            await asyncio.sleep(max(0.0, run_start - time.monotonic()))
            samples = Samples()
            helpers = [asyncio.create_task(sample_server(http, samples, run_start)),
                       asyncio.create_task(sample_gpu(samples))]
            try:
                results = await clients.collect("result", None)
            finally:
                await stop_helpers(helpers)
            graceful = True
        finally:
            clients.close(graceful)
        wall = time.monotonic() - run_start
        after = await scrape(http)
    logs = []
    for result in results:
        shift = run_start - result.run_start  # this process's monotonic clock from the client's
        logs.extend(shift_log_times(log, shift) for log in result.logs)
    logs.sort(key=lambda log: log.index)
    by_proc = [result.loop_lag_s for result in results]
    worst = max(by_proc, key=lambda lags: (distribution(lags)["p99"] or 0.0, max(lags, default=0.0)))
    samples.loop_lag_s = list(worst)
    return LoadRun(streams, logs, samples, before, after, run_start, wall, procs, by_proc, tcp_before=tcp_before,
                   tcp_after=tcp_counters())


async def stop_helpers(helpers: list[asyncio.Task]) -> None:
    for helper in helpers:
        helper.cancel()
    await asyncio.gather(*helpers, return_exceptions=True)


def shift_log_times(log: StreamLog, shift: float) -> StreamLog:
    """``log`` with its instants (time.monotonic() of the process that recorded them) moved by ``shift`` seconds;
    times relative to the run's start (push_lag) and durations stay as they are."""
    if shift == 0.0:
        return log
    log.sent_at = [(timestamp, sent + shift) for timestamp, sent in log.sent_at]
    if log.end_sent_at is not None:
        log.end_sent_at += shift
    if log.events is not None:
        log.events.decisions = [replace(d, received_at=d.received_at + shift) for d in log.events.decisions]
        for response in log.events.responses.values():
            response.first_at = None if response.first_at is None else response.first_at + shift
            response.ended_at = None if response.ended_at is None else response.ended_at + shift
            response.chunk_at = [at + shift for at in response.chunk_at]
    return log


# ---- client processes (--client-procs) -----------------------------------------------------------------------
@dataclass
class ClientResult:
    """What one client process sends back: its streams' logs, its own event loop's lag, and its run start (its
    time.monotonic() at the shared origin)."""

    logs: list[StreamLog]
    loop_lag_s: list[float]
    run_start: float


class ClientProcesses:
    """Spawned client processes (no forked event loop or sockets), one pipe each. Messages from a client:
    ("ready", None), then ("result", ClientResult), or ("error", why) at any time; to a client:
    ("start", origin as time.time())."""

    def __init__(self, url: str, streams: int, procs: int, frames: list[EncodedFrame], config: LoadConfig,
                 stream) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes, self.pipes = [], []
        try:
            for k in range(procs):
                ours, theirs = context.Pipe()
                process = context.Process(target=client_main, name=f"load-client-{k}", daemon=True,
                                          args=(theirs, url, list(range(k, streams, procs)), streams, frames,
                                                config, stream))
                process.start()
                theirs.close()
                self.processes.append(process)
                self.pipes.append(ours)
        except BaseException:
            self.close(graceful=False)
            raise

    def start(self, origin_wall: float) -> None:
        for pipe in self.pipes:
            pipe.send(("start", origin_wall))

    async def collect(self, expected: str, timeout_s: float | None) -> list:
        """The payload of every client's next ``expected`` message, in client order; a client's error, or its
        exit without one, raises StreamClientError."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = {pipe: k for k, pipe in enumerate(self.pipes)}
        payloads: list = [None] * len(self.pipes)
        while pending:
            ready = await asyncio.to_thread(multiprocessing.connection.wait, list(pending), 0.5)
            for pipe in ready:
                k = pending.pop(pipe)
                try:
                    tag, payload = pipe.recv()
                except (EOFError, OSError):
                    raise StreamClientError(f"client process {k} exited (code {self.processes[k].exitcode})") \
                        from None
                if tag == "error":
                    raise StreamClientError(f"client process {k} failed: {payload}")
                if tag != expected:
                    raise StreamClientError(f"client process {k} sent {tag!r}, expected {expected!r}")
                payloads[k] = payload
            if deadline is not None and pending and time.monotonic() > deadline:
                raise StreamClientError(f"no {expected!r} from {len(pending)} client process(es) within "
                                        f"{timeout_s:.0f} s")
        return payloads

    def close(self, graceful: bool) -> None:
        """Wait for clients that are done; stop the others (SIGTERM: their streams delete their sessions)."""
        if graceful:
            for process in self.processes:
                process.join(10)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(15)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in self.pipes:
            pipe.close()


def client_main(pipe, url: str, indices: list[int], count: int, frames: list[EncodedFrame], config: LoadConfig,
                stream) -> None:
    """A client process: its share of the streams (``indices`` of ``count``), started from the shared origin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent stops its clients
    try:
        raise_open_files_limit(len(indices))
        result = asyncio.run(client_streams(pipe, url, indices, count, frames, config, stream))
        pipe.send(("result", result))
    except BaseException as error:  # noqa: BLE001 - whatever it was, the parent reports it
        try:
            pipe.send(("error", f"{type(error).__name__}: {error}"))
        except OSError:
            pass  # the parent is gone
    finally:
        pipe.close()


async def client_streams(pipe, url: str, indices: list[int], count: int, frames: list[EncodedFrame],
                         config: LoadConfig, stream) -> ClientResult:
    main = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)  # streams end their sessions
    watchdog = asyncio.create_task(cancel_when_parent_dies(main))
    limits = httpx.Limits(max_connections=2 * len(indices) + 16, max_keepalive_connections=2 * len(indices) + 16,
                          keepalive_expiry=config.keepalive_expiry_s)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits,
                                     headers=auth_headers(config.api_key)) as http:
            pipe.send(("ready", None))
            while not await asyncio.to_thread(pipe.poll, 0.5):
                pass
            tag, origin_wall = pipe.recv()
            if tag != "start":
                raise StreamClientError(f"expected 'start', got {tag!r}")
            run_start = time.monotonic() + (origin_wall - time.time())  # the shared origin on this clock
            await asyncio.sleep(max(0.0, run_start - time.monotonic()))
            samples = Samples()
            lagger = asyncio.create_task(sample_loop_lag(samples))
            try:
                logs = await asyncio.gather(*(stream(i, count, http, url, frames, config, run_start)
                                              for i in indices))
            finally:
                await stop_helpers([lagger])
    finally:
        await stop_helpers([watchdog])
    return ClientResult(list(logs), samples.loop_lag_s, run_start)


async def cancel_when_parent_dies(task: asyncio.Task, every_s: float = 1.0) -> None:
    """A client whose parent died (killed, no clean-up) stops too instead of streaming on unseen."""
    parent = multiprocessing.parent_process()
    while parent is None or parent.is_alive():
        await asyncio.sleep(every_s)
    task.cancel()


async def scrape(http: httpx.AsyncClient) -> MetricsSnapshot | None:
    try:
        return MetricsSnapshot.parse((await http.get("/metrics", timeout=10)).text)
    except (httpx.HTTPError, ValueError):
        return None


# ---- statistics ---------------------------------------------------------------------------------------------------------
def distribution(values: list[float]) -> dict:
    """count, mean, p50/p90/p99 (linear between order statistics), max; None for each number when empty."""
    ordered = sorted(v for v in values if math.isfinite(v))
    if not ordered:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {"count": len(ordered), "mean": _r(sum(ordered) / len(ordered)), "p50": _r(percentile(ordered, 50)),
            "p90": _r(percentile(ordered, 90)), "p99": _r(percentile(ordered, 99)), "max": _r(ordered[-1])}


def percentile(ordered: list[float], q: float) -> float:
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rise_over_run(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y on x times the x span: how much y grew from the start to the end of the run."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
    return _r(slope * (max(xs) - min(xs)))


def _r(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)  # JSON has no NaN


# ---- the run's summary -----------------------------------------------------------------------------------------------------
@dataclass
class Timings:
    """Every latency sample of a run, pooled over its streams."""

    decision_server: list[float] = field(default_factory=list)
    decision_client: list[float] = field(default_factory=list)
    decision_trend: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, server latency)
    slowest: list[dict] = field(default_factory=list)  # the slowest decisions (server side), slowest first
    ttft: list[float] = field(default_factory=list)  # decision taken (estimated, see add_response) -> first text
    ttft_after_event: list[float] = field(default_factory=list)  # decision event received -> first text
    answer_latency: list[float] = field(default_factory=list)  # closing frame sent -> first answer text
    itl: list[float] = field(default_factory=list)
    chunk_gaps: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    tokens: int = 0
    triggers: int = 0
    answered: int = 0


def collect_timings(logs: list[StreamLog], run_start: float) -> Timings:
    timings = Timings()
    every_decision = []
    for log in logs:
        if log.events is None:
            continue
        triggers = {}
        for decision in log.events.decisions:
            timings.decision_server.append(decision.latency_s)
            timings.decision_trend.append((decision.received_at - run_start, decision.latency_s))
            closed = log.closing_sent_at(decision.clip)
            if closed is not None:
                timings.decision_client.append(decision.received_at - closed)
            every_decision.append({"at_s": _r(decision.received_at - run_start), "stream": log.index,
                                   "clip": decision.clip, "respond": decision.respond, "server_s": _r(decision.latency_s),
                                   "client_s": _r(decision.received_at - closed) if closed is not None else None})
            if decision.respond:
                triggers[decision.clip] = decision
        timings.triggers += len(triggers)
        for response in log.events.responses.values():
            add_response(timings, response, triggers.get(response.clip), log.closing_sent_at(response.clip))
    timings.slowest = sorted(every_decision, key=lambda d: d["server_s"] or 0.0, reverse=True)[:SLOWEST_DECISIONS]
    return timings


def add_response(timings: Timings, response, trigger, closed_at: float | None) -> None:
    """The trigger's instant is estimated as closing frame sent + the server's decision latency: a decision
    event can reach the client late (a busy server loop sends it together with the first chunk), which would
    make "decision event received -> first chunk" read near zero."""
    if response.first_at is None:
        return
    timings.answered += 1
    if trigger is not None:
        timings.ttft_after_event.append(response.first_at - trigger.received_at)
        decided_at = closed_at + trigger.latency_s if closed_at is not None else trigger.received_at
        timings.ttft.append(response.first_at - min(decided_at, trigger.received_at))
    if closed_at is not None:
        timings.answer_latency.append(response.first_at - closed_at)
    chunks = response.chunk_at
    timings.chunk_gaps.extend(b - a for a, b in zip(chunks, chunks[1:]))
    tokens = response.completion_tokens or 0
    timings.tokens += tokens
    if tokens >= 2 and len(chunks) >= 2 and chunks[-1] > chunks[0]:
        timings.itl.append((chunks[-1] - chunks[0]) / (tokens - 1))
        timings.tokens_per_s.append((tokens - 1) / (chunks[-1] - chunks[0]))


def summarize_run(streams: int, logs: list[StreamLog], samples: Samples, before: MetricsSnapshot | None,
                  after: MetricsSnapshot | None, run_start: float, wall: float, config: LoadConfig) -> dict:
    timings = collect_timings(logs, run_start)
    lags = [lag for log in logs for _, lag in log.push_lag]
    error_codes: dict[str, int] = {}
    for log in logs:
        for error in (log.events.errors if log.events else []):
            error_codes[str(error.get("code"))] = error_codes.get(str(error.get("code")), 0) + 1
    summary = {
        "streams": streams,
        "started_unix": round(time.time() - (time.monotonic() - run_start), 3),  # lines up with server-side logs
        "wall_s": _r(wall),
        "frames": {
            "sent": sum(log.frames_sent for log in logs),
            "late": sum(log.frames_late for log in logs),
            "dropped": sum(log.frames_dropped for log in logs),
            "push_lag_s": distribution(lags),
            "push_lag_growth_s": rise_over_run([p for log in logs for p in log.push_lag]),
            "push_rtt_s": distribution([r for log in logs for r in log.push_rtt_s]),
            # A push's round trip split: its time in the server's handler, and the rest (the network stack, the
            # server's event loop before and after the handler, the client's own loop).
            "push_in_server_s": distribution([s for log in logs for s in log.push_server_s]),
            "push_outside_server_s": distribution([r - s for log in logs
                                                   for r, s in zip(log.push_rtt_s, log.push_server_s)]),
            # The client's side of every push: before its request went out (the pool, connecting), and from its
            # body sent to the response's headers (the network stack and the server, handler included).
            "push_before_sending_s": distribution([before for log in logs for before, _ in log.push_waits]),
            "push_awaiting_response_s": distribution([awaiting for log in logs for _, awaiting in log.push_waits]),
            "slow_pushes": slow_push_report(logs),
        },
        "decisions": {
            "count": len(timings.decision_server),
            "respond": timings.triggers,
            "expected": streams * config.expected_clips,
            "latency_server_s": distribution(timings.decision_server),
            "latency_client_s": distribution(timings.decision_client),
            "latency_growth_s": rise_over_run(timings.decision_trend),
            "slowest": timings.slowest,  # when in the run (at_s, decision received), which stream and clip
        },
        "responses": {
            "triggers": timings.triggers,
            "answered": timings.answered,
            "silent_or_lost": timings.triggers - timings.answered,
            "ttft_s": distribution(timings.ttft),
            "ttft_after_decision_event_s": distribution(timings.ttft_after_event),
            "answer_latency_s": distribution(timings.answer_latency),
            "itl_s": distribution(timings.itl),
            "chunk_gap_s": distribution(timings.chunk_gaps),
            "tokens_per_s_per_answer": distribution(timings.tokens_per_s),
            "tokens_total": timings.tokens,
            "tokens_per_s_total": _r(timings.tokens / wall) if wall > 0 else None,
        },
        "errors": {"events": error_codes, "failed_streams": [
            {"stream": log.index, "session": log.session_id, "failure": log.failure} for log in logs if log.failure]},
        "server_backlog": {
            "pending_clips": distribution([v for _, v in samples.pending_clips]),
            "pending_clips_growth": rise_over_run(samples.pending_clips),
            "reaction_queue_depth": distribution([v for _, v in samples.reaction_queue]),
            "reactions_running": distribution(samples.running_reactions),
        },
        "server_metrics": server_metrics_delta(before, after),
        "gpu_memory": gpu_memory_summary(samples),
        "client_loop_lag_s": distribution(samples.loop_lag_s),
    }
    summary["realtime"] = judge_realtime(summary, logs, config)
    return summary


def server_metrics_delta(before: MetricsSnapshot | None, after: MetricsSnapshot | None) -> dict | None:
    """The server's own histograms over this run (bucket estimates) and its reaction outcomes."""
    if after is None:
        return None
    result = {}
    for key, name in (("decision_latency_s", DECISION_LATENCY), ("perception_latency_s", PERCEPTION_LATENCY),
                      ("ttft_s", TIME_TO_FIRST_TOKEN), ("reaction_queue_wait_s", QUEUE_WAIT)):
        histogram = after.histogram(name)
        result[key] = histogram.minus(before.histogram(name) if before else None).summary() if histogram else None
    outcomes = {}
    for name, labels, value in after.samples:
        if name == "dispider_reactions_total":
            earlier = before.value(name, **labels) if before else None
            outcomes[labels.get("outcome", "?")] = int(value - (earlier or 0))
    result["reactions"] = outcomes
    result["sidecar_steps"] = sidecar_steps_delta(before, after)
    result["gc_pauses_s"] = gc_pauses_delta(before, after)
    result["server_loop_lag_s"] = server_loop_lag_delta(before, after)
    result["frame_push_s"] = frame_push_delta(before, after)
    result["decision_gate"] = decision_gate_delta(before, after)
    return result


def frame_push_delta(before: MetricsSnapshot | None, after: MetricsSnapshot) -> dict | None:
    """Pushed image frames in the server over this run, by phase (read, decode, handled): bucket estimates."""
    phases = {}
    for phase in ("read", "decode", "handled"):
        histogram = labeled_histogram(after, FRAME_PUSH, phase=phase)
        if histogram is not None:
            run = histogram.minus(labeled_histogram(before, FRAME_PUSH, phase=phase) if before else None)
            phases[phase] = {**run.summary(), "longest_at_most_s": longest_bound(run)}
    return phases or None


def server_loop_lag_delta(before: MetricsSnapshot | None, after: MetricsSnapshot) -> dict | None:
    """How late the server's event loop ran its 50-ms timer over this run, and its stalls over 0.5 s (each one is
    in the server's log with the loop's stack)."""
    lag = after.histogram(SERVER_LOOP_LAG)
    if lag is None:
        return None
    run = lag.minus(before.histogram(SERVER_LOOP_LAG) if before else None)
    stalls = (after.value(SERVER_LOOP_STALLS) or 0) - ((before.value(SERVER_LOOP_STALLS) or 0) if before else 0)
    return {**run.summary(), "longest_at_most_s": longest_bound(run), "stalls_over_0.5_s": int(stalls)}


def gc_pauses_delta(before: MetricsSnapshot | None, after: MetricsSnapshot) -> dict:
    """Python's garbage collections in the server and the sidecar over this run, by generation (bucket estimates;
    ``total_s`` is exact): a collection stops its whole process, so long ones show up in the latency tail."""
    result: dict[str, dict] = {}
    for process in ("server", "sidecar"):
        for generation in ("0", "1", "2"):
            histogram = labeled_histogram(after, GC_PAUSES, process=process, generation=generation)
            if histogram is None:
                continue
            earlier = labeled_histogram(before, GC_PAUSES, process=process, generation=generation) if before else None
            pauses = histogram.minus(earlier)
            result.setdefault(process, {})[generation] = {**pauses.summary(), "total_s": _r(pauses.total),
                                                          "longest_at_most_s": longest_bound(pauses)}
    return result


def sidecar_steps_delta(before: MetricsSnapshot | None, after: MetricsSnapshot) -> dict:
    """The sidecar's batched steps over this run (bucket estimates): clips per batch, the wall time of each step
    phase, each clip's wait from its last frame to its batch, frames' transit to it and its intake's decoding.
    The sidecar reports them once a second, so the last second of a run may be missing."""
    def delta(name: str, **labels: str) -> dict | None:
        histogram = labeled_histogram(after, name, **labels)
        earlier = labeled_histogram(before, name, **labels) if before else None
        return histogram.minus(earlier).summary() if histogram else None

    return {
        "batch_clips": delta(SIDECAR_BATCH_CLIPS),
        "step_s": {phase: delta(SIDECAR_STEP_SECONDS, phase=phase) for phase in SIDECAR_STEP_PHASES},
        "queue_wait_s": delta(SIDECAR_QUEUE_WAIT),
        "transit_s": delta(SIDECAR_TRANSIT),
        "frame_decode_batch_s": delta(SIDECAR_FRAME_DECODE),
    }


def longest_bound(histogram: Histogram) -> float | None:
    """The upper bound of the highest bucket with an observation (None: none, or only above the last bound)."""
    below, highest = 0.0, None
    for upper, cumulative in histogram.buckets:
        if cumulative > below:
            highest = None if math.isinf(upper) else upper
        below = cumulative
    return highest


def labeled_histogram(snapshot: MetricsSnapshot, name: str, **labels: str) -> Histogram | None:
    """``snapshot.histogram(name)`` over only the series with these labels (that one sums every series)."""
    return MetricsSnapshot(tuple(sample for sample in snapshot.samples
                                 if all(sample[1].get(k) == v for k, v in labels.items()))).histogram(name)


def gpu_memory_summary(samples: Samples) -> dict | None:
    if not samples.gpu_used_mib:
        return None
    per_gpu = list(zip(*samples.gpu_used_mib))
    return {"source": samples.gpu_source, "max_used_mib": [max(g) for g in per_gpu],
            "total_mib": samples.gpu_total_mib}


def judge_realtime(summary: dict, logs: list[StreamLog], config: LoadConfig) -> dict:
    """Real-time or not, with every reason it is not."""
    reasons, notes = [], []
    frames, decisions, responses = summary["frames"], summary["decisions"], summary["responses"]
    if frames["dropped"]:
        reasons.append(f"{frames['dropped']} frames dropped (pushed over {config.drop_after_s:g} s late)")
    for label, growth in (("push lag", frames["push_lag_growth_s"]), ("decision latency", decisions["latency_growth_s"])):
        if growth is not None and growth > config.growth_tolerance_s:
            reasons.append(f"{label} grew by {growth:.2f} s over the run (backlog)")
    p99_decision = decisions["latency_client_s"]["p99"]
    if p99_decision is None:
        reasons.append("no decisions")
    elif p99_decision > config.max_p99_decision_s:
        reasons.append(f"p99 decision latency {p99_decision:.2f} s > {config.max_p99_decision_s:g} s")
    p99_ttft = responses["ttft_s"]["p99"]
    if p99_ttft is not None and p99_ttft > config.max_p99_ttft_s:
        reasons.append(f"p99 time to first token {p99_ttft:.2f} s > {config.max_p99_ttft_s:g} s")
    if p99_ttft is None:
        notes.append("no answers to time (start the server with --respond-every N for forced answers)")
    # The percentiles time only the answers that came: one that never did must not pass for a fast one.
    if responses["silent_or_lost"]:
        reasons.append(f"{responses['silent_or_lost']} of {responses['triggers']} answers never came")
    if decisions["count"] < decisions["expected"]:
        reasons.append(f"{decisions['expected'] - decisions['count']} clips were never decided")
    if summary["errors"]["events"] or summary["errors"]["failed_streams"]:
        reasons.append("errors (see errors)")
    loop_p99 = summary["client_loop_lag_s"]["p99"]
    if loop_p99 is not None and loop_p99 > LOOP_LAG_LIMIT_S:
        notes.append(f"the load generator's own event loop lagged (p99 {loop_p99:.2f} s): results may understate "
                     "the server; run fewer streams per client process (--client-procs)")
    return {"ok": not reasons, "reasons": reasons, "notes": notes}


# ---- frames -------------------------------------------------------------------------------------------------------------------
def prepare_frames(video: Path | None, frame_size: tuple[int, int], fps: float, quality: int) -> tuple[list[EncodedFrame], str]:
    """JPEG frames at ``fps`` from ``video`` (default: a generated 64-s video with 4 scenes), encoded once."""
    if video is None:
        from dispider_vllm.checkpoint.cache import dispider_home
        from dispider_vllm.video.synth import make_test_video

        width, height = frame_size
        video = dispider_home() / "bench" / f"scenes-64s-{width}x{height}.mp4"
        if not video.is_file():
            video.parent.mkdir(parents=True, exist_ok=True)
            partial = video.with_suffix(".partial.mp4")
            make_test_video(partial, seconds=64, fps=4, scenes=4, size=frame_size)
            partial.rename(video)
    frames = [EncodedFrame(f.timestamp, encode_jpeg(f.pixels, quality)) for f in thin(video_file_frames(video), fps)]
    if not frames:
        raise StreamClientError(f"{video} has no frames")
    return frames, str(video)


# ---- the command line -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/load_streams.py",
        description="N concurrent live streams at real-time pace against dispider-serve: decision latency, time "
                    "to first token, inter-token latency, tokens/s, frames late or dropped, backlog, GPU memory; "
                    "--sweep finds the largest N that stays real-time. Server arguments go after `--`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running dispider-serve, e.g. http://127.0.0.1:8000")
    where.add_argument("--start-server", action="store_true",
                       help="start dispider-serve on loopback with the arguments after `--`, stop it at the end")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--streams", type=int, default=4, metavar="N", help="concurrent streams (default 4)")
    count.add_argument("--sweep", type=int, nargs="+", metavar="N", help="run each N (ascending) until one is not "
                                                                         "real-time; report the largest that was")
    parser.add_argument("--idle-factor", type=float, default=1.5, metavar="X",
                        help="with --sweep including N=1 (the idle server): report the largest N whose decision "
                             "latency stays within X times the idle run's (default 1.5)")
    parser.add_argument("--sweep-all", action="store_true", help="with --sweep: run every N even after a failure")
    parser.add_argument("--duration", type=float, default=120.0, metavar="S", help="video seconds per stream "
                                                                                     "(default 120)")
    parser.add_argument("--api-key", default=os.environ.get("DISPIDER_API_KEY"),
                        help="API key for a server run with --tenants (default $DISPIDER_API_KEY)")
    parser.add_argument("--blocking-reaction", action="store_true",
                        help="open every session with \"blocking_reaction\": true (the blocking baseline: a "
                             "session's input waits from a trigger until its answer ends) on any server")
    parser.add_argument("--respond-every", type=int, metavar="N",
                        help="with --start-server: the server forces an answer every N clips (random weights "
                             "decide at random); with --url: only recorded, it must match the server's")
    add_stream_options(parser)
    parser.add_argument("--fps", type=float, default=1.0, help="frames pushed per second of video (default 1)")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help="video seconds per wall second (default 1; more is for smoke tests, not measurements)")
    parser.add_argument("--stagger", type=float, default=float(CLIP_SECONDS), metavar="S",
                        help=f"spread stream starts evenly over S seconds (default {CLIP_SECONDS}: one clip; 0: all "
                             "clips close at once, the worst case)")
    parser.add_argument("--growth-tolerance", type=float, default=0.5, metavar="S",
                        help="largest rise of push lag or decision latency over a run that is not a backlog "
                             "(default 0.5 s)")
    parser.add_argument("--max-p99-decision", type=float, default=MAX_P99_DECISION_S, metavar="S",
                        help=f"real-time needs p99 decision latency <= S (default {MAX_P99_DECISION_S:g})")
    parser.add_argument("--max-p99-ttft", type=float, default=MAX_P99_TTFT_S, metavar="S",
                        help=f"real-time needs p99 time to first token <= S (default {MAX_P99_TTFT_S:g})")
    parser.add_argument("--server-start-timeout", type=float, default=900.0, metavar="S")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="run one short stream before measuring (default on)")
    parser.add_argument("--client-procs", type=client_procs_arg, default="auto", metavar="K",
                        help=f"spread each run's streams over K client processes (default auto: 1 up to "
                             f"{STREAMS_PER_CLIENT_PROC} streams, else one per {STREAMS_PER_CLIENT_PROC}, at most "
                             "half the cores)")
    parser.add_argument("--keepalive-expiry", type=float, default=KEEPALIVE_EXPIRY_S, metavar="S",
                        help=f"close a client connection idle for S s (default {KEEPALIVE_EXPIRY_S:g}; under the "
                             "server's --keep-alive, so the client closes first; 2 was the default before the "
                             "tenth session)")
    parser.add_argument("--client-pool", choices=CLIENT_POOLS, default="per-stream",
                        help="per-stream (default): each stream has an HTTP client of its own, one connection for "
                             "its events and one for its pushes, as separate cameras would; shared: the streams of "
                             "a client process share one connection pool (the only mode before the thirteenth "
                             "session)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    return parser


def add_stream_options(parser: argparse.ArgumentParser) -> None:
    """What each live stream sends and how long it waits: shared with tenancy_bench.py."""
    parser.add_argument("--max-tokens", type=int, default=32, metavar="N", help="tokens per answer (default 32)")
    parser.add_argument("--video", type=Path, help="stream this video (looped) instead of the generated one")
    parser.add_argument("--frame-size", default="640x360", metavar="WxH",
                        help="size of the generated video's frames (default 640x360; the H200 runs use 320x240)")
    parser.add_argument("--drop-after", type=float, default=2.0, metavar="S",
                        help="drop a frame the client could not push within S s of its time (default 2)")
    parser.add_argument("--drain-timeout", type=float, default=120.0, metavar="S",
                        help="after its last frame, wait at most S s for a stream's last answers (default 120)")


def server_log_path() -> Path:
    from dispider_vllm.checkpoint.cache import dispider_home

    return dispider_home() / "bench" / f"server-{time.strftime('%Y%m%d-%H%M%S')}.log"


def split_server_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, server_args: list[str]) -> list[int]:
    counts = sorted(set(args.sweep)) if args.sweep else [args.streams]
    if min(counts) < 1:
        parser.error("stream counts must be >= 1")
    for flag, value in (("--duration", args.duration), ("--fps", args.fps), ("--speed", args.speed),
                        ("--drop-after", args.drop_after), ("--drain-timeout", args.drain_timeout),
                        ("--idle-factor", args.idle_factor), ("--keepalive-expiry", args.keepalive_expiry)):
        if not value > 0:
            parser.error(f"{flag} must be > 0")
    if args.stagger < 0:
        parser.error("--stagger must be >= 0")
    if server_args and not args.start_server:
        parser.error("arguments after `--` are for --start-server")
    if args.video is not None and not args.video.is_file():
        parser.error(f"no such video file: {args.video}")
    parse_frame_size(parser, args.frame_size)
    return counts


def parse_frame_size(parser: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    """``--frame-size WxH`` -> (W, H); even sides of at least 16 (the video encoder's needs), else a usage error."""
    try:
        width, height = (int(x) for x in text.lower().split("x"))
        if width < 16 or height < 16 or width % 2 or height % 2:
            raise ValueError
    except ValueError:
        parser.error("--frame-size is WIDTHxHEIGHT, even, at least 16x16 (e.g. 640x360)")
    return width, height


def server_command_args(args: argparse.Namespace, server_args: list[str], most_streams: int) -> list[str]:
    extra = list(server_args)
    if args.respond_every is not None and option_value(extra, "--respond-every") is None:
        extra += ["--respond-every", str(args.respond_every)]
    if option_value(extra, "--max-sessions") is None:
        extra += ["--max-sessions", str(max(64, most_streams + 8))]
    return extra


def raise_open_files_limit(streams: int) -> None:
    """Two connections per stream: lift the soft limit on open files toward the hard one if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * streams + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard), hard))


def device_label() -> str:
    """The GPU the server ran on (same machine), else the CPU."""
    gpus = environment()["gpus"]
    if gpus:
        return gpus[0].split(",")[0].strip()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def environment() -> dict:
    gpus = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            gpus = [line.strip() for line in out.strip().splitlines()]
        except (OSError, subprocess.SubprocessError):
            gpus = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "gpus": gpus}


def print_run(run: dict) -> None:
    d, r, f = run["decisions"], run["responses"], run["frames"]
    verdict = "REAL-TIME" if run["realtime"]["ok"] else "not real-time: " + "; ".join(run["realtime"]["reasons"])
    print(f"N={run['streams']:<4} client procs {run.get('client_procs', 1)}, "
          f"decision p50/p99 {_ms(d['latency_client_s'])} (server {_ms(d['latency_server_s'])}), "
          f"TTFT {_ms(r['ttft_s'])}, ITL p50 {_fmt(r['itl_s']['p50'])}, {r['answered']}/{r['triggers']} answered, "
          f"frames late {f['late']} dropped {f['dropped']}  -> {verdict}", flush=True)
    for note in run["realtime"]["notes"]:
        print(f"       note: {note}", flush=True)


def _ms(dist: dict) -> str:
    return f"{_fmt(dist['p50'])}/{_fmt(dist['p99'])}"


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}s"


async def warm_up(url: str, frames: list[EncodedFrame], config: LoadConfig) -> None:
    """One stream of three clips at 16x: the server's first batches and answers are slow, and not what we measure."""
    print("warming up the server (one short stream) ...", flush=True)
    quick = LoadConfig(duration_s=3 * CLIP_SECONDS, fps=config.fps, speed=16.0, stagger_s=0.0,
                       max_tokens=config.max_tokens, drop_after_s=1e9, drain_timeout_s=config.drain_timeout_s,
                       api_key=config.api_key)
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=auth_headers(config.api_key)) as http:
        log = await run_stream(0, 1, http, url, frames, quick, time.monotonic())
    if log.failure:
        raise StreamClientError(f"the warm-up stream failed: {log.failure}")


async def run_counts(url: str, counts: list[int], frames: list[EncodedFrame], config: LoadConfig,
                     stop_at_failure: bool, warmup: bool, client_procs: int | str = 1,
                     after_each: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One run per stream count; ``after_each(runs so far)`` after each (a long sweep cut short keeps them)."""
    if warmup:
        await warm_up(url, frames, config)
    runs = []
    for streams in counts:
        procs = resolve_client_procs(client_procs, streams)
        print(f"running {streams} streams for {config.duration_s:g} s of video each"
              + (f" from {procs} client processes" if procs > 1 else "") + " ...", flush=True)
        run = await run_load(url, streams, frames, config, client_procs=procs)
        print_run(run)
        runs.append(run)
        if after_each is not None:
            after_each(runs)
        if stop_at_failure and not run["realtime"]["ok"]:
            break
    return runs


def check_reachable(url: str) -> dict:
    """The server's /health body (placement, the sidecar's features), or a StreamClientError."""
    try:
        health = httpx.get(url + "/health", timeout=10)
    except httpx.HTTPError as error:
        raise StreamClientError(f"cannot reach the server at {url}: {error}") from None
    if health.status_code != 200:
        raise StreamClientError(f"the server at {url} is not healthy: {health.status_code} {health.text[:200]}")
    return health.json()


def main(argv: list[str] | None = None) -> None:
    own, server_args = split_server_args(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)
    counts = check_args(parser, args, server_args)
    config = LoadConfig(duration_s=args.duration, fps=args.fps, speed=args.speed, stagger_s=args.stagger,
                        max_tokens=args.max_tokens, drop_after_s=args.drop_after, drain_timeout_s=args.drain_timeout,
                        growth_tolerance_s=args.growth_tolerance, max_p99_decision_s=args.max_p99_decision,
                        max_p99_ttft_s=args.max_p99_ttft, api_key=args.api_key,
                        blocking_reaction=args.blocking_reaction, keepalive_expiry_s=args.keepalive_expiry,
                        client_pool=args.client_pool)
    raise_open_files_limit(max(counts))
    started = time.time()
    server = None
    try:
        frames, video = prepare_frames(args.video, tuple(int(x) for x in args.frame_size.lower().split("x")),
                                       args.fps, config.jpeg_quality)
        if args.start_server:
            server = LocalServer(server_command_args(args, server_args, max(counts)), server_log_path())
            print(f"starting {' '.join(server.command[1:])} (log {server.log_path}) ...", flush=True)
            server.start()
            print(f"server ready in {server.wait_healthy(args.server_start_timeout):.0f} s at {server.url}", flush=True)
        url = server.url if server else args.url.rstrip("/")
        health = check_reachable(url)

        def save_so_far(runs: list[dict]) -> None:
            if args.out and len(runs) < len(counts):
                write_report(args.out, make_report(args, config, counts, video, frames, url, server, health, started, runs,
                                                   complete=False), quiet=True)

        runs = asyncio.run(run_counts(url, counts, frames, config, stop_at_failure=bool(args.sweep) and not args.sweep_all,
                                      warmup=args.warmup, client_procs=args.client_procs, after_each=save_so_far))
    except (StreamClientError, ServerStartError) as error:
        sys.exit(f"load_streams: {error}")
    except KeyboardInterrupt:
        sys.exit("load_streams: interrupted")
    finally:
        if server is not None:
            server.stop()
    report = make_report(args, config, counts, video, frames, url, server, health, started, runs, complete=True)
    if args.sweep:
        print(f"largest real-time N: {report['sweep']['max_realtime_streams']}", flush=True)
        if (against_idle := report["sweep"]["latency_vs_idle"]) is not None:
            print(f"largest real-time N with decision latency within {args.idle_factor:g}x of the idle run's: "
                  f"p50 {against_idle['largest_streams_within_factor_p50']}, p50 and p99 "
                  f"{against_idle['largest_streams_within_factor_p50_p99']}", flush=True)
    if args.out:
        write_report(args.out, report)


def write_report(path: Path, report: dict, quiet: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    if not quiet:
        print(f"wrote {path}", flush=True)


def make_report(args: argparse.Namespace, config: LoadConfig, counts: list[int], video: str,
                frames: list[EncodedFrame], url: str, server: LocalServer | None, health: dict, started: float,
                runs: list[dict], complete: bool) -> dict:
    """The JSON report; ``complete`` is False while a sweep is still running (written after each run)."""
    report = {
        "benchmark": "load_streams",
        "version": REPORT_VERSION,
        "device": device_label(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "config": {**{k: v for k, v in asdict(config).items() if k != "api_key"}, "video": video, "frames_in_loop": len(frames),
                   "respond_every": args.respond_every, "blocking_reaction": args.blocking_reaction, "stream_counts": counts, "warmup": args.warmup,
                   "client_procs": args.client_procs,
                   "client_procs_by_streams": {str(n): resolve_client_procs(args.client_procs, n) for n in counts}},
        "server": {"url": url, "started_by_benchmark": server is not None,
                   "args": server.command[3:] if server else None, "health": health},
        "environment": environment(),
        "complete": complete,
        "runs": runs,
    }
    if args.sweep:
        passing = [run["streams"] for run in runs if run["realtime"]["ok"]]
        first_fail = next((run["streams"] for run in runs if not run["realtime"]["ok"]), None)
        report["sweep"] = {
            "max_realtime_streams": max((n for n in passing if first_fail is None or n < first_fail), default=None),
            "first_not_realtime": first_fail,
            "criteria": {"max_p99_decision_s": config.max_p99_decision_s, "max_p99_ttft_s": config.max_p99_ttft_s,
                         "growth_tolerance_s": config.growth_tolerance_s, "frames_dropped": 0},
            "latency_vs_idle": latency_against_idle(runs, args.idle_factor),
        }
    return report


def latency_against_idle(runs: list[dict], factor: float) -> dict | None:
    """Each run's decision latency (the server's) over the idle server's, i.e. the sweep's one-stream run, and the
    largest real-time N whose p50 (and, apart, whose p50 and p99) stay within ``factor`` of it. None without a
    one-stream run. The idle run has one decision per clip of its one stream: its p99 is about its slowest."""
    idle = next((run for run in runs if run["streams"] == 1), None)
    base = idle["decisions"]["latency_server_s"] if idle else {}
    if not base.get("p50") or not base.get("p99"):
        return None
    rows = []
    for run in runs:
        latency = run["decisions"]["latency_server_s"]
        rows.append({"streams": run["streams"], "realtime": run["realtime"]["ok"],
                     "p50_s": latency["p50"], "p99_s": latency["p99"],
                     "p50_over_idle": _r(latency["p50"] / base["p50"]) if latency["p50"] is not None else None,
                     "p99_over_idle": _r(latency["p99"] / base["p99"]) if latency["p99"] is not None else None})

    def largest(keys: tuple[str, ...]) -> int | None:
        within = [row["streams"] for row in rows
                  if row["realtime"] and all(row[key] is not None and row[key] <= factor for key in keys)]
        return max(within, default=None)

    return {"idle_decisions": idle["decisions"]["count"], "idle_p50_s": base["p50"], "idle_p99_s": base["p99"],
            "factor": factor, "runs": rows, "largest_streams_within_factor_p50": largest(("p50_over_idle",)),
            "largest_streams_within_factor_p50_p99": largest(("p50_over_idle", "p99_over_idle"))}


if __name__ == "__main__":
    main()
