"""``dispider-stream``: stream a video file (or a camera) into a live Dispider session at real-time pace, and
print what the model says, each answer with the span of video time that prompted it:

    dispider-stream video.mp4 --question "Tell me when the light turns green."
    dispider-stream video.mp4 --speed 4 --show-decisions --via ws
    dispider-stream --camera 0 --duration 120

Frames are decoded with PyAV, thinned to at most ``--fps`` per second of video, JPEG-encoded and pushed to
``POST /v1/sessions/{id}/frames`` (or the session's WebSocket) when their video time comes; the session's
events (SSE, or the same WebSocket) are read at the same time, so answers print while the video plays.
Answers go to stdout; status lines and errors go to stderr.

The building blocks (``Pacer``, ``sse_events``, ``encode_jpeg``, ``stream_session`` ...) are also used by the
demo (``dispider-demo``) and the load benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import httpx

if TYPE_CHECKING:
    import numpy as np

    from dispider_vllm.types import Frame

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_QUESTION = "Tell me whenever something changes in the video, and describe it."
# The server samples 1 frame per second at the middle of each second; at 2 fps those middles are pushed
# exactly, and more frames would only cost bandwidth.
DEFAULT_MAX_FPS = 2.0
SSE_RECONNECTS = 3  # a dropped event stream is resumed (Last-Event-ID) at most this many times
SSE_READ_TIMEOUT_S = 60.0  # the server sends a keep-alive every 15 s
REQUEST_TIMEOUT_S = 30.0
DELETE_TIMEOUT_S = 5.0

# Exit codes of dispider-stream.
EXIT_OK = 0
EXIT_STREAM_FAILED = 1  # the server refused something, reported errors, or the session ended early
EXIT_BAD_INPUT = 2  # bad arguments, unreadable video, no camera
EXIT_UNREACHABLE = 3  # no server at --url
EXIT_INTERRUPTED = 130  # Ctrl-C


# ---- errors -----------------------------------------------------------------------------------------------------
class StreamClientError(Exception):
    """A failure with a one-line explanation for the user and the exit code that goes with it."""

    exit_code = EXIT_STREAM_FAILED


class SourceError(StreamClientError):
    exit_code = EXIT_BAD_INPUT


class ServerUnreachable(StreamClientError):
    exit_code = EXIT_UNREACHABLE


class ServerRejected(StreamClientError):
    """The server answered with an error (its OpenAI-style ``{"error": {...}}`` body)."""

    def __init__(self, status: int, message: str, code: str | None) -> None:
        super().__init__(f"the server refused ({status} {code or 'error'}): {message}")
        self.status, self.code = status, code


# ---- settings and results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamSettings:
    url: str = DEFAULT_URL
    question: str = DEFAULT_QUESTION
    speed: float = 1.0  # video seconds per wall second; inf pushes as fast as the server takes frames
    max_fps: float = DEFAULT_MAX_FPS
    via: str = "http"  # "http": POST frames + SSE events; "ws": both over the session's WebSocket
    max_tokens: int | None = None  # per answer; None: the server's default
    clip_mode: str = "uniform"
    jpeg_quality: int = 85
    duration_s: float | None = None  # stop after this much video time (a camera never ends by itself)
    end_timeout_s: float = 300.0  # after the last frame: how long to wait for the remaining answers
    api_key: str | None = None  # for a server run with --tenants (sent as Authorization: Bearer KEY)
    blocking_reaction: bool | None = None  # the benchmark baseline: input held while answering; None: server's


@dataclass(frozen=True)
class DecisionSeen:
    clip: int
    start: float
    end: float
    respond: bool
    logit: float
    latency_s: float  # the server's: clip's last frame received -> decision taken
    received_at: float  # time.monotonic() here


@dataclass
class ResponseSeen:
    response: int
    clip: int
    start: float
    end: float
    text: str = ""
    first_at: float | None = None  # time.monotonic() of its first text
    chunk_at: list[float] = field(default_factory=list)  # time.monotonic() of each piece of text
    ended_at: float | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None


@dataclass
class StreamReport:
    session_id: str
    frames_sent: int = 0
    max_lag_s: float = 0.0  # how far behind its video time a frame was pushed, at worst
    decisions: list[DecisionSeen] = field(default_factory=list)
    responses: dict[int, ResponseSeen] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)  # the ``error`` objects of error events
    end: dict | None = None  # the ``end`` event's data: reason, clips, responses, decisions

    @property
    def ended_normally(self) -> bool:
        return self.end is not None and self.end.get("reason") == "end_of_stream"


# ---- frame sources ----------------------------------------------------------------------------------------------
def video_file_frames(path: str | os.PathLike) -> Iterator[Frame]:
    """Decoded frames of a video file; an unreadable file raises :class:`SourceError` before any frame."""
    from dispider_vllm.perception.frames import VideoError, decode_video  # imports torch: only when needed

    if not Path(path).is_file():
        raise SourceError(f"no such video file: {path}")
    try:
        frames = decode_video(path)
    except VideoError as error:
        raise SourceError(f"cannot read {path}: {error}") from None
    return _reraise_video_errors(frames, path, VideoError)


def _reraise_video_errors(frames: Iterator[Frame], path, video_error: type[Exception]) -> Iterator[Frame]:
    try:
        yield from frames
    except video_error as error:  # a file that goes bad midway
        raise SourceError(f"{path} stopped decoding: {error}") from None


def camera_device(index: int) -> str:
    """The V4L2 device of camera ``index``, or :class:`SourceError` saying clearly that there is none."""
    if not sys.platform.startswith("linux"):
        raise SourceError(f"--camera reads V4L2 devices, which exist on Linux only (this is {sys.platform}); "
                          "record a file and stream that instead")
    device = f"/dev/video{index}"
    if not os.path.exists(device):
        found = sorted(str(p) for p in Path("/dev").glob("video*"))
        raise SourceError(f"no camera {device} on this machine"
                          + (f" (found: {', '.join(found)})" if found else " (it has no V4L2 camera at all)"))
    return device


def camera_frames(index: int) -> Iterator[Frame]:
    """Frames from a V4L2 camera through PyAV, timed from the first capture (live: no pacing needed)."""
    import av
    import numpy as np

    from dispider_vllm.types import Frame

    device = camera_device(index)
    try:
        container = av.open(device, format="v4l2")
    except av.FFmpegError as error:
        raise SourceError(f"cannot open camera {device}: {error}") from None
    return _camera_iter(container, Frame, np)


def _camera_iter(container, frame_type, np) -> Iterator[Frame]:
    origin = None
    try:
        for frame in container.decode(video=0):
            now = time.monotonic()
            origin = now if origin is None else origin
            yield frame_type(now - origin, np.ascontiguousarray(frame.to_ndarray(format="rgb24")))
    finally:
        container.close()


def thin(frames: Iterator[Frame], max_fps: float) -> Iterator[Frame]:
    """Keep at most ``max_fps`` frames per second of video time, on a grid from the first frame."""
    if math.isinf(max_fps):
        yield from frames
        return
    interval, next_due = 1.0 / max_fps, None
    for frame in frames:
        if next_due is None or frame.timestamp >= next_due - 1e-6:
            yield frame
            start = frame.timestamp if next_due is None else next_due
            # Skip grid points the source had no frame for, so a gap never causes a burst.
            next_due = start + interval * max(1, math.floor((frame.timestamp - start) / interval) + 1)


def encode_jpeg(pixels: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


# ---- pacing -----------------------------------------------------------------------------------------------------
class Pacer:
    """Holds each frame back until its video time comes: ``(timestamp - first timestamp) / speed`` after start."""

    def __init__(self, speed: float = 1.0) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.speed = speed
        self._origin: tuple[float, float] | None = None  # (wall, video time) of the first frame

    def due(self, timestamp: float) -> float:
        """When (time.monotonic()) the frame at ``timestamp`` should go."""
        if self._origin is None:
            self._origin = (time.monotonic(), timestamp)
        wall, video = self._origin
        return wall + (timestamp - video) / self.speed

    async def wait_for(self, timestamp: float) -> float:
        """Sleep until the frame's time; returns how late it is (seconds, >= 0)."""
        due = self.due(timestamp)
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return max(0.0, time.monotonic() - due)


