"""Where generated checkpoints and splits are cached, and a file lock so that processes share them."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOME_ENV = "DISPIDER_HOME"
DEFAULT_HOME = "~/.cache/dispider-vllm"


def dispider_home() -> Path:
    """The cache root: ``$DISPIDER_HOME``, else ``~/.cache/dispider-vllm``."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def default_split_dir(source: str | Path) -> Path:
    """A per-source cache directory for the split of ``source`` (name plus a hash of its absolute path)."""
    source = Path(source).expanduser().resolve()
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    return dispider_home() / "splits" / f"{source.name}-{digest}"


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if needed) for the duration of the block."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
