"""End to end: ``dispider-serve`` as a subprocess (real sidecar, real vLLM CPU engine, tiny random checkpoint)
driven through the ``openai`` SDK, httpx (SSE) and a WebSocket client.

The server answers every 2nd clip (``--respond-every 2``), so with 16-s clips a 64-s video gives 4 clips and
answers at clips 1 and 3. Random weights may still stay silent (``<keep_silent>`` first, or no text), so
answer counts are checked against the triggers, not fixed.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import openai
import psutil
import pytest
from PIL import Image

from sse_reader import EventReader
from clients.server_metrics import MetricsSnapshot, decision_gate_delta
from dispider_vllm.video.synth import make_test_frames, make_test_video
from serve.config import default_kept_clips_budget_bytes, installed

pytestmark = pytest.mark.timeout(900)

QUESTION = "Tell me whenever the square changes colour."
CLIP_SECONDS = 16


# ---- helpers ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[int, bytes]:
    """MP4 bytes by length in seconds (2 fps: small and quick to decode)."""
    folder = tmp_path_factory.mktemp("videos")
    return {s: make_test_video(folder / f"v{s}.mp4", seconds=s, fps=2, seed=s).read_bytes() for s in (32, 48, 64)}


@pytest.fixture(scope="module")
def client(dispider_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=dispider_server.openai_base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(dispider_server):
    with httpx.Client(base_url=dispider_server.url, timeout=120) as session:
        yield session


@pytest.fixture(scope="module")
def video_site(videos, tmp_path_factory):
    """A plain HTTP server on 127.0.0.1 serving clip32.mp4 and notes.txt; yields its base URL."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = tmp_path_factory.mktemp("site")
    (folder / "clip32.mp4").write_bytes(videos[32])
    (folder / "notes.txt").write_text("not a video")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def data_url(video: bytes, kind: str = "video/mp4") -> str:
    return f"data:{kind};base64," + base64.b64encode(video).decode()


def video_message(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]}]


def jpeg(pixels) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=80)
    return out.getvalue()


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert error["message"]
    return error


def expected_triggers(seconds: int, every: int) -> int:
    clips = seconds // CLIP_SECONDS
    return sum(1 for i in range(clips) if (i + 1) % every == 0)


