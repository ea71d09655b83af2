"""Two tenants on one server: a light tenant's live streams next to a flooding tenant, against the same tenant alone.

The benchmark writes a tenants file with two tenants, ``flood`` and ``light`` (a fresh random key each, only
their hashes in the file, no quotas), starts ``dispider-serve --tenants FILE`` with the server arguments given
after ``--``, and runs two phases on that one server:

1. ``alone``: the light tenant runs ``--light-streams`` live streams (default 4) for ``--duration`` s (96);
2. ``with_flood``: the flood tenant opens ``--flood-streams`` streams (default 192), ramped up over one clip;
   one clip later (``--head-start``, 16 s) the light tenant runs the same streams as in phase 1, while the flood
   goes on until the light tenant is done. Flood streams push 1-fps JPEG frames in real time as
   ``load_streams.py`` does (``--flood-mode push``), or each uploads one long video chunk at once
   (``--flood-mode upload``, ``--upload-seconds`` of video: the "noisy" tenant of tests/test_tenancy.py) and
   holds its session open until the light tenant is done.

Streams are those of ``benchmarks/load_streams.py`` (same code, same statistics). The flood runs in a child
process with its own event loop, so the light tenant's client-side times (time to first token) are not
delayed by the load generator serving the flood's hundreds of streams; that child spreads the flood's streams
over ``--flood-client-procs`` client processes of its own (load_streams' ``--client-procs``; default auto: one
per 64 streams, at most half the cores), so that the flood too is pushed in real time.

Recorded for the light tenant in each phase: decision latency p50/p90/p99 (the server's ``latency_s``: clip's
last frame received -> decision; and the client's), time to first token p50/p99, answers, frames dropped,
errors; for the flood tenant: its decision latency and how many of its streams were admitted and how many
refused (503 when the server runs its capacity, ``--capacity-streams``; 429 from a quota): a refused flood
stream is reported, it is not an error of the benchmark. ``comparison`` divides the light tenant's p99
decision latency and p99 time to first token with the flood by the same alone (1.0: the flood costs the light
tenant nothing).

On the H200, with the shapes-only checkpoint of the live-stream sweep (benchmarks/h200_streams.sh; stop that
sweep's server first, both take the same GPU memory share), or ``bash benchmarks/h200_tenancy.sh``::

    python3 -m dispider_vllm.checkpoint.dummy /tmp/dispider-streams/split --shapes real
    python3 benchmarks/tenancy_bench.py --frame-size 320x240 --drain-timeout 60 \\
        --out benchmarks/results/tenancy_h200.json -- \\
        --checkpoint /tmp/dispider-streams/split --respond-probability 0.25 --max-sessions 2048 \\
        --gpu-memory-utilization 0.55 --max-batch-clips 64 --default-max-tokens 64

The server flags are the sweep's (benchmarks/h200_streams.sh), answers forced at random on a quarter of the
clips (the admission cost model's default ``triggers_per_clip``; the sweep uses 1/8), since random weights
decide at random. Not ``--respond-every N``: streams started within one clip all answer at the same clips, so
the light tenant, one clip behind the flood, would always answer at the same place in the flood's bursts of
answers (between them with N = 2), and a 96-s stream (6 clips) never reaches the sweep's 8th. The light
tenant's time to first token rests on about 6 answers a phase (4 streams x 6 clips / 4), so its p99 is about
their maximum; ``--light-streams 8`` doubles them. 192 flood streams are past the 128 the sweep found real-time
on the H200 (256 was not): the flood overloads the server on purpose. About 5 minutes plus the server's start.
A CPU smoke run (tiny random checkpoint, numbers meaningless)::

    python benchmarks/tenancy_bench.py --light-streams 1 --flood-streams 2 --duration 32 \\
        --out /tmp/tenancy.json -- --respond-every 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import queue
import shlex
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # load_streams.py sits next to this file
import load_streams as ls  # noqa: E402
from clients.local_server import LocalServer, ServerStartError, option_value  # noqa: E402
from clients.stream_video import (  # noqa: E402
    EventRecorder,
    StreamClientError,
    delete_session,
    raise_for_api_error,
    sse_events,
)
from serve.tenants import hash_key, new_key  # noqa: E402

REPORT_VERSION = 1
TENANT_NAMES = ("flood", "light")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "tenancy_h200.json"
PROGRESS_EVERY_S = 30.0
FLOOD_MESSAGE_TIMEOUT_S = 300.0  # the flood process imports and starts within this
UPLOAD_TIMEOUT_S = 300.0  # one long video chunk, to a server busy with many of them
STOP_POLL_S = 1.0


# ---- the tenants file --------------------------------------------------------------------------------------------
def write_tenants_file(folder: Path, flood_max_sessions: int | None = None) -> tuple[Path, dict[str, str]]:
    """Two tenants, a fresh key each (the file holds only the keys' hashes), no quotas unless the flood's
    ``max_sessions`` is given."""
    keys = {name: new_key() for name in TENANT_NAMES}
    document = {"tenants": [{"name": name, "keys": [hash_key(key)], **tenant_quotas(name, flood_max_sessions)}
                            for name, key in keys.items()]}
    path = folder / "tenants.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path, keys


def tenant_quotas(name: str, flood_max_sessions: int | None) -> dict:
    return {"max_sessions": flood_max_sessions} if name == "flood" and flood_max_sessions else {}


# ---- the flood, in its own process -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FloodPlan:
    streams: int
    mode: str  # "push": real-time JPEG frames; "upload": one long video chunk per stream
    config: ls.LoadConfig
    upload_video: str | None = None  # mode "upload": the video file each stream sends
    client_procs: int = 1  # the flood's streams spread over this many client processes (load_streams)


async def upload_stream(video: bytes, stop, index: int, count: int, http: httpx.AsyncClient, url: str,
                        frames: list[ls.EncodedFrame], config: ls.LoadConfig, run_start: float) -> ls.StreamLog:
    """A flood stream that sends its whole video at once, then keeps its session (and backlog) until ``stop``."""
    log = ls.StreamLog(index)
    await asyncio.sleep(config.stagger_s * index / max(count, 1) / config.speed)
    session = await ls.open_logged(http, url, config, log)
    if session is None:
        return log
    recorder = EventRecorder(log.events, ls.QuietPrinter())
    reader = asyncio.create_task(record_events(http, session["events_url"], recorder))
    try:
        sent = time.monotonic()
        response = await http.post(f"/v1/sessions/{session['id']}/frames", params={"time_offset": "0"},
                                   content=video, headers={"content-type": "video/mp4"}, timeout=UPLOAD_TIMEOUT_S)
        raise_for_api_error(response)
        log.push_rtt_s.append(time.monotonic() - sent)
        while not stop.is_set() and not reader.done():
            await asyncio.sleep(STOP_POLL_S)
        if reader.done():
            log.failure = ls.reader_failure(reader) or "the session ended before the light tenant was done"
    except (StreamClientError, httpx.HTTPError) as error:
        log.failure = ls.reader_failure(reader) or f"upload: {type(error).__name__}: {error}"
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await delete_session(http, session["id"])
    return log


async def record_events(http: httpx.AsyncClient, path: str, recorder: EventRecorder) -> None:
    async for name, data in sse_events(http, path):
        recorder.handle(name, data)


async def run_flood(url: str, frames: list[ls.EncodedFrame], plan: FloodPlan, messages, stop) -> dict:
    ls.raise_open_files_limit(plan.streams)
    stream = ls.run_stream
    if plan.mode == "upload":
        stream = partial(upload_stream, Path(plan.upload_video).read_bytes(), stop)
    messages.put(("started", None))
    run = await ls.collect_load(url, plan.streams, frames, plan.config, stream=stream, client_procs=plan.client_procs)
    return tenant_record(run, plan.config)


def flood_main(url: str, frames: list[ls.EncodedFrame], plan: FloodPlan, messages, stop) -> None:
    """The flood process: runs the flood and sends ("started", None), then ("result", record) or ("error", why)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent stops the flood and the server, in order
    try:
        messages.put(("result", asyncio.run(run_flood(url, frames, plan, messages, stop))))
    except BaseException as error:  # noqa: BLE001 - whatever it was, the parent reports it
        messages.put(("error", f"{type(error).__name__}: {error}"))


class FloodProcess:
    """The flood tenant's load generator in a child process (spawned: no forked event loop or sockets)."""

    def __init__(self, url: str, frames: list[ls.EncodedFrame], plan: FloodPlan) -> None:
        context = multiprocessing.get_context("spawn")
        self.messages = context.Queue()
        self.stop_flag = context.Event()
        # a daemonic process may not start client processes of its own; close() stops it either way
        self.process = context.Process(target=flood_main, args=(url, frames, plan, self.messages, self.stop_flag),
                                       name="tenancy-flood", daemon=plan.client_procs <= 1)
        self.process.start()

    async def receive(self, expected: str, timeout_s: float):
        """The payload of the next ``expected`` message; an error from the flood raises StreamClientError."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                tag, payload = await asyncio.to_thread(self.messages.get, True, 1.0)
            except queue.Empty:
                if not self.process.is_alive():
                    raise StreamClientError(f"the flood process exited (code {self.process.exitcode})") from None
                continue
            if tag == "error":
                raise StreamClientError(f"the flood failed: {payload}")
            if tag == expected:
                return payload
        raise StreamClientError(f"no {expected!r} from the flood process within {timeout_s:.0f} s")

    def stop(self) -> None:
        """Upload mode: the flood's streams close their sessions (push mode runs its set duration)."""
        self.stop_flag.set()

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ---- what a tenant's run reports ---------------------------------------------------------------------------------
def tenant_record(run: ls.LoadRun, config: ls.LoadConfig) -> dict:
    """The figures this benchmark compares, plus load_streams' full summary of the run under ``detail``."""
    summary = run.summary(config)
    decisions, responses, frames = summary["decisions"], summary["responses"], summary["frames"]
    admission = admission_of(run.logs)
    failures = [log.failure for log in run.logs if log.failure and log.session_id is not None]
    return {
        "streams": run.streams,
        "admission": admission,
        "decision_latency_s": decisions["latency_server_s"],
        "decision_latency_client_s": decisions["latency_client_s"],
        "decisions": {"count": decisions["count"], "expected_if_all_admitted": decisions["expected"]},
        "ttft_s": responses["ttft_s"],
        "answers": {"triggers": responses["triggers"], "answered": responses["answered"]},
        "frames": {"sent": frames["sent"], "late": frames["late"], "dropped": frames["dropped"]},
        "errors": {"events": summary["errors"]["events"], "failed_streams": len(failures),
                   "first_failures": failures[:5]},
        "detail": summary,
    }


def admission_of(logs: list[ls.StreamLog]) -> dict:
    """Streams admitted, refused by status (503: the server's capacity, 429: a quota), or not opened otherwise."""
    refused = Counter(str(log.open_status) for log in logs if log.session_id is None and log.open_status)
    return {
        "requested": len(logs),
        "admitted": sum(log.session_id is not None for log in logs),
        "refused_503": refused.get("503", 0),
        "refused_by_status": dict(refused),
        "not_opened_otherwise": sum(log.session_id is None and not log.open_status for log in logs),
    }


def comparison(alone: dict, with_flood: dict) -> dict:
    """The light tenant's figures with the flood divided by alone."""
    def ratio(metric: str, quantile: str) -> dict:
        before, after = alone[metric][quantile], with_flood[metric][quantile]
        share = round(after / before, 3) if before and after is not None else None
        return {"alone": before, "with_flood": after, "ratio": share}

    return {
        "light_p99_decision_latency_s": ratio("decision_latency_s", "p99"),
        "light_p99_ttft_s": ratio("ttft_s", "p99"),
        "light_p50_decision_latency_s": ratio("decision_latency_s", "p50"),
        "light_p50_ttft_s": ratio("ttft_s", "p50"),
        "ratio_is": "with_flood / alone; null where either side has no samples",
    }


# ---- the phases --------------------------------------------------------------------------------------------------
async def report_progress(phase: str, expected_s: float) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        print(f"  {phase}: {time.monotonic() - started:.0f} s of about {expected_s:.0f} s", flush=True)


async def with_progress(phase: str, expected_s: float, work):
    ticker = asyncio.create_task(report_progress(phase, expected_s))
    try:
        return await work
    finally:
        ticker.cancel()


async def light_phase(url: str, streams: int, frames: list[ls.EncodedFrame], config: ls.LoadConfig) -> dict:
    return tenant_record(await ls.collect_load(url, streams, frames, config), config)


async def phase_alone(url: str, args: argparse.Namespace, frames, light: ls.LoadConfig) -> dict:
    print(f"phase alone: tenant light, {args.light_streams} streams, {light.duration_s:g} s each ...", flush=True)
    started = time.monotonic()
    record = await with_progress("alone", light_run_seconds(light, args.light_streams),
                                 light_phase(url, args.light_streams, frames, light))
    print_light("alone", record)
    return {"wall_s": round(time.monotonic() - started, 1), "light": record}


async def phase_with_flood(url: str, args: argparse.Namespace, frames, light: ls.LoadConfig,
                           plan: FloodPlan) -> dict:
    print(f"phase with_flood: tenant flood, {plan.streams} streams ({plan.mode}, {plan.client_procs} client "
          f"process{'es' if plan.client_procs > 1 else ''}), then after {args.head_start:g} s "
          f"tenant light, {args.light_streams} streams ...", flush=True)
    started = time.monotonic()
    flood = FloodProcess(url, frames, plan)
    try:
        await flood.receive("started", FLOOD_MESSAGE_TIMEOUT_S)
        await asyncio.sleep(args.head_start)  # the flood ramps up over one clip before the light tenant starts
        print(f"  flood running for {args.head_start:g} s; light tenant starting", flush=True)
        light_record = await with_progress("with_flood", light_run_seconds(light, args.light_streams),
                                           light_phase(url, args.light_streams, frames, light))
        print_light("with_flood", light_record)
        flood.stop()
        print("  waiting for the flood to finish ...", flush=True)
        flood_record = await flood_result(flood, plan)
    finally:
        flood.close()
    print_flood(flood_record)
    return {"wall_s": round(time.monotonic() - started, 1), "head_start_s": args.head_start, "light": light_record,
            "flood": flood_record}


async def flood_result(flood: FloodProcess, plan: FloodPlan) -> dict:
    """The flood's record; a flood that failed is reported as such rather than losing the light tenant's run."""
    timeout = plan.config.duration_s / plan.config.speed + plan.config.stagger_s + plan.config.drain_timeout_s + 120
    try:
        return await flood.receive("result", timeout)
    except StreamClientError as error:
        print(f"  the flood failed: {error}", flush=True)
        return {"streams": plan.streams, "failure": str(error)}


def light_run_seconds(config: ls.LoadConfig, streams: int) -> float:
    """When the last stream pushes its last frame (its answers take a little longer)."""
    return (config.stagger_s * (streams - 1) / streams + config.duration_s) / config.speed


# ---- printing ----------------------------------------------------------------------------------------------------
def print_light(phase: str, record: dict) -> None:
    d, t, a = record["decision_latency_s"], record["ttft_s"], record["admission"]
    print(f"  light ({phase}): {a['admitted']}/{a['requested']} admitted, decision p50/p99 {_s(d['p50'])}/"
          f"{_s(d['p99'])}, TTFT p50/p99 {_s(t['p50'])}/{_s(t['p99'])}, {record['answers']['answered']}/"
          f"{record['answers']['triggers']} answered, {record['frames']['dropped']} frames dropped, "
          f"{record['errors']['failed_streams']} failed streams", flush=True)


def print_flood(record: dict) -> None:
    if "failure" in record:
        return
    d = record["decision_latency_s"]
    print(f"  flood: {_admitted(record)}, decision p50/p99 {_s(d['p50'])}/{_s(d['p99'])}, "
          f"{record['frames']['dropped']} frames dropped", flush=True)


def print_table(report: dict) -> None:
    alone, flooded = report["phases"]["alone"]["light"], report["phases"]["with_flood"]["light"]
    ratios = report["comparison"]
    rows = [
        ("admitted", _ratio_of(alone["admission"]), _ratio_of(flooded["admission"]), ""),
        ("decision p50", _s(alone["decision_latency_s"]["p50"]), _s(flooded["decision_latency_s"]["p50"]),
         _x(ratios["light_p50_decision_latency_s"]["ratio"])),
        ("decision p99", _s(alone["decision_latency_s"]["p99"]), _s(flooded["decision_latency_s"]["p99"]),
         _x(ratios["light_p99_decision_latency_s"]["ratio"])),
        ("TTFT p50", _s(alone["ttft_s"]["p50"]), _s(flooded["ttft_s"]["p50"]), _x(ratios["light_p50_ttft_s"]["ratio"])),
        ("TTFT p99", _s(alone["ttft_s"]["p99"]), _s(flooded["ttft_s"]["p99"]), _x(ratios["light_p99_ttft_s"]["ratio"])),
        ("answered", _answered(alone), _answered(flooded), ""),
        ("frames dropped", str(alone["frames"]["dropped"]), str(flooded["frames"]["dropped"]), ""),
        ("failed streams", str(alone["errors"]["failed_streams"]), str(flooded["errors"]["failed_streams"]), ""),
    ]
    print(f"\nlight tenant ({report['config']['light_streams']} streams) on {report['device']}:")
    print(f"  {'':<16}{'alone':>10}{'with flood':>12}{'ratio':>9}")
    for label, before, after, share in rows:
        print(f"  {label:<16}{before:>10}{after:>12}{share:>9}")
    flood = report["phases"]["with_flood"]["flood"]
    if "failure" in flood:
        print(f"flood tenant: failed ({flood['failure']})")
    else:
        print(f"flood tenant ({report['config']['flood_mode']}): {_admitted(flood)}, decision p50/p99 "
              f"{_s(flood['decision_latency_s']['p50'])}/{_s(flood['decision_latency_s']['p99'])}")
    for note in report["notes"]:
        print(f"note: {note}")


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}s"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _ratio_of(admission: dict) -> str:
    return f"{admission['admitted']}/{admission['requested']}"


