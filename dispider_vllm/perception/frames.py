"""Frames in: decode videos and pushed images, sample them at a fixed rate, and preprocess them for CLIP.

DISPIDER.md section 2 fixes what the model expects:

- streaming sampling keeps, in every window, the frame nearest to ``start + (k + 0.5) / fps`` (1 fps);
- a non-square frame is squashed (nearest-neighbour, no crop) to ``min(H, W)`` square, then the vision tower's
  ``CLIPImageProcessor`` runs: bicubic resize of the shortest edge, center crop, ``/255``, CLIP mean/std.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from dispider_vllm.types import EncodedFrame, Frame

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

MIN_FRAME_SIDE = 16
MAX_FRAME_SIDE = 4096

# Only plain media containers: playlist-like demuxers (hls, concat, dash, ...) would open other files or URLs
# named inside an uploaded file. FFmpeg matches these names against each demuxer's comma-separated aliases.
ALLOWED_DEMUXERS = "mov,mp4,matroska,webm,avi,mpegts,mpeg,flv,ogg,asf,gif,ivf"

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
JPEG_MAGIC = b"\xff\xd8"

# CLIP ViT-L/14 defaults (OpenAI CLIP's preprocessing, as in its preprocessor_config.json), used when the
# checkpoint's vision tower does not give its own.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


class VideoError(ValueError):
    """A video that cannot be opened or decoded (corrupt, unsupported, too large, missing)."""


class FrameError(ValueError):
    """A pushed frame that cannot be used (corrupt image, wrong shape or dtype, time going backwards)."""


# ----------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class VideoInfo:
    duration: float | None  # seconds; None when the container does not say
    fps: float | None
    width: int
    height: int
    codec: str


def probe_video(source: VideoSource, *, max_bytes: int | None = None) -> VideoInfo:
    """Read a video's header: duration, frame rate, size and codec, without decoding frames."""
    with _open_container(source, max_bytes) as container:
        stream = _video_stream(container)
        return VideoInfo(
            duration=_duration_seconds(container, stream),
            fps=float(stream.average_rate) if stream.average_rate else None,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
        )


def decode_video(source: VideoSource, *, max_bytes: int | None = None) -> Iterator[Frame]:
    """Decode every frame of a video as RGB uint8 with its time in seconds from the stream start.

    ``source`` is a local path, the raw bytes of a file, or a binary file-like object. The container is opened
    (and a bad file rejected with :class:`VideoError`) before this returns; frames are decoded lazily.
    ``max_bytes`` refuses larger inputs up front.
    """
    container = _open_container(source, max_bytes)
    try:
        stream = _video_stream(container)
    except VideoError:
        container.close()
        raise
    return _iter_frames(container, stream)


def _iter_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Iterator[Frame]:
    stream.thread_type = "AUTO"  # frame-parallel decoding
    origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    fps = float(stream.average_rate or stream.guessed_rate or 0) or None
    try:
        for index, frame in enumerate(container.decode(stream)):
            if frame.pts is not None and frame.time_base is not None:
                timestamp = float(frame.pts * frame.time_base) - origin
            elif fps:
                timestamp = index / fps  # no timestamps in the stream: assume a constant rate
            else:
                raise VideoError("the video has neither frame timestamps nor a frame rate")
            yield Frame(timestamp=timestamp, pixels=frame.to_ndarray(format="rgb24"))
    except av.FFmpegError as error:
        raise VideoError(f"video could not be decoded: {_describe(error)}") from None
    finally:
        container.close()


