"""``GET /openapi.json``: the OpenAPI 3.1 description of every route, written out by hand.

Every operation needs a tenant's API key (bearer) unless it says ``security: []`` (``/health``, ``/metrics``,
``/openapi.json``); a server run without a tenants file takes any key or none.
"""

from __future__ import annotations

from dispider_vllm import __version__

JSON = "application/json"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
SSE = "text/event-stream"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: dict, media: str = JSON, required: bool = True) -> dict:
    return {"required": required, "content": {media: {"schema": schema}}}


def _reply(description: str, schema: dict | None = None, media: str = JSON) -> dict:
    reply: dict = {"description": description}
    if schema is not None:
        reply["content"] = {media: {"schema": schema}}
    return reply


ERROR_MEANINGS = {
    401: "No API key, or one the server does not know (code missing_api_key / invalid_api_key)",
    429: "Over a quota of the tenant (type rate_limit_error; code too_many_sessions, frame_rate_exceeded); "
         "Retry-After says when to try again",
    503: "The server runs its capacity of streams (type server_overloaded, code server_at_capacity); running "
         "streams are untouched. Retry-After says when to try again",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}}


def _errors(*statuses: int) -> dict:
    """Error replies; every authenticated operation may also answer 401."""
    replies = {}
    for status in sorted({*statuses, 401}):
        reply = _reply(ERROR_MEANINGS.get(status, "An OpenAI-style error"), _ref("Error"))
        if status in (429, 503):
            reply["headers"] = RETRY_AFTER
        replies[str(status)] = reply
    return replies


OPEN = {"security": []}  # no API key needed


SESSION_ID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _session_op(summary: str, replies: dict, *, body: dict | None = None, parameters: list | None = None) -> dict:
    op = {"summary": summary, "parameters": [SESSION_ID, *(parameters or [])], "responses": replies}
    if body is not None:
        op["requestBody"] = body
    return op


def _schemas(model: str) -> dict:
    number, integer, string, boolean = ({"type": t} for t in ("number", "integer", "string", "boolean"))
    span = {"clip": integer, "start": number, "end": number}
    generation = {
        "max_tokens": {"type": "integer", "minimum": 1, "description": "Per answer"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "description": "Default 0 (greedy)"},
        "stop": {"oneOf": [string, {"type": "array", "items": string, "maxItems": 4}]},
        "include_previous_answers": {"type": "boolean", "default": True,
                                     "description": "Earlier answers go into the reaction prompt"},
        "clip_mode": {"enum": ["uniform", "scene"], "default": "uniform"},
    }
    return {
        "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": string, "type": string, "param": {"type": ["string", "null"]}, "code": string}}}},
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"],
            "properties": {
                "model": {"type": "string", "example": model},
                "messages": {"type": "array", "description": "The last user message holds a text part (the "
                             "question) and a part {type: video_url, video_url: {url}}: an http(s) URL, a "
                             "data:video/...;base64 URL, or a local path under --allowed-local-media-path",
                             "items": {"type": "object"}},
                "stream": boolean,
                "stream_options": {"type": "object", "properties": {"include_usage": boolean}},
                "realtime": {"type": "boolean", "default": False, "description": "Play the video at its own pace"},
                "max_completion_tokens": generation["max_tokens"], **generation,
            },
        },
        "DispiderAnswer": {"type": "object", "properties": {**span, "text": string}},
        "ChatCompletion": {"type": "object", "properties": {
            "id": string, "object": {"const": "chat.completion"}, "created": integer, "model": string,
            "choices": {"type": "array", "items": {"type": "object"}}, "usage": {"type": "object"},
            "dispider": {"type": "object", "properties": {
                "responses": {"type": "array", "items": _ref("DispiderAnswer")}, "decisions": integer}}}},
        "ChatCompletionChunk": {"type": "object", "description": "Sent as SSE `data:` lines, then `data: [DONE]`",
                                "properties": {
                                    "object": {"const": "chat.completion.chunk"},
                                    "choices": {"type": "array", "items": {"type": "object"}},
                                    "dispider": {"type": "object", "properties": {"response": integer, **span}}}},
        "SessionCreate": {"type": "object", "required": ["question"],
                          "properties": {"question": string, **generation, "blocking_reaction": {
                              "type": "boolean", "description": "A baseline for benchmarks: from a trigger until "
                              "its answer ends, the frames pushed wait in the server (then go on in order, their "
                              "decision latency counting the wait), as VideoLLM-online does. Default: the server's "
                              "--blocking-reaction (off)"}}},
        "Session": {"type": "object", "properties": {
            "id": string, "object": {"const": "session"}, "created": integer, "model": string,
            "status": {"enum": ["active", "ending", "ended", "closed"]}, "question": string,
            "frames": integer, "clips": integer, "decisions": integer, "responses": integer,
            "skipped_answers": {"type": "integer", "description": "Triggers left unanswered: the tenant was over "
                                "its reaction tokens per minute"},
            "blocking_reaction": boolean,
            "held_frames": {"type": "integer", "description": "Frames a blocking session holds while it answers"},
            "last_timestamp": {"type": ["number", "null"]}, "events_url": string, "websocket_url": string}},
        "Frames": {"type": "object", "required": ["frames"], "properties": {"frames": {"type": "array", "items": {
            "type": "object", "required": ["timestamp", "image"],
            "properties": {"timestamp": number, "image": {"type": "string", "contentEncoding": "base64",
                                                          "description": "JPEG, PNG or WebP"}}}}}},
        "FramesAccepted": {"type": "object", "properties": {
            "id": string, "object": {"const": "session.frames"}, "accepted_frames": integer,
            "last_timestamp": {"type": ["number", "null"]}}},
        "Question": {"type": "object", "required": ["question"], "properties": {"question": string}},
        "SessionEvents": {"type": "string", "description": (
            "Server-Sent Events, each with an `id:` (send Last-Event-ID to resume): `decision` "
            "{clip, start, end, logit, respond, latency_s, question_id}; `chunk` (a chat.completion.chunk with "
            "the dispider extension); `response_end` {response, clip, start, end, text, finish_reason, usage}; "
            "`error` (an OpenAI error object; with `retry_after` when a quota refused, e.g. code "
            "token_quota_exceeded: an answer skipped, the session goes on); `end` {reason, clips, responses, "
            "decisions}. Events produced before a reader connects are buffered.")},
    }