# ---- the HTTP API -----------------------------------------------------------------------------------------------
def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def raise_for_api_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        message, code = error.get("message") or response.text, error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = response.text.strip()[:300] or response.reason_phrase, None
    raise ServerRejected(response.status_code, message, code)


@contextlib.asynccontextmanager
async def reaching(url: str):
    """Turn transport failures into :class:`ServerUnreachable` with the URL in the message."""
    try:
        yield
    except httpx.ConnectError as error:
        raise ServerUnreachable(f"cannot reach the server at {url} ({error}); is dispider-serve running there?") from None
    except httpx.TimeoutException as error:
        raise ServerUnreachable(f"the server at {url} did not answer in time ({type(error).__name__})") from None


async def open_session(http: httpx.AsyncClient, settings: StreamSettings) -> dict:
    body: dict = {"question": settings.question, "clip_mode": settings.clip_mode}
    if settings.max_tokens is not None:
        body["max_tokens"] = settings.max_tokens
    if settings.blocking_reaction is not None:
        body["blocking_reaction"] = settings.blocking_reaction
    async with reaching(settings.url):
        response = await http.post("/v1/sessions", json=body)
    raise_for_api_error(response)
    return response.json()


async def delete_session(http: httpx.AsyncClient, session_id: str) -> None:
    """Best effort: the session may be gone already (expired, or the server is stopping)."""
    with contextlib.suppress(httpx.HTTPError):
        await http.delete(f"/v1/sessions/{session_id}", timeout=DELETE_TIMEOUT_S)


