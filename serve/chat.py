"""``POST /v1/chat/completions``: play a video through Dispider and return every proactive answer.

The last user message carries a ``video_url`` part and a text part (the question). The video is played
through a session of its own (as fast as possible, or at real-time pace with ``"realtime": true``) and every
answer the model gives comes back in choice 0 with its span of video time in the ``dispider`` extension:

- streamed: ``chat.completion.chunk`` s, each with ``"dispider": {"response", "clip", "start", "end"}``;
  answer i > 0 starts with a blank line; the last chunk has the finish reason and a summary;
- not streamed: one ``chat.completion`` with the answers joined by blank lines and
  ``"dispider": {"responses": [{"clip", "start", "end", "text"}], "decisions": n}``.

This module also shapes the OpenAI objects that live-session events carry.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve.auth import tenant_of
from serve.errors import APIError, bad_request
from serve.media import MediaLimits, iter_video_frames, load_video, probe, read_json_object
from serve.sessions import (
    CLIP_MODES,
    AnswerDelta,
    AnswerEnded,
    DecisionMade,
    Session,
    SessionEnded,
    SessionEvent,
    SessionOptions,
    SessionProblem,
)

KEEPALIVE_S = 15.0
MAX_STOP_SEQUENCES = 4


# ---- OpenAI objects --------------------------------------------------------------------------------------------
def chat_chunk(session: Session, delta: dict, *, finish_reason: str | None = None, dispider: dict | None = None,
               usage: dict | None = None, choices: bool = True) -> dict:
    chunk = {
        "id": session.completion_id,
        "object": "chat.completion.chunk",
        "created": session.created,
        "model": session.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if choices else [],
    }
    if dispider is not None:
        chunk["dispider"] = dispider
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def answer_ext(response: int, span) -> dict:
    return {"response": response, **span.as_dict()}


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def event_payload(session: Session, event: SessionEvent) -> tuple[str, dict]:
    """A session event as a live-session client sees it (SSE ``event:`` name and JSON ``data``)."""
    if isinstance(event, DecisionMade):
        e = event.event
        return "decision", {"clip": e.clip_index, "start": e.start, "end": e.end, "logit": e.logit,
                            "respond": event.respond, "latency_s": round(event.latency_s, 4),
                            "question_id": e.question_id}
    if isinstance(event, AnswerDelta):
        delta = {"role": "assistant", "content": event.text} if event.first else {"content": event.text}
        return "chunk", chat_chunk(session, delta, dispider=answer_ext(event.response, event.span))
    if isinstance(event, AnswerEnded):
        return "response_end", {**answer_ext(event.response, event.span), "text": event.text,
                                "finish_reason": event.finish_reason,
                                "usage": usage_object(event.prompt_tokens, event.completion_tokens)}
    if isinstance(event, SessionProblem):
        return "error", event.error.event_data()
    assert isinstance(event, SessionEnded)
    return "end", {"reason": event.reason, "clips": event.clips, "responses": event.responses,
                   "decisions": event.decisions}


def sse(name: str | None, data: dict | str, event_id: int | None = None) -> str:
    lines = [] if event_id is None else [f"id: {event_id}"]
    if name:
        lines.append(f"event: {name}")
    lines.append("data: " + (data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))))
    return "\n".join(lines) + "\n\n"


SSE_KEEPALIVE = ": keep-alive\n\n"


# ---- the request ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatRequest:
    options: SessionOptions  # the question and how to answer it
    video_url: str
    stream: bool
    include_usage: bool
    realtime: bool


def parse_chat_request(body: dict, *, served_model: str, default_max_tokens: int) -> ChatRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required", "missing_model", "model")
    if model != served_model:
        raise APIError(404, f"The model `{model}` does not exist. This server serves `{served_model}`.",
                       "model_not_found", "model")
    if body.get("n", 1) != 1:
        raise bad_request("only n=1 is supported: every answer comes in choice 0", "unsupported_parameter", "n")
    question, video_url = _question_and_video(body.get("messages"))
    stream = _flag(body, "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("'stream_options' must be an object", "invalid_parameter", "stream_options")
    options = SessionOptions(
        question=question, clip_mode=parse_clip_mode(body.get("clip_mode")),
        **generation_fields(body, default_max_tokens),
    )
    return ChatRequest(options, video_url, stream, bool(stream_options.get("include_usage")), _flag(body, "realtime"))


def generation_fields(body: dict, default_max_tokens: int) -> dict:
    """The answer settings a chat request and a live session share, checked as OpenAI checks them."""
    return {
        "max_tokens": _max_tokens(body, default_max_tokens),
        "temperature": _temperature(body.get("temperature")),
        "stop": _stop(body.get("stop")),
        "include_previous_answers": _flag(body, "include_previous_answers", default=True),
    }


def parse_clip_mode(value: object) -> str:
    if value is None:
        return "uniform"
    if value not in CLIP_MODES:
        raise bad_request(f"'clip_mode' is one of {list(CLIP_MODES)}", "invalid_parameter", "clip_mode")
    return value  # type: ignore[return-value]


def _question_and_video(messages: object) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "invalid_messages", "messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise bad_request("'messages' has no user message", "invalid_messages", "messages")
    content = users[-1].get("content")
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    videos = [p.get("video_url") for p in parts if isinstance(p, dict) and p.get("type") == "video_url"]
    if not videos:
        raise bad_request("the last user message has no video: add a part "
                          '{"type": "video_url", "video_url": {"url": ...}}', "missing_video", "messages")
    if len(videos) > 1:
        raise bad_request("one video per request", "too_many_videos", "messages")
    url = videos[0].get("url") if isinstance(videos[0], dict) else videos[0]
    question = " ".join(t.strip() for t in texts if isinstance(t, str) and t.strip())
    if not question:
        raise bad_request("the last user message has no question: add a text part", "missing_question", "messages")
    return question, url


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false", "invalid_parameter", name)
    return value


def _max_tokens(body: dict, default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_request(f"'{name}' must be an integer >= 1", "invalid_parameter", name)
            return value
    return default


def _temperature(value: object) -> float:
    if value is None:
        return 0.0  # Dispider answers greedily (DISPIDER.md section 4)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise bad_request("'temperature' must be a number in [0, 2]", "invalid_parameter", "temperature")
    return float(value)


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    well_formed = isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)
    if not well_formed or len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"'stop' must be a string or a list of up to {MAX_STOP_SEQUENCES} strings",
                          "invalid_parameter", "stop")
    return tuple(stops)


# ---- the route ----------------------------------------------------------------------------------------------------
async def chat_completions(request: Request) -> Response:
    state = request.app.state
    config = state.config
    body = await read_json_object(request, config.max_upload_bytes)
    chat = parse_chat_request(body, served_model=config.served_model_name,
                              default_max_tokens=config.default_max_tokens)
    usage = state.quotas.usage(tenant_of(request))
    state.sessions.admit(usage)  # refused before the video is fetched, when it would be refused anyway
    limits: MediaLimits = state.media_limits
    data = await load_video(chat.video_url, limits)
    info = await probe(data, limits.max_bytes, "video_url.url")
    state.sessions.admit(usage)  # again: other streams may have opened meanwhile; no await from here to open
    usage.take_video_frames(info.duration, info.fps)  # the whole video, paid up front
    session = state.sessions.open(chat.options, usage, public=False)
    feeder = asyncio.create_task(_play(session, data, chat.realtime), name=f"play-{session.id}")
    if chat.stream:
        return StreamingResponse(_stream_chunks(request, session, feeder, chat),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        return await _until_disconnect(request, _complete(session, chat))
    finally:
        await _discard(request, session, feeder)


async def _play(session: Session, data: bytes, realtime: bool) -> None:
    """Feed the video: whole to the sidecar (it decodes), or decoded here and pushed at the video's pace."""
    if not realtime:
        session.push_encoded(data, 0.0, None, end=True)
        return
    started, origin = time.monotonic(), None
    try:
        async for frame in iter_video_frames(data):
            origin = frame.timestamp if origin is None else origin
            delay = started + (frame.timestamp - origin) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            session.push_frames([frame])
    except (ValueError, APIError) as error:  # VideoError mid-file, or frames going back in time
        session.fail(bad_request(f"the video could not be played: {error}", "invalid_video"), "media")
    session.end()