def _admitted(record: dict) -> str:
    """'190/192 streams admitted (refused: 503 x2)'."""
    refused = ", ".join(f"{status} x{n}" for status, n in sorted(record["admission"]["refused_by_status"].items()))
    return f"{_ratio_of(record['admission'])} streams admitted" + (f" (refused: {refused})" if refused else "")


def _answered(record: dict) -> str:
    return f"{record['answers']['answered']}/{record['answers']['triggers']}"


# ---- the command line --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/tenancy_bench.py",
        usage="%(prog)s [options] [-- dispider-serve arguments ...]",
        description="Two tenants on one dispider-serve (started here with a generated tenants file and the "
                    "server arguments after `--`): the light tenant's decision latency and time to first token "
                    "while a flood tenant overloads the server, against the same light tenant alone.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    parser.add_argument("--light-streams", type=int, default=4, metavar="N", help="the light tenant's streams "
                                                                                  "(default 4)")
    parser.add_argument("--flood-streams", type=int, default=192, metavar="N", help="the flood tenant's streams "
                                                                                    "(default 192)")
    parser.add_argument("--flood-mode", choices=["push", "upload"], default="push",
                        help="push: real-time 1-fps JPEG frames, like the light tenant (default); upload: each "
                             "flood stream sends one long video chunk at once")
    parser.add_argument("--upload-seconds", type=float, default=720.0, metavar="S",
                        help="--flood-mode upload: seconds of video each flood stream uploads (default 720)")
    parser.add_argument("--flood-client-procs", type=ls.client_procs_arg, default="auto", metavar="K",
                        help="spread the flood's streams over K client processes (default auto: 1 up to "
                             f"{ls.STREAMS_PER_CLIENT_PROC} streams, else one per {ls.STREAMS_PER_CLIENT_PROC}, "
                             "at most half the cores)")
    parser.add_argument("--flood-max-sessions", type=int, metavar="N",
                        help="a max_sessions quota for the flood tenant (its streams past N get 429); default none. "
                             "Admission (--capacity-streams) is server-wide: a flood that fills it gets the light "
                             "tenant's streams refused too")
    parser.add_argument("--duration", type=float, default=96.0, metavar="S",
                        help="video seconds per light stream, both phases (default 96: 6 clips)")
    parser.add_argument("--head-start", type=float, default=float(ls.CLIP_SECONDS), metavar="S",
                        help=f"the flood runs this long before the light tenant starts (default {ls.CLIP_SECONDS}: "
                             "one clip, the flood's ramp-up)")
    parser.add_argument("--stagger", type=float, default=float(ls.CLIP_SECONDS), metavar="S",
                        help=f"spread each tenant's stream starts over S seconds (default {ls.CLIP_SECONDS})")
    ls.add_stream_options(parser)
    parser.add_argument("--server-start-timeout", type=float, default=900.0, metavar="S")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="run one short light stream before measuring (default on)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="the JSON report (default benchmarks/results/tenancy_h200.json)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, server_args: list[str]) -> tuple[int, int]:
    if args.light_streams < 1 or args.flood_streams < 1:
        parser.error("--light-streams and --flood-streams must be >= 1")
    if args.flood_max_sessions is not None and args.flood_max_sessions < 1:
        parser.error("--flood-max-sessions must be >= 1")
    for flag, value in (("--duration", args.duration), ("--upload-seconds", args.upload_seconds),
                        ("--drop-after", args.drop_after), ("--drain-timeout", args.drain_timeout)):
        if not value > 0:
            parser.error(f"{flag} must be > 0")
    if args.stagger < 0 or args.head_start < 0:
        parser.error("--stagger and --head-start must be >= 0")
    if option_value(server_args, "--tenants") is not None:
        parser.error("the benchmark writes its own tenants file; leave --tenants out of the server arguments")
    if args.video is not None and not args.video.is_file():
        parser.error(f"no such video file: {args.video}")
    return ls.parse_frame_size(parser, args.frame_size)