def _paths() -> dict:
    image_body = {"content": {
        **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in IMAGE_TYPES},
        JSON: {"schema": _ref("Frames")},
        "video/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }, "required": True}
    return {
        "/v1/chat/completions": {"post": {
            "summary": "Play a video through Dispider and return every proactive answer with its time span",
            "requestBody": _body(_ref("ChatCompletionRequest")),
            "responses": {"200": {"description": "A completion, or a stream of chunks when stream is true",
                                  "content": {JSON: {"schema": _ref("ChatCompletion")},
                                              SSE: {"schema": _ref("ChatCompletionChunk")}}},
                          **_errors(400, 404, 413, 415, 429, 503)}}},
        "/v1/sessions": {"post": {"summary": "Open a live session", "requestBody": _body(_ref("SessionCreate")),
                                  "responses": {"201": _reply("The session", _ref("Session")),
                                                **_errors(400, 429, 503)}}},
        "/v1/sessions/{session_id}": {
            "get": _session_op("A session's state (another tenant's session answers 404, as an unknown one)",
                               {"200": _reply("The session", _ref("Session")), **_errors(404)}),
            "delete": _session_op("Close a session now (running answers are aborted)",
                                  {"200": _reply("Deleted", {"type": "object"}), **_errors(404)}),
        },
        "/v1/sessions/{session_id}/frames": {"post": _session_op(
            "Push frames: one image (?timestamp= seconds), JSON frames, or an encoded video chunk (?time_offset=)",
            {"202": _reply("Accepted", _ref("FramesAccepted")), **_errors(400, 404, 409, 413, 415, 429)},
            body=image_body,
            parameters=[{"name": "timestamp", "in": "query", "schema": {"type": "number"}},
                        {"name": "time_offset", "in": "query", "schema": {"type": "number"}}],
        )},
        "/v1/sessions/{session_id}/questions": {"post": _session_op(
            "Ask a new question", {"200": _reply("The session", _ref("Session")), **_errors(400, 404, 409)},
            body=_body(_ref("Question")))},
        "/v1/sessions/{session_id}/end": {"post": _session_op(
            "End of stream: the last partial clip is decided, running answers finish, then `end`",
            {"202": _reply("The session", _ref("Session")), **_errors(404)})},
        "/v1/sessions/{session_id}/events": {"get": _session_op(
            "The session's events as Server-Sent Events",
            {"200": _reply("An event stream", _ref("SessionEvents"), SSE), **_errors(404)},
            parameters=[{"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}}])},
        "/v1/sessions/{session_id}/ws": {"get": _session_op(
            "WebSocket. Client sends {type: frame, timestamp, image (base64)}, {type: question, text}, {type: end}; "
            "the server sends {event, id, data} with the same events as the SSE stream. The API key comes in the "
            "handshake's Authorization header or as ?api_key=; without a valid one the server sends an error "
            "event and closes with 4401 (an unknown or other tenant's session: 4404)",
            {"101": _reply("Switching protocols")},
            parameters=[{"name": "api_key", "in": "query", "schema": {"type": "string"},
                         "description": "The API key, for clients that cannot set headers"}])},
        "/v1/models": {"get": {"summary": "The served model",
                               "responses": {"200": _reply("A list", {"type": "object"}), **_errors()}}},
        "/v1/models/{model}": {"get": {"summary": "One model", "parameters": [
            {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _reply("The model", {"type": "object"}), **_errors(404)}}},
        "/health": {"get": {"summary": "Sidecar and engine alive (no API key needed)", **OPEN, "responses": {
            "200": _reply("Healthy", {"type": "object"}), "503": _reply("Unhealthy", {"type": "object"})}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (no API key needed)", **OPEN, "responses": {
            "200": _reply("Text format", {"type": "string"}, "text/plain")}}},
        "/openapi.json": {"get": {"summary": "This description (no API key needed)", **OPEN,
                                  "responses": {"200": _reply("OpenAPI 3.1")}}},
    }


def openapi_schema(model: str) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "dispider-vllm", "version": __version__,
                 "description": "Dispider, a proactive streaming video LLM, behind an OpenAI-compatible API"},
        "paths": _paths(),
        "components": {"schemas": _schemas(model), "securitySchemes": {"apiKey": {
            "type": "http", "scheme": "bearer",
            "description": "A tenant's API key (Authorization: Bearer KEY), as the OpenAI SDK sends it. A server "
                           "run without --tenants is open: any key or none"}}},
        "security": [{"apiKey": []}],
    }
