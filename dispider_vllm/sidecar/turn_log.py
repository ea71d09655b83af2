"""A timeline of the sidecar's loop, one JSON line per turn that did work, for finding where a stall was.

Written only when asked (``dispider-serve --sidecar-turn-log PATH``). A slow decision's moment can then be laid
against what the sidecar was doing (``benchmarks/turn_timeline.py``): a long step, a long stretch of command
handling, or no turn at all (the process held up outside its loop). Times are wall-clock (``time.time()``) so
that another process's records line up with them.
"""
from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Turn:
    """One pass of the sidecar's loop: commands taken in, decoded video handled, one step."""

    started: float  # wall clock at the turn's start
    commands: dict[str, int] = field(default_factory=dict)  # by command kind (PushFrames, CloseStream, ...)
    handle_s: float = 0.0  # handling the commands (and decoded video)
    step_s: float = 0.0  # the perceive-and-decide step, its wait for preprocessing included
    clips: int = 0  # clips the step perceived and decided
    events: dict[str, int] = field(default_factory=dict)  # by event kind the turn sent back
    pending_after: int = 0  # closed clips still waiting when the turn ended

    @property
    def did_work(self) -> bool:
        return bool(self.commands or self.clips or self.events)


class TurnClock:
    """Times the parts of one turn while the loop runs it."""

    def __init__(self) -> None:
        self.turn = Turn(started=time.time())
        self._commands: Counter = Counter()
        self._events: Counter = Counter()
        self._mark = time.monotonic()
        self._clips_before = 0

    def took(self, command) -> None:
        self._commands[type(command).__name__] += 1

    def sent(self, event) -> None:
        self._events[type(event).__name__] += 1

    def handled(self, clips_total: int) -> None:
        """The commands are done; what follows is the step (``clips_total``: the engine's count so far)."""
        now = time.monotonic()
        self.turn.handle_s, self._mark, self._clips_before = now - self._mark, now, clips_total

    def stepped(self, clips_total: int, pending_after: int) -> Turn:
        self.turn.step_s = time.monotonic() - self._mark
        self.turn.clips, self.turn.pending_after = clips_total - self._clips_before, pending_after
        self.turn.commands, self.turn.events = dict(self._commands), dict(self._events)
        return self.turn


class _NoClock:
    """Stands in for the clock when no turn log is kept: the loop calls it the same way, at no cost."""

    def took(self, command) -> None:
        pass

    def sent(self, event) -> None:
        pass

    def handled(self, clips_total: int) -> None:
        pass


NO_CLOCK = _NoClock()


class TurnLog:
    """Appends turns that did work to a JSON-lines file, a line at a time (readable while the sidecar runs; some
    tens of short writes a second under load)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8", buffering=1)

    def record(self, turn: Turn) -> None:
        if not turn.did_work:
            return
        line = {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(turn).items()}
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


def read_turns(path: str | Path) -> list[Turn]:
    """The turns of a log (plain or gzipped), in order; a line cut short by a killed process is skipped."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text(encoding="utf-8")
    turns = []
    for line in text.splitlines():
        try:
            turns.append(Turn(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return turns