def server_command_args(server_args: list[str], tenants_file: Path, total_streams: int) -> list[str]:
    """The given server arguments, the tenants file, and a session cap that does not refuse the benchmark itself
    (admission control still refuses past --capacity-streams, if given: that is part of what is measured)."""
    extra = [*server_args, "--tenants", str(tenants_file)]
    if option_value(extra, "--max-sessions") is None:
        extra += ["--max-sessions", str(max(64, total_streams + 8))]
    return extra


def load_configs(args: argparse.Namespace, keys: dict[str, str]) -> tuple[ls.LoadConfig, ls.LoadConfig]:
    """The light tenant's streams, and the flood's: in push mode it lasts until the light tenant's last clip is
    decided (head start + ramp-up + duration + one clip)."""
    light = ls.LoadConfig(duration_s=args.duration, stagger_s=args.stagger, max_tokens=args.max_tokens,
                          drop_after_s=args.drop_after, drain_timeout_s=args.drain_timeout, api_key=keys["light"])
    if args.flood_mode == "upload":
        flood_seconds = args.upload_seconds
    else:
        flood_seconds = args.head_start + args.stagger + args.duration + ls.CLIP_SECONDS
    return light, replace(light, duration_s=flood_seconds, api_key=keys["flood"])


def make_upload_video(folder: Path, args: argparse.Namespace, size: tuple[int, int]) -> str | None:
    if args.flood_mode != "upload":
        return None
    from dispider_vllm.video.synth import make_test_video

    print(f"making the flood's {args.upload_seconds:g}-s upload video ...", flush=True)
    return str(make_test_video(folder / "flood.mp4", seconds=args.upload_seconds, fps=1, size=size,
                               scenes=max(1, math.ceil(args.upload_seconds / 64)), seed=7))


