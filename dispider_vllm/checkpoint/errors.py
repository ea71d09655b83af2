"""The one error type of the checkpoint package: it always says which file, and which key when there is one."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not have the expected layout.

    ``file`` is the file at fault (or the directory when no file can be named), ``key`` the config key or
    tensor name at fault, or None.
    """

    def __init__(self, file: str | Path, key: str | None, problem: str):
        self.file = Path(file)
        self.key = key
        self.problem = problem
        where = f"{self.file}: " if key is None else f"{self.file}: '{key}': "
        super().__init__(where + problem)