def answers_from_events(events: list[dict]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in events:
        response = chunk["dispider"]["response"]
        texts[response] = texts.get(response, "") + chunk["choices"][0]["delta"]["content"]
    return texts


# ---- the reaction engine's answer stream (no server needed) ----------------------------------------------------------
def _outputs(*steps):
    """vLLM-like delta outputs: (token_ids, text, finish_reason) per step."""
    from types import SimpleNamespace

    async def generate():
        for index, (token_ids, text, finish_reason) in enumerate(steps):
            completion = SimpleNamespace(token_ids=token_ids, text=text, finish_reason=finish_reason)
            yield SimpleNamespace(prompt_token_ids=[0] * 10 if index == 0 else None, outputs=[completion])

    return generate()


def _deltas(*steps, keep_silent_id=7):
    import asyncio

    from dispider_vllm.reaction.engine import answer_deltas

    async def collect():
        return [delta async for delta in answer_deltas(_outputs(*steps), keep_silent_id)]

    return asyncio.run(collect())


def test_answer_deltas_silence_and_text():
    silent = _deltas(([7], "", None), ([3], "never seen", None))
    assert [(d.text, d.finished, d.finish_reason) for d in silent] == [("", True, "silent")]
    empty = _deltas(([5], " ", None), ([6], "\n", "stop"))
    assert [(d.text, d.finish_reason) for d in empty] == [("", "silent")]
    spoken = _deltas(([5], " ", None), ([6], " Hello", None), ([8, 9], " world", "length"))
    assert [d.text for d in spoken] == ["Hello", " world"]
    assert (spoken[-1].finished, spoken[-1].finish_reason, spoken[-1].num_tokens, spoken[-1].prompt_tokens) == (
        True, "length", 4, 10)
    later_silent_token = _deltas(([3], "Hi", None), ([7], "", "stop"))
    assert [d.text for d in later_silent_token] == ["Hi", ""] and later_silent_token[-1].finish_reason == "stop"


# ---- the service ------------------------------------------------------------------------------------------------
def test_models_health_and_openapi(client, http, dispider_server):
    assert [m.id for m in client.models.list().data] == [dispider_server.model]
    health = http.get("/health").json()
    placement = health.pop("placement")
    features = health.pop("sidecar_features")
    # The reaction engine's settings as vLLM resolved them: on the CPU its own prefill chunk (2048) and answers at once.
    assert health.pop("reaction_features") == {"max_num_batched_tokens": 2048, "max_num_seqs": 128,
                                               "max_model_len": 8192, "quantization": None,
                                               "mps_client_priority": "below_normal", "decision_gate_ms": 20.0}
    # uvicorn's C parser and loop where installed (httptools is a dependency; uvloop comes with vLLM).
    # --switch-interval 2 (conftest) reached the server's process.
    assert health.pop("frontend") == {"http": "httptools", "loop": "uvloop" if installed("uvloop") else "asyncio",
                                      "decode_frames_in": "sidecar", "switch_interval_ms": 2.0}
    assert health == {"status": "ok", "sidecar": True, "engine": True}
    # What the sidecar runs with: on the CPU nothing is captured as a CUDA graph.
    graphs = {"perception": False, "frames": False, "decision": False}
    assert features["device"] == "cpu" and features["cuda_graphs"] == graphs
    assert features["preprocess_workers"] == 4 and features["kv_slots"] == 16 and features["mps_daemon"] is False
    # Frames preprocessed on the host (the CPU's default), so the CLIP tower sees them at each clip's close.
    assert (features["preprocess_on"], features["frame_perception"]) == ("host", "clip")
    assert features["arrival_policy"]["closes_first"]  # the default schedule, --sidecar-schedule closes-first
    # The kept clips: 32 a stream, 40% of the host's memory for all streams; the server says so at start.
    assert features["max_kept_clips"] == 32 and features["kept_clips_budget_bytes"] == default_kept_clips_budget_bytes()
    assert features["kept_clip_bytes"] > 0
    assert "kept clips: budget" in dispider_server.log_file.read_text(errors="replace")
    # Process placement: the sidecar is a process of its own, the server's child, on the device it says.
    assert placement["platform"] == "cpu" and placement["sidecar_device"] == "cpu"
    assert placement["reaction_devices"] == ["cpu"] and placement["tensor_parallel_size"] == 1
    server = psutil.Process(placement["server_pid"])
    assert placement["sidecar_pid"] in {child.pid for child in server.children()}
    assert placement["sidecar_pid"] != placement["server_pid"]
    assert 0 < placement["frame_ring_mib"] <= 256  # 256 by default, cut to half of what /dev/shm has free
    paths = http.get("/openapi.json").json()["paths"]
    session = "/v1/sessions/{session_id}"
    for path in ("/v1/chat/completions", "/v1/sessions", session, f"{session}/frames", f"{session}/questions",
                 f"{session}/end", f"{session}/events", f"{session}/ws", "/v1/models", "/health", "/metrics",
                 "/openapi.json"):
        assert path in paths


# ---- chat completions -------------------------------------------------------------------------------------------
def test_chat_completion(client, videos, dispider_server):
    completion = client.chat.completions.create(
        model=dispider_server.model, messages=video_message(data_url(videos[64])), max_tokens=6,
    )
    dispider = completion.model_extra["dispider"]
    assert completion.object == "chat.completion" and completion.model == dispider_server.model
    assert dispider["decisions"] == 4
    answers = dispider["responses"]
    # Clips 1 and 3 trigger; random weights could stay silent, but this checkpoint does answer.
    assert 1 <= len(answers) <= expected_triggers(64, dispider_server.respond_every)
    assert completion.choices[0].message.content == "\n\n".join(a["text"] for a in answers)
    for answer in answers:
        assert answer["clip"] in (1, 3) and answer["end"] - answer["start"] == CLIP_SECONDS and answer["text"]
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6 * len(answers)


def test_chat_completion_streamed(client, videos, dispider_server):
    stream = client.chat.completions.create(
        model=dispider_server.model, messages=video_message(data_url(videos[64])), max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c for c in chunks if c.usage is not None]
    assert len(final) == 1 and final[0] is chunks[-2] and usage == [chunks[-1]]
    assert final[0].model_extra["dispider"]["decisions"] == 4
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    by_response: dict[int, list] = {}
    for chunk in content:
        extension = chunk.dispider  # the SDK keeps unknown fields
        assert set(extension) == {"response", "clip", "start", "end"}
        by_response.setdefault(extension["response"], []).append(chunk)
    assert sorted(by_response) == list(range(len(by_response)))
    assert len(by_response) == final[0].model_extra["dispider"]["responses"]
    clips = [pieces[0].dispider["clip"] for _, pieces in sorted(by_response.items())]
    assert clips == sorted(set(clips)), "answers come in the order of their clips"
    for response, pieces in by_response.items():
        first = pieces[0].choices[0].delta.content
        assert first.startswith("\n\n") == (response > 0)
        assert pieces[0].dispider["clip"] in (1, 3)
    if by_response:
        assert content[0].choices[0].delta.role == "assistant"
        assert usage[0].usage.completion_tokens > 0
    assert final[0].choices[0].finish_reason in ("stop", "length")  # "length": the last answer was cut


def test_chat_completion_from_http_url(client, video_site, dispider_server):
    completion = client.chat.completions.create(
        model=dispider_server.model, messages=video_message(f"{video_site}/clip32.mp4"), max_tokens=4)
    assert completion.model_extra["dispider"]["decisions"] == 2


def test_chat_completion_local_file_and_realtime(client, videos, dispider_server):
    path = dispider_server.media_dir / "clip32.mp4"
    path.write_bytes(videos[32])
    started = time.monotonic()
    completion = client.chat.completions.create(
        model=dispider_server.model, messages=video_message(f"file://{path}"), max_tokens=4,
        extra_body={"realtime": True},
    )
    assert completion.model_extra["dispider"]["decisions"] == 2
    assert time.monotonic() - started >= 30  # played at the video's own pace (32 s)


def _active_sessions(http) -> float:
    metrics = http.get("/metrics").text
    return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("dispider_active_sessions")))


