"""Synthetic, deterministic test videos: a few scenes, each a flat background of its own colour with a bouncing
square and a frame counter, so sampling, uniform windows and scene cuts can be checked without real footage.

    python -m dispider_vllm.video.synth OUT.mp4 --seconds 48
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from dispider_vllm.types import Frame

# Backgrounds far apart in colour, so every scene change is a clear cut.
PALETTE = (
    (200, 40, 40),
    (40, 160, 60),
    (40, 60, 200),
    (220, 200, 40),
    (160, 40, 180),
    (40, 190, 190),
    (230, 130, 30),
    (30, 30, 30),
)
SHAPE_COLOUR = (245, 245, 245)
TEXT_COLOUR = (255, 255, 255)
ENCODERS = ("libx264", "mpeg4")  # H.264 when the bundled FFmpeg has it


def scene_starts(seconds: float, scenes: int) -> list[float]:
    """Start time of each scene: the video is cut into ``scenes`` equal parts."""
    return [seconds * i / scenes for i in range(scenes)]


def iter_test_frames(
    *, seconds: float = 48, fps: float = 4, size: tuple[int, int] = (320, 240), scenes: int = 3, seed: int = 0
) -> Iterator[Frame]:
    """Yield the frames of the synthetic video at ``n / fps`` seconds, RGB uint8 [height, width, 3]."""
    if seconds <= 0 or fps <= 0 or scenes < 1:
        raise ValueError("need seconds > 0, fps > 0 and scenes >= 1")
    width, height = size
    rng = np.random.default_rng(seed)
    colours = [PALETTE[i % len(PALETTE)] for i in rng.permutation(max(scenes, len(PALETTE)))][:scenes]
    side = max(4, height // 6)
    position = rng.uniform([0, 0], [width - side, height - side])
    velocity = rng.uniform(40, 80, size=2) * rng.choice([-1, 1], size=2)  # pixels per second
    count = int(round(seconds * fps))
    for n in range(count):
        scene = min(int(n * scenes / count), scenes - 1)
        position, velocity = _bounce(position + velocity / fps, velocity, (width - side, height - side))
        yield Frame(timestamp=n / fps, pixels=_draw(size, colours[scene], position, side, n))


def make_test_frames(
    *, seconds: float = 48, fps: float = 4, size: tuple[int, int] = (320, 240), scenes: int = 3, seed: int = 0
) -> list[Frame]:
    """The synthetic video's frames in memory (e.g. to push to a live stream)."""
    return list(iter_test_frames(seconds=seconds, fps=fps, size=size, scenes=scenes, seed=seed))


def make_test_video(
    path: str | os.PathLike,
    *,
    seconds: float = 48,
    fps: float = 4,
    size: tuple[int, int] = (320, 240),
    scenes: int = 3,
    seed: int = 0,
) -> Path:
    """Write the synthetic video as an MP4 (H.264, or MPEG-4 part 2 without libx264); returns the path.

    The same arguments give the same frames; width and height must be even (4:2:0 chroma).
    """
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {width}x{height}")
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(_encoder(), rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1  # single-threaded encoding keeps the bytes reproducible
        for n, frame in enumerate(iter_test_frames(seconds=seconds, fps=fps, size=size, scenes=scenes, seed=seed)):
            video_frame = av.VideoFrame.from_ndarray(frame.pixels, format="rgb24")
            video_frame.pts, video_frame.time_base = n, 1 / rate
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))  # drain the encoder
    return path


def _encoder() -> str:
    for name in ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except av.FFmpegError:  # the bundled FFmpeg was built without it
            continue
    raise RuntimeError(f"none of the encoders {ENCODERS} is available in PyAV's FFmpeg")


def _bounce(position: np.ndarray, velocity: np.ndarray, limit: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Reflect the square off the frame edges."""
    limit_array = np.asarray(limit, dtype=float)
    velocity = np.where((position < 0) | (position > limit_array), -velocity, velocity)
    return np.clip(position, 0, limit_array), velocity


def _draw(size: tuple[int, int], background: tuple[int, int, int], position: np.ndarray, side: int, n: int):
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in position)
    draw.rectangle((x, y, x + side - 1, y + side - 1), fill=SHAPE_COLOUR)
    draw.text((4, 4), f"{n:05d}", fill=TEXT_COLOUR)
    return np.asarray(image)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dispider_vllm.video.synth",
        description="Write a deterministic synthetic test video: flat-colour scenes, a bouncing square, a counter.",
    )
    parser.add_argument("out", help="output .mp4 path")
    parser.add_argument("--seconds", type=float, default=48, help="length in seconds (default 48)")
    parser.add_argument("--fps", type=float, default=4, help="frame rate (default 4)")
    parser.add_argument("--width", type=int, default=320, help="even width in pixels (default 320)")
    parser.add_argument("--height", type=int, default=240, help="even height in pixels (default 240)")
    parser.add_argument("--scenes", type=int, default=3, help="number of equal-length scenes (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for colours and motion (default 0)")
    args = parser.parse_args(argv)
    path = make_test_video(
        args.out, seconds=args.seconds, fps=args.fps, size=(args.width, args.height), scenes=args.scenes, seed=args.seed
    )
    print(f"wrote {path} ({args.seconds:g} s at {args.fps:g} fps, {args.scenes} scenes)")


if __name__ == "__main__":
    main()
