"""The frame path's host cost: CPU time per pushed frame in the server's process and in each of its children.

    python benchmarks/frame_path_bench.py --out /tmp/frame_path.json                  # tiny checkpoint, CPU
    python benchmarks/frame_path_bench.py --sessions 32 --seconds 60 --out benchmarks/results/frame_path_h200.json \\
        -- --checkpoint /tmp/dispider-streams/split --respond-every 8
    python benchmarks/frame_path_bench.py --compare-ring --frame-size 640x360 --out /tmp/frame_ring.json

Every live frame crosses the server's process (HTTP request, the JPEG's header check, hand-off to the sidecar;
its decoding too with ``--decode-frames-in server``) and the sidecar's (decoding, sampling, resize and normalise
into clips) before any GPU work. One Python process has one core's worth
of interpreter, so the server's CPU seconds per frame bound the frames per second, hence the 1-fps streams, that
one server can take, whatever the GPU does: ``streams_per_server_core`` = 1 / (server CPU s per frame).

The run starts the server (its arguments after ``--``; default: the tiny random checkpoint on the CPU), opens
``--sessions`` live sessions, and pushes JPEG frames (320x240 by default) into them back to back for
``--seconds``, one request in flight per session. It reads the CPU times of the server's process and of each
child (the sidecar, vLLM's engine core) before and after. The sidecar's figure includes its model work when it
runs on the CPU; on a GPU host it is the host-side share.

``--compare-ring`` runs it twice, in one go: frames' pixels pickled through the sidecar's pipe (the server with
``--frame-ring-mb 0``), then through the shared-memory frame ring (the server's default), and reports the ratios.
``--compare-http`` likewise: uvicorn's pure-Python HTTP parser (``--http h11``), then its C one (``--http httptools``).
``--compare-access-log``: an access-log line for every request (``--access-log all``), then for every request but
the accepted frame pushes (``except-frames``, the default). ``--compare-switch-interval``: Python's GIL switch
interval (5 ms), then ``--switch-interval 1``; ``decode_s`` (from /metrics) is a push's wait for a decode thread
and its decoding. ``--compare-frame-decoding``: images decoded on the server's threads (``--decode-frames-in
server``), then in the sidecar's process (``sidecar``, the default: the server reads their headers only;
``sidecar_decode_s`` is the decoding there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.local_server import LocalServer, ServerStartError  # noqa: E402
from clients.stream_video import encode_jpeg  # noqa: E402
from dispider_vllm.video.synth import make_test_frames  # noqa: E402

QUESTION = "Tell me when something changes."


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def processes_of(pid: int, sidecar_pid: int | None) -> dict[str, psutil.Process]:
    """The server and its children, by role: the sidecar (its pid from /health), the others by process name."""
    server = psutil.Process(pid)
    named = {"server": server}
    for child in server.children(recursive=True):
        role = "sidecar" if child.pid == sidecar_pid else f"{child.name()}[{child.pid}]"
        named[role] = child
    return named


def sidecar_pid_of(url: str) -> int | None:
    return httpx.get(url + "/health", timeout=10).json().get("placement", {}).get("sidecar_pid")


def snapshot(processes: dict[str, psutil.Process]) -> dict[str, float]:
    seen = {}
    for role, process in processes.items():
        try:
            seen[role] = cpu_seconds(process)
        except psutil.Error:
            pass
    return seen


async def push_back_to_back(http: httpx.AsyncClient, session_id: str, jpegs: list[bytes], until: float,
                            rtts: list[float]) -> None:
    timestamp = 0.0
    while time.monotonic() < until:
        data = jpegs[int(timestamp) % len(jpegs)]
        started = time.monotonic()
        reply = await http.post(f"/v1/sessions/{session_id}/frames", params={"timestamp": f"{timestamp:.3f}"},
                                content=data, headers={"content-type": "image/jpeg"})
        reply.raise_for_status()
        rtts.append(time.monotonic() - started)
        timestamp += 1.0


async def drive(url: str, sessions: int, seconds: float, jpegs: list[bytes]) -> tuple[list[float], float]:
    # Idle connections are forgotten well before the server's keep-alive timeout (uvicorn: 5 s): reusing one the
    # server is closing at that moment fails the request (load_streams.py does the same).
    limits = httpx.Limits(max_connections=sessions + 4, max_keepalive_connections=sessions + 4, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        ids = []
        for _ in range(sessions):
            reply = await http.post("/v1/sessions", json={"question": QUESTION})
            reply.raise_for_status()
            ids.append(reply.json()["id"])
        rtts: list[float] = []
        started = time.monotonic()
        await asyncio.gather(*(push_back_to_back(http, i, jpegs, started + seconds, rtts) for i in ids))
        elapsed = time.monotonic() - started
        for session_id in ids:
            await http.delete(f"/v1/sessions/{session_id}")
    return rtts, elapsed


def frames_sent_by_way(url: str) -> dict[str, float]:
    """The server's count of frames handed to the sidecar through the ring and through the pipe."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {sample.labels["way"]: sample.value for family in text_string_to_metric_families(text)
            if family.name == "dispider_sidecar_frames_sent" for sample in family.samples}