def test_client_gone_ends_its_stream(http, videos, dispider_server):
    before = _active_sessions(http)  # other tests' live sessions may still be open
    body = {"model": dispider_server.model, "messages": video_message(data_url(videos[32])), "realtime": True}
    with httpx.stream("POST", dispider_server.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=30) as response:
        assert response.status_code == 200
        assert _active_sessions(http) == before + 1
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up while the video plays
        httpx.post(dispider_server.url + "/v1/chat/completions", json=body, timeout=2)
    deadline = time.monotonic() + 30
    while _active_sessions(http) > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _active_sessions(http) == before


# ---- live sessions ----------------------------------------------------------------------------------------------
def _frames_sent(http) -> dict[str, float]:
    prefix = "dispider_sidecar_frames_sent_total{way="
    return {line[len(prefix) + 1 : line.index('"}')]: float(line.split()[1])
            for line in http.get("/metrics").text.splitlines() if line.startswith(prefix)}


def test_live_session_over_http(http, dispider_server):
    sent_before = _frames_sent(http)
    created = http.post("/v1/sessions", json={"question": QUESTION, "max_tokens": 6})
    assert created.status_code == 201, created.text
    session = created.json()
    assert session["object"] == "session" and session["status"] == "active"
    reader = EventReader(dispider_server.url + session["events_url"])
    reader.start()
    assert reader.connected.wait(30)

    frames = make_test_frames(seconds=64, fps=2, seed=1)
    pushed_last_at = None
    for index, frame in enumerate(frames):
        url = f"/v1/sessions/{session['id']}/frames?timestamp={frame.timestamp}"
        reply = http.post(url, content=jpeg(frame.pixels), headers={"content-type": "image/jpeg"})
        assert reply.status_code == 202, reply.text
        # Slow down after the first clip closes, until its decision shows, so that it shows mid-stream.
        if index > 2 * CLIP_SECONDS and not reader.named("decision"):
            time.sleep(0.5)
        pushed_last_at = time.monotonic()
    assert http.post(f"/v1/sessions/{session['id']}/end").status_code == 202
    reader.finish()

    decisions = reader.named("decision")
    assert [d["clip"] for d in decisions] == [0, 1, 2, 3]
    assert [d["respond"] for d in decisions] == [False, True, False, True]
    first_decision_at = next(t for t, name, _ in reader.events if name == "decision")
    assert first_decision_at < pushed_last_at, "events must arrive while frames are still being pushed"
    ends = reader.named("response_end")
    assert answers_from_events(reader.named("chunk")) == {e["response"]: e["text"] for e in ends}
    for end in ends:  # max_tokens is per answer; "length" when an answer used all of it
        tokens = end["usage"]["completion_tokens"]
        assert end["finish_reason"] == ("length" if tokens == 6 else "stop") and 0 < tokens <= 6
    assert reader.named("end") == [{"reason": "end_of_stream", "clips": 4, "responses": len(ends), "decisions": 4}]
    state = http.get(f"/v1/sessions/{session['id']}").json()
    assert state["status"] == "ended" and state["frames"] == len(frames)
    assert http.delete(f"/v1/sessions/{session['id']}").json()["deleted"] is True
    # The pixels went to the sidecar through the shared-memory frame ring (a frame finding it full goes through
    # the sidecar's pipe: each frame one way or the other).
    sent = {way: count - sent_before[way] for way, count in _frames_sent(http).items()}
    assert sent["ring"] > 0 and sent["ring"] + sent["pipe"] == len(frames)