def config_notes(args: argparse.Namespace, server_args: list[str]) -> list[str]:
    """What about the settings weakens the comparison (printed before the run, kept in the report)."""
    notes = []
    every = option_value(server_args, "--respond-every")
    clips = math.ceil(args.duration / ls.CLIP_SECONDS)
    if every is None and option_value(server_args, "--respond-probability") is None:
        notes.append("no forced answers (--respond-every / --respond-probability): with random weights the light "
                     "tenant's time to first token may have few or no samples")
    elif every is not None and int(every) > clips:
        notes.append(f"--respond-every {every} > the {clips} clips of a light stream: no forced answers, no time to "
                     "first token")
    elif every is not None and int(every) > 1:
        notes.append(f"--respond-every {every}: the flood's streams answer in bursts at the same clips, and the light "
                     "tenant's answers may fall between them; --respond-probability spreads them")
    return notes


def result_notes(phases: dict, device: str) -> list[str]:
    notes = []
    light = phases["with_flood"]["light"]["admission"]
    if light["admitted"] < light["requested"]:
        notes.append(f"with the flood, {light['requested'] - light['admitted']} of the light tenant's streams were "
                     "not admitted (admission is server-wide: see --flood-max-sessions); its figures cover the rest")
    if device.startswith("CPU"):
        notes.append("a CPU run: a smoke check of the benchmark, its figures say nothing about a GPU server")
    return notes


