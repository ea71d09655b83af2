"""The Starlette app: OpenAI-compatible chat completions, live sessions, models, health, metrics, OpenAPI.

``build_app(config, parts)`` returns the app; its lifespan starts the sidecar (perception + decision) and the
reaction engine, and stops both at shutdown. Routes (bodies in :mod:`serve.openapi`):

    POST   /v1/chat/completions            a video + a question -> every proactive answer (streamed or not)
    POST   /v1/sessions                    open a live session                  -> 201 session
    GET    /v1/sessions/{id}               its state
    DELETE /v1/sessions/{id}               close it now
    POST   /v1/sessions/{id}/frames        an image, JSON frames, or an encoded video chunk -> 202
    POST   /v1/sessions/{id}/questions     ask a new question
    POST   /v1/sessions/{id}/end           end of stream: the rest is decided and answered, then `end`
    GET    /v1/sessions/{id}/events        Server-Sent Events: decision, chunk, response_end, error, end
    WS     /v1/sessions/{id}/ws            frames/questions/end in, the same events out
    GET    /v1/models, /health, /metrics, /openapi.json

Every route but /health, /metrics and /openapi.json needs the API key of a tenant when the server runs with a
tenants file (:mod:`serve.auth`, :mod:`serve.tenants`); a tenant sees only its own sessions, within its quotas
(:mod:`serve.quotas`), and new streams are admitted up to the server's capacity (:mod:`serve.admission`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from dispider_vllm.decision_gate import DecisionGate
from dispider_vllm.gc_pauses import GcPauseMeter, freeze_startup_heap
from dispider_vllm.reaction.engine import ReactionEngine, ReactionEngineConfig
from dispider_vllm.sidecar.client import SidecarClient, SidecarConfig

from serve import chat
from serve.admission import Admission
from serve.auth import TenantAuth, install_log_redaction, tenant_of
from serve.config import ModelParts, ServerConfig, frontend_features
from serve.errors import (
    APIError,
    api_error_handler,
    bad_request,
    client_gone_handler,
    http_error_handler,
    internal_error_handler,
    unsupported_media,
)
from serve.loop_watch import LoopWatch
from serve.media import (
    IMAGE_TYPES,
    MediaLimits,
    decode_base64,
    image_frame,
    frames_from_json,
    is_video_type,
    media_type,
    parse_timestamp,
    probe,
    read_body,
    read_json_object,
    require_image_type,
)
from serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serve.metrics import ServerMetrics
from serve.openapi import openapi_schema
from serve.placement import Placement, host_placement
from serve.quotas import QuotaBook, TenantUsage
from serve.sessions import Session, SessionLimits, SessionManager, SessionOptions

log = logging.getLogger("dispider.serve")

KEEPALIVE_S = 15.0


# ---- the two back ends ------------------------------------------------------------------------------------------
@dataclass
class Backends:
    sidecar: SidecarClient
    engine: ReactionEngine
    placement: Placement
    decision_gate: DecisionGate | None = None  # the sidecar holds it, the reaction's steps wait at it


# On a GPU an answer's whole prompt (about 4,400 positions) is prefilled in one vLLM step, as vLLM's own OpenAI
# server does on an H100/H200: at 832 streams on an H200 the p99 time to first token was 2-3x lower than with the
# 2048 this engine otherwise gets, and the p99 decision latency lower too (docs/benchmarks.md, "The reaction's
# prefill chunk").
GPU_MAX_NUM_BATCHED_TOKENS = 8192


def reaction_batched_tokens(requested: int | None, on_cpu: bool) -> int | None:
    """vLLM's ``max_num_batched_tokens`` for the reaction: as asked, else 8192 on a GPU, vLLM's default on the CPU."""
    if requested is not None or on_cpu:
        return requested
    return GPU_MAX_NUM_BATCHED_TOKENS


# On a GPU the sidecar shares, each reaction step waits up to this long while closed clips are decided: on an
# H200 at 352 and 512 streams the median decision was 0.83x and 0.43x of the ungated server's (docs/benchmarks.md,
# "The decision gate"), at the cost of slower answer streaming.
SHARED_GPU_DECISION_GATE_MS = 25.0


def decision_gate_ms(requested: float | None, placement: Placement) -> float:
    """How long a reaction step may wait for the sidecar's decisions: as asked, else 25 ms where the two share a GPU
    (nothing to gain where they do not, nor measured on the CPU)."""
    if requested is not None:
        return requested
    shares_gpu = placement.platform != "cpu" and placement.sidecar_shares_gpu
    return SHARED_GPU_DECISION_GATE_MS if shares_gpu else 0.0


def make_backends(config: ServerConfig, parts: ModelParts) -> Backends:
    placement = host_placement(config)  # serve.placement: which GPUs the reaction takes, where the sidecar goes
    on_cpu = placement.platform == "cpu"
    log.info("placement: %s", placement.describe())
    gate_ms = decision_gate_ms(config.decision_gate_ms, placement)
    gate = DecisionGate.create() if gate_ms > 0 else None
    sidecar = SidecarClient(SidecarConfig(
        part_dir=str(parts.perception_decision_dir),
        device=placement.sidecar_device,
        dtype="float32" if placement.sidecar_device == "cpu" else "bfloat16",
        max_batch_clips=config.max_batch_clips,
        max_kept_clips=config.max_kept_clips,
        kept_clips_budget_bytes=config.kept_clips_budget_bytes,
        respond_every=config.respond_every,
        respond_probability=config.respond_probability,
        threads=placement.sidecar_threads,
        preprocess_on=config.preprocess_on,
        preprocess_workers=config.preprocess_workers,
        frame_perception=config.frame_perception,
        kv_slots=config.sidecar_kv_slots,
        # On a GPU it shares, the sidecar may take what vLLM leaves (its KV slots are checked against it at start).
        memory_share=1 - placement.gpu_memory_utilization if placement.sidecar_shares_gpu else None,
        cuda_graphs=config.cuda_graphs,
        lanes=config.sidecar_lanes,
        schedule=config.sidecar_schedule,
        turn_log=config.sidecar_turn_log,
        quantization=config.sidecar_quantization,
        frame_ring_mb=config.frame_ring_mb,
        decision_gate=gate.name if gate else None,
    ))
    engine = ReactionEngine(ReactionEngineConfig(
        model_dir=str(parts.reaction_dir),
        dtype=config.dtype if config.dtype != "auto" else ("float32" if on_cpu else "auto"),
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=reaction_batched_tokens(config.max_num_batched_tokens, on_cpu),
        gpu_memory_utilization=placement.gpu_memory_utilization,
        tensor_parallel_size=placement.tensor_parallel_size,
        enforce_eager=on_cpu if config.enforce_eager is None else config.enforce_eager,
        disable_custom_all_reduce=config.disable_custom_all_reduce,
        cpu_kv_cache_gib=config.cpu_kv_cache_gib,
        scheduling_policy=config.scheduling_policy,
        mps_client_priority=config.reaction_mps_priority,
        quantization=config.quantization,
        decision_gate=gate.name if gate else None,
        decision_gate_ms=gate_ms,
    ))
    return Backends(sidecar, engine, placement, gate)


async def start_backends(backends: Backends) -> None:
    """Start both at once: the sidecar loads in its own process while the engine builds (which blocks)."""
    log.info("starting the sidecar (perception + decision) from %s", backends.sidecar.config.part_dir)
    sidecar_ready = asyncio.create_task(backends.sidecar.start())
    await asyncio.sleep(0)  # lets the sidecar process spawn before the engine build blocks the loop
    log.info("starting the reaction engine (vLLM) from %s", backends.engine.config.model_dir)
    started = time.monotonic()
    try:
        await backends.engine.start()
        log.info("reaction engine up in %.0f s", time.monotonic() - started)
        ready = await sidecar_ready
    except BaseException:
        await stop_backends(backends)  # neither process outlives a failed start
        raise
    log.info("sidecar up on %s (%s)", ready.device, ready.model)
    log.info("%s", kept_clips_line(ready.features))


def kept_clips_line(features: dict) -> str:
    """The kept clips' budget at start, and how many clips it holds at the checkpoint's shapes."""
    budget, per_clip = features.get("kept_clips_budget_bytes"), features.get("kept_clip_bytes")
    per_stream = f"at most {features.get('max_kept_clips')} a stream"
    if budget is None:
        return f"kept clips: no budget over all streams, {per_stream}"
    line = f"kept clips: budget {budget / (1 << 30):.1f} GiB over all streams"
    if per_clip:
        line += f", {budget // per_clip:,} clips of {per_clip / 1e6:.2f} MB at this checkpoint's shapes"
    return f"{line}, {per_stream}"


async def stop_backends(backends: Backends) -> None:
    await backends.sidecar.stop()
    backends.engine.shutdown()
    gate, backends.decision_gate = backends.decision_gate, None  # a scrape from now on sees no gate
    if gate is not None:  # both processes that attached it are gone
        gate.close()


# ---- the app ---------------------------------------------------------------------------------------------------------
def build_app(config: ServerConfig, backends: Backends) -> Starlette:
    metrics = ServerMetrics()
    gc_pauses = GcPauseMeter()
    metrics.watch(backends.sidecar.is_alive, backends.engine.is_alive, lambda: backends.sidecar.last_stats,
                  server_gc_pauses=gc_pauses.snapshot, frames_sent=lambda: dict(backends.sidecar.frames_sent))
    metrics.watch_decision_gate(lambda: backends.decision_gate.counts() if backends.decision_gate else None)
    directory = config.tenant_directory()
    admission = Admission(config.stream_capacity())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        install_log_redaction()  # uvicorn has configured its loggers by now
        await start_backends(backends)
        app.state.sessions = SessionManager(
            backends.sidecar, backends.engine, metrics, model=config.served_model_name,
            limits=SessionLimits(config.session_idle_timeout_s, config.event_buffer), admission=admission,
        )
        log.info("%s; admitting %d streams at once",
                 "open mode: no API keys" if directory.open else f"tenants: {', '.join(sorted(directory.tenants))}",
                 admission.capacity)
        reaper = asyncio.create_task(app.state.sessions.reap_forever())
        freeze_startup_heap()  # vLLM's frontend and the models' configs stay for good: no collection walks them again
        loop_watch = LoopWatch(metrics.loop_lag, metrics.loop_stalls)
        loop_watch.start()
        log.info("ready: serving %r at %s (OpenAI base URL %s/v1)", config.served_model_name, config.url, config.url)
        try:
            yield
        finally:
            loop_watch.stop()
            reaper.cancel()
            await app.state.sessions.close_all()
            await stop_backends(backends)
            gc_pauses.close()
            log.info("stopped")

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={APIError: api_error_handler, HTTPException: http_error_handler,
                            ClientDisconnect: client_gone_handler, Exception: internal_error_handler},
        middleware=[Middleware(TenantAuth, directory=directory, count_error=metrics.count_error)],
    )
    app.state.config = config
    app.state.quotas = QuotaBook(on_refusal=metrics.count_quota_refusal)
    app.state.backends = backends
    app.state.metrics = metrics
    app.state.started = int(time.time())
    app.state.media_limits = MediaLimits(
        max_bytes=config.max_upload_bytes,
        allowed_local_path=Path(config.allowed_local_media_path) if config.allowed_local_media_path else None,
        fetch_timeout_s=config.media_fetch_timeout_s,
    )
    return app


# ---- models, health, metrics, schema -------------------------------------------------------------------------------
def _model_object(request: Request) -> dict:
    return {"id": request.app.state.config.served_model_name, "object": "model",
            "created": request.app.state.started, "owned_by": "dispider-vllm"}


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_object(request)]})


async def get_model(request: Request) -> Response:
    model = request.path_params["model"]
    if model != request.app.state.config.served_model_name:
        raise APIError(404, f"The model `{model}` does not exist.", "model_not_found", "model")
    return JSONResponse(_model_object(request))


async def health(request: Request) -> Response:
    backends: Backends = request.app.state.backends
    sidecar, engine = backends.sidecar.is_alive(), backends.engine.is_alive()
    status = "ok" if sidecar and engine else "unhealthy"
    ready = backends.sidecar.ready_info
    body = {"status": status, "sidecar": sidecar, "engine": engine,
            "placement": {**backends.placement.describe(), "server_pid": os.getpid(), "sidecar_pid": backends.sidecar.pid,
                          "frame_ring_mib": backends.sidecar.frame_ring_mib},
            "sidecar_features": ready.features if ready else None,
            "reaction_features": backends.engine.features(),
            "frontend": frontend_features(request.app.state.config.http, request.app.state.config.decode_frames_in)}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


async def metrics_text(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi_schema(request.app.state.config.served_model_name))


# ---- sessions --------------------------------------------------------------------------------------------------------
def usage_of(connection: HTTPConnection) -> TenantUsage:
    """The quotas of the tenant whose key the request carries."""
    return connection.app.state.quotas.usage(tenant_of(connection))


def _session(connection: HTTPConnection) -> Session:
    """The session named in the path, if it is the caller's tenant's (else the same 404 as an unknown id)."""
    return connection.app.state.sessions.get(connection.path_params["session_id"], tenant_of(connection).name)


def _accepting(session: Session) -> Session:
    if not session.accepts_input:
        raise APIError(409, f"session {session.id} has ended; it takes no more input", "session_ended")
    return session


def _question(body: dict, name: str = "question") -> str:
    question = body.get(name)
    if not isinstance(question, str) or not question.strip():
        raise bad_request(f"'{name}' must be a non-empty string", "missing_question", name)
    return question.strip()


def session_options(body: dict, config: ServerConfig) -> SessionOptions:
    """``{question, clip_mode?, max_tokens?, temperature?, stop?, include_previous_answers?, blocking_reaction?}``,
    read as in chat."""
    return SessionOptions(
        question=_question(body),
        clip_mode=chat.parse_clip_mode(body.get("clip_mode")),
        blocking_reaction=_blocking_reaction(body.get("blocking_reaction"), config.blocking_reaction),
        **chat.generation_fields(body, config.default_max_tokens),
    )


def _blocking_reaction(value: object, default: bool) -> bool:
    """The benchmark baseline (``--blocking-reaction`` by default): input waits while the session answers."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request("'blocking_reaction' must be true or false", "invalid_parameter", "blocking_reaction")
    return value