def test_an_image_broken_past_its_header_is_an_error_event(http, dispider_server):
    """The sidecar decodes pushed images (the default): the server reads a JPEG's header only, so one that breaks
    past it is accepted, then reported on the session's stream as an invalid_frame error (OpenAI's error format,
    400). The frames around it go on into clips and decisions, and the decoding shows in /metrics."""
    session = http.post("/v1/sessions", json={"question": QUESTION}).json()
    reader = EventReader(dispider_server.url + session["events_url"])
    reader.start()
    assert reader.connected.wait(30)
    for frame in make_test_frames(seconds=CLIP_SECONDS + 2, fps=1, seed=4):
        data = jpeg(frame.pixels)
        if frame.timestamp == 5.0:
            data = data[: data.index(b"\xff\xda") + 20]  # the header whole, the compressed data cut short
        reply = http.post(f"/v1/sessions/{session['id']}/frames?timestamp={frame.timestamp}", content=data,
                          headers={"content-type": "image/jpeg"})
        assert reply.status_code == 202, reply.text
    assert http.post(f"/v1/sessions/{session['id']}/end").status_code == 202
    reader.finish()
    errors = [error["error"] for error in reader.named("error")]
    assert len(errors) == 1 and errors[0]["code"] == "invalid_frame" and errors[0]["type"] == "invalid_request_error"
    assert "not a readable" in errors[0]["message"]
    assert [d["clip"] for d in reader.named("decision")] == [0, 1]  # 16 s of frames, then the flushed rest
    assert reader.named("end")[0]["reason"] == "end_of_stream"
    http.delete(f"/v1/sessions/{session['id']}")
    name = "dispider_sidecar_frame_decode_seconds"
    decoded = _metrics_once(http, lambda m: m.histogram(name) is not None and m.histogram(name).count > 0)
    assert decoded.histogram(name).count > 0


