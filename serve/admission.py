"""Admission control: how many streams the server runs at once without any of them falling behind real time.

Every live session and every chat completion is one stream. When the server runs its capacity, a new one is
refused with 503 (``type: server_overloaded``, ``code: server_at_capacity``) and ``Retry-After``; the streams
already running are never touched. The capacity is the smallest of

- ``--max-sessions N`` (a hard cap, default 64),
- ``--capacity-streams N`` (the operator's own figure), or else the figure of a cost file
  (``--capacity-file FILE``, JSON or TOML), calibrated by the benchmarks.

The cost model of a stream: at 1-fps sampling a stream closes one clip every ``clip_seconds`` (16 s), and a
fraction ``triggers_per_clip`` of its clips asks for an answer of about ``tokens_per_answer`` tokens. So one
stream asks the sidecar for ``1 / clip_seconds`` clips/s and the reaction engine for
``triggers_per_clip * tokens_per_answer / clip_seconds`` tokens/s, and::

    capacity = floor(headroom * min(sidecar_clips_per_s * clip_seconds,
                                    reaction_tokens_per_s * clip_seconds / (triggers_per_clip * tokens_per_answer)))

The cost file, e.g. for an H200::

    {"sidecar_clips_per_s": 48.0,       # benchmarks/sidecar_bench.py: report["ours"]["clips_per_s"]
     "reaction_tokens_per_s": 6000.0,   # benchmarks/reaction_bench.py: B * 1000 / decode_ms_per_step_batchB
     "triggers_per_clip": 0.25,         # how often streams answer (1/N with --respond-every N); default 0.25
     "tokens_per_answer": 64,           # answer length incl. the prefill's share of engine time; default 64
     "clip_seconds": 16,                # frames_per_clip / sample_fps; default 16
     "headroom": 0.8}                   # keep this share of the measured throughput; default 0.8

(JSON has no comments: leave them out.) A chat completion that plays its video faster than real time counts as
one stream too: the sidecar's fair batching spreads its burst over the other streams' turns.

``--capacity-file`` also takes a sweep measured on the same GPU and configuration (a ``benchmarks/load_streams.py
--sweep`` report, e.g. ``benchmarks/results/streams_h200.json``). ``--capacity-bound realtime`` (the default) admits
its largest real-time N; ``--capacity-bound latency`` its largest real-time N whose median decision latency stayed
within the sweep's ``--idle-factor`` (1.5) of its idle run's (``sweep.latency_vs_idle``): fewer streams, each
decided about as fast as on an idle server. A sweep's N are the ones it ran: the capacity is at most that precise.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from serve.errors import overloaded

ADMISSION_RETRY_AFTER_S = 10.0  # streams last minutes; a short wait before asking again is enough


@dataclass(frozen=True)
class StreamCosts:
    sidecar_clips_per_s: float
    reaction_tokens_per_s: float
    triggers_per_clip: float = 0.25
    tokens_per_answer: float = 64.0
    clip_seconds: float = 16.0
    headroom: float = 0.8

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"cost file: '{field.name}' must be a number > 0")
        if self.headroom > 1:
            raise ValueError("cost file: 'headroom' is a share of the measured throughput, at most 1")

    def sidecar_streams(self) -> float:
        return self.sidecar_clips_per_s * self.clip_seconds

    def reaction_streams(self) -> float:
        tokens_per_stream_per_s = self.triggers_per_clip * self.tokens_per_answer / self.clip_seconds
        return self.reaction_tokens_per_s / tokens_per_stream_per_s

    def capacity_streams(self) -> int:
        return max(1, math.floor(self.headroom * min(self.sidecar_streams(), self.reaction_streams())))


CAPACITY_BOUNDS = ("realtime", "latency")


def read_document(path: Path) -> object:
    try:
        text = path.read_text()
        return tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: {error}") from None


def is_sweep(document: object) -> bool:
    return isinstance(document, dict) and document.get("benchmark") == "load_streams"


def sweep_capacity(sweep_report: dict, bound: str, path: Path) -> int:
    """The largest real-time N of a load_streams sweep, or of those within its latency factor of the idle run."""
    sweep = sweep_report.get("sweep") or {}
    if bound == "realtime":
        streams, lacking = sweep.get("max_realtime_streams"), "no real-time N (or is not a --sweep report)"
    else:
        against_idle = sweep.get("latency_vs_idle") or {}
        streams = against_idle.get("largest_streams_within_factor_p50")
        lacking = "no real-time N within its latency factor of an idle run (a sweep needs N = 1 for that)"
    if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
        raise ValueError(f"{path}: the sweep has {lacking}")
    return streams


def load_cost_file(path: str | Path) -> StreamCosts:
    path = Path(path)
    document = read_document(path)
    known = {field.name for field in fields(StreamCosts)}
    if not isinstance(document, dict) or set(document) - known:
        raise ValueError(f"{path}: a cost file is an object with the fields {sorted(known)}")
    try:
        return StreamCosts(**document)
    except TypeError as error:  # a required figure is missing
        raise ValueError(f"{path}: {error}") from None


def file_capacity(capacity_file: str | Path, bound: str = "realtime") -> int:
    """The streams a cost file models, or a sweep measured (``bound``: which of its capacities)."""
    path = Path(capacity_file)
    if bound not in CAPACITY_BOUNDS:
        raise ValueError(f"capacity bound must be one of {', '.join(CAPACITY_BOUNDS)}, not {bound!r}")
    document = read_document(path)
    if is_sweep(document):
        return sweep_capacity(document, bound, path)
    if bound != "realtime":
        raise ValueError(f"{path}: --capacity-bound {bound} needs a load_streams sweep (a cost file models no latency)")
    return load_cost_file(path).capacity_streams()


def capacity_streams(max_sessions: int, capacity_streams: int | None, capacity_file: str | None,
                     bound: str = "realtime") -> int:
    """The number of streams the server runs at once (see the module docstring)."""
    if bound != "realtime" and not capacity_file:  # else the option would be taken and silently do nothing
        raise ValueError(f"--capacity-bound {bound} reads a measured sweep: give one with --capacity-file")
    modelled = capacity_streams
    if modelled is None and capacity_file:
        modelled = file_capacity(capacity_file, bound)
    return max_sessions if modelled is None else min(max_sessions, modelled)


@dataclass(frozen=True)
class Admission:
    capacity: int

    def admit(self, running: int) -> None:
        """Raise 503 when one more stream would be over capacity."""
        if running >= self.capacity:
            raise overloaded(
                f"the server runs its capacity of {self.capacity} streams; new streams would make the running ones "
                "fall behind real time. Try again later", ADMISSION_RETRY_AFTER_S)