async def _discard(request: Request, session: Session, feeder: asyncio.Task) -> None:
    # Shielded: on a client disconnect Starlette cancels the response's scope, and the clean-up must still run.
    with anyio.CancelScope(shield=True):
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        await request.app.state.sessions.remove(session, "finished" if session.status == "ended" else "client_gone")


async def _until_disconnect(request: Request, work) -> Response:
    """Run ``work``; if the client goes away first, stop it (its reactions are aborted)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if task not in done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Tally:
    """What the final chunk or the whole completion reports."""

    def __init__(self) -> None:
        self.answers: list[AnswerEnded] = []
        self.reaction_errors: list[dict] = []
        self.decisions = 0

    def usage(self) -> dict:
        return usage_object(sum(a.prompt_tokens for a in self.answers), sum(a.completion_tokens for a in self.answers))

    def finish_reason(self) -> str:
        return "length" if self.answers and self.answers[-1].finish_reason == "length" else "stop"

    def summary(self) -> dict:
        summary = {"responses": len(self.answers), "decisions": self.decisions}
        if self.reaction_errors:
            summary["errors"] = self.reaction_errors
        return summary

    def record(self, event: SessionEvent) -> APIError | None:
        """Count an event; return the error that ends the completion, if it is one."""
        if isinstance(event, DecisionMade):
            self.decisions += 1
        elif isinstance(event, AnswerEnded):
            self.answers.append(event)
        elif isinstance(event, SessionProblem):
            if event.source not in ("reaction", "quota"):
                return event.error  # the video cannot be played on
            self.reaction_errors.append(event.error.body()["error"])  # one answer lost; the others go on
        return None


async def _complete(session: Session, chat: ChatRequest) -> Response:
    tally = _Tally()
    async for item in session.events.follow():
        _, event = item
        if (error := tally.record(event)) is not None:
            return error.response()
    text = "\n\n".join(a.text for a in tally.answers)
    body = {
        "id": session.completion_id,
        "object": "chat.completion",
        "created": session.created,
        "model": session.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": tally.finish_reason()}],
        "usage": tally.usage(),
        "dispider": {
            "responses": [{**a.span.as_dict(), "text": a.text} for a in tally.answers],
            **{k: v for k, v in tally.summary().items() if k != "responses"},
        },
    }
    return JSONResponse(body)


async def _stream_chunks(
    request: Request, session: Session, feeder: asyncio.Task, chat: ChatRequest
) -> AsyncIterator[str]:
    """The SSE body; leaving it (the end, or the client gone) removes the session and aborts its answers."""
    tally = _Tally()
    try:
        async for item in session.events.follow(keepalive_s=KEEPALIVE_S):
            if item is None:
                yield SSE_KEEPALIVE
                continue
            _, event = item
            if (error := tally.record(event)) is not None:
                yield sse(None, error.body())
                return
            if isinstance(event, AnswerDelta):
                yield sse(None, _content_chunk(session, event))
        yield sse(None, chat_chunk(session, {}, finish_reason=tally.finish_reason(), dispider=tally.summary()))
        if chat.include_usage:
            yield sse(None, chat_chunk(session, {}, usage=tally.usage(), choices=False))
        yield sse(None, "[DONE]")
    finally:
        await _discard(request, session, feeder)


def _content_chunk(session: Session, event: AnswerDelta) -> dict:
    # All answers share choice 0; a blank line separates answer i > 0 from the one before.
    text = ("\n\n" if event.first and event.response > 0 else "") + event.text
    delta = {"role": "assistant", "content": text} if event.first and event.response == 0 else {"content": text}
    return chat_chunk(session, delta, dispider=answer_ext(event.response, event.span))
