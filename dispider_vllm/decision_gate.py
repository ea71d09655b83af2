"""The decision gate: the reaction's engine waits before its next step while the sidecar decides closed clips.

On a GPU they share, the sidecar's kernels already go first under CUDA MPS (client priority), but priority only
orders kernels waiting to start: a reaction step already on the SMs (a decode of the running answers, the prefill
of a new one) shares them with a clip's close and slows it (docs/benchmarks.md, "The decision gate"). The gate
keeps the next step from starting while the sidecar has closed clips to decide: the reaction is delayed, never
stopped, so that a decision waits at most for the step in flight.

It is a few words of shared memory, created by the server:
- the sidecar (one writer) sets ``held_until`` to now + ``HOLD_EXPIRY_S`` (``time.monotonic``, one clock for
  all processes on Linux) while closed clips wait, and to 0 once they are decided; a sidecar that dies holding
  the gate lets go by itself;
- vLLM's scheduler (``dispider_vllm.reaction.scheduler``, one reader in the engine-core process) waits before
  each step while the gate is held, at most ``limit_s`` a step, and counts what it waited.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

# A hold not renewed for this long is over: the sidecar renews it every turn of its loop while clips wait.
HOLD_EXPIRY_S = 1.0
POLL_S = 0.0002  # how often a waiting step looks at the gate again
# float64 words: the sidecar's on one cache line, the reaction's on another
_HELD_UNTIL, _HOLDS = 0, 1
_CHECKS, _WAITS, _WAITED_S = 8, 9, 10
_WORDS = 16


@dataclass(frozen=True)
class GateCounts:
    """What the gate has seen since it was created."""

    holds: int  # sidecar turns that began holding the reaction (closed clips waiting)
    checks: int  # reaction steps that looked at the gate
    waits: int  # reaction steps that found it held and waited
    waited_s: float  # the seconds they waited, all together


class DecisionGate:
    """``create`` in the server; ``attach`` by name in the sidecar (``hold``) and in vLLM's scheduler
    (``wait_while_held``)."""

    def __init__(self, memory: shared_memory.SharedMemory, owner: bool) -> None:
        self._memory = memory
        self._owner = owner
        self.name = memory.name
        self._words = np.ndarray((_WORDS,), dtype=np.float64, buffer=memory.buf)
        self._holding = False

    @classmethod
    def create(cls) -> DecisionGate:
        memory = shared_memory.SharedMemory(create=True, size=_WORDS * 8)
        memory.buf[:] = bytes(_WORDS * 8)
        return cls(memory, owner=True)

    @classmethod
    def attach(cls, name: str) -> DecisionGate:
        return cls(shared_memory.SharedMemory(name=name), owner=False)

    # -- the sidecar --------------------------------------------------------------------------------------------
    def hold(self, closes_waiting: bool) -> None:
        """Held (renewed) while closed clips wait to be decided, released once none do."""
        if closes_waiting:
            if not self._holding:
                self._words[_HOLDS] += 1
            self._words[_HELD_UNTIL] = time.monotonic() + HOLD_EXPIRY_S
        elif self._holding:
            self._words[_HELD_UNTIL] = 0.0
        self._holding = closes_waiting

    # -- the reaction -------------------------------------------------------------------------------------------
    def wait_while_held(self, limit_s: float) -> float:
        """Wait while the gate is held, at most ``limit_s``; the seconds waited (0.0 when it was open)."""
        self._words[_CHECKS] += 1
        if not self._held():
            return 0.0
        started = time.monotonic()
        while self._held() and time.monotonic() - started < limit_s:
            time.sleep(POLL_S)
        waited = time.monotonic() - started
        self._words[_WAITS] += 1
        self._words[_WAITED_S] += waited
        return waited

    def _held(self) -> bool:
        return time.monotonic() < self._words[_HELD_UNTIL]

    # -- anyone -------------------------------------------------------------------------------------------------
    def counts(self) -> GateCounts:
        words = self._words
        return GateCounts(int(words[_HOLDS]), int(words[_CHECKS]), int(words[_WAITS]), float(words[_WAITED_S]))

    def close(self) -> None:
        self._words = None  # the numpy view holds the buffer: drop it before the mapping goes
        self._memory.close()
        if self._owner:
            self._memory.unlink()