def _metrics_once(http, holds, timeout: float = 30.0) -> MetricsSnapshot:
    """The first scrape for which ``holds`` is true (the sidecar reports its stats once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = MetricsSnapshot.parse(http.get("/metrics").text)
        if holds(snapshot) or time.monotonic() > deadline:
            return snapshot
        time.sleep(0.2)


def test_metrics_show_the_clips_a_live_session_keeps(http, dispider_server):
    features = http.get("/health").json()["sidecar_features"]
    per_clip, budget = features["kept_clip_bytes"], features["kept_clips_budget_bytes"]
    session = http.post("/v1/sessions", json={"question": QUESTION, "max_tokens": 4}).json()
    reader = EventReader(dispider_server.url + session["events_url"])
    reader.start()
    assert reader.connected.wait(30)
    frames = {frame.timestamp: frame for frame in make_test_frames(seconds=32, fps=2, seed=5)}
    for timestamp in (0.0, 31.5):  # two frames fill clips 0 and 1: the 1-fps sampler repeats a frame over the gap
        image = base64.b64encode(jpeg(frames[timestamp].pixels)).decode()
        reply = http.post(f"/v1/sessions/{session['id']}/frames",
                          json={"frames": [{"timestamp": timestamp, "image": image}]})
        assert reply.status_code == 202, reply.text
    reader.wait_for("decision", 2)
    kept = _metrics_once(http, lambda m: (m.value("dispider_sidecar_kept_clips") or 0) >= 2)
    clips = kept.value("dispider_sidecar_kept_clips")
    assert clips >= 2, "the session's two clips were not reported as kept"
    assert kept.value("dispider_sidecar_kept_clip_bytes") == clips * per_clip
    assert kept.value("dispider_sidecar_kept_clip_budget_bytes") == budget
    assert kept.value("dispider_sidecar_kept_clips_evicted_total") == 0  # far from 40% of the host's memory
    assert http.delete(f"/v1/sessions/{session['id']}").status_code == 200
    closed = _metrics_once(http, lambda m: m.value("dispider_sidecar_kept_clips") <= clips - 2)
    assert closed.value("dispider_sidecar_kept_clips") <= clips - 2, "closing the session did not free its clips"
    assert closed.value("dispider_sidecar_kept_clip_bytes") == closed.value("dispider_sidecar_kept_clips") * per_clip


def test_live_session_over_websocket(http, dispider_server):
    from websockets.sync.client import connect

    session = http.post("/v1/sessions", json={"question": QUESTION, "max_tokens": 4}).json()
    ws_url = dispider_server.url.replace("http://", "ws://") + session["websocket_url"]
    events = []
    with connect(ws_url, max_size=None) as ws:
        for frame in make_test_frames(seconds=32, fps=2, seed=2):
            image = base64.b64encode(jpeg(frame.pixels)).decode()
            ws.send(json.dumps({"type": "frame", "timestamp": frame.timestamp, "image": image}))
        ws.send(json.dumps({"type": "question", "text": "And now?"}))
        ws.send(json.dumps({"type": "frame", "timestamp": 1.0, "image": image}))  # back in time: an error reply
        ws.send(json.dumps({"type": "end"}))
        for message in ws:
            events.append(json.loads(message))
            if events[-1]["event"] == "end":
                break
    names = [e["event"] for e in events]
    assert names.count("decision") == 2 and names[-1] == "end"
    errors = [e["data"]["error"] for e in events if e["event"] == "error"]
    assert [e["code"] for e in errors] == ["timestamp_out_of_order"]
    assert http.get(f"/v1/sessions/{session['id']}").json()["question"] == "And now?"


def test_two_sessions_never_see_each_other(http, dispider_server):
    lengths = {"a": 32, "b": 64}
    sessions = {k: http.post("/v1/sessions", json={"question": f"{k}: {QUESTION}", "max_tokens": 4}).json()
                for k in lengths}
    readers = {k: EventReader(dispider_server.url + s["events_url"]) for k, s in sessions.items()}

    def feed(key: str) -> None:
        with httpx.Client(base_url=dispider_server.url, timeout=120) as own:
            for frame in make_test_frames(seconds=lengths[key], fps=2, seed=3):
                image = base64.b64encode(jpeg(frame.pixels)).decode()
                body = {"frames": [{"timestamp": frame.timestamp, "image": image}]}
                assert own.post(f"/v1/sessions/{sessions[key]['id']}/frames", json=body).status_code == 202
            assert own.post(f"/v1/sessions/{sessions[key]['id']}/end").status_code == 202

    feeders = [threading.Thread(target=feed, args=(k,)) for k in lengths]
    for thread in [*readers.values(), *feeders]:
        thread.start()
    for thread in feeders:
        thread.join(120)
    for key, reader in readers.items():
        reader.finish()
        clips = lengths[key] // CLIP_SECONDS
        assert [d["clip"] for d in reader.named("decision")] == list(range(clips))
        assert reader.named("end")[0]["clips"] == clips
        own_id = "chatcmpl-" + sessions[key]["id"]
        assert all(chunk["id"] == own_id for chunk in reader.named("chunk"))
        http.delete(f"/v1/sessions/{sessions[key]['id']}")


def test_events_before_a_reader_are_kept(http, dispider_server, videos):
    session = http.post("/v1/sessions", json={"question": QUESTION}).json()
    reply = http.post(f"/v1/sessions/{session['id']}/frames?time_offset=0", content=videos[32],
                      headers={"content-type": "video/mp4"})
    assert reply.status_code == 202, reply.text
    http.post(f"/v1/sessions/{session['id']}/end")
    deadline = time.monotonic() + 120
    while http.get(f"/v1/sessions/{session['id']}").json()["status"] != "ended" and time.monotonic() < deadline:
        time.sleep(0.5)
    reader = EventReader(dispider_server.url + session["events_url"])  # connects after everything happened
    reader.start()
    reader.finish()
    assert [d["clip"] for d in reader.named("decision")] == [0, 1] and reader.named("end")
    http.delete(f"/v1/sessions/{session['id']}")


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_bad_chat_requests(http, client, videos, video_site, dispider_server, tmp_path):
    post = lambda body, **kw: http.post("/v1/chat/completions", json=body, **kw)  # noqa: E731
    ok = video_message(data_url(videos[32]))

    assert_error(http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "invalid_json")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=ok)
    assert caught.value.code == "model_not_found"
    assert_error(post({"model": "dispider", "messages": [{"role": "user", "content": "no video here"}]}),
                 400, "missing_video")
    assert_error(post({"model": "dispider", "messages": video_message(data_url(b"\x00not a video" * 100))}),
                 400, "invalid_video")
    assert_error(post({"model": "dispider", "messages": video_message(data_url(b"hello", "text/plain"))}),
                 415, "unsupported_media_type")
    big = b"\x00" * (dispider_server.max_upload_mb * 2 << 20)
    assert_error(post({"model": "dispider", "messages": video_message(data_url(big))}), 413, "payload_too_large")
    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(videos[32])
    assert_error(post({"model": "dispider", "messages": video_message(str(outside))}), 400, "local_media_forbidden")
    assert_error(post({"model": "dispider", "messages": ok, "max_tokens": 0}), 400, "invalid_parameter")
    assert_error(post({"model": "dispider", "messages": video_message(f"{video_site}/missing.mp4")}),
                 400, "video_fetch_failed")
    assert_error(post({"model": "dispider", "messages": video_message(f"{video_site}/notes.txt")}),
                 415, "unsupported_media_type")


def test_bad_session_requests(http, videos):
    assert_error(http.post("/v1/sessions", json={"clip_mode": "uniform"}), 400, "missing_question")
    assert_error(http.get("/v1/sessions/sess-unknown"), 404, "session_not_found")
    assert_error(http.post("/v1/sessions/sess-unknown/frames?timestamp=0", content=b"x",
                           headers={"content-type": "image/jpeg"}), 404, "session_not_found")
    session = http.post("/v1/sessions", json={"question": QUESTION}).json()
    frames = f"/v1/sessions/{session['id']}/frames"
    assert_error(http.post(frames + "?timestamp=0", content=b"GIF89a", headers={"content-type": "image/gif"}),
                 415, "unsupported_media_type")
    assert_error(http.post(frames + "?timestamp=0", content=b"\xff\xd8 broken", headers={"content-type": "image/jpeg"}),
                 400, "invalid_image")
    assert_error(http.post(frames, json={"frames": [{"timestamp": 0, "image": "%%%"}]}), 400, "invalid_base64")
    assert_error(http.post(frames, content=b"\x00" * 1000, headers={"content-type": "video/mp4"}), 400, "invalid_video")
    assert_error(http.post(frames, content=b"\x00" * (3 << 20), headers={"content-type": "video/mp4"}),
                 413, "payload_too_large")
    assert http.delete(f"/v1/sessions/{session['id']}").status_code == 200
    assert_error(http.post(frames + "?timestamp=0", content=b"x", headers={"content-type": "image/jpeg"}),
                 404, "session_not_found")
    assert_error(http.delete(f"/v1/sessions/{session['id']}"), 404, "session_not_found")


def test_access_log_keeps_refused_pushes_and_drops_accepted_ones(http, dispider_server):
    """The default ``--access-log except-frames``: a line per request except for accepted frame pushes."""
    session = http.post("/v1/sessions", json={"question": QUESTION}).json()
    frames = f"/v1/sessions/{session['id']}/frames"
    pixels = make_test_frames(seconds=1, fps=1, seed=3)[0].pixels
    reply = http.post(frames + "?timestamp=0", content=jpeg(pixels), headers={"content-type": "image/jpeg"})
    assert reply.status_code == 202
    assert_error(http.post(frames + "?timestamp=1", content=b"\xff\xd8 broken", headers={"content-type": "image/jpeg"}),
                 400, "invalid_image")
    assert http.delete(f"/v1/sessions/{session['id']}").status_code == 200
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in dispider_server.log_file.read_text(errors="replace").splitlines()
                 if session["id"] in line and '"' in line]  # uvicorn's access lines quote the request line
        if any("DELETE" in line for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    pushes = [line for line in lines if f"POST {frames}" in line]
    assert len(pushes) == 1 and "timestamp=1" in pushes[0] and '" 400' in pushes[0], lines
    assert any(f"DELETE /v1/sessions/{session['id']} " in line and '" 200' in line for line in lines), lines


def test_access_log_filter_reads_uvicorns_record():
    from serve.access_log import is_accepted_frame_push

    push = ("127.0.0.1:1", "POST", "/v1/sessions/sess-a/frames?timestamp=3", "1.1")
    assert is_accepted_frame_push((*push, 202))
    assert not is_accepted_frame_push((*push, 400))
    assert not is_accepted_frame_push(("127.0.0.1:1", "GET", "/v1/sessions/sess-a/frames", "1.1", 200))
    assert not is_accepted_frame_push(("127.0.0.1:1", "POST", "/v1/sessions", "1.1", 201))
    assert not is_accepted_frame_push(("an unexpected record",))


def _error_count(http, code: str) -> float:
    prefix = f'dispider_errors_total{{code="{code}"}} '
    return next((float(line[len(prefix):]) for line in http.get("/metrics").text.splitlines()
                 if line.startswith(prefix)), 0.0)


def test_a_push_cut_off_midway_is_the_clients_doing(http, dispider_server):
    """A client that closes its connection in the middle of a frame's body is counted as gone, not as a server
    error, and the session takes the next frame as usual."""
    import socket
    from urllib.parse import urlsplit

    session = http.post("/v1/sessions", json={"question": QUESTION}).json()
    path = f"/v1/sessions/{session['id']}/frames?timestamp=0"
    gone_before, internal_before = _error_count(http, "client_disconnected"), _error_count(http, "internal_error")
    address = urlsplit(dispider_server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as cut_off:
        cut_off.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                        "Content-Length: 100000\r\n\r\n".encode() + b"\xff\xd8" + b"\x00" * 1000)
        time.sleep(0.5)  # the server is reading the body when the connection goes
    deadline = time.monotonic() + 10
    while _error_count(http, "client_disconnected") == gone_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _error_count(http, "client_disconnected") == gone_before + 1
    assert _error_count(http, "internal_error") == internal_before
    frame = make_test_frames(seconds=1, fps=1, seed=2)[0]
    reply = http.post(path, content=jpeg(frame.pixels), headers={"content-type": "image/jpeg"})
    assert reply.status_code == 202, reply.text
    assert http.delete(f"/v1/sessions/{session['id']}").status_code == 200


def test_an_idle_connection_outlives_uvicorns_default_keep_alive(dispider_server):
    """A camera pushing a frame every few seconds keeps its connection: the server holds an idle one for
    --keep-alive (30 s), not uvicorn's 5 s, so a client never has to open a new one between frames."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(dispider_server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        assert _get_health(connection).startswith(b"HTTP/1.1 200")
        time.sleep(6)  # past uvicorn's default keep-alive of 5 s
        assert _get_health(connection).startswith(b"HTTP/1.1 200")


