"""Shared fixtures. The expensive ones (a checkpoint, a running server) are session-scoped: the CPU engine
takes a minute or two to start, so a test session starts each at most once.

- ``default_checkpoint``: the tiny random Dispider checkpoint and its split (made on first use, cached).
- ``dispider_server``: ``dispider-serve`` as a subprocess on 127.0.0.1 (real sidecar, real vLLM CPU engine),
  answering every 2nd clip (``--respond-every 2``, since random weights decide at random).

``launch_server`` starts one with other options (tests/test_tenancy.py runs its own, with tenants).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

SERVER_START_TIMEOUT_S = 600.0
SERVER_STOP_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def default_checkpoint():
    from dispider_vllm.checkpoint.random import ensure_default_checkpoint

    return ensure_default_checkpoint()


@dataclass(frozen=True)
class ServerHandle:
    url: str  # http://127.0.0.1:PORT
    media_dir: Path  # the --allowed-local-media-path
    log_file: Path
    max_upload_mb: int
    respond_every: int
    turn_log: Path  # the sidecar's turn log (--sidecar-turn-log)
    model: str = "dispider"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def dispider_server(default_checkpoint, tmp_path_factory) -> ServerHandle:
    with launch_server(default_checkpoint, tmp_path_factory.mktemp("dispider-server")) as handle:
        yield handle


@contextmanager
def launch_server(checkpoint, workdir: Path, extra_args: Sequence[str] = (), *, respond_every: int = 2,
                  max_upload_mb: int = 2) -> Iterator[ServerHandle]:
    """``dispider-serve`` on a free loopback port, healthy, stopped on exit; its log in ``workdir``."""
    media_dir = workdir / "media"
    media_dir.mkdir()
    handle = ServerHandle(
        url=f"http://127.0.0.1:{_free_port()}", media_dir=media_dir, log_file=workdir / "server.log",
        max_upload_mb=max_upload_mb, respond_every=respond_every, turn_log=workdir / "sidecar-turns.jsonl",
    )
    command = [
        sys.executable, "-m", "serve",
        "--checkpoint", str(checkpoint.checkpoint_dir),
        "--port", handle.url.rsplit(":", 1)[1],
        "--respond-every", str(handle.respond_every),
        "--default-max-tokens", "8",
        "--max-upload-mb", str(handle.max_upload_mb),
        "--allowed-local-media-path", str(media_dir),
        "--max-model-len", "8192",
        "--sidecar-turn-log", str(handle.turn_log),
        "--switch-interval", "2",  # /health reports what the process runs with
        "--decision-gate-ms", "20",  # the reaction's steps wait for the sidecar's decisions (at most 20 ms each)
        *extra_args,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    with open(handle.log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_until_healthy(handle, process)
        yield handle
    finally:
        _stop(process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_healthy(handle: ServerHandle, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dispider-serve exited with {process.returncode} while starting:\n{handle.log_tail()}")
        try:
            if httpx.get(handle.url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
    pytest.fail(f"dispider-serve was not healthy after {SERVER_START_TIMEOUT_S:.0f} s:\n{handle.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    """SIGINT (uvicorn's graceful shutdown stops the sidecar and the engine), then SIGKILL the group if stuck."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the group is the server's own (start_new_session)
        process.wait()
