r"""One stream's decision sequence for one question, and how it maps onto the stream's KV cache.

The decision sequence at clip t (DISPIDER.md section 3), with triggers at a_1 < ... < a_k:

    [ANS] [Q] [S_1] [ANS] ... [S_k] [ANS] [M_{a_k+1} ... M_t] [Q] [TODO]
    \________ stable part ___________/    \____ window ____/   \_ tail _/

- The stable part only grows (by [S, ANS] at a trigger) and lives in the KV cache.
- The window holds the M of the clips since the last trigger; each clip's M is appended to the cache when that
  clip is decided.
- The tail [Q, TODO] (Q = ids of ``question + "<to_do>"``, so it ends with a TODO too) is evaluated for every clip
  and never cached.
- ``pending`` holds tokens of the stable part or window not yet in the cache ([ANS, Q] after open/ask, [S, ANS]
  after a trigger, window M after a rebuild); they ride in front of the next clip's M in its decision forward.

Window bound (``max_context_clips``): when a new clip would make the window longer than ``max_context_clips``, the
window restarts from its newest ``keep_clips - 1`` clips plus the new clip, and the cache is cut back to the stable
part (those clips' M are re-appended). Dispider itself never does this; it bounds a stream that stays silent
for a long time, at the cost of the model no longer seeing the oldest unanswered clips. With the default halving,
the rebuild happens once every max/2 clips of silence.

A summary S_j covers the clips in the window when trigger j fires; without a rebuild those are (a_{j-1}, a_j].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..types import ClipFeatures


@dataclass
class DecisionContext:
    question: str
    question_id: int
    tail: torch.Tensor  # [Q, TODO] embeddings
    stable_length: int  # tokens of [ANS, Q, (S, ANS)*], committed or pending
    pending: list[torch.Tensor] = field(default_factory=list)
    window: list[ClipFeatures] = field(default_factory=list)
    trigger_clips: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, question: str, question_id: int, question_embeds: torch.Tensor, ans: torch.Tensor,
              todo: torch.Tensor) -> DecisionContext:
        """A fresh sequence [ANS, Q] (pending) for a question; ``question_embeds`` already ends with TODO."""
        return cls(question=question, question_id=question_id, tail=torch.cat([question_embeds, todo]),
                   stable_length=len(ans) + len(question_embeds), pending=[ans, question_embeds])

    # ---- per clip -----------------------------------------------------------------------------------------
    def cached_length(self) -> int:
        """The KV cache length this context expects between decisions (no pending tokens)."""
        return self.stable_length + sum(len(clip.memory) for clip in self.window)

    def needs_rebuild(self, max_context_clips: int | None) -> bool:
        return max_context_clips is not None and len(self.window) + 1 > max_context_clips

    def rebuild(self, keep_clips: int) -> int:
        """Restart the window from its newest ``keep_clips - 1`` clips; return the cache length to cut back to."""
        if self.pending:
            raise RuntimeError("a rebuild expects every token committed")
        self.window = self.window[len(self.window) - (keep_clips - 1):] if keep_clips > 1 else []
        self.pending = [clip.memory for clip in self.window]
        return self.stable_length

    def suffix(self, clip: ClipFeatures) -> tuple[torch.Tensor, int]:
        """The decision forward's input for ``clip``: pending + M_t (kept) + [Q, TODO] (not kept)."""
        kept = torch.cat([*self.pending, clip.memory])
        return torch.cat([kept, self.tail.to(kept.dtype)]), int(kept.shape[0])

    def decided(self, clip: ClipFeatures) -> None:
        """The suffix's kept tokens are in the cache now."""
        self.pending = []
        self.window.append(clip)

    # ---- per trigger --------------------------------------------------------------------------------------
    def summary_clips(self) -> list[ClipFeatures]:
        return list(self.window)

    def triggered(self, clip_index: int, summary: torch.Tensor, ans: torch.Tensor) -> int:
        """Fold the window into [S, ANS]; return the cache length to cut back to (the old stable part)."""
        cut = self.stable_length
        self.pending = [summary, ans]
        self.stable_length += len(summary) + len(ans)
        self.window = []
        self.trigger_clips.append(clip_index)
        return cut