def transit_quantiles(url: str) -> dict[str, float | None]:
    """Frames' transit to the sidecar (the server's receipt -> the sidecar's intake): bucket bounds of p50/p99."""
    return histogram_quantiles(url, "dispider_sidecar_transit_seconds")


def decode_quantiles(url: str) -> dict[str, float | None]:
    """A push's decode phase in the server (waiting for a worker thread and decoding; with ``--decode-frames-in
    sidecar``, reading the image's header): bucket bounds of p50/p99."""
    return histogram_quantiles(url, "dispider_frame_push_seconds", phase="decode")


def sidecar_decode_quantiles(url: str) -> dict[str, float | None]:
    """Decoding a batch of pushed images in the sidecar's intake (``--decode-frames-in sidecar``): p50/p99 bounds."""
    return histogram_quantiles(url, "dispider_sidecar_frame_decode_seconds")


def histogram_quantiles(url: str, family_name: str, **labels: str) -> dict[str, float | None]:
    """The bucket bounds that hold the p50 and p99 of one of the server's histograms (with these labels)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    buckets = [(float(sample.labels["le"]), sample.value) for family in text_string_to_metric_families(text)
               if family.name == family_name for sample in family.samples
               if sample.name.endswith("_bucket") and labels.items() <= sample.labels.items()]
    total = buckets[-1][1] if buckets else 0
    return {name: next((bound for bound, count in buckets if count >= q * total), None) if total else None
            for name, q in (("p50_le", 0.5), ("p99_le", 0.99))}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(url: str, pid: int, args) -> dict:
    width, height = (int(v) for v in args.frame_size.split("x"))
    frames = make_test_frames(seconds=64, fps=1, size=(width, height), seed=5)
    jpegs = [encode_jpeg(frame.pixels, 85) for frame in frames]
    processes = processes_of(pid, sidecar_pid_of(url))
    before = snapshot(processes)
    rtts, elapsed = asyncio.run(drive(url, args.sessions, args.seconds, jpegs))
    after = snapshot(processes)
    time.sleep(1.5)  # the sidecar reports its counts once a second
    pushed = len(rtts)
    per_frame_ms = {role: (after[role] - before[role]) * 1000 / pushed for role in after if role in before}
    server_ms = per_frame_ms.get("server", float("nan"))
    return {
        "sessions": args.sessions, "seconds": elapsed, "frames": pushed, "frames_per_s": pushed / elapsed,
        "frame_size": [width, height], "jpeg_bytes_mean": statistics.mean(len(j) for j in jpegs),
        "push_rtt_s": {"p50": percentile(rtts, 0.5), "p90": percentile(rtts, 0.9), "p99": percentile(rtts, 0.99)},
        "cpu_ms_per_frame": per_frame_ms,
        "streams_per_server_core": 1000 / server_ms if server_ms > 0 else None,
        "frames_sent_by_way": frames_sent_by_way(url),
        "transit_s": transit_quantiles(url),
        "decode_s": decode_quantiles(url),
        "sidecar_decode_s": sidecar_decode_quantiles(url),
    }


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({psutil.cpu_count()} cores)"


def run(args, serve_args: list[str]) -> dict:
    """Measure against ``--url``, or against a server started here with ``serve_args``."""
    if args.url:
        return measure(args.url, args.pid, args)
    log = Path(tempfile.gettempdir()) / "frame_path_server.log"  # not next to --out: results/ is committed
    with LocalServer(serve_args, log) as server:
        print(f"[frame-path] starting the server (log: {log})", flush=True)
        server.wait_healthy(900)
        return measure(server.url, server.pid, args)


# What each comparison runs: (name, server arguments added) for the old way, then the new one.
COMPARISONS = {
    "ring": (("pipe", ["--frame-ring-mb", "0"]), ("ring", [])),
    "http": (("h11", ["--http", "h11"]), ("httptools", ["--http", "httptools"])),
    "access-log": (("all", ["--access-log", "all"]), ("except-frames", ["--access-log", "except-frames"])),
    "switch-interval": (("5ms", []), ("1ms", ["--switch-interval", "1"])),
    "frame-decoding": (("server", ["--decode-frames-in", "server"]), ("sidecar", ["--decode-frames-in", "sidecar"])),
}


def compare(args, serve_args: list[str], comparison: str) -> dict:
    """The same push load twice, on two servers one after the other: the old way, then the new one."""
    (old, old_args), (new, new_args) = COMPARISONS[comparison]
    print(f"[frame-path] {old}: {' '.join(old_args) or 'the defaults'}", flush=True)
    before = run(args, [*serve_args, *old_args])
    print(f"[frame-path] {new}: {' '.join(new_args) or 'the defaults'}", flush=True)
    after = run(args, [*serve_args, *new_args])

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return round(numerator / denominator, 3) if numerator and denominator else None

    return {old: before, new: after, "ratios": {
        f"server_cpu_ms_per_frame_{old}_over_{new}": ratio(before["cpu_ms_per_frame"].get("server"),
                                                           after["cpu_ms_per_frame"].get("server")),
        f"sidecar_cpu_ms_per_frame_{old}_over_{new}": ratio(before["cpu_ms_per_frame"].get("sidecar"),
                                                            after["cpu_ms_per_frame"].get("sidecar")),
        f"frames_per_s_{new}_over_{old}": ratio(after["frames_per_s"], before["frames_per_s"]),
    }}


def print_result(result: dict, sessions: int) -> None:
    print(f"\n{result['frames']} frames in {result['seconds']:.1f} s ({result['frames_per_s']:.1f}/s) from "
          f"{sessions} sessions; push RTT p50 {result['push_rtt_s']['p50'] * 1000:.1f} ms; frames sent by way "
          f"{result['frames_sent_by_way']}; transit to the sidecar {result['transit_s']}; "
          f"decode {result['decode_s']}; in the sidecar {result['sidecar_decode_s']}")
    for role, ms in sorted(result["cpu_ms_per_frame"].items(), key=lambda item: -item[1]):
        print(f"  {role:28} {ms:8.2f} CPU ms per frame")
    if result["streams_per_server_core"]:
        print(f"one server process takes at most ~{result['streams_per_server_core']:.0f} frames/s (1-fps streams)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=4, help="live sessions pushing at once (default 4)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to push (default 30)")
    parser.add_argument("--frame-size", default="320x240", metavar="WxH", help="pushed frame size (default 320x240)")
    parser.add_argument("--url", help="a running server instead of starting one (needs --pid)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id")
    parser.add_argument("--compare-ring", action="store_const", dest="compare", const="ring",
                        help="run twice: frames pickled through the sidecar's pipe, then through the frame ring")
    parser.add_argument("--compare-http", action="store_const", dest="compare", const="http",
                        help="run twice: the server with uvicorn's h11 parser, then with httptools")
    parser.add_argument("--compare-access-log", action="store_const", dest="compare", const="access-log",
                        help="run twice: the server writing an access-log line per pushed frame, then not")
    parser.add_argument("--compare-switch-interval", action="store_const", dest="compare", const="switch-interval",
                        help="run twice: the server's process with Python's GIL switch interval (5 ms), then 1 ms")
    parser.add_argument("--compare-frame-decoding", action="store_const", dest="compare", const="frame-decoding",
                        help="run twice: pushed images decoded on the server's threads, then in the sidecar's process")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.url and not args.pid:
        parser.error("--url needs --pid (the server's process, whose CPU time is measured)")
    if args.url and args.compare:
        parser.error(f"--compare-{args.compare} starts its own two servers: leave out --url")

    try:
        result = compare(args, serve_args, args.compare) if args.compare else run(args, serve_args)
    except psutil.NoSuchProcess:
        parser.error(f"--pid {args.pid}: no such process (the server's process id: /health's placement.server_pid)")
    except (httpx.HTTPError, ServerStartError) as error:
        print(f"frame_path_bench: {error}", file=sys.stderr)
        return 1
    report = {"benchmark": "frame_path", "device": device_name(), "command": "python benchmarks/frame_path_bench.py "
              + " ".join(sys.argv[1:]), "server_args": serve_args, **result}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    names = [name for name, _ in COMPARISONS[args.compare]] if args.compare else [""]
    for name in names:
        if name:
            print(f"\n== {name}")
        print_result(result[name] if name else result, args.sessions)
    if args.compare:
        print(f"\nratios: {result['ratios']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