async def sse_events(http: httpx.AsyncClient, path: str) -> AsyncIterator[tuple[str, dict]]:
    """``(event name, data)`` from a session's SSE stream until ``end``, resuming a dropped connection."""
    last_id: str | None = None
    for attempt in range(SSE_RECONNECTS + 1):
        headers = {"Last-Event-ID": last_id} if last_id is not None else {}
        try:
            async with http.stream("GET", path, headers=headers,
                                   timeout=httpx.Timeout(REQUEST_TIMEOUT_S, read=SSE_READ_TIMEOUT_S)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise_for_api_error(response)
                async for event_id, name, data in _parse_sse(response.aiter_lines()):
                    last_id = event_id if event_id is not None else last_id
                    yield name, data
                    if name == "end":
                        return
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout):
            if attempt == SSE_RECONNECTS:
                raise
            await asyncio.sleep(0.5 * (attempt + 1))
    raise StreamClientError("the event stream closed before its end event")


async def _parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str | None, str, dict]]:
    event_id, name, data = None, "message", []
    async for line in lines:
        if not line:  # a blank line dispatches the event
            if data:
                yield event_id, name, json.loads("\n".join(data))
            event_id, name, data = None, "message", []
        elif line.startswith(":"):
            continue  # a keep-alive comment
        else:
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key == "id":
                event_id = value


def websocket_url(http_url: str, path: str) -> str:
    base = http_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):] + path
    return "ws://" + base.removeprefix("http://") + path


async def ws_events(ws) -> AsyncIterator[tuple[str, dict]]:
    """``(event name, data)`` from a session's WebSocket until ``end`` (or the server closes it)."""
    async for message in ws:
        event = json.loads(message)
        yield event.get("event", "message"), event.get("data") or {}
        if event.get("event") == "end":
            return


class HttpFramePusher:
    def __init__(self, http: httpx.AsyncClient, session_id: str, url: str) -> None:
        self._http, self._path, self._url = http, f"/v1/sessions/{session_id}", url

    async def push(self, timestamp: float, jpeg: bytes) -> None:
        async with reaching(self._url):
            response = await self._http.post(f"{self._path}/frames", params={"timestamp": f"{timestamp:.6f}"},
                                             content=jpeg, headers={"content-type": "image/jpeg"})
        raise_for_api_error(response)

    async def end(self) -> None:
        async with reaching(self._url):
            response = await self._http.post(f"{self._path}/end")
        raise_for_api_error(response)


