"""Frames from the server to the sidecar through shared memory: the pipe carries only where each frame lies.

Pickled through the process pipe, each frame's bytes go in 64 KiB writes and reads that take turns on both
processes' GILs (the server's queue feeder thread, the sidecar's intake thread): at 640 live streams on an H200
frames took 3.0 s at p99 to arrive, and clips piled up (docs/benchmarks.md, "Frames through shared memory").
Instead the server copies each frame's pixels into a ring of shared memory and sends their place; the sidecar's
intake thread copies them out as the commands arrive, in the order they were written, and moves the ring's read
position on.

One writer (the server's event loop) and one reader (the sidecar's intake thread), both in command order, so two
positions are the whole protocol: the writer's, kept by the writer, and the reader's, in the ring's header. A
frame that does not fit (the sidecar is behind by more than the ring holds) travels through the pipe as before:
slower, never lost and never waited for.

A frame the server did not decode (``EncodedFrame``: its JPEG/PNG/WebP bytes) goes the same way, its bytes in
place of pixels (``EncodedFrameInRing``): a tenth of the size at 320x240.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from dispider_vllm.types import EncodedFrame, Frame

log = logging.getLogger(__name__)

HEADER_BYTES = 64  # the reader's position (uint64) on a cache line of its own
ALIGN = 64
SHM_DIR = "/dev/shm"
# A ring larger than half of what /dev/shm has free is cut down: writing past that filesystem's limit is a SIGBUS,
# and vLLM shares it (a Docker container's default is 64 MiB).
SHM_SHARE = 0.5


@dataclass(frozen=True)
class FrameInRing:
    """Where a frame's pixels lie in the ring; stands in for the ``Frame`` on the pipe."""

    timestamp: float
    offset: int  # bytes from the start of the ring's data
    shape: tuple[int, ...]  # uint8
    end: int  # the writer's position after this frame: the reader's once it is copied out


@dataclass(frozen=True)
class EncodedFrameInRing:
    """Where an encoded frame's bytes lie in the ring; stands in for the ``EncodedFrame`` on the pipe."""

    timestamp: float
    offset: int
    size: int  # bytes of the encoded image
    end: int


class FrameRing:
    """A ring of shared memory for frame pixels. ``create`` in the server, ``attach`` by name in the sidecar."""

    def __init__(self, memory: shared_memory.SharedMemory, owner: bool) -> None:
        self._memory = memory
        self._owner = owner
        self.name = memory.name
        self.capacity = memory.size - HEADER_BYTES
        self._read_position = np.ndarray((1,), dtype=np.uint64, buffer=memory.buf, offset=0)
        self._data = np.ndarray((self.capacity,), dtype=np.uint8, buffer=memory.buf, offset=HEADER_BYTES)
        self._write_position = 0

    @classmethod
    def create(cls, capacity_bytes: int) -> FrameRing | None:
        """A new ring of up to ``capacity_bytes``, cut to what /dev/shm can hold; None when that is too little."""
        capacity = _fitting_capacity(capacity_bytes)
        if capacity < ALIGN:
            return None
        memory = shared_memory.SharedMemory(create=True, size=HEADER_BYTES + capacity)
        memory.buf[:HEADER_BYTES] = bytes(HEADER_BYTES)  # reader's position 0
        return cls(memory, owner=True)

    @classmethod
    def attach(cls, name: str) -> FrameRing:
        return cls(shared_memory.SharedMemory(name=name), owner=False)

    # -- the writer (server) ------------------------------------------------------------------------------------
    def put(self, frame: Frame | EncodedFrame) -> FrameInRing | EncodedFrameInRing | Frame | EncodedFrame:
        """The frame's pixels (or encoded bytes) copied into the ring and their place, or the frame itself when
        it does not fit."""
        if isinstance(frame, EncodedFrame):
            data = np.frombuffer(frame.data, dtype=np.uint8)
        elif frame.pixels.dtype == np.uint8:
            data = frame.pixels.reshape(-1)
        else:
            return frame
        placed = self._write(data)
        if placed is None:
            return frame
        offset, end = placed
        if isinstance(frame, EncodedFrame):
            return EncodedFrameInRing(frame.timestamp, offset, data.size, end)
        return FrameInRing(frame.timestamp, offset, tuple(frame.pixels.shape), end)

    def _write(self, data: np.ndarray) -> tuple[int, int] | None:
        """``data`` (flat uint8) copied in at the write position: (its offset, the position after it), or None
        when the reader has not freed enough room."""
        size = _aligned(data.size)
        start = self._write_position
        if start % self.capacity + size > self.capacity:  # no room before the end: skip to the ring's start
            start += self.capacity - start % self.capacity
        end = start + size
        if end - int(self._read_position[0]) > self.capacity:
            return None
        offset = start % self.capacity
        self._data[offset : offset + data.size] = data
        self._write_position = end
        return offset, end

    # -- the reader (sidecar) -------------------------------------------------------------------------------------
    def take(self, place: FrameInRing | EncodedFrameInRing) -> Frame | EncodedFrame:
        """The frame (or encoded frame) copied out of the ring; its space goes back to the writer."""
        if isinstance(place, EncodedFrameInRing):
            taken = EncodedFrame(place.timestamp, self._data[place.offset : place.offset + place.size].tobytes())
        else:
            size = int(np.prod(place.shape))
            taken = Frame(place.timestamp, self._data[place.offset : place.offset + size].reshape(place.shape).copy())
        self._read_position[0] = place.end
        return taken

    def close(self) -> None:
        # numpy views hold the buffer: drop them before the mapping goes
        self._read_position = self._data = None
        self._memory.close()
        if self._owner:
            self._memory.unlink()


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def _fitting_capacity(wanted: int) -> int:
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:  # no /dev/shm (not Linux): shared_memory uses what the platform has
        return _aligned(wanted)
    free = int(stats.f_bavail * stats.f_frsize * SHM_SHARE)
    if free < wanted:
        log.warning("the frame ring gets %d MiB, not %d: %s has %d MiB free (raise a container's --shm-size)",
                    free >> 20, wanted >> 20, SHM_DIR, (stats.f_bavail * stats.f_frsize) >> 20)
    return min(wanted, free) // ALIGN * ALIGN
