"""``dispider-serve`` (also ``python -m serve``): serve one Dispider checkpoint behind an OpenAI-compatible API."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from serve.config import (
    DEFAULT_MODEL_NAME,
    KEPT_CLIPS_HOST_MEMORY_SHARE,
    ServerConfig,
    frontend_features,
    host_memory_bytes,
    installed,
    resolve_model_parts,
)
from serve.access_log import ACCESS_LOG_MODES, filter_access_log
from serve.admission import CAPACITY_BOUNDS
from serve.placement import PlacementError, host_placement

# A step waits at most this long for the gate (a hold the sidecar does not renew ends after 1 s anyway).
MAX_DECISION_GATE_MS = 1000

DESCRIPTION = """\
Serve Dispider, a proactive streaming video LLM: the reaction model runs on vLLM, perception and decision
run in a sidecar process, and an OpenAI-compatible API sits in front:

  POST /v1/chat/completions   a video (video_url part) and a question -> every proactive answer, with its
                              span of video time (streamed or not)
  /v1/sessions...             live sessions: push frames over HTTP or a WebSocket, read events as SSE
  GET  /v1/models, /health, /metrics (Prometheus), /openapi.json

The checkpoint is split into its reaction and perception/decision parts on first use (cached).

Tenants: with --tenants FILE every request needs an API key (Authorization: Bearer KEY; a WebSocket may use
?api_key=KEY) naming its tenant, with the tenant's quotas and priority (file format: `pydoc serve.tenants`);
/health, /metrics and /openapi.json stay open. Without it the server is open: every request is tenant
"default". `dispider-serve hash-key [KEY]` prints the hash of a key for the file (a new key when none given)."""

EPILOG = """\
examples:
  dispider-serve --checkpoint /models/Dispider
  dispider-serve --respond-every 2              # the tiny random test checkpoint, answering every 2nd clip
  dispider-serve --tenants tenants.toml --capacity-file costs.json --scheduling-policy priority
  curl localhost:8000/v1/chat/completions -H 'content-type: application/json' -d '{"model": "dispider",
    "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://.../a.mp4"}},
    {"type": "text", "text": "Tell me when the person picks up the cup."}]}]}'"""


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="dispider-serve", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", metavar="DIR",
                       help="a Dispider checkpoint directory (or one already split); default: a tiny random test "
                            "checkpoint, generated on first use (no real answers)")
    model.add_argument("--split-dir", metavar="DIR",
                       help="where to write the split parts (default: a per-checkpoint dir under $DISPIDER_HOME, "
                            "~/.cache/dispider-vllm)")
    model.add_argument("--served-model-name", default=DEFAULT_MODEL_NAME, metavar="NAME",
                       help=f"the model name clients send (default {DEFAULT_MODEL_NAME!r})")

    net = parser.add_argument_group("network")
    net.add_argument("--host", default=defaults.host, help=f"address to bind (default {defaults.host})")
    net.add_argument("--port", type=int, default=defaults.port, help=f"port (default {defaults.port})")

    engine = parser.add_argument_group("reaction engine (vLLM)")
    engine.add_argument("--dtype", default=defaults.dtype,
                        help="weights dtype: auto (float32 on the CPU, the checkpoint's on a GPU), float16, bfloat16, "
                             "float32")
    engine.add_argument("--max-model-len", type=int, default=defaults.max_model_len, metavar="N",
                        help=f"longest reaction prompt + answer in tokens (default {defaults.max_model_len}; a "
                             "streaming answer's prompt is about 4,400)")
    engine.add_argument("--max-num-seqs", type=int, metavar="N", help="answers generated at once (vLLM's default)")
    engine.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                        help="prompt and answer tokens one vLLM step takes: an answer's prompt (about 4,400 "
                             "positions) is prefilled in chunks of this size (default: 8192 on a GPU, one chunk; "
                             "vLLM's 2048 on the CPU)")
    engine.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                        help="share of each of its GPUs vLLM may take (default: 0.75 of a GPU the sidecar shares, "
                             "0.9 of one it does not)")
    engine.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="GPUs for the reaction model (vLLM tensor parallelism over GPUs 0..N-1; default 1)")
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="no compilation or CUDA graphs (default: on for the CPU, off on a GPU)")
    engine.add_argument("--disable-custom-all-reduce", action="store_true",
                        help="with --tensor-parallel-size > 1: all-reduce through NCCL only, not vLLM's CUDA-IPC "
                             "kernel (for hosts where GPU peer access fails, e.g. some VMs)")
    engine.add_argument("--cpu-kv-cache-gib", type=int, default=defaults.cpu_kv_cache_gib, metavar="GIB",
                        help="KV cache size on the CPU, unless VLLM_CPU_KVCACHE_SPACE is set (default 1)")
    engine.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default=defaults.scheduling_policy,
                        help="order of waiting reactions: fcfs (default), or priority: by the tenant's priority "
                             "from the tenants file (lower first), then arrival")
    engine.add_argument("--reaction-mps-priority", choices=["below_normal", "normal"],
                        default=defaults.reaction_mps_priority,
                        help="when the sidecar shares the reaction's GPU under a CUDA MPS daemon: the reaction's "
                             "client priority (default below_normal: perception and decision kernels go first; "
                             "the sidecar always runs at normal). Without MPS it does nothing (README: GPUs)")
    engine.add_argument("--quantization", choices=["fp8"],
                        help="fp8: the reaction model's weights and activations in FP8 (vLLM's online dynamic FP8 "
                             "of the bf16 checkpoint; a GPU of compute capability 8.9+, e.g. H100/H200, L40S). "
                             "Faster prefill, changed numerics; default off")
    engine.add_argument("--decision-gate-ms", type=float, metavar="MS",
                        help="each vLLM step of the reaction first waits while the sidecar has closed clips to "
                             "decide, at most MS: decisions then share the GPU with at most the reaction step in "
                             "flight, and answers stream slower by what they wait (default: 25 on a GPU the sidecar "
                             "shares with the reaction, 0 (never waits) otherwise; /metrics: dispider_decision_gate_*; "
                             "docs/benchmarks.md, \"The decision gate\")")

    sidecar = parser.add_argument_group("sidecar (perception and decision)")
    sidecar.add_argument("--sidecar-device", default="auto", metavar="DEVICE",
                         help="auto, cpu, cuda, cuda:N (default auto: the first GPU the reaction does not use, "
                              "else GPU 0, shared; the CPU on the CPU build)")
    sidecar.add_argument("--sidecar-threads", type=int, metavar="N",
                         help="torch CPU threads in the sidecar (default: 4 on a GPU host, all cores on the CPU)")
    sidecar.add_argument("--preprocess-on", choices=["auto", "device", "host"], default=defaults.preprocess_on,
                         help="where frames are resized and normalised for CLIP: device (the sidecar's GPU, batched "
                              "with each step; the host only stacks a clip's uint8 frames) or host (threads of the "
                              "sidecar process, --preprocess-workers). Default auto: device on a GPU, host on the CPU")
    sidecar.add_argument("--preprocess-workers", type=int, default=defaults.preprocess_workers, metavar="N",
                         help="with host preprocessing: threads preprocessing each sampled frame as it arrives (and "
                              "stacking a closed clip's) in the sidecar, beside the GPU's work "
                              f"(default {defaults.preprocess_workers}; 0: on the sidecar's loop)")
    sidecar.add_argument("--frame-perception", choices=["auto", "arrival", "prefill", "clip"],
                         default=defaults.frame_perception,
                         help="when the CLIP tower sees a frame: arrival (soon after the frame arrives, batched with "
                              "every stream's new frames, so a closing clip is left with the compact model's pass and "
                              "the decision; needs device preprocessing; holds each clip in progress on the GPU, 8 MB "
                              "at real shapes), prefill (experimental: as arrival, and the compact model's pass over "
                              "the clip's time prompt and each frame's raw tokens as well, into a K/V cache per clip "
                              "in progress, ~37 MB more per stream at real shapes; a shorter close, but slower overall "
                              "on an H200: docs/benchmarks.md) or clip (over a clip's 16 frames when it closes). "
                              "Default auto: arrival with device preprocessing, else clip")
    sidecar.add_argument("--sidecar-kv-slots", type=int, default=defaults.sidecar_kv_slots, metavar="N",
                         help="streams whose decision KV caches the sidecar allocates at start (default "
                              f"{defaults.sidecar_kv_slots}; about 29 MB each at real shapes; past them the pool doubles, "
                              "which also recaptures its CUDA graphs: set it to the streams you expect; a count its "
                              "memory cannot hold is refused at start; with --frame-perception prefill the prefix "
                              "pool has as many slots, ~37 MB each)")
    sidecar.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                         help="run the sidecar's small steps eagerly instead of replaying CUDA graphs (GPU only; "
                              "DISPIDER_CUDA_GRAPHS=0 does the same)")
    sidecar.add_argument("--sidecar-lanes", action="store_true",
                         help="experimental: the CLIP tower's passes over arrived frames that no closed clip waits "
                              "for on a low-priority CUDA stream, a closing clip's work on a high-priority one (GPU "
                              "only; DISPIDER_SIDECAR_LANES=0 keeps one stream). Off by default: on an H200 it was "
                              "no faster and its tail was longer (docs/benchmarks.md)")
    sidecar.add_argument("--sidecar-schedule", choices=["closes-first", "together"], default=defaults.sidecar_schedule,
                         help="with --frame-perception arrival/prefill, when the frames go through the CLIP tower: "
                              "closes-first (a step passes only the closed clips' own waiting frames, most often their "
                              "last, decides those clips, and only then passes at most 32 of the other streams' "
                              "frames, so a close waits behind one short pass at most) or together (a step passes all "
                              "waiting frames, up to 512, then decides the closed clips: the schedule before). "
                              f"Default {defaults.sidecar_schedule}")
    sidecar.add_argument("--sidecar-turn-log", metavar="PATH",
                         help="write a JSON line for every turn of the sidecar's loop (commands taken in, step time, "
                              "clips) to PATH, to lay slow decisions against (benchmarks/turn_timeline.py); off by "
                              "default")
    sidecar.add_argument("--sidecar-quantization", choices=["fp8"],
                         help="fp8: the sidecar's matmuls (CLIP, projector, compact LLM) with FP8 weights and "
                              "per-call FP8 activations (dispider_vllm/fp8.py; on a GPU it needs compute capability "
                              "8.9+). Faster perception and decision, changed numerics; default off")
    sidecar.add_argument("--frame-ring-mb", type=int, default=defaults.frame_ring_mb, metavar="MIB",
                         help="shared memory (in /dev/shm) that carries pushed frames' pixels to the sidecar "
                              f"process; only their place goes through its pipe (default {defaults.frame_ring_mb}; "
                              "cut to half of what /dev/shm has free; a frame that does not fit goes through the "
                              "pipe; 0: every frame pickled through the pipe)")
    sidecar.add_argument("--max-batch-clips", type=int, default=defaults.max_batch_clips, metavar="N",
                         help=f"clips of all streams perceived in one batch (default {defaults.max_batch_clips})")
    sidecar.add_argument("--max-kept-clips", type=int, default=defaults.max_kept_clips, metavar="N",
                         help="per stream: the last N clips whose features are kept for retrieval and an answer's "
                              f"global memory (default {defaults.max_kept_clips}: about 8.5 minutes of 16-s clips). "
                              "A kept clip costs about 8.6 MB at the real model's shapes in 16-bit, nearly all of it "
                              "raw CLIP features in host memory: 32 clips are about 275 MB a stream")
    # "%%": argparse formats help texts with %.
    sidecar.add_argument("--kept-clips-memory-gib", type=float, metavar="GIB",
                         help="memory for the kept clips of all streams together (about 8.6 MB a clip at real "
                              "shapes: 1 GiB holds about 125). Over it, the stream keeping the most clips loses its "
                              "oldest, never below the 4 a trigger retrieves; /metrics shows the kept clips, their "
                              "bytes and the evictions. Default: "
                              f"{KEPT_CLIPS_HOST_MEMORY_SHARE * 100:.0f}%% of the host's memory "
                              f"({KEPT_CLIPS_HOST_MEMORY_SHARE * host_memory_bytes() / (1 << 30):.1f} GiB here)")
    forced = sidecar.add_mutually_exclusive_group()
    forced.add_argument("--respond-every", type=int, metavar="N",
                        help="for load tests and demos with random weights: force an answer every N clips instead "
                             "of the model's own decision")
    forced.add_argument("--respond-probability", type=float, metavar="P",
                        help="or answer each clip with probability P, independently per stream (seeded by stream and "
                             "clip): streams started together do not all answer at the same clip, as real ones would "
                             "not")

    requests = parser.add_argument_group("requests and sessions")
    requests.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens, metavar="N",
                          help=f"tokens per answer when a request does not say (default {defaults.default_max_tokens})")
    requests.add_argument("--max-upload-mb", type=int, default=defaults.max_upload_mb, metavar="MB",
                          help=f"largest request body, fetched video or frame (default {defaults.max_upload_mb}); "
                               "larger gets 413")
    requests.add_argument("--allowed-local-media-path", metavar="DIR",
                          help="let requests name local videos (a path or file:// URL) under DIR; off by default")
    requests.add_argument("--media-fetch-timeout", type=float, default=defaults.media_fetch_timeout_s,
                          metavar="S",
                          help=f"timeout for fetching http(s) videos (default {defaults.media_fetch_timeout_s:g} s)")
    requests.add_argument("--max-sessions", type=int, default=defaults.max_sessions, metavar="N",
                          help=f"live sessions and chat streams at once, a hard cap (default {defaults.max_sessions}); "
                               "more get 503")
    requests.add_argument("--session-idle-timeout", type=float, default=defaults.session_idle_timeout_s, metavar="S",
                          help=f"close a live session after S seconds without input or reader "
                               f"(default {defaults.session_idle_timeout_s:g})")
    requests.add_argument("--keep-alive", type=int, default=defaults.keep_alive_s, metavar="S",
                          help="seconds an idle HTTP connection stays open (default "
                               f"{defaults.keep_alive_s}: a camera pushing a frame a second keeps one connection, and "
                               "no client reuses one just as the server closes it; uvicorn's own default is 5)")
    requests.add_argument("--http", choices=["auto", "httptools", "h11"], default=defaults.http,
                          help="HTTP/1.1 parser: httptools (C; the server's CPU per pushed frame 2.0 ms against "
                               "2.5 ms with h11 on a 2-core CPU host, docs/benchmarks.md) or h11 (pure Python). "
                               "Default auto: httptools when installed (a dependency of this package), else h11")
    requests.add_argument("--access-log", choices=list(ACCESS_LOG_MODES), default=defaults.access_log,
                          help="uvicorn's line per request: all, except-frames (every request but accepted frame "
                               "pushes, a line a second per camera otherwise) or off (default except-frames)")
    requests.add_argument("--switch-interval", type=float, default=defaults.switch_interval_ms, metavar="MS",
                          help="how long one thread of the server's process may hold Python's GIL while another "
                               "waits for it (sys.setswitchinterval; default Python's own, 5 ms). With "
                               "--decode-frames-in server each pushed frame is decoded on a worker thread, which waits "
                               "for the GIL at every hand-off while the event loop is busy; but 1 ms doubled a push's time in the "
                               "server at 704 streams on an H200 (docs/benchmarks.md): for measurements, not tuning")
    requests.add_argument("--decode-frames-in", choices=["sidecar", "server"], default=defaults.decode_frames_in,
                          help="where a pushed JPEG/PNG/WebP frame is decoded. sidecar (default): the server reads "
                               "only its header (format, size: a bad one is refused with 400 at once) and the "
                               "sidecar's process decodes it, so the server's interpreter spends no time on it; an "
                               "image that breaks past its header is then an 'invalid_frame' error event on the "
                               "session's stream. server: decoded on the server's threads before the push is "
                               "answered (every undecodable image a 400)")
    requests.add_argument("--event-buffer", type=int, default=defaults.event_buffer, metavar="N",
                          help="events kept per session for readers that connect late "
                               f"(default {defaults.event_buffer})")
    requests.add_argument("--blocking-reaction", action="store_true",
                          help="a baseline for benchmarks: the reaction holds the session's perception and decision "
                               "while it answers, as VideoLLM-online does (frames wait in the server until the "
                               "answer ends); the default for live sessions, which may set \"blocking_reaction\" "
                               "themselves (default off)")
    tenancy = parser.add_argument_group("tenants and capacity")
    tenancy.add_argument("--tenants", metavar="FILE",
                         help="tenants, their hashed API keys, quotas and priority (TOML or JSON; see `pydoc "
                              "serve.tenants`); default: open mode, no keys, every request is tenant 'default'")
    tenancy.add_argument("--capacity-streams", type=int, metavar="N",
                         help="streams (live sessions + chat completions) the server runs at once without falling "
                              "behind real time; more get 503 + Retry-After (default: --max-sessions)")
    tenancy.add_argument("--capacity-file", metavar="FILE",
                         help="or: a cost file calibrated by the benchmarks (sidecar clips/s, reaction tokens/s, "
                              "...) from which the capacity is computed (formula: `pydoc serve.admission`), or a "
                              "load_streams.py sweep measured on this GPU (benchmarks/results/streams_h200.json)")
    tenancy.add_argument("--capacity-bound", choices=list(CAPACITY_BOUNDS), default=defaults.capacity_bound,
                         help="with a sweep as --capacity-file: admit its largest real-time N (realtime, the "
                              "default) or its largest real-time N whose median decision latency stayed within the "
                              "sweep's --idle-factor (1.5) of the idle server's (latency)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level (default info)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        checkpoint=args.checkpoint, split_dir=args.split_dir, served_model_name=args.served_model_name,
        host=args.host, port=args.port,
        dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager, cpu_kv_cache_gib=args.cpu_kv_cache_gib,
        disable_custom_all_reduce=args.disable_custom_all_reduce,
        sidecar_device=args.sidecar_device, sidecar_threads=args.sidecar_threads,
        preprocess_on=args.preprocess_on, preprocess_workers=args.preprocess_workers,
        frame_perception=args.frame_perception, sidecar_kv_slots=args.sidecar_kv_slots,
        cuda_graphs=args.cuda_graphs, sidecar_lanes=args.sidecar_lanes,
        sidecar_schedule=args.sidecar_schedule, sidecar_turn_log=args.sidecar_turn_log,
        sidecar_quantization=args.sidecar_quantization, quantization=args.quantization,
        decision_gate_ms=args.decision_gate_ms,
        frame_ring_mb=args.frame_ring_mb,
        max_batch_clips=args.max_batch_clips, max_kept_clips=args.max_kept_clips,
        kept_clips_memory_gib=args.kept_clips_memory_gib, respond_every=args.respond_every,
        respond_probability=args.respond_probability,
        default_max_tokens=args.default_max_tokens, max_upload_mb=args.max_upload_mb,
        allowed_local_media_path=args.allowed_local_media_path, media_fetch_timeout_s=args.media_fetch_timeout,
        max_sessions=args.max_sessions, session_idle_timeout_s=args.session_idle_timeout,
        keep_alive_s=args.keep_alive, http=args.http, access_log=args.access_log,
        switch_interval_ms=args.switch_interval, decode_frames_in=args.decode_frames_in,
        event_buffer=args.event_buffer, blocking_reaction=args.blocking_reaction,
        scheduling_policy=args.scheduling_policy, reaction_mps_priority=args.reaction_mps_priority,
        tenants_file=args.tenants,
        capacity_streams=args.capacity_streams, capacity_file=args.capacity_file,
        capacity_bound=args.capacity_bound, log_level=args.log_level,
    )