class WebSocketFramePusher:
    def __init__(self, ws) -> None:
        self._ws = ws

    async def push(self, timestamp: float, jpeg: bytes) -> None:
        await self._ws.send(json.dumps({"type": "frame", "timestamp": timestamp,
                                        "image": base64.b64encode(jpeg).decode()}))

    async def end(self) -> None:
        await self._ws.send(json.dumps({"type": "end"}))


# ---- printing ---------------------------------------------------------------------------------------------------
def video_time(seconds: float) -> str:
    """``75.0`` -> ``01:15``; ``3725`` -> ``1:02:05``."""
    whole = max(0, int(round(seconds)))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def span_label(start: float, end: float) -> str:
    return f"[{video_time(start)}-{video_time(end)}]"


class TimelinePrinter:
    """Prints decisions and answers as they come, each answer streamed on its own ``[mm:ss-mm:ss]`` line."""

    def __init__(self, out: TextIO | None = None, *, show_decisions: bool = False,
                 err: TextIO | None = None) -> None:
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.show_decisions = show_decisions
        self._open: int | None = None  # the answer whose line is being written

    def decision(self, decision: DecisionSeen) -> None:
        if not self.show_decisions:
            return
        self._close_line()
        verdict = "respond" if decision.respond else "silent "
        self._write(f"{span_label(decision.start, decision.end)} decision: {verdict} "
                    f"(model logit {decision.logit:+.2f}; {decision.latency_s:.2f} s after the clip closed)\n")

    def answer_text(self, response: ResponseSeen, text: str) -> None:
        if self._open != response.response:
            self._close_line()
            self._write(f"{span_label(response.start, response.end)} ")
            self._open = response.response
            text = text.lstrip()
        self._write(text.replace("\n", "\n" + " " * 14))  # continuation lines under the text, not the label

    def answer_end(self, response: ResponseSeen) -> None:
        if self._open == response.response:
            self._close_line()

    def error(self, error: dict) -> None:
        self._close_line()
        print(f"error from the server: {error.get('message')} ({error.get('code')})", file=self.err, flush=True)

    def status(self, line: str) -> None:
        self._close_line()
        print(line, file=self.err, flush=True)

    def _close_line(self) -> None:
        if self._open is not None:
            self._write("\n")
            self._open = None

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


# ---- the session ----------------------------------------------------------------------------------------------
class EventRecorder:
    """Turns session events into the report and the printout."""

    def __init__(self, report: StreamReport, printer: TimelinePrinter) -> None:
        self.report, self.printer = report, printer

    def handle(self, name: str, data: dict) -> None:
        now = time.monotonic()
        if name == "decision":
            decision = DecisionSeen(data["clip"], data["start"], data["end"], bool(data["respond"]),
                                    float(data["logit"]), float(data["latency_s"]), now)
            self.report.decisions.append(decision)
            self.printer.decision(decision)
        elif name == "chunk":
            self._chunk(data, now)
        elif name == "response_end":
            response = self._response(data)
            response.ended_at, response.text = now, data.get("text", response.text)
            response.finish_reason = data.get("finish_reason")
            response.completion_tokens = (data.get("usage") or {}).get("completion_tokens")
            self.printer.answer_end(response)
        elif name == "error":
            error = data.get("error", data)
            self.report.errors.append(error)
            self.printer.error(error)
        elif name == "end":
            self.report.end = data

    def _chunk(self, data: dict, now: float) -> None:
        response = self._response(data["dispider"])
        text = "".join((choice.get("delta") or {}).get("content") or "" for choice in data.get("choices", []))
        if response.first_at is None:
            response.first_at = now
        response.chunk_at.append(now)
        response.text += text
        self.printer.answer_text(response, text)

    def _response(self, ext: dict) -> ResponseSeen:
        number = ext["response"]
        if number not in self.report.responses:
            self.report.responses[number] = ResponseSeen(number, ext["clip"], ext["start"], ext["end"])
        return self.report.responses[number]