def _open_container(source: VideoSource, max_bytes: int | None) -> av.container.InputContainer:
    options = {"format_whitelist": ALLOWED_DEMUXERS}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise VideoError(f"no such video file: {os.fspath(source)}")
        _check_size(path.stat().st_size, max_bytes)
        target: str | BinaryIO = str(path)
        options["protocol_whitelist"] = "file"  # a path, never a URL
    elif isinstance(source, (bytes, bytearray, memoryview)):
        _check_size(len(source), max_bytes)
        target = io.BytesIO(source)
    elif hasattr(source, "read"):
        target = _bounded_file(source, max_bytes)
    else:
        raise TypeError(f"a video source is a path, bytes or a binary file object, not {type(source).__name__}")
    try:
        return av.open(target, mode="r", options=options)
    except av.FFmpegError as error:
        raise VideoError(f"not a readable video (corrupt, or not an accepted container): {_describe(error)}") from None


def _bounded_file(file: BinaryIO, max_bytes: int | None) -> BinaryIO:
    if max_bytes is None:
        return file
    if file.seekable():
        here = file.tell()
        size = file.seek(0, io.SEEK_END) - here
        file.seek(here)
        _check_size(size, max_bytes)
        return file
    data = file.read(max_bytes + 1)  # a stream of unknown length: read at most one byte past the limit
    _check_size(len(data), max_bytes)
    return io.BytesIO(data)