def _get_health(connection) -> bytes:
    """GET /health on an open connection; the whole response (its Content-Length read)."""
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = connection.recv(65536)
        assert chunk, "the server closed the connection"
        reply += chunk
    head, body = reply.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += connection.recv(65536)
    return reply


def test_unknown_session_websocket(dispider_server):
    from websockets.sync.client import connect

    with connect(dispider_server.url.replace("http://", "ws://") + "/v1/sessions/sess-unknown/ws") as ws:
        reply = json.loads(ws.recv())
        assert reply["event"] == "error" and reply["data"]["error"]["code"] == "session_not_found"
        with pytest.raises(Exception):
            ws.recv()
        assert ws.close_code == 4404


def test_still_healthy_with_metrics(http, client, videos, dispider_server):
    assert http.get("/health").status_code == 200
    gate_before = MetricsSnapshot.parse(http.get("/metrics").text)
    completion = client.chat.completions.create(
        model=dispider_server.model, messages=video_message(data_url(videos[32])), max_tokens=2)
    assert completion.model_extra["dispider"]["decisions"] == 2
    metrics = http.get("/metrics").text
    # --decision-gate-ms (conftest): the sidecar held the gate for the clips it decided, and the engine-core
    # process's scheduler looked at it before the answer's steps.
    gate = decision_gate_delta(gate_before, MetricsSnapshot.parse(metrics))
    assert gate["holds"] >= 1 and gate["checks"] >= 1, gate
    assert gate["waits"] <= gate["checks"] and gate["wait_seconds"] <= 0.02 * gate["waits"] + 0.5, gate
    # The 64-s chats trigger at clips 1 and 3 at once: the second waits behind the first answer.
    queued = float(next(line.split()[1] for line in metrics.splitlines()
                        if line.startswith("dispider_reaction_queued_total")))
    assert queued >= 1
    for name in ("dispider_active_sessions", "dispider_frames_received_total", "dispider_clips_perceived_total",
                 "dispider_decision_latency_seconds_bucket", "dispider_reaction_time_to_first_token_seconds_bucket",
                 "dispider_reaction_tokens_total", "dispider_reaction_queue_depth", "dispider_reaction_queued_total",
                 "dispider_sidecar_up 1.0", "dispider_engine_up 1.0", 'dispider_errors_total{code="model_not_found"}',
                 "dispider_sidecar_batch_clips_bucket", 'dispider_sidecar_step_seconds_count{phase="perceive"}',
                 "dispider_sidecar_queue_wait_seconds_bucket", "dispider_sidecar_transit_seconds_bucket",
                 'dispider_gc_pause_seconds_count{generation="0",process="server"}',
                 'dispider_gc_pause_seconds_count{generation="0",process="sidecar"}',
                 "dispider_server_loop_lag_seconds_bucket", "dispider_server_loop_stalls_total"):
        assert name in metrics, name