async def stream_session(settings: StreamSettings, frames: Iterator[Frame],
                         printer: TimelinePrinter | None = None) -> StreamReport:
    """Open a live session, push ``frames`` at their pace while printing its events, end it, wait for the last
    answer, delete it. Cancelled (Ctrl-C), it deletes the session before re-raising."""
    printer = printer or TimelinePrinter()
    limits = httpx.Limits(max_connections=4)
    async with httpx.AsyncClient(base_url=settings.url, timeout=REQUEST_TIMEOUT_S, limits=limits,
                                 headers=auth_headers(settings.api_key)) as http:
        session = await open_session(http, settings)
        report = StreamReport(session["id"])
        recorder = EventRecorder(report, printer)
        try:
            if settings.via == "ws":
                await _run_over_websocket(settings, session, frames, recorder)
            else:
                events = sse_events(http, session["events_url"])
                pusher = HttpFramePusher(http, session["id"], settings.url)
                await _run(settings, frames, pusher, events, recorder)
        finally:
            await asyncio.shield(delete_session(http, session["id"]))
        return report


async def _run_over_websocket(settings: StreamSettings, session: dict, frames: Iterator[Frame],
                              recorder: EventRecorder) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException

    url = websocket_url(settings.url, session["websocket_url"])
    try:
        async with connect(url, max_size=None, open_timeout=REQUEST_TIMEOUT_S,
                           additional_headers=auth_headers(settings.api_key)) as ws:
            await _run(settings, frames, WebSocketFramePusher(ws), ws_events(ws), recorder)
    except (OSError, WebSocketException) as error:
        raise StreamClientError(f"the WebSocket {url} failed: {type(error).__name__}: {error}") from None


async def _run(settings: StreamSettings, frames: Iterator[Frame], pusher, events: AsyncIterator[tuple[str, dict]],
               recorder: EventRecorder) -> None:
    reader = asyncio.create_task(_read_events(events, recorder))
    try:
        await push_frames(settings, frames, pusher, recorder.report, stop=reader.done)
        if not reader.done():
            await pusher.end()
        await asyncio.wait_for(asyncio.shield(reader), settings.end_timeout_s)
    except asyncio.TimeoutError:
        raise StreamClientError(f"no end event {settings.end_timeout_s:g} s after the last frame") from None
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _read_events(events: AsyncIterator[tuple[str, dict]], recorder: EventRecorder) -> None:
    async for name, data in events:
        recorder.handle(name, data)


async def push_frames(settings: StreamSettings, frames: Iterator[Frame], pusher, report: StreamReport,
                      stop: Callable[[], bool] = lambda: False) -> None:
    """Decode, encode and push each frame when its time comes (decoding runs off the event loop)."""
    pacer = Pacer(settings.speed)
    source = thin(frames, settings.max_fps)
    first: float | None = None
    while not stop():
        item = await asyncio.to_thread(_next_encoded, source, settings.jpeg_quality)
        if item is None:
            return
        timestamp, jpeg = item
        first = timestamp if first is None else first
        if settings.duration_s is not None and timestamp - first >= settings.duration_s:
            return
        lag = await pacer.wait_for(timestamp)
        await pusher.push(timestamp, jpeg)
        report.frames_sent += 1
        report.max_lag_s = max(report.max_lag_s, lag)


def _next_encoded(source: Iterator[Frame], quality: int) -> tuple[float, bytes] | None:
    frame = next(source, None)
    return None if frame is None else (frame.timestamp, encode_jpeg(frame.pixels, quality))


