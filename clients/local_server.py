"""Run ``dispider-serve`` as a child process on loopback: start it on a free port, wait for ``/health``, stop it.

Used by ``dispider-demo`` and the load benchmark. The child gets its own process group, so a Ctrl-C in the
terminal reaches only the parent, which then stops the server in order (SIGINT: uvicorn's graceful shutdown
stops the sidecar and the vLLM engine), and kills the whole group only if that hangs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"
HEALTH_POLL_S = 1.0
STOP_TIMEOUT_S = 60.0


class ServerStartError(RuntimeError):
    """The server exited or never became healthy; the message ends with the tail of its log."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def option_value(args: list[str], flag: str) -> str | None:
    """The value of ``--flag V`` or ``--flag=V`` in a command line, if given."""
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class LocalServer:
    """One ``python -m serve`` child process, its URL and its log file."""

    def __init__(self, serve_args: list[str], log_path: Path, *, env: dict[str, str] | None = None) -> None:
        args = list(serve_args)
        host = option_value(args, "--host")
        if host is None:
            host = LOOPBACK
            args += ["--host", host]
        port = option_value(args, "--port")
        if port is None:
            port = str(free_port())
            args += ["--port", port]
        connect_host = LOOPBACK if host in ("0.0.0.0", "::") else host
        self.url = f"http://{connect_host}:{port}"
        self.command = [sys.executable, "-m", "serve", *args]
        self.log_path = Path(log_path)
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> LocalServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self._env,
                                            start_new_session=True)  # Ctrl-C in the terminal: the parent decides
        return self

    def wait_healthy(self, timeout_s: float, progress: Callable[[float, str], None] | None = None) -> float:
        """Poll ``/health`` until it says ok; returns the seconds it took. ``progress(elapsed, last log line)``."""
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < timeout_s:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerStartError(f"dispider-serve exited with code {code} while starting:\n{self.log_tail()}")
            if self._healthy():
                return elapsed
            if progress is not None:
                progress(elapsed, self.last_log_line(" dispider."))  # the server's own steps, not vLLM's
            time.sleep(HEALTH_POLL_S)
        raise ServerStartError(f"dispider-serve was not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGINT and wait; SIGKILL the process group if it does not stop in time. Returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        with _ctrl_c_ignored():  # a second Ctrl-C must not leave the server running, orphaned
            self.process.send_signal(signal.SIGINT)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # the group is the server's own (start_new_session)
                return self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def last_log_line(self, containing: str = "") -> str:
        """The last line of the log (with ``containing`` in it), or ""."""
        lines = [line for line in self.log_tail(200).splitlines() if containing in line and line != "(no log)"]
        return lines[-1].strip() if lines else ""

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
