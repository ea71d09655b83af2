"""``dispider-demo``: the whole job on one machine, no GPU needed, in a few minutes.

1. ensures the tiny random-weight Dispider checkpoint (made once, cached under ``$DISPIDER_HOME``);
2. generates a test video with scene changes (cached too);
3. starts ``dispider-serve`` as a child process on a free loopback port, answering every 2nd clip;
4. streams the video into a live session at real-time pace with the ``dispider-stream`` client, printing a
   timeline of decisions and answers;
5. prints a summary (from the client and from the server's /metrics) and stops the server, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from clients.local_server import LocalServer, ServerStartError
from clients.server_metrics import DECISION_LATENCY, TIME_TO_FIRST_TOKEN, MetricsSnapshot
from clients.stream_video import (
    StreamClientError,
    StreamReport,
    StreamSettings,
    TimelinePrinter,
    stream_session,
    video_file_frames,
)

RESPOND_EVERY = 2
ANSWER_TOKENS = 24  # random weights speak noise: short answers keep the timeline readable
QUESTION = "Tell me whenever the scene changes, and what the square is doing."
SERVER_START_TIMEOUT_S = 900.0  # the first start on a small CPU builds the checkpoint's split and the engine


@dataclass(frozen=True)
class DemoVideo:
    seconds: int = 64
    fps: int = 4
    scenes: int = 4

    @property
    def file_name(self) -> str:
        return f"scenes-{self.seconds}s-{self.fps}fps-{self.scenes}.mp4"


# ---- output -------------------------------------------------------------------------------------------------------
def say(line: str = "") -> None:
    print(line, flush=True)


class StartProgress:
    """One status line while the server starts: elapsed seconds and what its log says now (rewritten in place on
    a terminal, a line every 15 s otherwise)."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._last_printed = -15.0

    def __call__(self, elapsed: float, log_line: str) -> None:
        activity = _short_log_line(log_line)
        if self.tty:
            print(f"\r  starting ... {elapsed:4.0f} s  {activity[:70]:<70}", end="", flush=True)
        elif elapsed - self._last_printed >= 15:
            self._last_printed = elapsed
            say(f"  starting ... {elapsed:.0f} s  {activity[:90]}")

    def done(self) -> None:
        if self.tty:
            print("\r" + " " * 100 + "\r", end="", flush=True)


def _short_log_line(line: str) -> str:
    """A log line without its timestamp and logger prefix (``... INFO dispider.serve: text`` -> ``text``)."""
    for marker in ("] ", ": "):
        if marker in line:
            line = line.split(marker, 1)[1]
            break
    return line.strip()


# ---- steps ----------------------------------------------------------------------------------------------------------
def ensure_checkpoint() -> Path:
    from dispider_vllm.checkpoint.random import default_checkpoint_dir, ensure_default_checkpoint

    cached = default_checkpoint_dir().is_dir()
    say(f"checkpoint  {'cached' if cached else 'making (once)'}: the tiny random-weight Dispider checkpoint ...")
    made = ensure_default_checkpoint()
    say(f"            {made.checkpoint_dir}")
    return Path(made.checkpoint_dir)


def ensure_demo_video(spec: DemoVideo) -> Path:
    from dispider_vllm.checkpoint.cache import dispider_home, locked
    from dispider_vllm.video.synth import make_test_video

    folder = dispider_home() / "demo"
    path = folder / spec.file_name
    with locked(folder / ".video.lock"):
        if not path.is_file():
            partial = path.with_suffix(".partial.mp4")  # renamed into place: a half-written video is never used
            make_test_video(partial, seconds=spec.seconds, fps=spec.fps, scenes=spec.scenes)
            partial.rename(path)
    say(f"video       {path} ({spec.seconds} s, {spec.fps} fps, {spec.scenes} scenes)")
    return path


def start_server(checkpoint: Path, log_path: Path) -> LocalServer:
    server = LocalServer(["--checkpoint", str(checkpoint), "--respond-every", str(RESPOND_EVERY)], log_path)
    say(f"server      dispider-serve on {server.url} (vLLM reaction engine + sidecar process); log: {log_path}")
    return server.start()


def wait_until_ready(server: LocalServer) -> None:
    progress = StartProgress()
    try:
        took = server.wait_healthy(SERVER_START_TIMEOUT_S, progress)
    finally:
        progress.done()
    say(f"            ready in {took:.0f} s")


def explain_forced_triggers() -> None:
    say()
    say("The weights are random, so the model's own decisions mean nothing and its words are noise. The server runs")
    say(f"with --respond-every {RESPOND_EVERY}: every {RESPOND_EVERY}nd clip's decision is forced to 'respond', so the "
        "demo shows")
    say("the whole path: 16-s clips -> decisions -> triggers -> answers streamed back with their video time.")
    say()