# ---- the command line ---------------------------------------------------------------------------------------------
EPILOG = """\
exit codes: 0 done; 1 the server refused or reported errors, or the session ended early;
            2 bad arguments, unreadable video or no camera; 3 no server at --url; 130 interrupted (Ctrl-C)

Ctrl-C closes the session on the server (DELETE) before exiting. Start a server with `dispider-serve`
(with random test weights add `--respond-every 2`, so that answers are forced)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispider-stream",
        description="Stream a video file or a camera into a live Dispider session at real-time pace; print each "
                    "answer, streamed, with the video time that prompted it ([mm:ss-mm:ss] text).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("video", nargs="?", help="a video file (anything FFmpeg reads: mp4, mkv, webm ...)")
    source.add_argument("--camera", type=int, metavar="N", help="stream V4L2 camera /dev/videoN instead (Linux)")
    parser.add_argument("--url", default=os.environ.get("DISPIDER_URL", DEFAULT_URL),
                        help=f"the server (default $DISPIDER_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("DISPIDER_API_KEY"),
                        help="API key, for a server run with --tenants (default $DISPIDER_API_KEY)")
    parser.add_argument("-q", "--question", default=DEFAULT_QUESTION, help="what to watch for (default: %(default)r)")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help="play X times faster than real time (default 1; 'inf': as fast as the server takes "
                             "frames); ignored for a camera")
    parser.add_argument("--fps", type=float, default=DEFAULT_MAX_FPS, metavar="N",
                        help=f"push at most N frames per second of video (default {DEFAULT_MAX_FPS:g}; the model "
                             "samples 1 per second)")
    parser.add_argument("--via", choices=("http", "ws"), default="http",
                        help="http: POST each frame, read events as SSE (default); ws: both over one WebSocket")
    parser.add_argument("--show-decisions", action="store_true",
                        help="also print each clip's decision (respond or stay silent) and its latency")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="longest answer (default: the server's)")
    parser.add_argument("--clip-mode", choices=("uniform", "scene"), default="uniform",
                        help="16-s windows (default) or scene-based clips")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds of video (a camera runs "
                                                                    "until this or Ctrl-C)")
    parser.add_argument("--jpeg-quality", type=int, default=85, metavar="Q", help="JPEG quality 1-95 (default 85)")
    parser.add_argument("--end-timeout", type=float, default=300.0, metavar="S",
                        help="after the last frame, wait at most S seconds for the last answers (default 300)")
    return parser


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> StreamSettings:
    if not args.speed > 0:
        parser.error("--speed must be > 0")
    if not args.fps > 0:
        parser.error("--fps must be > 0")
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    if args.duration is not None and not args.duration > 0:
        parser.error("--duration must be > 0")
    if not 1 <= args.jpeg_quality <= 95:
        parser.error("--jpeg-quality must be in 1..95")
    return StreamSettings(
        url=args.url.rstrip("/"), question=args.question,
        speed=1.0 if args.camera is not None else args.speed,  # a camera is live: its frames come in real time
        max_fps=args.fps, via=args.via, max_tokens=args.max_tokens, clip_mode=args.clip_mode,
        jpeg_quality=args.jpeg_quality, duration_s=args.duration, end_timeout_s=args.end_timeout,
        api_key=args.api_key,
    )


def describe_end(report: StreamReport) -> str:
    end = report.end or {}
    return (f"session {report.session_id}: {report.frames_sent} frames, {end.get('clips', '?')} clips, "
            f"{len(report.decisions)} decisions, {len(report.responses)} answers"
            + (f", {len(report.errors)} errors" if report.errors else "")
            + f" ({end.get('reason', 'no end event')}; frames at most {report.max_lag_s:.2f} s late)")


def exit_code_of(report: StreamReport) -> int:
    return EXIT_OK if report.ended_normally and not report.errors else EXIT_STREAM_FAILED


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(parser, args)
    printer = TimelinePrinter(show_decisions=args.show_decisions)
    try:
        frames = camera_frames(args.camera) if args.camera is not None else video_file_frames(args.video)
        source = f"camera /dev/video{args.camera}" if args.camera is not None else args.video
        printer.status(f"streaming {source} to {settings.url} at {_pace(settings)}, via {settings.via}")
        report = asyncio.run(stream_session(settings, frames, printer))
    except StreamClientError as error:
        printer.status(f"dispider-stream: {error}")
        sys.exit(error.exit_code)
    except httpx.HTTPError as error:  # e.g. the server went away mid-stream
        printer.status(f"dispider-stream: the connection to {settings.url} failed: {type(error).__name__}: {error}")
        sys.exit(EXIT_STREAM_FAILED)
    except KeyboardInterrupt:
        printer.status("dispider-stream: interrupted (the session, if one was open, is closed)")
        sys.exit(EXIT_INTERRUPTED)
    printer.status(describe_end(report))
    sys.exit(exit_code_of(report))


def _pace(settings: StreamSettings) -> str:
    if math.isinf(settings.speed):
        return "full speed"
    return "real-time pace" if settings.speed == 1 else f"{settings.speed:g}x real time"


if __name__ == "__main__":
    main()