def _unwritable(path: Path) -> str | None:
    """Why a log file could not be appended to at ``path`` (None: it can), asked before the models load."""
    if path.is_dir():
        return "is a directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            return None
    except OSError as error:
        return error.strerror or str(error)


def vllm_default_max_num_seqs() -> int:
    """vLLM's answers at once for an engine built from its arguments, as the reaction's is."""
    from vllm.config.scheduler import SchedulerConfig

    return SchedulerConfig.DEFAULT_MAX_NUM_SEQS


def _check(parser: argparse.ArgumentParser, config: ServerConfig) -> str:
    """Refuse bad settings; say which tenancy, capacity and placement the server runs with."""
    positive = {"--max-upload-mb": config.max_upload_mb, "--max-sessions": config.max_sessions,
                "--default-max-tokens": config.default_max_tokens, "--event-buffer": config.event_buffer,
                "--max-model-len": config.max_model_len, "--sidecar-kv-slots": config.sidecar_kv_slots,
                "--max-kept-clips": config.max_kept_clips, "--keep-alive": config.keep_alive_s}
    optional = {"--respond-every": config.respond_every, "--capacity-streams": config.capacity_streams,
                "--max-num-seqs": config.max_num_seqs, "--max-num-batched-tokens": config.max_num_batched_tokens}
    positive.update({flag: value for flag, value in optional.items() if value is not None})  # None: not given
    for flag, value in positive.items():
        if value < 1:
            parser.error(f"{flag} must be >= 1")
    if config.max_num_batched_tokens is not None:  # vLLM refuses this deep in its start; say it here
        answers = config.max_num_seqs or vllm_default_max_num_seqs()
        if config.max_num_batched_tokens < answers:
            parser.error(f"--max-num-batched-tokens {config.max_num_batched_tokens} is below the answers vLLM "
                         f"generates at once ({answers}, --max-num-seqs): a step must hold a token of each")
    gib = config.kept_clips_memory_gib
    if gib is not None and not (math.isfinite(gib) and gib > 0):
        parser.error(f"--kept-clips-memory-gib must be > 0 (GiB of memory for all streams' kept clips), not {gib:g}")
    for flag, value in {"--preprocess-workers": config.preprocess_workers,
                        "--frame-ring-mb": config.frame_ring_mb}.items():
        if value < 0:
            parser.error(f"{flag} must be >= 0")
    if config.frame_perception in ("arrival", "prefill") and config.preprocess_on == "host":
        parser.error(f"--frame-perception {config.frame_perception} takes frames as they came, for the GPU to "
                     "preprocess: it does not go with --preprocess-on host")
    gate = config.decision_gate_ms
    if gate is not None and not (math.isfinite(gate) and 0 <= gate <= MAX_DECISION_GATE_MS):
        parser.error(f"--decision-gate-ms must be between 0 (off) and {MAX_DECISION_GATE_MS} ms, not {gate:g}")
    interval = config.switch_interval_ms
    if interval is not None and not (math.isfinite(interval) and 0.01 <= interval <= 1000):
        parser.error(f"--switch-interval must be between 0.01 and 1000 ms, not {interval:g}")
    if config.http == "httptools" and not installed("httptools"):
        parser.error("--http httptools: the httptools package is not installed (pip install httptools)")
    if config.respond_probability is not None and not 0 <= config.respond_probability <= 1:
        parser.error("--respond-probability must be between 0 and 1")
    if config.sidecar_turn_log and (problem := _unwritable(Path(config.sidecar_turn_log))):
        parser.error(f"--sidecar-turn-log {config.sidecar_turn_log}: {problem}")
    try:  # a bad tenants or cost file stops the server here, before the models load
        directory = config.tenant_directory()
        capacity = config.stream_capacity()
    except ValueError as error:
        parser.error(str(error))
    try:  # likewise a placement the host cannot give (GPUs it does not have)
        placement = host_placement(config)
    except PlacementError as error:
        parser.error(str(error))
    if config.quantization and placement.reaction_devices[0] == "cpu":
        parser.error(f"--quantization {config.quantization} needs a GPU: vLLM runs the reaction on the CPU here")
    tenants = "open mode (no API keys)" if directory.open else f"{len(directory.tenants)} tenants"
    summary = (f"{tenants}; capacity {capacity} streams; reaction on {', '.join(placement.reaction_devices)}, "
               f"sidecar on {placement.sidecar_device}")
    if config.scheduling_policy != "priority" and any(t.priority for t in directory.tenants.values()):
        summary += "; tenant priorities are ignored without --scheduling-policy priority"
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-key"]:  # `dispider-serve hash-key [KEY]`: a key's hash for the tenants file
        from serve.tenants import main as tenants_main

        tenants_main(argv)
        return
    parser = build_parser()
    config = config_from_args(parser.parse_args(argv))
    tenancy = _check(parser, config)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    log = logging.getLogger("dispider.serve")
    log.info("dispider-serve starting: checkpoint %s; %s", config.checkpoint or "(tiny random test checkpoint)",
             tenancy)
    parts = resolve_model_parts(config)
    log.info("reaction part %s; perception/decision part %s", parts.reaction_dir, parts.perception_decision_dir)

    import uvicorn

    from serve.app import build_app, make_backends

    if config.switch_interval_ms is not None:  # process-wide; the sidecar and vLLM's engine core keep their own
        sys.setswitchinterval(config.switch_interval_ms / 1000)
    app = build_app(config, make_backends(config, parts))
    frontend = frontend_features(config.http, config.decode_frames_in)
    log.info("HTTP: %s", ", ".join(f"{k} {v}" for k, v in frontend.items()))
    server = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level,
        ws_max_size=config.max_upload_bytes * 4 // 3 + 4096,  # a frame message: a base64 image and a little JSON
        timeout_graceful_shutdown=10, timeout_keep_alive=config.keep_alive_s, http=config.http,
        access_log=config.access_log != "off",
    )  # uvicorn sets its loggers up here: the access log's filter goes on after
    filter_access_log(config.access_log)
    uvicorn.Server(server).run()


if __name__ == "__main__":
    main()
