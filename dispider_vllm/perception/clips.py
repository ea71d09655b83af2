"""Sampled frames -> 16-frame clips, per stream (DISPIDER.md section 2, "Sampling" and "Time prompt").

Two ways to cut the stream:

- ``uniform`` (v2 streaming, the released behaviour): fixed windows of ``frames_per_clip / fps`` seconds
  (16 s at 1 fps), one clip every 16 sampled frames. The time prompt's ``start``/``end`` are the window start and
  end, rounded; a partial last window, closed by :meth:`ClipAssembler.flush`, ends at its last sample time,
  rounded, and repeats its last frame up to 16.
- ``scene`` (the paper's scene-based clips): :mod:`dispider_vllm.perception.scenes` cuts the stream into scenes,
  and each scene becomes one clip of 16 frames spread evenly over it. Each sampled frame stands for one sampling
  interval centred on it, so a scene runs from its first frame's time minus half an interval to its last frame's
  time plus half an interval; clips of consecutive scenes tile the timeline.

Times are rounded with Python's ``round`` (half to even), as the time prompt takes whole seconds.

Closing a window and preprocessing its pixels are two steps: :meth:`ClipAssembler.push_windows` gives the
closed :class:`ClipWindow` s and :func:`make_clip` preprocesses one into its :class:`Clip`; it touches no assembler
state, so the sidecar runs it on worker threads while the stream goes on. :meth:`ClipAssembler.push` does both.
Preprocessing can also run per frame as it arrives (:func:`prepare_frame_pixels`, a :class:`PreparedFrame` in the
assembler's place); closing its clip then only stacks the 16 prepared frames. Or not at all on the host:
:func:`make_frames_clip` stacks the frames as they came, for the encoder to preprocess on its GPU. Or a frame
goes through the CLIP tower itself as it arrives (a :class:`PerceivedFrame`), and :func:`make_perceived_clip`
stacks its 16 frames' CLIP tokens.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dispider_vllm.perception.frames import (
    FrameError,
    PreprocessorConfig,
    normalize_with_config,
    resize_with_config,
    validate_frame,
)
from dispider_vllm.perception.scenes import SceneOptions, SceneSegmenter, resample_scene
from dispider_vllm.types import FRAMES_PER_CLIP, Clip, ClipPrefix, Frame

ClipMode = Literal["uniform", "scene"]


@dataclass(frozen=True)
class ClipWindow:
    """A closed clip before preprocessing: its index, its time-prompt seconds and its frames (exactly 16)."""

    index: int
    start: float  # whole seconds
    end: float
    frames: tuple[Frame, ...]


@dataclass(frozen=True)
class PreparedFrame(Frame):
    """A sampled frame whose preprocessing (float32 [3, h, w], ready for CLIP) started when it arrived, maybe on
    another thread."""

    prepared: Future | None = None


@dataclass(frozen=True)
class PerceivedFrame(Frame):
    """A sampled frame queued for the CLIP tower as it arrived: ``features`` is the Future of its merged CLIP tokens
    [64, raw_dim] on the model's device (:meth:`~dispider_vllm.perception.encoder.PerceptionEncoder.perceive_frames`)."""

    features: Future | None = None
    prefix: ClipPrefix | None = None  # the K/V its tokens then go into (frame_perception "prefill")


def make_perceived_clip(window: ClipWindow) -> Clip:
    """The window's Clip from its frames' CLIP tokens (every frame's Future done): ``features`` [16, 64, raw_dim],
    no pixels. Raises what a frame's perception raised."""
    return Clip(
        index=window.index,
        start=window.start,
        end=window.end,
        pixels=torch.empty(0),
        frame_times=tuple(f.timestamp for f in window.frames),
        features=torch.stack([frame.features.result() for frame in window.frames]),
    )


def prepare_frame_pixels(frame: Frame, preprocessor: PreprocessorConfig) -> torch.Tensor:
    """One frame squashed, resized, cropped and normalised: float32 [3, h, w] (~1 ms of CPU at 320x240; the same
    values as preprocessing it within its clip, since every step works frame by frame)."""
    return normalize_with_config(resize_with_config([frame.pixels], preprocessor), preprocessor)[0]


def make_clip(window: ClipWindow, preprocessor: PreprocessorConfig) -> Clip:
    """The window's frames squashed, resized and normalised for the CLIP tower (~10 ms of CPU at 320x240); frames
    already prepared (:class:`PreparedFrame`) are only stacked."""
    return Clip(
        index=window.index,
        start=window.start,
        end=window.end,
        pixels=_pixels(window.frames, preprocessor),
        frame_times=tuple(f.timestamp for f in window.frames),
    )


# Larger frames are preprocessed on the host even for a GPU encoder: a batch of their uint8 copies and float
# intermediates would take GPU memory by the gigabyte (a 4K frame is 25 MB as uint8, 100 MB as float).
DEVICE_PREPROCESS_MAX_PIXELS = 1280 * 720


def make_frames_clip(window: ClipWindow, preprocessor: PreprocessorConfig) -> Clip:
    """The window's frames stacked as they came, uint8 [16, H, W, 3], for the encoder to preprocess on its device
    (38% of the preprocessed clip's bytes at 320x240, and no CPU work but the copy). Frames of different
    sizes cannot be stacked, and frames above 1280x720 pixels would cost the GPU too much memory: such a window is
    preprocessed here, as :func:`make_clip` does."""
    shapes = {frame.pixels.shape for frame in window.frames}
    if len(shapes) > 1 or max(shape[0] * shape[1] for shape in shapes) > DEVICE_PREPROCESS_MAX_PIXELS:
        return make_clip(window, preprocessor)
    return Clip(
        index=window.index,
        start=window.start,
        end=window.end,
        pixels=torch.from_numpy(np.stack([frame.pixels for frame in window.frames])),
        frame_times=tuple(f.timestamp for f in window.frames),
    )


