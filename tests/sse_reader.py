"""A session's Server-Sent Events read in a thread, for the end-to-end tests: (arrival time, event, data)."""

from __future__ import annotations

import json
import threading
import time

import httpx


class EventReader(threading.Thread):
    """Reads a session's SSE stream in a thread, stamping each event with its arrival time."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.headers = headers or {}
        self.events: list[tuple[float, str, dict]] = []
        self.connected = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers=self.headers, timeout=httpx.Timeout(10, read=300)) as reply:
                assert reply.status_code == 200, reply.read()
                self.connected.set()
                name = None
                for line in reply.iter_lines():
                    if line.startswith("event: "):
                        name = line[len("event: "):]
                    elif line.startswith("data: "):
                        self.events.append((time.monotonic(), name, json.loads(line[len("data: "):])))
                        if name == "end":
                            return
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error
            self.connected.set()

    def named(self, name: str) -> list[dict]:
        return [data for _, n, data in list(self.events) if n == name]

    def wait_for(self, name: str, count: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.named(name)) < count and time.monotonic() < deadline and self.error is None:
            time.sleep(0.05)
        assert self.error is None, repr(self.error)
        found = self.named(name)
        assert len(found) >= count, f"{len(found)} {name} events of {count} in {timeout} s: {self.events[-3:]}"
        return found

    def finish(self, timeout: float = 300) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the event stream did not end"
        assert self.error is None, repr(self.error)