async def create_session(request: Request) -> Response:
    state = request.app.state
    body = await read_json_object(request, state.config.max_upload_bytes)
    session = state.sessions.open(session_options(body, state.config), usage_of(request))
    return JSONResponse(session.describe(), status_code=201)


async def get_session(request: Request) -> Response:
    return JSONResponse(_session(request).describe())


async def delete_session(request: Request) -> Response:
    session = _session(request)
    await request.app.state.sessions.remove(session, "deleted")
    return JSONResponse({"id": session.id, "object": "session.deleted", "deleted": True})


async def push_frames(request: Request) -> Response:
    """An image (``?timestamp=``), JSON ``{"frames": [...]}``, or a video chunk (``?time_offset=``)."""
    session = _accepting(_session(request))
    usage = usage_of(request)
    max_bytes = request.app.state.config.max_upload_bytes
    kind = media_type(request.headers.get("content-type"))
    timing: dict[str, str] = {}
    # The frame quota is taken before the decoding: a refused push costs the server nothing more.
    if kind == "application/json":
        body = await read_json_object(request, max_bytes)
        usage.take_frames(len(body["frames"]) if isinstance(body.get("frames"), list) else 0)
        frames = await frames_from_json(body, max_bytes, request.app.state.config.decode_frames_in)
        session.push_frames(frames)
        accepted = len(frames)
    elif kind.startswith("image/"):
        require_image_type(kind)
        timestamp = _timestamp_param(request, session)
        phases = request.app.state.metrics.frame_push
        started = time.perf_counter()
        data = await read_body(request, max_bytes)
        read = time.perf_counter()
        usage.take_frames(1)
        frame = await image_frame(data, timestamp, request.app.state.config.decode_frames_in)
        decoded = time.perf_counter()
        session.push_frames([frame])
        accepted = 1
        # Where a slow push waits: its body, the decoding threads, or the rest (timed per phase, /metrics).
        phases.labels(phase="read").observe(read - started)
        phases.labels(phase="decode").observe(decoded - read)
        handled = time.perf_counter() - started
        phases.labels(phase="handled").observe(handled)
        # The client can then tell its round trip's time in this handler from the time outside it.
        timing = {"Server-Timing": f"handled;dur={handled * 1000:.1f}"}
    elif is_video_type(kind):
        data = await read_body(request, max_bytes)
        info = await probe(data, max_bytes)
        offset = parse_timestamp(request.query_params.get("time_offset", session.last_timestamp or 0.0), "time_offset")
        usage.take_video_frames(info.duration, info.fps)
        session.push_encoded(data, offset, info.duration)
        accepted = 0
    else:
        raise unsupported_media(
            f"frames are sent as {', '.join(IMAGE_TYPES)}, application/json, or a video chunk (video/*, "
            f"application/octet-stream); got {kind or 'no content type'!r}"
        )
    return JSONResponse({"id": session.id, "object": "session.frames", "accepted_frames": accepted,
                         "last_timestamp": session.last_timestamp}, status_code=202, headers=timing)