def _check_size(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise VideoError(f"video is {size} bytes, over the limit of {max_bytes} bytes")
    if size == 0:
        raise VideoError("video is empty")


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoError(f"the {container.format.name} file has no video stream")
    return container.streams.video[0]


def _duration_seconds(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _describe(error: av.FFmpegError) -> str:
    return error.strerror or type(error).__name__


# ------------------------------------------------------------------------------------------- live frames


def decode_image(data: bytes) -> np.ndarray:
    """Decode a pushed JPEG, PNG or WebP frame to RGB uint8 [H, W, 3] (EXIF rotation applied)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            _check_side_lengths(image.width, image.height)  # before decoding: refuse huge images cheaply
            image = ImageOps.exif_transpose(image).convert("RGB")
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as error:
        raise FrameError(f"not a readable JPEG/PNG/WebP image: {error}") from None
    return validate_frame(pixels)


def check_image_header(data: bytes) -> tuple[int, int]:
    """A pushed image's (width, height) from its header alone (~20 us: nothing is decoded). Raises FrameError for
    what ``decode_image`` would refuse up front: not a JPEG/PNG/WebP, or a side out of range. A body that breaks
    after a good header is only found when the image is decoded."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            _check_side_lengths(image.width, image.height)
            return image.width, image.height
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as error:
        raise FrameError(f"not a readable JPEG/PNG/WebP image: {error}") from None


def with_pixels(frame: Frame | EncodedFrame) -> Frame:
    """The frame with its pixels: an encoded one decoded (FrameError when its image does not decode)."""
    if isinstance(frame, EncodedFrame):
        return Frame(frame.timestamp, decode_image(frame.data))
    return frame


def decode_frames(frames: Sequence[Frame | EncodedFrame]) -> list[Frame | EncodedFrame]:
    """The frames with the encoded ones decoded: the JPEGs in one call into torchvision (libjpeg-turbo, the GIL
    released once for all of them instead of at each step of Pillow's per-image Python), any other image with
    Pillow. One that does not decode comes back still encoded, for ``with_pixels`` to fail in its place."""
    jpegs = [i for i, frame in enumerate(frames) if isinstance(frame, EncodedFrame) and frame.data[:2] == JPEG_MAGIC]
    out = list(frames)
    for i, pixels in zip(jpegs, _decode_jpegs([frames[i].data for i in jpegs])):
        if pixels is not None:
            out[i] = Frame(frames[i].timestamp, pixels)
    for i, frame in enumerate(out):
        if isinstance(frame, EncodedFrame):
            with contextlib.suppress(FrameError):
                out[i] = with_pixels(frame)
    return out


def _decode_jpegs(images: list[bytes]) -> list[np.ndarray | None]:
    """RGB uint8 [H, W, 3] per JPEG (EXIF rotation applied), None for one torchvision cannot decode (Pillow then
    has its go, and says why). A batch that fails as a whole is decoded one by one."""
    if not images:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg  # with vLLM on every platform it runs on

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:
        if len(images) == 1:
            return [None]
        return [pixels for data in images for pixels in _decode_jpegs([data])]
    return [_checked_hwc(chw) for chw in decoded]


def _checked_hwc(chw: torch.Tensor) -> np.ndarray | None:
    try:
        return validate_frame(np.ascontiguousarray(chw.permute(1, 2, 0).numpy()))
    except FrameError:
        return None


def validate_frame(pixels: np.ndarray) -> np.ndarray:
    """Check a frame is RGB uint8 [H, W, 3] with sides in [16, 4096]; returns it unchanged."""
    if not isinstance(pixels, np.ndarray):
        raise FrameError(f"a frame is a numpy array, not {type(pixels).__name__}")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise FrameError(f"a frame is [H, W, 3] RGB, got shape {list(pixels.shape)}")
    if pixels.dtype != np.uint8:
        raise FrameError(f"a frame is uint8, got {pixels.dtype}")
    _check_side_lengths(pixels.shape[1], pixels.shape[0])
    return pixels


def _check_side_lengths(width: int, height: int) -> None:
    if not (MIN_FRAME_SIDE <= width <= MAX_FRAME_SIDE and MIN_FRAME_SIDE <= height <= MAX_FRAME_SIDE):
        raise FrameError(f"frame is {width}x{height}; each side must be {MIN_FRAME_SIDE}..{MAX_FRAME_SIDE} px")


# ---------------------------------------------------------------------------------------------- sampling


class FrameSampler:
    """Per-stream resampler to a fixed rate: for each target time ``start + (k + 0.5) / fps`` it keeps the
    nearest frame (the earlier one on a tie).

    It is streaming: a target is decided as soon as a frame at or past it arrives, from that frame and the one
    before it. When frames are sparser than ``fps``, one frame fills several targets, so every window still
    gets its full count. ``start`` defaults to the first frame's timestamp.
    """

    def __init__(self, fps: float = 1.0, *, start: float | None = None):
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.start = start
        self._taken = 0  # targets already filled
        self._previous: Frame | None = None

    @property
    def next_target(self) -> float | None:
        """The time of the next sample to fill, once ``start`` is known."""
        return None if self.start is None else self.start + (self._taken + 0.5) / self.fps

    def push(self, frame: Frame) -> list[Frame]:
        """Feed the next frame; returns the sampled frames it decided (zero, one or several).

        A bad frame (shape, dtype, size, time going back) raises :class:`FrameError` and changes nothing.
        """
        validate_frame(frame.pixels)  # before it can be picked: a sample slot is never spent on a bad frame
        if not math.isfinite(frame.timestamp):
            raise FrameError(f"frame timestamp must be finite, got {frame.timestamp}")
        if self._previous is not None and frame.timestamp < self._previous.timestamp:
            raise FrameError(
                f"frame timestamp {frame.timestamp:.3f}s goes back from {self._previous.timestamp:.3f}s"
            )
        if self.start is None:
            self.start = frame.timestamp
        sampled = []
        while frame.timestamp >= (target := self.next_target):
            sampled.append(self._nearer(self._previous, frame, target))
            self._taken += 1
        self._previous = frame
        return sampled

    @staticmethod
    def _nearer(before: Frame | None, after: Frame, target: float) -> Frame:
        if before is not None and target - before.timestamp <= after.timestamp - target:
            return before
        return after


# ----------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class PreprocessorConfig:
    """What a ``CLIPImageProcessor`` does to a square frame: resize the shortest edge, center crop, rescale,
    normalise. Defaults are OpenAI CLIP ViT-L/14-224's."""

    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    shortest_edge: int = CLIP_SIZE
    crop_height: int = CLIP_SIZE
    crop_width: int = CLIP_SIZE
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, config: dict) -> PreprocessorConfig:
        """Read a ``preprocessor_config.json`` dict; keys it lacks keep the CLIP defaults. ``size`` and
        ``crop_size`` may be ints (old files) or dicts (``shortest_edge`` / ``height`` + ``width``)."""
        size = config.get("size", CLIP_SIZE)
        shortest_edge = size if isinstance(size, int) else size.get("shortest_edge", min(size.values()))
        crop = config.get("crop_size", shortest_edge)
        crop_height, crop_width = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        return cls(
            image_mean=tuple(config.get("image_mean", CLIP_MEAN)),
            image_std=tuple(config.get("image_std", CLIP_STD)),
            shortest_edge=int(shortest_edge),
            crop_height=int(crop_height),
            crop_width=int(crop_width),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
        )


def load_preprocessor_config(path: str | os.PathLike) -> PreprocessorConfig:
    """Load ``preprocessor_config.json`` (the file, or a directory holding it, e.g. the vision-tower dir)."""
    path = Path(path)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    return PreprocessorConfig.from_dict(json.loads(path.read_text()))


def preprocess_frames(
    frames: Sequence[np.ndarray],
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
    size: int = CLIP_SIZE,
    *,
    crop_size: int | tuple[int, int] | None = None,
    rescale_factor: float = 1 / 255,
) -> torch.Tensor:
    """RGB uint8 frames [H, W, 3] -> float32 [n, 3, crop, crop] for the CLIP tower.

    Each frame is squashed to ``min(H, W)`` square (nearest neighbour, no crop), then treated as the
    ``CLIPImageProcessor`` of transformers 5 does: shortest edge resized to ``size`` (bicubic, antialiased, on
    uint8), center crop to ``crop_size`` (default ``size``), rescale, normalise. Frames of one size form one batch.
    """
    crop = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size or (size, size)
    return normalize_frames(resize_frames(frames, size, crop), image_mean, image_std, rescale_factor)


def resize_frames(frames: Sequence[np.ndarray], size: int, crop: tuple[int, int]) -> torch.Tensor:
    """The costly half of preprocessing: squash, resize, center crop -> uint8 [n, 3, crop_h, crop_w].

    Done per frame as frames arrive (a quarter of the float result's bytes), so closing a clip only normalises."""
    if not frames:
        raise ValueError("no frames to preprocess")
    out = torch.empty(len(frames), 3, crop[0], crop[1], dtype=torch.uint8)
    squares = [_squash_to_square(frame) for frame in frames]
    for indices in _group_by_shape(squares).values():
        batch = torch.from_numpy(np.stack([squares[i] for i in indices])).permute(0, 3, 1, 2)
        out[indices] = _center_crop(_resize_shortest_edge(batch, size), crop)
    return out


def normalize_frames(resized: torch.Tensor, image_mean: Sequence[float] = CLIP_MEAN,
                     image_std: Sequence[float] = CLIP_STD, rescale_factor: float = 1 / 255) -> torch.Tensor:
    """uint8 [n, 3, h, w] from :func:`resize_frames` -> the CLIP tower's float32 input: rescale, normalise (on the
    tensor's device)."""
    mean, std = _channel_constants(tuple(image_mean), tuple(image_std), resized.device)
    return (resized.float() * rescale_factor - mean) / std


def preprocess_with_config(frames: Sequence[np.ndarray], config: PreprocessorConfig) -> torch.Tensor:
    return normalize_with_config(resize_with_config(frames, config), config)


def resize_with_config(frames: Sequence[np.ndarray], config: PreprocessorConfig) -> torch.Tensor:
    return resize_frames(frames, config.shortest_edge, (config.crop_height, config.crop_width))


def normalize_with_config(resized: torch.Tensor, config: PreprocessorConfig) -> torch.Tensor:
    return normalize_frames(resized, config.image_mean, config.image_std, config.rescale_factor)


def _group_by_shape(frames: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, frame in enumerate(frames):
        groups.setdefault(frame.shape, []).append(index)
    return groups


def _squash_to_square(frame: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> [S, S, 3], S = min(H, W), with PIL's nearest-neighbour resize (what PIL-based loaders do)."""
    height, width = frame.shape[:2]
    if height == width:
        return frame
    side = min(height, width)
    return np.asarray(Image.fromarray(frame).resize((side, side), Image.Resampling.NEAREST))


def _resize_shortest_edge(batch: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> uint8 [n, 3, h, w] with min(h, w) = size.

    torch's uint8 bicubic antialiased kernel is the one torchvision (so the image processor) uses: same output.
    """
    new_size = _shortest_edge_size(batch.shape[-2:], size)
    if tuple(batch.shape[-2:]) == new_size:
        return batch
    return F.interpolate(batch, size=new_size, mode="bicubic", antialias=True, align_corners=False)


def _shortest_edge_size(shape: Sequence[int], size: int) -> tuple[int, int]:
    height, width = shape
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)  # as transformers' get_resize_output_image_size
    return (size, new_long) if height <= width else (new_long, size)


def _center_crop(batch: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    height, width = batch.shape[-2:]
    crop_height, crop_width = crop
    if height < crop_height or width < crop_width:
        raise ValueError(f"cannot crop {crop_height}x{crop_width} from a {height}x{width} image")
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return batch[..., top : top + crop_height, left : left + crop_width]


# ------------------------------------------------------------------------------ preprocessing on the device


def preprocess_on_device(frames: torch.Tensor, config: PreprocessorConfig) -> torch.Tensor:
    """RGB uint8 frames [n, H, W, 3] of one size, on any device -> float32 [n, 3, crop_h, crop_w] on that device:
    :func:`preprocess_with_config` as tensor kernels, so a GPU sidecar's host only stacks and copies uint8 frames.

    The squash gathers the rows and columns PIL's nearest-neighbour resize picks (the same pixels). The resize runs
    the float bicubic antialiased kernel one axis at a time, width then height, rounded to uint8 levels after each
    pass as the host's uint8 kernel does: at most 2 levels (of 255) from the host's values, on under 1% of them
    for random-noise frames (the host kernel's fixed-point weights), fewer on video."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [n, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    batch = frames.permute(0, 3, 1, 2)
    height, width = batch.shape[-2:]
    if height != width:
        side = min(height, width)
        batch = batch.index_select(2, _nearest_sources(height, side, batch.device))
        batch = batch.index_select(3, _nearest_sources(width, side, batch.device))
    resized = _resize_shortest_edge_in_levels(batch.float(), config.shortest_edge)
    cropped = _center_crop(resized, (config.crop_height, config.crop_width))
    mean, std = _channel_constants(config.image_mean, config.image_std, cropped.device)
    return (cropped * config.rescale_factor - mean) / std


def _resize_shortest_edge_in_levels(batch: torch.Tensor, size: int) -> torch.Tensor:
    """float [n, 3, H, W] holding uint8 levels -> the same with min(h, w) = size, as :func:`_resize_shortest_edge`."""
    height, width = batch.shape[-2:]
    new_height, new_width = _shortest_edge_size((height, width), size)
    if new_width != width:
        batch = _bicubic_levels(batch, (height, new_width))
    if new_height != height:
        batch = _bicubic_levels(batch, (new_height, new_width))
    return batch


def _bicubic_levels(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    resized = F.interpolate(batch, size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255)


@functools.lru_cache(maxsize=64)
def _nearest_sources(length: int, new_length: int, device: torch.device) -> torch.Tensor:
    """The source index of each output position of PIL's nearest-neighbour resize from ``length`` to
    ``new_length`` (PIL resizes an index ramp), kept on ``device``: no host-to-device copy per batch."""
    ramp = np.arange(length, dtype=np.int32)[None, :]
    picked = np.asarray(Image.fromarray(ramp).resize((new_length, 1), Image.Resampling.NEAREST))[0]
    return torch.from_numpy(picked.astype(np.int64)).to(device)


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std as [1, 3, 1, 1] float32 on ``device``, made once (a fresh one per batch on a GPU would
    be a blocking copy)."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))
