"""Scene-based clips (the paper's variant of the 16-frame clip; DISPIDER.md section 2, "Scene segmentation").

The paper embeds regularly sampled frames with SigLIP, L2-normalises the embeddings, compares consecutive frames
by cosine similarity, cuts where the similarity drops, and keeps an exclusion window so clips are not too short.
Each scene then gives one clip of 16 frames taken at ``linspace(first, last + 1, 16, endpoint=False)`` over its
frames. SigLIP is not available offline, and the sources give no threshold, window or maximum length, so:

- the default embedding is a cheap stand-in, :func:`thumbnail_embedding`: a 16x16 area-averaged colour
  thumbnail, centred on mid-grey and L2-normalised (centring makes black and white, or two different background
  colours, point in opposite directions rather than all lying in the positive orthant). Any
  ``embed(pixels) -> 1-D vector`` can be passed instead, e.g. a real SigLIP image embedding;
- ``threshold=0.8``: consecutive 1-fps frames of one shot score well above it with the thumbnail embedding;
  a cut between different-looking shots usually scores far below;
- ``min_frames=8`` (the exclusion window): no cut until the current scene has 8 sampled frames (8 s at 1 fps),
  half a uniform clip, so a flash or a dissolve cannot produce a run of tiny clips;
- ``max_frames=64``: a scene is closed after 64 frames (64 s at 1 fps), so a static shot still yields a clip,
  and so a decision, at least that often, and 16 frames still cover it at no less than 1 per 4 s.

Streaming: a cut is confirmed by the first frame that differs, so the scene before it closes right then;
the last scene closes on :meth:`SceneSegmenter.flush`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dispider_vllm.types import Frame

Embedding = Callable[[np.ndarray], np.ndarray]


def thumbnail_embedding(pixels: np.ndarray, side: int = 16) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> unit vector of ``side * side * 3`` floats: the mid-grey-centred colour thumbnail."""
    thumbnail = np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BOX), dtype=np.float32)
    vector = (thumbnail / 255.0 - 0.5).ravel()
    return vector / max(float(np.linalg.norm(vector)), 1e-6)


@dataclass(frozen=True)
class SceneOptions:
    threshold: float = 0.8  # cut where cosine(previous frame, frame) falls below this
    min_frames: int = 8  # exclusion window: no cut before the current scene has this many frames
    max_frames: int = 64  # a scene is closed when it reaches this many frames
    embed: Embedding | None = None  # frame -> embedding; None: thumbnail_embedding

    def __post_init__(self):
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {self.min_frames} and {self.max_frames}")


class SceneSegmenter:
    """Groups a stream of sampled frames into scenes, closing each scene when the next one is confirmed."""

    def __init__(self, options: SceneOptions | None = None):
        self.options = options or SceneOptions()
        self._embed = self.options.embed or thumbnail_embedding
        self._scene: list[Frame] = []
        self._last_embedding: np.ndarray | None = None

    def push(self, frame: Frame) -> list[list[Frame]]:
        """Feed one sampled frame; returns the scenes it closed (none or one)."""
        embedding = _unit(self._embed(frame.pixels))
        closed = []
        if self._scene and self._starts_new_scene(embedding):
            closed.append(self._scene)
            self._scene = []
        self._scene.append(frame)
        self._last_embedding = embedding
        return closed

    def flush(self) -> list[list[Frame]]:
        """End of stream: close the scene in progress, if any."""
        closed = [self._scene] if self._scene else []
        self._scene, self._last_embedding = [], None
        return closed

    def _starts_new_scene(self, embedding: np.ndarray) -> bool:
        length = len(self._scene)
        if length >= self.options.max_frames:
            return True
        similarity = float(np.dot(self._last_embedding, embedding))
        return similarity < self.options.threshold and length >= self.options.min_frames


def resample_scene(frames: list[Frame], count: int = 16) -> list[Frame]:
    """Exactly ``count`` frames taken evenly over a scene (repeating frames when it has fewer)."""
    picks = np.linspace(0, len(frames), count, endpoint=False).astype(int)
    return [frames[i] for i in picks]


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).ravel()
    return vector / max(float(np.linalg.norm(vector)), 1e-6)
