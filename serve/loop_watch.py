"""The server's event loop, watched: how late its timers fire (``dispider_server_loop_lag_seconds``), and where it
was stuck when it stopped answering for a while (a warning with the loop thread's stack).

Every HTTP push, event stream and answer of every session runs on one loop: a callback that holds it for a second
delays all of them. A tick every ``TICK_S`` measures how late it woke (the lag); a watchdog thread, which the
stuck loop cannot hold up, logs the loop thread's stack once per stall longer than ``stall_s``, so a blocked
loop names its culprit in the server log.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

from prometheus_client import Counter, Histogram

log = logging.getLogger("dispider.serve")

TICK_S = 0.05
STACK_FRAMES = 12  # the innermost frames of the stuck loop's stack


class LoopWatch:
    def __init__(self, lag: Histogram, stalls: Counter, stall_s: float = 0.5) -> None:
        self._lag, self._stalls, self._stall_s = lag, stalls, stall_s
        self._heartbeat = time.monotonic()
        self._loop_thread: int | None = None
        self._stopped = threading.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """On the loop to watch."""
        self._loop_thread = threading.get_ident()
        self._heartbeat = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="loop-watch")
        threading.Thread(target=self._watch, name="loop-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        if self._task is not None:
            self._task.cancel()

    async def _tick(self) -> None:
        while True:
            expected = time.monotonic() + TICK_S
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            self._lag.observe(max(0.0, now - expected))
            self._heartbeat = now

    def _watch(self) -> None:
        reported = None  # the heartbeat of the stall already logged
        while not self._stopped.wait(self._stall_s / 4):
            heartbeat = self._heartbeat
            stuck_for = time.monotonic() - heartbeat
            if stuck_for < self._stall_s or heartbeat == reported:
                continue
            reported = heartbeat
            self._stalls.inc()
            log.warning("the event loop has not run for %.2f s; it is in:\n%s", stuck_for, self._loop_stack())

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return "  (the loop thread is gone)"
        return "".join(traceback.format_stack(frame)[-STACK_FRAMES:])
