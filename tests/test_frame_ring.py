"""The frame ring: frames' pixels from the server to the sidecar through shared memory, in order, never lost."""

from __future__ import annotations

import io
import multiprocessing
import time

import numpy as np
import pytest
from PIL import Image

from dispider_vllm.perception.frames import decode_image
from dispider_vllm.sidecar.frame_ring import ALIGN, EncodedFrameInRing, FrameInRing, FrameRing
from dispider_vllm.sidecar.protocol import PushFrames, PushSharedFrames, Shutdown
from dispider_vllm.types import EncodedFrame, Frame


def _frame(index: int, shape=(24, 32, 3)) -> Frame:
    rng = np.random.default_rng(index)
    return Frame(float(index), rng.integers(0, 256, shape, dtype=np.uint8))


@pytest.fixture
def ring_pair():
    frame_bytes = 24 * 32 * 3  # 2304, a multiple of ALIGN
    writer = FrameRing.create(int(3.5 * frame_bytes))  # three frames and a half: every fourth one wraps
    reader = FrameRing.attach(writer.name)
    yield writer, reader
    reader.close()
    writer.close()


def test_frames_cross_the_ring_in_order_and_wrap_around(ring_pair):
    writer, reader = ring_pair
    offsets = []
    for index in range(20):
        frame = _frame(index)
        place = writer.put(frame)
        assert isinstance(place, FrameInRing)
        offsets.append(place.offset)
        taken = reader.take(place)
        assert taken.timestamp == frame.timestamp
        np.testing.assert_array_equal(taken.pixels, frame.pixels)
    assert offsets[:5] == [0, 2304, 4608, 0, 2304]  # the half-frame tail is skipped, not split
    assert all(offset % ALIGN == 0 for offset in offsets)


def test_a_full_ring_hands_the_frame_back_whole_until_the_reader_catches_up(ring_pair):
    writer, reader = ring_pair
    places = [writer.put(_frame(i)) for i in range(3)]
    assert all(isinstance(place, FrameInRing) for place in places)
    overflow = _frame(3)
    assert writer.put(overflow) is overflow  # no room: it goes through the pipe as it is
    assert writer.put(_frame(4, shape=(240, 320, 3))).timestamp == 4.0  # larger than the ring: whole as well
    for place in places:  # the pixels still in the ring were not overwritten by the refused frames
        np.testing.assert_array_equal(reader.take(place).pixels, _frame(int(place.timestamp)).pixels)
    assert isinstance(writer.put(_frame(5)), FrameInRing)


def test_frames_of_other_types_go_whole(ring_pair):
    writer, _ = ring_pair
    floats = Frame(0.0, np.zeros((4, 4, 3), np.float32))
    assert writer.put(floats) is floats


def test_the_intake_turns_shared_frames_back_into_frames_in_order(ring_pair):
    """The sidecar's intake copies each frame out as its command arrives; frames that came whole stay in place."""
    from dispider_vllm.sidecar.process import CommandIntake, _drain

    writer, reader = ring_pair
    commands = multiprocessing.get_context("spawn").Queue()
    intake = CommandIntake(commands, reader)
    sent = [_frame(i) for i in range(12)]
    for first in range(0, 12, 4):  # four frames a push: the fourth of each does not fit until the reader moves
        places = tuple(writer.put(frame) for frame in sent[first : first + 4])
        commands.put(PushSharedFrames("s", places, received_at=time.time()))
        deadline = time.monotonic() + 30
        while intake.queue.qsize() < first // 4 + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    commands.put(Shutdown())
    drained = _drain(intake.queue, block=True)
    pushes = [command for command in drained if isinstance(command, PushFrames)]
    received = [frame for push in pushes for frame in push.frames]
    assert [frame.timestamp for frame in received] == [frame.timestamp for frame in sent]
    for got, want in zip(received, sent):
        np.testing.assert_array_equal(got.pixels, want.pixels)
    assert intake.transit_seconds.snapshot().counts  # each push was timed
    assert sum(intake.transit_seconds.snapshot().counts) == 3


def _jpeg(index: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(_frame(index, shape=(48, 64, 3)).pixels).save(out, format="JPEG")
    return out.getvalue()


def test_encoded_frames_cross_the_ring_as_bytes(ring_pair):
    writer, reader = ring_pair
    for index in range(10):  # each JPEG is smaller than a frame of pixels: more of them fit before the wrap
        encoded = EncodedFrame(float(index), _jpeg(index))
        place = writer.put(encoded)
        assert isinstance(place, EncodedFrameInRing) and place.size == len(encoded.data)
        assert reader.take(place) == encoded
    big = EncodedFrame(10.0, bytes(9000))  # more than the ring holds: it goes whole
    assert writer.put(big) is big


def test_the_intake_decodes_encoded_frames_and_leaves_a_broken_one_for_the_engine(ring_pair):
    """Images the server did not decode reach the engine as pixels, in order, whether they came through the ring
    or the pipe; one that breaks past its header stays encoded (the engine fails it as the stream's error)."""
    from dispider_vllm.sidecar.process import CommandIntake, _drain

    writer, reader = ring_pair
    commands = multiprocessing.get_context("spawn").Queue()
    intake = CommandIntake(commands, reader)
    jpegs = [_jpeg(i) for i in range(4)]
    broken = EncodedFrame(2.0, jpegs[2][: jpegs[2].index(b"\xff\xda") + 20])
    commands.put(PushSharedFrames("s", (writer.put(EncodedFrame(0.0, jpegs[0])), EncodedFrame(1.0, jpegs[1])),
                                  received_at=time.time()))
    commands.put(PushFrames("t", (broken, EncodedFrame(3.0, jpegs[3])), received_at=time.time()))
    commands.put(Shutdown())
    deadline = time.monotonic() + 30
    while intake.queue.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    pushes = [command for command in _drain(intake.queue, block=True) if isinstance(command, PushFrames)]
    assert [push.stream_id for push in pushes] == ["s", "t"]
    frames = [frame for push in pushes for frame in push.frames]
    assert [frame.timestamp for frame in frames] == [0.0, 1.0, 2.0, 3.0]
    assert frames[2] == broken
    for index in (0, 1, 3):
        np.testing.assert_array_equal(frames[index].pixels, decode_image(jpegs[index]))
    assert 1 <= sum(intake.decode_seconds.snapshot().counts) <= 2  # one call per batch that waited together


def test_no_room_in_dev_shm_means_frames_through_the_pipe(monkeypatch):
    """A ring is cut to a share of what /dev/shm has free; with none to spare there is no ring, and the server's
    sidecar client sends frames through the pipe instead of failing to start."""
    from dispider_vllm.sidecar import client, frame_ring

    monkeypatch.setattr(frame_ring, "SHM_SHARE", 0.0)
    assert FrameRing.create(1 << 20) is None
    assert client._frame_ring(256) is None