def test_blocking_reaction_holds_the_stream(http, dispider_server):
    """The baseline (``blocking_reaction``): a frame pushed while an answer runs waits in the server, so the clip
    it closes is decided only after the answer ends, its latency counting the wait; a plain session does not wait."""
    assert_error(http.post("/v1/sessions", json={"question": QUESTION, "blocking_reaction": "yes"}),
                 400, "invalid_parameter")
    frames = {frame.timestamp: frame for frame in make_test_frames(seconds=48, fps=2, seed=4)}
    blocking, plain = (_clip_pushed_during_an_answer(http, dispider_server, frames, block) for block in (True, False))
    assert blocking["held"] == 1 and plain["held"] == 0
    assert blocking["decided_after_answer"]
    # Held from the push until (at least) the answer's response_end; 0.25 s for the SSE delivery of that event.
    assert blocking["latency_s"] >= blocking["answer_ended_at"] - blocking["pushed_at"] - 0.25
    assert plain["latency_s"] < blocking["latency_s"]


def _clip_pushed_during_an_answer(http, server, frames, blocking: bool) -> dict:
    """Clips 0-1 (clip 1 triggers), then the frame closing clip 2 as soon as the trigger shows, then the end."""
    body = {"question": QUESTION, "max_tokens": 64, "blocking_reaction": blocking}  # a long answer: ~0.5 s on a CPU
    created = http.post("/v1/sessions", json=body)
    assert created.status_code == 201, created.text
    session = created.json()
    assert session["blocking_reaction"] is blocking and session["held_frames"] == 0
    path = f"/v1/sessions/{session['id']}"
    reader = EventReader(server.url + session["events_url"])
    reader.start()
    assert reader.connected.wait(30)

    def push(timestamp: float) -> None:
        image = base64.b64encode(jpeg(frames[timestamp].pixels)).decode()
        reply = http.post(f"{path}/frames", json={"frames": [{"timestamp": timestamp, "image": image}]})
        assert reply.status_code == 202, reply.text

    push(0.0)
    push(31.5)  # two frames fill clips 0 and 1: the 1-fps sampler repeats a frame over the gap
    assert [d["respond"] for d in reader.wait_for("decision", 2)] == [False, True]
    push(47.5)  # closes clip 2 while clip 1's answer runs
    pushed_at = time.monotonic()
    held = http.get(path).json()["held_frames"]
    assert http.post(f"{path}/end").status_code == 202  # held too in a blocking session, behind the frame
    reader.finish()
    http.delete(path)
    assert [d["clip"] for d in reader.named("decision")] == [0, 1, 2]
    assert reader.named("end")[0]["clips"] == 3
    names = [name for _, name, _ in reader.events]
    assert "response_end" in names, "clip 1's trigger gave no answer"
    answer_end, clip2 = names.index("response_end"), len(names) - 1 - names[::-1].index("decision")
    return {"held": held, "pushed_at": pushed_at, "latency_s": reader.events[clip2][2]["latency_s"],
            "answer_ended_at": reader.events[answer_end][0], "decided_after_answer": clip2 > answer_end}