def _pixels(frames: tuple[Frame, ...], preprocessor: PreprocessorConfig) -> torch.Tensor:
    """float32 [16, 3, h, w]: the prepared frames' results (their failure raises here), the others made now."""
    todo = [i for i, frame in enumerate(frames) if getattr(frame, "prepared", None) is None]
    made = normalize_with_config(resize_with_config([frames[i].pixels for i in todo], preprocessor), preprocessor) \
        if todo else None
    fresh = iter(made) if made is not None else iter(())
    return torch.stack([next(fresh) if getattr(frame, "prepared", None) is None else frame.prepared.result()
                        for frame in frames])


class ClipAssembler:
    """Per-stream: takes sampled frames (from a :class:`~dispider_vllm.perception.frames.FrameSampler` at the
    same ``fps``) and closes preprocessed :class:`Clip` s, indexed from 0.

    ``start`` is the stream's time origin, where the first uniform window begins. By default it is taken from
    the first frame as its time minus half a sampling interval, which is exact when that frame is the sampler's
    first target ``start + 0.5 / fps``; pass the sampler's ``start`` to be exact in every case.
    ``preprocessor`` is a :class:`PreprocessorConfig` or a ``preprocessor_config.json`` dict (CLIP defaults when
    None). A frame that is rejected (:class:`FrameError`) leaves the assembler as it was.
    """

    def __init__(
        self,
        frames_per_clip: int = FRAMES_PER_CLIP,
        fps: float = 1.0,
        mode: ClipMode = "uniform",
        *,
        start: float | None = None,
        scene_options: SceneOptions | None = None,
        preprocessor: PreprocessorConfig | dict | None = None,
    ):
        if mode not in ("uniform", "scene"):
            raise ValueError(f"mode is 'uniform' or 'scene', not {mode!r}")
        if frames_per_clip < 1 or not fps > 0:
            raise ValueError(f"need frames_per_clip >= 1 and fps > 0, got {frames_per_clip} and {fps}")
        self.frames_per_clip = frames_per_clip
        self.fps = fps
        self.mode = mode
        self.start = start
        self.preprocessor = (
            preprocessor if isinstance(preprocessor, PreprocessorConfig)
            else PreprocessorConfig.from_dict(preprocessor or {})
        )
        self._segmenter = SceneSegmenter(scene_options) if mode == "scene" else None
        self._pending: list[Frame] = []  # uniform mode: the window in progress
        self._last_time: float | None = None
        self.next_index = 0

    def push(self, frame: Frame) -> list[Clip]:
        """Feed one sampled frame; returns the clips it closed (usually none, at most one)."""
        return [make_clip(window, self.preprocessor) for window in self.push_windows(frame)]

    def flush(self) -> list[Clip]:
        """End of stream: close the clip in progress, if any frames are waiting."""
        return [make_clip(window, self.preprocessor) for window in self.flush_windows()]

    def push_windows(self, frame: Frame) -> list[ClipWindow]:
        """As :meth:`push`, but the closed clips are left unpreprocessed (see :func:`make_clip`)."""
        self._check(frame)
        if self.start is None:
            self.start = frame.timestamp - 0.5 / self.fps
        self._last_time = frame.timestamp
        if self._segmenter is not None:
            return [self._scene_window(scene) for scene in self._segmenter.push(frame)]
        self._pending.append(frame)
        if len(self._pending) < self.frames_per_clip:
            return []
        return [self._close_window(partial=False)]

    def flush_windows(self) -> list[ClipWindow]:
        """As :meth:`flush`, but the closed clip is left unpreprocessed."""
        if self._segmenter is not None:
            return [self._scene_window(scene) for scene in self._segmenter.flush()]
        return [self._close_window(partial=True)] if self._pending else []

    def window_in_progress(self) -> tuple[int, float, float] | None:
        """Uniform mode: the index and the time prompt's seconds of the window the next frame goes into, as it will
        close once full (a partial last window, flushed, ends earlier); None by scene or before the start is known."""
        if self._segmenter is not None or self.start is None:
            return None
        start, end = self._window_times(self.next_index)
        return self.next_index, _whole_seconds(start), _whole_seconds(end)

    def _window_times(self, index: int) -> tuple[float, float]:
        seconds = self.frames_per_clip / self.fps
        start = self.start + index * seconds
        return start, start + seconds

    def _check(self, frame: Frame) -> None:
        validate_frame(frame.pixels)
        if self._last_time is not None and frame.timestamp < self._last_time:
            raise FrameError(f"frame timestamp {frame.timestamp:.3f}s goes back from {self._last_time:.3f}s")

    def _close_window(self, *, partial: bool) -> ClipWindow:
        frames, self._pending = self._pending, []
        start, end = self._window_times(self.next_index)
        if partial:
            end = frames[-1].timestamp
        frames = frames + [frames[-1]] * (self.frames_per_clip - len(frames))  # the model takes exactly 16
        return self._window(frames, start, end)

    def _scene_window(self, scene: list[Frame]) -> ClipWindow:
        half_interval = 0.5 / self.fps
        start, end = scene[0].timestamp - half_interval, scene[-1].timestamp + half_interval
        return self._window(resample_scene(scene, self.frames_per_clip), start, end)

    def _window(self, frames: list[Frame], start: float, end: float) -> ClipWindow:
        window = ClipWindow(self.next_index, _whole_seconds(start), _whole_seconds(end), tuple(frames))
        self.next_index += 1
        return window


def _whole_seconds(seconds: float) -> float:
    return round(seconds) + 0.0  # + 0.0 turns -0.0 (from a start a hair below zero) into 0.0