def start_server(server: LocalServer, timeout_s: float) -> None:
    print(f"starting {' '.join(server.command[1:])} (log {server.log_path}) ...", flush=True)
    server.start()
    last_said = [0.0]

    def progress(elapsed: float, line: str) -> None:
        if elapsed - last_said[0] >= 30:
            last_said[0] = elapsed
            print(f"  server starting, {elapsed:.0f} s: {line[-120:]}", flush=True)

    print(f"server ready in {server.wait_healthy(timeout_s, progress):.0f} s at {server.url}", flush=True)


async def run_phases(url: str, args: argparse.Namespace, frames, light: ls.LoadConfig, plan: FloodPlan) -> dict:
    if args.warmup:
        await ls.warm_up(url, frames, light)
    alone = await phase_alone(url, args, frames, light)
    with_flood = await phase_with_flood(url, args, frames, light, plan)
    return {"alone": alone, "with_flood": with_flood}


def build_report(args: argparse.Namespace, command: str, server: LocalServer, video: str, frames, light, plan,
                 phases: dict, started: float, notes: list[str]) -> dict:
    config = {
        "light_streams": args.light_streams, "flood_streams": args.flood_streams, "flood_mode": args.flood_mode,
        "flood_client_procs": plan.client_procs,
        "duration_s": args.duration, "head_start_s": args.head_start, "flood_duration_s": plan.config.duration_s,
        "upload_seconds": args.upload_seconds if args.flood_mode == "upload" else None,
        "frame_size": args.frame_size, "video": video, "frames_in_loop": len(frames),
        "respond_every": option_value(server.command, "--respond-every"),
        "respond_probability": option_value(server.command, "--respond-probability"), "warmup": args.warmup,
        "stream": {k: v for k, v in asdict(light).items() if k != "api_key"},
        "tenants": {name: {"quotas": tenant_quotas(name, args.flood_max_sessions) or None, "priority": 0}
                    for name in TENANT_NAMES},
    }
    return {
        "benchmark": "tenancy_bench", "version": REPORT_VERSION, "device": ls.device_label(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)), "command": command,
        "config": config,
        "server": {"args": server.command[3:], "log": str(server.log_path)},
        "environment": ls.environment(),
        "phases": phases,
        "comparison": comparison(phases["alone"]["light"], phases["with_flood"]["light"]),
        "notes": notes,
    }