def stream_video(url: str, video: Path, speed: float) -> StreamReport:
    settings = StreamSettings(url=url, question=QUESTION, speed=speed, max_tokens=ANSWER_TOKENS)
    pace = "real-time pace" if speed == 1 else f"{speed:g}x real time"
    say(f"streaming   {video.name} into a live session at {pace}; question: {QUESTION!r}")
    say()
    printer = TimelinePrinter(sys.stdout, show_decisions=True)
    return asyncio.run(stream_session(settings, video_file_frames(video), printer))


def summarize(report: StreamReport, metrics: MetricsSnapshot | None) -> None:
    end = report.end or {}
    triggers = sum(1 for d in report.decisions if d.respond)
    latencies = [d.latency_s for d in report.decisions]
    say()
    say("summary")
    say(f"  clips {end.get('clips', '?')}, decisions {len(report.decisions)} ({triggers} respond), "
        f"answers {len(report.responses)}, errors {len(report.errors)}; frames pushed {report.frames_sent}, "
        f"at most {report.max_lag_s:.2f} s late")
    if latencies:
        say(f"  decision latency (clip's last frame -> decision), p50: {statistics.median(latencies):.2f} s "
            "from the session's events" + _server_p50(metrics, DECISION_LATENCY))
    if waits := first_token_waits(report):
        say(f"  time to first token (decision -> first answer text), p50: {statistics.median(waits):.2f} s from the "
            "session's events" + _server_p50(metrics, TIME_TO_FIRST_TOKEN))
    if triggers > len(report.responses):
        say(f"  ({triggers - len(report.responses)} triggered answer(s) came back silent: random weights may "
            "choose <keep_silent>)")


def first_token_waits(report: StreamReport) -> list[float]:
    triggers = {d.clip: d for d in report.decisions if d.respond}
    return [r.first_at - triggers[r.clip].received_at for r in report.responses.values()
            if r.first_at is not None and r.clip in triggers]


def _server_p50(metrics: MetricsSnapshot | None, name: str) -> str:
    histogram = metrics.histogram(name) if metrics else None
    if not histogram or not histogram.count:
        return ""
    return f", {histogram.quantile(0.5):.2f} s from /metrics (bucket estimate)"


def fetch_metrics(url: str) -> MetricsSnapshot | None:
    try:
        return MetricsSnapshot.parse(httpx.get(url + "/metrics", timeout=10).text)
    except (httpx.HTTPError, ValueError):
        return None


# ---- main -------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispider-demo",
        description="Run the whole job locally with random test weights: make a checkpoint and a test video, start "
                    "dispider-serve on loopback, stream the video into a live session at real-time pace, print the "
                    "timeline of decisions and answers and a summary, stop the server.",
    )
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help="stream X times faster than real time (default 1: the 64-s video takes 64 s)")
    parser.add_argument("--video", type=Path, metavar="PATH", help="stream this video instead of the generated one")
    parser.add_argument("--keep-server", action="store_true",
                        help="leave the server running afterwards (its URL and how to stop it are printed)")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    from dispider_vllm.checkpoint.cache import dispider_home

    started = time.monotonic()
    say("dispider-demo: Dispider served on vLLM, end to end, on this machine")
    checkpoint = ensure_checkpoint()
    video = args.video or ensure_demo_video(DemoVideo())
    if args.video is not None:
        say(f"video       {video}")
    server = start_server(checkpoint, dispider_home() / "demo" / "server.log")
    try:
        wait_until_ready(server)
        explain_forced_triggers()
        report = stream_video(server.url, video, args.speed)
        summarize(report, fetch_metrics(server.url))
    finally:
        if args.keep_server:
            say(f"\nserver left running at {server.url} (OpenAI base URL {server.url}/v1), pid {server.pid}; "
                f"stop it with: kill -INT {server.pid}")
        else:
            say("\nstopping the server ...")
            server.stop()
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0 if report.ended_normally and not report.errors else 1


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.speed > 0:
        sys.exit("dispider-demo: --speed must be > 0")
    if args.video is not None and not args.video.is_file():
        sys.exit(f"dispider-demo: no such video file: {args.video}")
    try:
        sys.exit(run_demo(args))
    except ServerStartError as error:
        sys.exit(f"dispider-demo: the server did not start.\n{error}")
    except (StreamClientError, httpx.HTTPError) as error:
        sys.exit(f"dispider-demo: streaming failed: {error}")
    except KeyboardInterrupt:
        print("\ndispider-demo: interrupted; the server was stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