def _timestamp_param(request: Request, session: Session) -> float:
    value = request.query_params.get("timestamp")
    if value is None:  # a camera that does not say: the time since the session opened
        return max(time.time() - session.created, session.last_timestamp or 0.0)
    return parse_timestamp(value, "timestamp")


async def ask_question(request: Request) -> Response:
    session = _accepting(_session(request))
    body = await read_json_object(request, request.app.state.config.max_upload_bytes)
    session.ask(_question(body))
    return JSONResponse(session.describe())


async def end_session(request: Request) -> Response:
    session = _session(request)
    session.end()
    return JSONResponse(session.describe(), status_code=202)


async def session_events(request: Request) -> Response:
    session = _session(request)
    last_seen = request.headers.get("last-event-id", "")
    after = int(last_seen) if last_seen.isdigit() else -1
    return StreamingResponse(_sse_events(session, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse_events(session: Session, after: int):
    session.readers += 1
    try:
        async for item in session.events.follow(after, keepalive_s=KEEPALIVE_S):
            if item is None:
                yield chat.SSE_KEEPALIVE
                continue
            seq, event = item
            name, data = chat.event_payload(session, event)
            yield chat.sse(name, data, seq)
    finally:
        session.readers -= 1


# ---- the WebSocket --------------------------------------------------------------------------------------------------
async def session_websocket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        session = _session(websocket)
    except APIError as error:
        await websocket.send_json({"event": "error", "data": error.body()})
        await websocket.close(code=4404, reason=error.code)
        return
    session.readers += 1
    sender = asyncio.create_task(_send_events(websocket, session))
    try:
        await _receive_commands(websocket, session)
        await sender  # after "end": every remaining event, up to `end`
    except WebSocketDisconnect:
        pass
    finally:
        session.readers -= 1
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def _send_events(websocket: WebSocket, session: Session) -> None:
    async for item in session.events.follow():
        seq, event = item
        name, data = chat.event_payload(session, event)
        await websocket.send_json({"event": name, "id": seq, "data": data})
    await websocket.close()


async def _receive_commands(websocket: WebSocket, session: Session) -> None:
    """Client messages until it sends ``end`` (or goes away). A bad message gets an error reply, nothing more."""
    config = websocket.app.state.config
    usage = usage_of(websocket)
    while True:
        text = await websocket.receive_text()
        try:
            message = _ws_message(text)
            if await _apply_ws_message(session, usage, message, config):
                return
        except APIError as error:
            websocket.app.state.metrics.count_error(error.code)
            await websocket.send_json({"event": "error", "data": error.event_data()})


def _ws_message(text: str) -> dict:
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        raise bad_request(f"a message is a JSON object: {error}", "invalid_json") from None
    if not isinstance(message, dict):
        raise bad_request("a message is a JSON object with a 'type'", "invalid_json")
    return message


async def _apply_ws_message(session: Session, usage: TenantUsage, message: dict, config: ServerConfig) -> bool:
    """Apply one client message; True when it was ``end``."""
    kind = message.get("type")
    if kind == "end":
        session.end()
        return True
    _accepting(session)
    if kind == "frame":
        timestamp = parse_timestamp(message.get("timestamp"), "timestamp")
        usage.take_frames(1)
        image = decode_base64(message.get("image"), "image", config.max_upload_bytes)
        session.push_frames([await image_frame(image, timestamp, config.decode_frames_in, "image")])
    elif kind == "question":
        session.ask(_question(message, "text"))
    else:
        raise bad_request("'type' is one of frame, question, end", "invalid_message_type", "type")
    return False


ROUTES = [
    Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
    Route("/v1/sessions", create_session, methods=["POST"]),
    Route("/v1/sessions/{session_id}", get_session, methods=["GET"]),
    Route("/v1/sessions/{session_id}", delete_session, methods=["DELETE"]),
    Route("/v1/sessions/{session_id}/frames", push_frames, methods=["POST"]),
    Route("/v1/sessions/{session_id}/questions", ask_question, methods=["POST"]),
    Route("/v1/sessions/{session_id}/end", end_session, methods=["POST"]),
    Route("/v1/sessions/{session_id}/events", session_events, methods=["GET"]),
    WebSocketRoute("/v1/sessions/{session_id}/ws", session_websocket),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model}", get_model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics_text, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
]
