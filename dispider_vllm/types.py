"""Typed data at the doors between the rooms: (encoded) frames -> clips -> features -> decisions -> triggers.

Shapes are written for the real model (CLIP-L/14, Qwen2-1.5B compact model, Qwen2-7B reaction model);
the tiny random checkpoints use the same layout with smaller hidden sizes:

    raw_dim     = 4 * CLIP hidden      (4096 real)   2x2-merged CLIP patches
    memory_dim  = compact LLM hidden   (1536 real)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

FRAMES_PER_CLIP = 16
RAW_TOKENS_PER_CLIP = 1024  # 16 frames x 8x8 merged patches
MEMORY_TOKENS_PER_CLIP = 64  # pooled slots: 16 frames x 2x2 cells
REACTION_TOKENS_PER_CLIP = RAW_TOKENS_PER_CLIP + MEMORY_TOKENS_PER_CLIP  # 1088


@dataclass(frozen=True)
class Frame:
    """One decoded video frame, RGB uint8 [H, W, 3], at a point of video time (seconds)."""

    timestamp: float
    pixels: np.ndarray


@dataclass(frozen=True)
class EncodedFrame:
    """One pushed image frame still as it came (JPEG, PNG or WebP bytes), at a point of video time (seconds).

    The server checks its header (format, side lengths) and the sidecar's process decodes it: the decoding then
    costs the server's interpreter nothing (``dispider-serve --decode-frames-in``)."""

    timestamp: float
    data: bytes


@dataclass
class ClipPrefix:
    """The compact model's K/V of a clip in progress, cached as its frames arrive (the sidecar's
    ``frame_perception`` "prefill"): the clip's time prompt, then the raw tokens of its first ``frames`` frames.

    Its first pass is plain causal and the raw tokens come before the pooled ones, so this prefix is the same
    whenever it is computed; a clip that closes is left with its 65 pooled and global positions. ``slot`` is its
    slot in the encoder's prefix pool (None once given back); ``broken`` after a failed pass."""

    clip_index: int
    start: float  # the time prompt's whole seconds, as the clip's window will have them when it closes
    end: float
    slot: int | None
    frames: int = 0
    broken: bool = False

    def holds(self, index: int, start: float, end: float, frames: int) -> bool:
        """Whether this prefix is that clip's whole prefix: same window and times, every frame in it."""
        same_window = (self.clip_index, self.start, self.end) == (index, start, end)
        return self.slot is not None and not self.broken and same_window and self.frames == frames


@dataclass(frozen=True)
class Clip:
    """Sixteen sampled frames, for the CLIP tower.

    ``pixels`` is [16, 3, 224, 224] float32, already squashed to square, resized and CLIP-normalised; or the
    frames as they came, uint8 [16, H, W, 3], for the encoder to preprocess on its device (``preprocessed`` False).
    ``start``/``end`` are the seconds written into the time prompt.
    ``features``: when the frames went through the CLIP tower as they arrived (the sidecar's ``frame_perception``
    "arrival"), its output per frame, [16, 64, raw_dim] on the model's device, and ``pixels`` is empty.
    """

    index: int
    start: float
    end: float
    pixels: torch.Tensor
    frame_times: tuple[float, ...] = ()
    features: torch.Tensor | None = None
    prefix: ClipPrefix | None = None  # with ``features``: the compact model's prefix, cached as the frames came

    @property
    def preprocessed(self) -> bool:
        return self.pixels.dtype != torch.uint8

    @property
    def perceived(self) -> bool:
        """Whether the CLIP tower has seen the frames already (``features`` set)."""
        return self.features is not None

    @property
    def prefilled(self) -> bool:
        """Whether the compact model's pass over the time prompt and the raw tokens is done already (``prefix``)."""
        return self.prefix is not None


@dataclass
class ClipFeatures:
    """What perception keeps of one clip (DISPIDER.md section 2)."""

    index: int
    start: float
    end: float
    raw: torch.Tensor  # [1024, raw_dim]   merged CLIP patches, kept for the reaction
    memory: torch.Tensor  # [64, memory_dim]  M_i, compressed clip features
    indicator: torch.Tensor  # [memory_dim]   T_i, the clip indicator


@dataclass(frozen=True)
class DecisionEvent:
    """The decision taken when a clip closes: logit > 0 means respond."""

    stream_id: str
    question_id: int
    clip_index: int
    start: float
    end: float
    logit: float

    @property
    def respond(self) -> bool:
        return self.logit > 0.0


@dataclass
class ClipBundle:
    """The reaction model's multimodal input for one answer (DISPIDER.md section 4).

    Spliced at ``<image>`` as: for each retrieved clip in time order, clip_projector(raw_j) (1024 positions)
    then compress_projector(memory_j) (64 positions); then compress_projector(global_memory) (t positions).
    """

    raw: torch.Tensor  # [k, 1024, raw_dim]
    memory: torch.Tensor  # [k, 64, memory_dim]
    global_memory: torch.Tensor  # [t, memory_dim]

    @property
    def num_clips(self) -> int:
        return int(self.raw.shape[0])

    @property
    def num_positions(self) -> int:
        return REACTION_TOKENS_PER_CLIP * self.num_clips + int(self.global_memory.shape[0])

    def as_mm_data(self) -> dict[str, torch.Tensor]:
        """The ``multi_modal_data["image"]`` item the vLLM reaction model takes."""
        return {"clip_raw": self.raw, "clip_memory": self.memory, "global_memory": self.global_memory}


@dataclass
class Trigger:
    """A decision that said respond, with everything the reaction needs."""

    event: DecisionEvent
    question: str
    retrieved: tuple[int, ...]  # clip indices, chronological
    bundle: ClipBundle
    previous_answers: tuple[str, ...] = field(default_factory=tuple)