def stop_on_sigterm() -> None:
    """A kill (or a job timeout) stops the benchmark as Ctrl-C does: the server is stopped too."""
    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the server's stop short
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, server_args = ls.split_server_args(argv)
    parser = build_parser()
    args = parser.parse_args(own)
    size = check_args(parser, args, server_args)
    command = shlex.join(["python", "benchmarks/tenancy_bench.py", *argv])
    stop_on_sigterm()
    ls.raise_open_files_limit(args.light_streams)
    notes = config_notes(args, server_args)
    for note in notes:
        print(f"note: {note}", flush=True)
    started = time.time()
    server = None
    try:
        with tempfile.TemporaryDirectory(prefix="dispider-tenancy-") as folder:
            tenants_file, keys = write_tenants_file(Path(folder), args.flood_max_sessions)
            light, flood_config = load_configs(args, keys)
            upload_video = make_upload_video(Path(folder), args, size)
            plan = FloodPlan(args.flood_streams, args.flood_mode, flood_config, upload_video,
                             ls.resolve_client_procs(args.flood_client_procs, args.flood_streams))
            frames, video = ls.prepare_frames(args.video, size, light.fps, light.jpeg_quality)
            total = args.light_streams + args.flood_streams
            # known here before it starts, so that an interrupt while it starts still stops it
            server = LocalServer(server_command_args(server_args, tenants_file, total), ls.server_log_path())
            start_server(server, args.server_start_timeout)
            phases = asyncio.run(run_phases(server.url, args, frames, light, plan))
    except (StreamClientError, ServerStartError) as error:
        sys.exit(f"tenancy_bench: {error}")
    except KeyboardInterrupt:
        sys.exit("tenancy_bench: interrupted")
    finally:
        if server is not None:
            print("stopping the server ...", flush=True)
            server.stop()
    device = ls.device_label()
    report = build_report(args, command, server, video, frames, light, plan, phases, started,
                          notes + result_notes(phases, device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"wrote {args.out}", flush=True)
    if device.startswith("CPU") and args.out.resolve() == DEFAULT_OUT:
        print(f"warning: a CPU run written to {DEFAULT_OUT.name}, the file meant for the H200 run", flush=True)


if __name__ == "__main__":
    main()
