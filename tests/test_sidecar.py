"""The sidecar engine: frames of many streams in, batched perception and decision, events out.

In-process tests drive ``SidecarEngine`` with real decoded frames; the last test runs the real sidecar process
through ``SidecarClient``.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dispider_vllm.checkpoint.random import ensure_default_checkpoint
from dispider_vllm.decision.engine import DecisionConfig, clip_bytes_at_shapes
from dispider_vllm.perception.frames import decode_video, load_preprocessor_config
from dispider_vllm.perception.modules import PerceptionDecisionModules
from dispider_vllm.sidecar.client import SidecarClient, SidecarConfig
from dispider_vllm.sidecar.turn_log import read_turns
from dispider_vllm.sidecar.engine import ArrivalPolicy, SidecarEngine, make_respond_policy
from dispider_vllm.sidecar.protocol import (
    AskQuestion,
    ClipPerceived,
    CloseStream,
    Decision,
    OpenStream,
    PushEncoded,
    PushFrames,
    Shutdown,
    StreamEnded,
    StreamError,
    StreamOptions,
    Triggered,
)
from dispider_vllm.types import Frame
from dispider_vllm.video.synth import make_test_video


@pytest.fixture(scope="module")
def part_dir() -> Path:
    return Path(ensure_default_checkpoint().split.perception_decision_dir)


@pytest.fixture(scope="module")
def modules(part_dir) -> PerceptionDecisionModules:
    return PerceptionDecisionModules.load(part_dir)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[Frame]:
    """40 s of a generated 2-fps video, decoded for real: 2 whole clips and a partial one at 1 fps."""
    path = make_test_video(tmp_path_factory.mktemp("video") / "clip.mp4", seconds=40, fps=2, scenes=2)
    return list(decode_video(path))


def new_engine(modules, part_dir, *, respond_every: int = 2, **kwargs) -> SidecarEngine:
    return SidecarEngine(
        modules,
        preprocessor=load_preprocessor_config(part_dir / "vision_tower"),
        decision_config=DecisionConfig(),
        respond_policy=make_respond_policy(respond_every, None),  # 2: trigger at clips 1, 3, ...
        **kwargs,
    )


def run_until_idle(engine: SidecarEngine, events: list) -> list:
    while engine.has_work():
        events.extend(engine.step())
        # the engine counts its waiting clips beside the streams' queues: the count must not drift from them
        assert engine.pending_clips() == sum(len(stream.ready) for stream in engine.streams.values())
    return events


def outcomes(events: list, stream_id: str) -> list[tuple]:
    """What a stream was told: (clip, logit, triggered, retrieved) per decision, in order."""
    rows = []
    for event in events:
        if isinstance(event, Decision) and event.event.stream_id == stream_id:
            rows.append((event.event.clip_index, round(event.event.logit, 4), False, ()))
        if isinstance(event, Triggered) and event.trigger.event.stream_id == stream_id:
            trigger = event.trigger
            rows.append((trigger.event.clip_index, round(trigger.event.logit, 4), True, trigger.retrieved))
    return rows


def feed(engine, stream_id: str, frames: list[Frame], *, chunk: int = 7) -> list:
    events = []
    for start in range(0, len(frames), chunk):
        last = start + chunk >= len(frames)
        events += engine.handle(PushFrames(stream_id, tuple(frames[start : start + chunk]), end_of_stream=last))
    return events


def test_one_stream_clips_decisions_triggers_and_end(modules, part_dir, frames):
    engine = new_engine(modules, part_dir)
    events = engine.handle(OpenStream("a", "What changes in the scene?"))
    events += feed(engine, "a", frames)
    run_until_idle(engine, events)
    perceived = [e for e in events if isinstance(e, ClipPerceived)]
    assert [(e.clip_index, e.start, e.end) for e in perceived] == [(0, 0, 16), (1, 16, 32), (2, 32, 40)]
    rows = outcomes(events, "a")
    assert [row[0] for row in rows] == [0, 1, 2]
    assert [row[2] for row in rows] == [False, True, False]
    trigger = next(e for e in events if isinstance(e, Triggered)).trigger
    assert trigger.bundle.raw.shape == (2, 1024, modules.raw_dim)
    assert trigger.bundle.global_memory.shape == (2, modules.hidden_size)
    assert trigger.question == "What changes in the scene?"
    assert isinstance(events[-1], StreamEnded) and events[-1].reason == "end_of_stream" and events[-1].clips == 3
    assert all(e.latency_s >= 0 for e in events if isinstance(e, (Decision, Triggered)))


def test_an_fp8_engine_perceives_and_decides_the_same_clips_with_close_logits(modules, part_dir, frames):
    """--sidecar-quantization fp8: the same clips, triggers and retrievals; the logits move a little."""
    rows = {}
    for fp8 in (False, True):
        engine = new_engine(modules, part_dir, fp8=fp8)
        try:
            events = engine.handle(OpenStream("a", "What changes in the scene?"))
            events += feed(engine, "a", frames)
            rows[fp8] = outcomes(run_until_idle(engine, events), "a")
            assert engine.features()["quantization"] == ("fp8" if fp8 else None)
            if fp8:  # perception's and decision's views of the one compact LLM share one FP8 copy of it
                assert engine.decision.lm._qkv[0] is engine.encoder.lm._qkv[0]
        finally:
            engine.close()
    assert [(r[0], r[2], r[3]) for r in rows[True]] == [(r[0], r[2], r[3]) for r in rows[False]]
    exact, approximate = [r[1] for r in rows[False]], [r[1] for r in rows[True]]
    print("logits exact", exact, "fp8", approximate)
    assert exact != approximate
    assert max(abs(a - b) for a, b in zip(exact, approximate)) < 0.5


def _resized(frames: list[Frame], size: tuple[int, int]) -> list[Frame]:
    return [Frame(f.timestamp, np.asarray(Image.fromarray(f.pixels).resize(size))) for f in frames]


def test_device_preprocessing_perceives_and_decides_the_same_clips(modules, part_dir, frames):
    """preprocess_on="device" (the GPU sidecar's default): clips reach the encoder as their uint8 frames and are
    preprocessed there, batched with other streams' clips of other sizes, and with a clip whose frames differ in
    size (preprocessed on the host instead). The same clips, triggers and retrievals; logits within a hair (the
    features themselves: tests/test_perception_decision.py)."""
    streams = {"a": frames, "b": _resized(frames, (200, 150)),
               "c": _resized(frames[:20], (200, 150)) + frames[20:]}  # its first clip mixes two sizes
    rows = {}
    for place in ("host", "device"):
        engine = new_engine(modules, part_dir, preprocess_on=place, max_batch_clips=8)
        try:
            events = [e for stream_id in streams for e in engine.handle(OpenStream(stream_id, "What changes?"))]
            for stream_id, pushed in streams.items():
                events += feed(engine, stream_id, pushed)
            clips = [pending.resolve() for stream in engine.streams.values() for pending in stream.ready]
            run_until_idle(engine, events)
            rows[place] = {stream_id: outcomes(events, stream_id) for stream_id in streams}
            assert engine.features()["preprocess_on"] == place
        finally:
            engine.close()
        kinds = sorted((clip.preprocessed, clip.pixels.dtype, tuple(clip.pixels.shape)) for clip in clips)
        if place == "device":  # a's 3 clips and b's 3 as frames; c's first clip preprocessed on the host
            assert kinds.count((False, torch.uint8, (16, 150, 200, 3))) == 3
            assert kinds.count((False, torch.uint8, (16, *frames[0].pixels.shape))) == 5
            assert [kind[0] for kind in kinds].count(True) == 1
        else:
            assert all(kind[0] for kind in kinds)
    for stream_id in streams:
        host, device = rows["host"][stream_id], rows["device"][stream_id]
        assert len(host) == 3 and [(r[0], r[2], r[3]) for r in device] == [(r[0], r[2], r[3]) for r in host]
        assert max(abs(a[1] - b[1]) for a, b in zip(host, device)) < 2e-3, (host, device)


def test_frames_perceived_as_they_arrive_give_the_same_decisions(modules, part_dir, frames):
    """frame_perception="arrival": each sampled frame through the CLIP tower soon after it comes, batched over the
    streams; closed clips come to the encoder as their frames' tokens. "prefill": the compact model's pass over the
    time prompt and the frames' raw tokens too, into each clip's cached prefix; closed clips come with it. Streams
    of two frame sizes and one cut by scene (whose clips still go whole) get the clips, triggers, retrievals and
    logits of frame_perception="clip"; a stream closed mid-clip leaves nothing behind, even to a new stream of the
    same id, and every prefix slot is given back."""
    streams = {"a": frames, "b": _resized(frames, (200, 150)), "scene": frames, "again": frames}
    options = {"scene": StreamOptions(clip_mode="scene")}
    rows, seen_by_mode = {}, {}
    for mode in ("clip", "arrival", "prefill"):
        engine = new_engine(modules, part_dir, preprocess_on="device", frame_perception=mode, max_batch_clips=8,
                            arrival_policy=ArrivalPolicy(batch_frames=4))
        encode, seen = engine.encoder.encode, seen_by_mode.setdefault(mode, [])
        engine.encoder.encode = lambda clips: seen.extend((c.perceived, c.prefilled) for c in clips) or encode(clips)
        try:
            events = engine.handle(OpenStream("again", "What changes?"))  # closed mid-clip, then opened anew
            events += engine.handle(PushFrames("again", tuple(_resized(frames[:10], (200, 150)))))
            events.extend(engine.step())  # its 5 sampled frames through the tower (and into its prefix)
            events += engine.handle(CloseStream("again"))
            events += [e for stream_id in streams
                       for e in engine.handle(OpenStream(stream_id, "What changes?", options.get(stream_id, StreamOptions())))]
            for start in range(0, len(frames), 5):  # the streams' pushes interleaved, steps in between
                for stream_id, pushed in streams.items():
                    chunk = pushed[start : start + 5]
                    events += engine.handle(PushFrames(stream_id, tuple(chunk), end_of_stream=start + 5 >= len(pushed)))
                events.extend(engine.step())
            run_until_idle(engine, events)
            rows[mode] = {stream_id: outcomes(events, stream_id) for stream_id in streams}
            assert engine.features()["frame_perception"] == mode
            assert not engine.streams and not engine._arrived and not engine._closing
            assert not [e for e in events if isinstance(e, StreamError)]
            passes = sum(engine.step_stats.step_seconds["perceive_frames"].counts)
            prefills = sum(engine.step_stats.step_seconds["prefill_frames"].counts)
            if mode == "clip":
                assert engine.frames_perceived_total == 0 and passes == prefills == 0
            else:  # 40 sampled frames of a, b and the second "again" each, and the first's 5 (before its close)
                assert engine.frames_perceived_total == 125 and passes >= 4
                assert (prefills == passes) == (mode == "prefill") and (prefills == 0) == (mode == "arrival")
            pool = engine.encoder.prefix_pool
            assert (pool is not None) == (mode == "prefill")
            if pool is not None:  # every slot back: none held by a closed stream or a decided clip
                assert sorted(pool.free) == list(range(1, pool.num_slots + 1))
                assert engine.features()["prefix_slots"] >= 4
        finally:
            engine.close()
    scene_clips = len(rows["clip"]["scene"])  # those of a and b came as their frames' tokens, the scene's not
    assert seen_by_mode["clip"].count((False, False)) == 9 + scene_clips == len(seen_by_mode["clip"])
    assert (seen_by_mode["arrival"].count((True, False)), len(seen_by_mode["arrival"])) == (9, 9 + scene_clips)
    # a's and b's 3 full clips each and the second "again"'s with their prefix; their partial last ones without
    assert (seen_by_mode["prefill"].count((True, True)), seen_by_mode["prefill"].count((True, False))) == (6, 3)
    for mode in ("clip", "arrival", "prefill"):
        assert rows[mode]["again"] == rows[mode]["a"]
    for stream_id in streams:
        by_clip = rows["clip"][stream_id]
        for mode in ("arrival", "prefill"):
            on_arrival = rows[mode][stream_id]
            assert len(by_clip) >= 2 and [r[0::2] for r in on_arrival] == [r[0::2] for r in by_clip]
            assert max(abs(a[1] - b[1]) for a, b in zip(by_clip, on_arrival)) < 2e-3, (mode, by_clip, on_arrival)


def test_arrived_frames_go_to_the_tower_in_batches_or_when_a_clip_closes(modules, part_dir, frames):
    """ArrivalPolicy: frames wait for the CLIP tower until enough of them wait, the oldest has waited long enough,
    or a closed clip needs them; the loop has no work before that (it waits for commands instead of spinning)."""
    from dispider_vllm.sidecar.engine import ArrivalPolicy

    engine = new_engine(modules, part_dir, preprocess_on="device", frame_perception="arrival",
                        arrival_policy=ArrivalPolicy(batch_frames=4, wait_s=0.2))
    pushed = iter(frames)

    def sample(count: int) -> None:
        """Push frames until ``count`` more have been sampled (at 1 fps from the fixture's 2)."""
        target = len(engine._arrived) + engine.frames_perceived_total + count
        while len(engine._arrived) + engine.frames_perceived_total < target:
            engine.handle(PushFrames("a", (next(pushed),)))

    try:
        engine.handle(OpenStream("a", "What changes?"))
        sample(3)
        assert not engine.has_work()
        sample(1)
        assert engine.has_work() and engine.step() == [] and engine.frames_perceived_total == 4
        sample(1)
        assert not engine.has_work()
        time.sleep(0.25)
        assert engine.has_work() and engine.step() == [] and engine.frames_perceived_total == 5
        sample(10)
        engine.step()  # at most max_frames; all 10 due at once here
        assert engine.frames_perceived_total == 15 and not engine.has_work()
        sample(1)  # the 16th closes clip 0: it goes now, with its last frame
        assert engine.has_work()
        events = engine.step()
        assert engine.frames_perceived_total == 16
        assert [type(e).__name__ for e in events] == ["ClipPerceived", "Decision"]
    finally:
        engine.close()
    with pytest.raises(ValueError, match="needs preprocess_on='device'"):
        new_engine(modules, part_dir, preprocess_on="host", frame_perception="arrival")
    with pytest.raises(ValueError, match="frame_perception is one of"):
        new_engine(modules, part_dir, preprocess_on="device", frame_perception="frame")


def test_a_closing_clip_takes_only_its_own_frames_to_the_tower_unless_frames_go_together(modules, part_dir, frames):
    """Closes first (the default schedule) and with lanes, a step for a closed clip passes that clip's waiting frames,
    not every stream's: the others wait for a pass of their own (with lanes, on a GPU, in the background lane:
    dispider_vllm/sidecar/lanes.py). With the frames together, one pass takes every frame that waits. The decision is
    the same."""
    logits = {}
    for lanes, closes_first in ((True, False), (False, True), (False, False)):
        engine = new_engine(modules, part_dir, preprocess_on="device", frame_perception="arrival", lanes=lanes,
                            arrival_policy=ArrivalPolicy(batch_frames=64, wait_s=60.0, closes_first=closes_first))
        alone = lanes or closes_first
        try:
            for stream_id in ("a", "b"):
                engine.handle(OpenStream(stream_id, "What changes?"))
            engine.handle(PushFrames("b", tuple(frames[:6])))  # 3 sampled frames, no clip closed
            events = engine.handle(PushFrames("a", tuple(frames[:32])))  # 16 sampled: clip 0 closes
            assert engine.has_work()
            events += engine.step()
            assert [type(e).__name__ for e in events] == ["ClipPerceived", "Decision"]
            logits[lanes, closes_first] = events[-1].event.logit
            assert engine.frames_perceived_total == (16 if alone else 19)
            assert [stream.stream_id for _, stream, _ in engine._arrived] == (["b"] * 3 if alone else [])
            assert not engine.has_work()  # b's frames wait for 64 or a minute
            assert engine.features()["lanes"] is lanes and not engine.lanes.on_gpu  # the CPU: no CUDA streams
            assert engine.features()["arrival_policy"]["closes_first"] is closes_first
        finally:
            engine.close()
    assert logits[True, False] == pytest.approx(logits[False, False], abs=1e-5)
    assert logits[False, True] == pytest.approx(logits[False, False], abs=1e-5)


def test_closes_first_the_other_frames_go_after_the_closed_clips_decisions_a_short_pass_at_a_time(
        modules, part_dir, frames):
    """Closes first: frames due for the tower go after the closed clips' decisions in the same step, one pass of at
    most ``max_frames`` a step; the schedules are named as the server's --sidecar-schedule names them."""
    assert ArrivalPolicy.named("closes-first") == ArrivalPolicy() and ArrivalPolicy().closes_first
    assert not ArrivalPolicy.named("together").closes_first and ArrivalPolicy.named("together").max_frames == 512
    with pytest.raises(ValueError, match="schedule is one of"):
        ArrivalPolicy.named("fifo")
    engine = new_engine(modules, part_dir, preprocess_on="device", frame_perception="arrival",
                        arrival_policy=ArrivalPolicy(batch_frames=2, wait_s=60.0, max_frames=2))
    passes = engine.step_stats.step_seconds["perceive_frames"]
    try:
        for stream_id in ("a", "b"):
            engine.handle(OpenStream(stream_id, "What changes?"))
        engine.handle(PushFrames("b", tuple(frames[:10])))  # 5 sampled frames: due (2 wait)
        engine.handle(PushFrames("a", tuple(frames[:32])))  # 16 sampled: clip 0 closes
        events = engine.step()  # a's 16 frames, its clip's pass and decision, then 2 of b's frames
        assert [type(e).__name__ for e in events] == ["ClipPerceived", "Decision"]
        assert engine.frames_perceived_total == 18 and sum(passes.counts) == 2
        assert [stream.stream_id for _, stream, _ in engine._arrived] == ["b"] * 3
        assert engine.has_work() and engine.step() == [] and engine.frames_perceived_total == 20
        assert not engine.has_work() and len(engine._arrived) == 1  # one frame: not due for a minute
    finally:
        engine.close()
    # Short passes behind: every frame that waited wait_s goes in one pass (here b's 5 and a's 8: the catch-up),
    # with lanes too (their background pass).
    for lanes in (False, True):
        engine = new_engine(modules, part_dir, preprocess_on="device", frame_perception="arrival", lanes=lanes,
                            arrival_policy=ArrivalPolicy(batch_frames=2, wait_s=0.1, max_frames=2))
        try:
            for stream_id in ("a", "b"):
                engine.handle(OpenStream(stream_id, "What changes?"))
            engine.handle(PushFrames("b", tuple(frames[:10])))
            engine.handle(PushFrames("a", tuple(frames[:16])))  # 8 sampled frames, no clip closed
            time.sleep(0.15)
            engine.handle(PushFrames("a", tuple(frames[16:22])))  # 3 more, not yet waited long
            assert engine.step() == [] and engine.frames_perceived_total == 13 and len(engine._arrived) == 3
        finally:
            engine.close()


def test_lanes_on_a_cpu_have_no_cuda_streams_and_the_env_turns_them_off(monkeypatch):
    from dispider_vllm.sidecar.lanes import GpuLanes, lanes_enabled

    assert lanes_enabled(True) and not lanes_enabled(False)
    lanes = GpuLanes(torch.device("cpu"), enabled=True)
    made: Future = Future()
    with lanes.urgent(), lanes.background([made]):
        made.set_result(torch.zeros(2))
    lanes.take([made])  # nothing to wait for on one stream
    assert lanes.enabled and not lanes.on_gpu and made.result().tolist() == [0.0, 0.0]
    monkeypatch.setenv("DISPIDER_SIDECAR_LANES", "0")
    assert not lanes_enabled(True) and not GpuLanes(torch.device("cpu"), enabled=True).enabled


def test_streams_batched_together_match_each_stream_alone(modules, part_dir, frames):
    questions = {"a": "What changes in the scene?", "b": "Is there a red square?", "c": "Describe the motion."}
    shifted = {
        "a": frames,
        "b": frames[6:],  # starts later in the video: other pixels, other clips
        "c": [Frame(f.timestamp, np.ascontiguousarray(f.pixels[:, ::-1])) for f in frames],  # mirrored
    }
    alone = {}
    for stream_id, question in questions.items():
        engine = new_engine(modules, part_dir)
        events = engine.handle(OpenStream(stream_id, question))
        events += feed(engine, stream_id, shifted[stream_id])
        alone[stream_id] = outcomes(run_until_idle(engine, events), stream_id)

    engine = new_engine(modules, part_dir, max_batch_clips=4)
    events = []
    for stream_id, question in questions.items():
        events += engine.handle(OpenStream(stream_id, question))
    for start in range(0, len(frames), 5):  # interleave the streams' pushes
        for stream_id in questions:
            chunk = shifted[stream_id][start : start + 5]
            last = start + 5 >= len(shifted[stream_id])
            if chunk or last:
                events += engine.handle(PushFrames(stream_id, tuple(chunk), end_of_stream=last))
        events.extend(engine.step())
    run_until_idle(engine, events)
    assert engine.batches_total >= 2
    for stream_id in questions:
        assert outcomes(events, stream_id) == alone[stream_id], stream_id


def test_bad_frames_get_errors_and_do_not_disturb_other_streams(modules, part_dir, frames):
    reference = new_engine(modules, part_dir)
    expected = outcomes(run_until_idle(reference, reference.handle(OpenStream("good", "q?")) + feed(reference, "good", frames)), "good")

    engine = new_engine(modules, part_dir)
    events = engine.handle(OpenStream("good", "q?")) + engine.handle(OpenStream("bad", "q?"))
    bad_frames = [
        Frame(1.0, np.zeros((100, 100), dtype=np.uint8)),  # wrong shape
        Frame(2.0, np.zeros((100, 100, 3), dtype=np.float32)),  # wrong dtype
        Frame(3.0, np.zeros((100, 100, 3), dtype=np.uint8)),
        Frame(2.5, np.zeros((100, 100, 3), dtype=np.uint8)),  # timestamp goes back
    ]
    for frame in bad_frames:
        events += engine.handle(PushFrames("bad", (frame,)))
    events += engine.handle(PushFrames("nobody", frames[:2]))
    events += feed(engine, "good", frames)
    run_until_idle(engine, events)
    errors = [e for e in events if isinstance(e, StreamError)]
    assert [e.code for e in errors if e.stream_id == "bad"] == ["invalid_frame"] * 3
    assert any("back" in e.message for e in errors if e.stream_id == "bad")
    assert [e.code for e in errors if e.stream_id == "nobody"] == ["unknown_stream"]
    assert outcomes(events, "good") == expected
    # The bad stream is still usable after its errors.
    more = engine.handle(PushFrames("bad", tuple(Frame(3.0 + f.timestamp, f.pixels) for f in frames), end_of_stream=True))
    run_until_idle(engine, more)
    assert [row[0] for row in outcomes(more, "bad")] == [0, 1, 2]


def _sid(event) -> str:
    return event.event.stream_id if isinstance(event, Decision) else event.trigger.event.stream_id


def test_new_question_and_close(modules, part_dir, frames):
    engine = new_engine(modules, part_dir, respond_every=1)
    events = engine.handle(OpenStream("a", "first question?"))
    events += engine.handle(PushFrames("a", tuple(frames[:34])))
    run_until_idle(engine, events)
    events += engine.handle(AskQuestion("a", "second question?"))
    events += engine.handle(PushFrames("a", tuple(frames[34:66])))
    run_until_idle(engine, events)
    triggers = [e.trigger for e in events if isinstance(e, Triggered)]
    assert [t.question for t in triggers] == ["first question?", "second question?"]
    assert triggers[1].event.question_id == triggers[0].event.question_id + 1
    closed = engine.handle(CloseStream("a"))
    assert isinstance(closed[0], StreamEnded) and closed[0].reason == "closed"
    assert engine.handle(PushFrames("a", tuple(frames[:1])))[0].code == "unknown_stream"


@pytest.mark.parametrize("frame_perception", ["auto", "arrival", "prefill"])
def test_real_sidecar_process(part_dir, frames, tmp_path, frame_perception):
    """auto on the CPU: frames preprocessed on host threads, the CLIP tower at each clip's close; arrival: frames
    preprocessed on the device and through the tower as they come (a GPU sidecar's default); prefill: and through
    the compact model's pass into each clip's cached prefix; same events."""
    turn_log = tmp_path / "turns.jsonl"

    async def scenario():
        client = SidecarClient(SidecarConfig(part_dir=str(part_dir), respond_every=2, threads=1,
                                             turn_log=str(turn_log), frame_perception=frame_perception))
        ready = await client.start(timeout=300)
        assert ready.device == "cpu"
        assert (ready.features["preprocess_on"], ready.features["frame_perception"]) == {
            "auto": ("host", "clip"), "arrival": ("device", "arrival"),
            "prefill": ("device", "prefill")}[frame_perception]
        assert (ready.features["prefix_slots"] > 0) == (frame_perception == "prefill")
        queues = {sid: client.subscribe(sid) for sid in ("x", "y")}
        for sid in queues:
            client.send(OpenStream(sid, f"question for {sid}"))
        client.send(PushFrames("x", tuple(frames), end_of_stream=True))
        client.send(PushFrames("y", tuple(frames[:40]), end_of_stream=True))
        seen = {}
        for sid, queue in queues.items():
            events = []
            while not events or not isinstance(events[-1], StreamEnded):
                events.append(await asyncio.wait_for(queue.get(), timeout=300))
            seen[sid] = events
        await client.stop()
        return seen

    seen = asyncio.run(scenario())
    assert seen["x"][-1].clips == 3 and seen["y"][-1].clips == 2
    for sid, events in seen.items():
        decided = [e for e in events if isinstance(e, (Decision, Triggered))]
        assert all(_sid(e) == sid for e in decided)  # each stream sees only its own events
        assert any(isinstance(e, Triggered) for e in decided)
    # The turn log accounts for every command taken in, every clip stepped and every decision sent back.
    turns = read_turns(turn_log)
    assert all(a.started <= b.started for a, b in zip(turns, turns[1:]))
    taken = Counter(kind for turn in turns for kind, n in turn.commands.items() for _ in range(n))
    sent = Counter(kind for turn in turns for kind, n in turn.events.items() for _ in range(n))
    assert taken["OpenStream"] == 2 and taken["PushFrames"] == 2
    assert sum(turn.clips for turn in turns) == 5
    decided = sum(1 for events in seen.values() for e in events if isinstance(e, (Decision, Triggered)))
    assert sent["Decision"] + sent["Triggered"] == decided and sent["StreamEnded"] == 2
    assert all(turn.step_s > 0 for turn in turns if turn.clips)


def test_command_intake_hands_every_queued_frame_to_one_drain_in_order():
    """The pipe between server and sidecar holds less than one frame; read only between steps, it gave the loop
    about one frame per step. The intake thread empties it meanwhile, so one drain takes everything queued."""
    import multiprocessing

    from dispider_vllm.sidecar.process import CommandIntake, _drain

    commands = multiprocessing.get_context("spawn").Queue()
    frame = np.zeros((240, 320, 3), np.uint8)
    for i in range(40):
        commands.put(PushFrames("s", (Frame(float(i), frame),)))
    intake = CommandIntake(commands)
    deadline = time.monotonic() + 30
    while intake.queue.qsize() < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    drained = _drain(intake.queue, block=False)
    assert [command.frames[0].timestamp for command in drained] == [float(i) for i in range(40)]
    commands.put(Shutdown())


def test_decoder_keeps_each_streams_order_and_serves_uploads_side_by_side(tmp_path):
    """Two long uploads advance in turn (not one after the other); a stream's later command waits behind its upload."""
    from dispider_vllm.sidecar.process import DECODED_FRAMES_PER_PIECE, VideoDecoder

    seconds = 3 * DECODED_FRAMES_PER_PIECE
    video = make_test_video(tmp_path / "long.mp4", seconds=seconds, fps=1, size=(64, 48), seed=3).read_bytes()
    decoder = VideoDecoder()
    for stream_id in ("a", "b"):
        decoder.submit(PushEncoded(stream_id, video, time_offset=0.0))
    assert decoder.takes(AskQuestion("a", "and now?"))
    decoder.submit(AskQuestion("a", "and now?"))

    deadline = time.monotonic() + 60
    while decoder.decoding() and time.monotonic() < deadline:
        time.sleep(0.01)
    handed = decoder.take(100)
    assert not decoder.has_ready()
    assert [command.stream_id for command in handed] == ["a", "b", "a", "b", "a", "b", "a"]  # in turn
    a_commands = [command for command in handed if command.stream_id == "a"]
    assert isinstance(a_commands[-1], AskQuestion)  # behind a's whole upload
    a_times = [frame.timestamp for command in a_commands[:-1] for frame in command.frames]
    assert a_times == sorted(a_times) and len(a_times) == seconds
    assert not decoder.takes(AskQuestion("a", "later"))  # nothing of a's left: straight to the engine


def test_random_respond_policy_spreads_answers_over_streams_and_repeats_itself():
    """--respond-probability: about P of the clips answer, not in lockstep across streams, the same on a rerun."""
    policy = make_respond_policy(None, 0.125)
    answers = {(f"s{s}", c): policy(f"s{s}", c) for s in range(64) for c in range(64)}
    assert 0.10 < sum(answers.values()) / len(answers) < 0.15
    assert len({tuple(answers[f"s{s}", c] for c in range(64)) for s in range(64)}) > 60  # streams differ
    assert all(policy(stream, clip) == answer for (stream, clip), answer in answers.items())
    assert make_respond_policy(2, None)("any", 1) and not make_respond_policy(2, None)("any", 0)


# ---- preprocessing on the engine's pool, step statistics ---------------------------------------------------------
def preprocess_recorder(monkeypatch, *, delay=lambda window: 0.0, fail=lambda window: False) -> list[str]:
    """Wraps the engine's clip preprocessing: records the thread of each call, delays or fails chosen windows."""
    import threading

    import dispider_vllm.sidecar.engine as engine_module

    real, threads = engine_module.make_clip, []

    def make_clip(window, preprocessor):
        threads.append(threading.current_thread().name)
        time.sleep(delay(window))
        if fail(window):
            raise RuntimeError(f"cannot preprocess clip {window.index}")
        return real(window, preprocessor)

    monkeypatch.setattr(engine_module, "make_clip", make_clip)
    return threads


def test_preprocessing_runs_on_the_pool_and_keeps_each_streams_clip_order(modules, part_dir, frames, monkeypatch):
    """A stream's first clip finishes preprocessing after its later ones: the later ones still wait for it, so
    every stream's clips are perceived and decided in order, as with inline preprocessing."""
    threads = preprocess_recorder(monkeypatch, delay=lambda window: 0.05 if window.index == 0 else 0.0)
    streams = {f"s{i}": frames[i:] for i in range(6)}  # other starts, other clips

    def run(workers: int) -> list:
        engine = new_engine(modules, part_dir, max_batch_clips=4, preprocess_workers=workers, preprocess_wait_s=0.005)
        events = []
        for stream_id in streams:
            events += engine.handle(OpenStream(stream_id, "What changes in the scene?"))
        for stream_id, stream_frames in streams.items():
            events += feed(engine, stream_id, stream_frames)
        run_until_idle(engine, events)
        engine.close()
        return events

    inline = run(0)
    assert set(threads) == {"MainThread"}
    threads.clear()
    pooled = run(3)
    assert len(threads) == 18 and all(name.startswith("sidecar-preprocess") for name in threads)
    for stream_id in streams:
        perceived = [e.clip_index for e in pooled if isinstance(e, ClipPerceived) and e.stream_id == stream_id]
        assert perceived == [0, 1, 2], stream_id
        assert [row[0] for row in outcomes(pooled, stream_id)] == [0, 1, 2]
        assert outcomes(pooled, stream_id) == outcomes(inline, stream_id)
    ended = [e for e in pooled if isinstance(e, StreamEnded)]
    assert sorted(e.stream_id for e in ended) == sorted(streams) and all(e.clips == 3 for e in ended)
    assert not [e for e in pooled if isinstance(e, StreamError)]


def test_frames_are_preprocessed_as_they_arrive_and_a_closing_clip_only_stacks(modules, part_dir, frames,
                                                                               monkeypatch):
    """Each sampled frame's preprocessing starts on the pool when it is pushed, before its clip closes; the clip made
    from those prepared frames is the same, bit for bit, as one preprocessed in one go."""
    import dispider_vllm.sidecar.engine as engine_module
    from dispider_vllm.perception.clips import ClipWindow, PreparedFrame

    resized_at: list[float] = []
    real_resize = engine_module.prepare_frame_pixels
    monkeypatch.setattr(engine_module, "prepare_frame_pixels",
                        lambda frame, config: (resized_at.append(frame.timestamp), real_resize(frame, config))[1])
    engine = new_engine(modules, part_dir, preprocess_workers=2)
    engine.handle(OpenStream("a", "q?"))
    engine.handle(PushFrames("a", tuple(frames[:20])))  # 2 fps: 10 sampled frames, no clip closed yet
    deadline = time.monotonic() + 10
    while len(resized_at) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(resized_at) == 10 and engine.pending_clips() == 0
    engine.handle(PushFrames("a", tuple(frames[20:34])))  # 17 sampled: the first clip closes
    assert engine.pending_clips() == 1
    clip = engine.streams["a"].ready[0].clip.result(timeout=10)
    assert len(resized_at) == 17  # each frame once, none again at the clip's close
    window_frames = tuple(f for f in frames[:34] if f.timestamp in clip.frame_times)
    assert len(window_frames) == 16 and all(not isinstance(f, PreparedFrame) for f in window_frames)
    whole = engine_module.make_clip(ClipWindow(clip.index, clip.start, clip.end, window_frames), engine.preprocessor)
    assert whole.pixels.dtype == torch.float32 and torch.equal(clip.pixels, whole.pixels)
    engine.close()


def test_a_step_waits_briefly_for_clips_in_preprocessing(modules, part_dir, frames, monkeypatch):
    """A clip still on the pool keeps the engine busy (the stream is not finished) and a step waits for it,
    up to ``preprocess_wait_s``, instead of returning at once for the loop to spin."""
    preprocess_recorder(monkeypatch, delay=lambda window: 0.3)
    engine = new_engine(modules, part_dir, preprocess_workers=2, preprocess_wait_s=0.01)
    engine.handle(OpenStream("a", "q?"))
    assert engine.handle(PushFrames("a", tuple(frames[:34]), end_of_stream=True)) == []  # 2 clips, in the pool
    assert engine.has_work() and engine.pending_clips() == 2
    started = time.monotonic()
    assert engine.step() == []  # nothing preprocessed yet: waited, took nothing
    assert 0.005 < time.monotonic() - started < 0.25
    assert engine.has_work() and "a" in engine.streams
    engine.preprocess_wait_s = 30.0
    events = engine.step()  # waits until both are done, then perceives them in one batch
    assert [e.clip_index for e in events if isinstance(e, ClipPerceived)] == [0, 1]
    assert isinstance(events[-1], StreamEnded) and events[-1].clips == 2 and not engine.has_work()
    engine.close()


@pytest.mark.parametrize("workers", [0, 2], ids=["inline", "pool"])
def test_a_clip_whose_preprocessing_fails_is_an_error_of_its_stream_only(modules, part_dir, frames, monkeypatch,
                                                                          workers):
    reference = new_engine(modules, part_dir)
    events = reference.handle(OpenStream("good", "q?")) + feed(reference, "good", frames)
    expected = outcomes(run_until_idle(reference, events), "good")

    bad_frames = [Frame(f.timestamp, f.pixels.copy()) for f in frames]
    bad_pixels = {id(f.pixels) for f in bad_frames}
    preprocess_recorder(monkeypatch, fail=lambda w: w.index == 1 and id(w.frames[0].pixels) in bad_pixels)
    engine = new_engine(modules, part_dir, preprocess_workers=workers)
    events = engine.handle(OpenStream("good", "q?")) + engine.handle(OpenStream("bad", "q?"))
    events += feed(engine, "bad", bad_frames) + feed(engine, "good", frames)
    run_until_idle(engine, events)
    errors = [e for e in events if isinstance(e, StreamError)]
    assert [(e.stream_id, e.code) for e in errors] == [("bad", "internal_error")]
    assert "clip 1" in errors[0].message and "cannot preprocess" in errors[0].message
    assert [row[0] for row in outcomes(events, "bad")] == [0, 2]  # the other clips of the stream go on
    assert outcomes(events, "good") == expected
    ended = {e.stream_id: e for e in events if isinstance(e, StreamEnded)}
    assert set(ended) == {"good", "bad"} and ended["bad"].reason == "end_of_stream"
    engine.close()


def test_stats_report_each_steps_clips_phases_and_queue_waits(modules, part_dir, frames):
    from dispider_vllm.gc_pauses import GcPauseMeter
    from dispider_vllm.sidecar.process import CommandIntake, _stats

    engine = new_engine(modules, part_dir, max_batch_clips=2)
    # A frame push that the server received 50 ms before the sidecar's intake thread took it in.
    commands: queue.Queue = queue.Queue()
    intake = CommandIntake(commands)
    commands.put(PushFrames("a", (), received_at=time.time() - 0.05))
    intake.queue.get(timeout=10)
    events = engine.handle(OpenStream("a", "q?")) + engine.handle(OpenStream("b", "q?"))
    pushed = time.time()
    events += feed(engine, "a", frames) + feed(engine, "b", frames)
    run_until_idle(engine, events)
    waited_at_most = time.time() - pushed
    gc_pauses = GcPauseMeter()
    gc.collect()
    stats = _stats(engine, intake, gc_pauses)
    gc_pauses.close()
    assert sum(stats.transit_seconds.counts) == 1 and 0.05 <= stats.transit_seconds.total < 5
    assert set(stats.gc_pause_seconds) == {"0", "1", "2"} and sum(stats.gc_pause_seconds["2"].counts) == 1
    assert stats.clips_total == 6 and stats.batches_total >= 3
    assert sum(stats.batch_clips.counts) == stats.batches_total and stats.batch_clips.total == 6
    assert set(stats.step_seconds) == {"preprocess_wait", "perceive_frames", "prefill_frames", "perceive", "decide"}
    assert sum(stats.step_seconds.pop("perceive_frames").counts) == 0  # frames go to the tower with their clips here
    assert sum(stats.step_seconds.pop("prefill_frames").counts) == 0
    for phase, histogram in stats.step_seconds.items():
        assert sum(histogram.counts) == stats.batches_total, phase
        assert len(histogram.counts) == len(histogram.bounds) + 1 and histogram.total >= 0
    assert stats.step_seconds["perceive"].total > 0 and stats.step_seconds["decide"].total > 0
    assert sum(stats.queue_wait_seconds.counts) == 6
    assert 0 <= stats.queue_wait_seconds.total <= 6 * waited_at_most
    engine.close()


def test_the_sidecar_process_preprocesses_on_a_pool(part_dir):
    from dispider_vllm.sidecar.process import _build_engine

    assert SidecarConfig(part_dir=str(part_dir)).preprocess_workers > 0
    assert _build_engine(SidecarConfig(part_dir=str(part_dir), preprocess_workers=3)).preprocess_workers == 3
    engine = _build_engine(SidecarConfig(part_dir=str(part_dir), preprocess_workers=0))
    assert engine.preprocess_workers == 0
    assert engine.preprocess_on == "host"  # auto on the CPU: host threads overlap the CPU's model work
    on_device = _build_engine(SidecarConfig(part_dir=str(part_dir), preprocess_on="device"))
    assert (on_device.preprocess_on, on_device.preprocess_workers, on_device._pool) == ("device", 0, None)
    # frame_perception auto: frames through the tower on arrival wherever the device preprocesses them
    assert (engine.frame_perception, on_device.frame_perception) == ("clip", "arrival")
    arrival = _build_engine(SidecarConfig(part_dir=str(part_dir), frame_perception="arrival"))
    assert (arrival.preprocess_on, arrival.frame_perception) == ("device", "arrival")
    by_clip = _build_engine(SidecarConfig(part_dir=str(part_dir), preprocess_on="device", frame_perception="clip"))
    assert by_clip.frame_perception == "clip"


def test_a_kv_slot_count_the_memory_cannot_hold_is_refused_before_it_is_allocated(modules, part_dir):
    """--sidecar-kv-slots is checked against what the sidecar may take (its share of a GPU it shares with vLLM,
    what is free of one of its own, the host's available memory on the CPU) before the pool is allocated."""
    from dispider_vllm.decision.engine import DecisionConfig, DecisionEngine, KVPoolTooLarge
    from dispider_vllm.sidecar.process import _build_engine, shared_gpu_budget

    with pytest.raises(ValueError) as refused:
        _build_engine(SidecarConfig(part_dir=str(part_dir), kv_slots=10**9))  # petabytes: nothing is allocated
    message = str(refused.value)
    assert message.startswith("--sidecar-kv-slots 1000000000: the decision KV caches of 1000000000 streams take")
    assert "(the host's available memory); lower --sidecar-kv-slots" in message

    async def start_the_process():  # the same refusal from the sidecar's own process, as the server sees it
        client = SidecarClient(SidecarConfig(part_dir=str(part_dir), kv_slots=10**9, threads=1, frame_ring_mb=0))
        try:
            await client.start(timeout=300)
        finally:
            await client.stop()

    with pytest.raises(RuntimeError, match=r"did not start: ValueError: --sidecar-kv-slots 1000000000: the decision"):
        asyncio.run(start_the_process())
    # The check counts what the pool allocates: a budget of exactly that passes, one byte less does not.
    exact = DecisionEngine(modules, DecisionConfig(initial_kv_slots=3)).kv_pool_bytes()
    fits = DecisionEngine(modules, DecisionConfig(initial_kv_slots=3, kv_memory_budget_bytes=exact))
    assert fits.kv_pool_bytes() == exact
    with pytest.raises(KVPoolTooLarge, match="of 3 streams take"):
        DecisionEngine(modules, DecisionConfig(initial_kv_slots=3, kv_memory_budget_bytes=exact - 1))
    # On a GPU shared with vLLM the share counts, not what is free (vLLM may not have taken its part yet).
    gib = 2**30
    budget, source = shared_gpu_budget(100 * gib, 140 * gib, 0.25, 4 * gib, "cuda:0")
    assert budget == 31 * gib and source.startswith("the 0.25 of cuda:0's 140 GiB that vLLM leaves the sidecar")
    assert shared_gpu_budget(60 * gib, 80 * gib, None, 4 * gib, "cuda:1") == (60 * gib, "free on cuda:1")


def test_kept_clips_of_all_streams_stay_within_the_budget_and_are_reported(modules, part_dir, frames):
    """Two streams of real clips under a budget of 3 clips: the stream keeping the most clips loses its oldest (ties:
    the one opened first), the sidecar's stats report what is kept, and closing the streams frees it all."""
    from dispider_vllm.gc_pauses import GcPauseMeter
    from dispider_vllm.sidecar.process import CommandIntake, _build_engine, _stats

    per_clip = clip_bytes_at_shapes(modules)
    engine = SidecarEngine(modules, preprocessor=load_preprocessor_config(part_dir / "vision_tower"),
                           decision_config=DecisionConfig(top_k=1, kept_clips_budget_bytes=3 * per_clip),
                           respond_policy=make_respond_policy(2, None))
    intake, gc_pauses = CommandIntake(queue.Queue()), GcPauseMeter()

    def stats() -> tuple[int, int, int, int | None]:
        report = _stats(engine, intake, gc_pauses)
        return report.kept_clips, report.kept_clip_bytes, report.kept_clips_evicted_total, report.kept_clip_budget_bytes

    features = engine.features()
    assert (features["max_kept_clips"], features["kept_clips_budget_bytes"]) == (225, 3 * per_clip)
    assert features["kept_clip_bytes"] == per_clip
    events = engine.handle(OpenStream("a", "q?")) + engine.handle(OpenStream("b", "q?"))
    for sid in "ab":
        events += engine.handle(PushFrames(sid, tuple(frames)))  # two whole clips each; the third still open
    run_until_idle(engine, events)
    assert {sid: engine.decision.kept_clip_indices(sid) for sid in "ab"} == {"a": [1], "b": [0, 1]}
    assert stats() == (3, 3 * per_clip, 1, 3 * per_clip)
    triggered = [e.trigger for e in events if isinstance(e, Triggered)]
    retrieved = {t.event.stream_id: t.retrieved for t in triggered}  # at clip 1: the top_k = 1 of what is kept
    assert retrieved["a"] == (1,) and retrieved["b"] in {(0,), (1,)}
    for sid in "ab":  # the partial third clips close: b (3 clips) loses its oldest, then a (tied at 2, opened first)
        events += engine.handle(PushFrames(sid, (), end_of_stream=True))
    run_until_idle(engine, events)
    assert [e.stream_id for e in events if isinstance(e, StreamEnded)] == ["a", "b"]
    assert stats() == (0, 0, 3, 3 * per_clip)
    gc_pauses.close()
    engine.close()
    # The sidecar process builds its engine with the server's settings.
    built = _build_engine(SidecarConfig(part_dir=str(part_dir), max_kept_clips=5, kept_clips_budget_bytes=12345))
    assert (built.decision.config.max_kept_clips, built.decision.config.kept_clips_budget_bytes) == (5, 12345)
    built.close()


def test_lanes_bench_tiny_writes_a_well_formed_report(tmp_path):
    """benchmarks/lanes_bench.py --tiny: three live settings of the same streams, each timed, their decisions alike;
    settings it does not know, or fewer than two, refused before any run."""
    import importlib.util
    import json
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lanes_bench.py"
    spec = importlib.util.spec_from_file_location("lanes_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    (tmp_path / "file").touch()
    for refused_args in (["--out", str(tmp_path / "file" / "x.json")],  # under a file: it cannot be written
                         ["--settings", "lanes"], ["--settings", "lanes,lanes"], ["--settings", "lanes,fast"]):
        with pytest.raises(SystemExit) as refused:
            bench.main(["--tiny", *refused_args])
        assert refused.value.code == 2
    out = tmp_path / "lanes.json"
    # 2 streams started 8 s apart: the first's clip closes at 15 s, in the measured 2 s
    assert bench.main(["--tiny", "--streams", "2", "--warmup", "15", "--seconds", "2", "--out", str(out),
                       "--settings", "lanes,one_stream,eager_frames,closes_first"]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "lanes" and report["device"]["name"].startswith("CPU")
    assert report["settings"] == ["lanes", "one_stream", "eager_frames", "closes_first"] and report["ok"]
    expected = (("lanes", True, 32, False), ("one_stream", False, 32, False), ("eager_frames", False, 0, False),
                ("closes_first", False, 32, True))
    for name, lanes, graph_frames, closes_first in expected:
        setting = report[name]
        assert setting["lanes"] is lanes and setting["max_graph_frames"] == graph_frames
        assert setting["arrival_policy"]["closes_first"] is closes_first
        assert setting["frames_late"] == 0 and setting["clips_decided"] >= 1
        assert setting["decision_latency_s"]["count"] >= 1 and setting["decision_latency_s"]["p50"] > 0
        assert setting["frames_pushed"] >= 2 * 9 and setting["steps"] >= 1
    for name in ("one_stream", "eager_frames", "closes_first"):
        assert report["agreement"][name]["ok"] and report["agreement"][name]["clips"] >= 1
        assert report["ratios"][f"{name}_over_lanes"]["p50"] > 0
